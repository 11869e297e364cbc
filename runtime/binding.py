"""One artifact run through an IO binding that lives on between runs (``SolmSession._run``'s engine).

A decode step feeds ~126 inputs, of which only the ids, the positions and ``past_length`` change: the KV cache and
the page state are buffers written in place (runtime/kv.py), fed as the same OrtValues step after step. Binding all
of them anew each run cost ~0.25 ms of Python per SmolLM2 step; ``KeptBinding`` keeps the binding while the caller
runs on the same ``feeds`` dict (per thread) and binds again only the inputs whose OrtValue changed. Outputs that are
not buffers are bound afresh every run, so each run returns new OrtValues for them.
"""

from __future__ import annotations

import threading


class KeptBinding:
    """Runs ``sess`` on feeds dicts. ``names``/``outputs``: the graph's inputs and outputs in order; ``optional``:
    inputs bound only when fed; ``alias``: {present output: past input} of the buffers written in place;
    ``devices``: output name -> where a non-buffer output is bound."""

    def __init__(self, sess, names: list[str], outputs: list[str], optional: list[str], alias: dict, devices: dict):
        self.sess, self.names, self.outputs, self.optional = sess, names, outputs, optional
        self.alias, self.buffers, self.devices = alias, set(alias.values()), devices
        self._local = threading.local()

    def run(self, feeds: dict) -> dict:
        """One run: numpy or OrtValue inputs in, {output name: OrtValue} out (no copy to numpy); a buffer's output
        is its input's OrtValue."""
        import onnxruntime as ort

        names = self.names + [name for name in self.optional if name in feeds]   # left out: the empty default
        kept = getattr(self._local, "last", None)
        if kept is None or kept[0] is not feeds or kept[1] != names:
            kept = (feeds, names, self.sess.io_binding(), {})
            self._local.last = kept
        _, _, binding, bound = kept
        for name in names:
            v = feeds[name]
            if not isinstance(v, ort.OrtValue):
                v = ort.OrtValue.ortvalue_from_numpy(v)
                if name in self.buffers:                 # keep the buffer's OrtValue: the output is bound to it
                    feeds[name] = v
            if bound.get(name) is not v:
                binding.bind_ortvalue_input(name, v)
                bound[name] = v
        for name in self.outputs:                        # in output order: get_outputs() returns them so
            if name in self.alias:
                v = feeds[self.alias[name]]
                if bound.get(("out", name)) is not v:
                    binding.bind_ortvalue_output(name, v)
                    bound[("out", name)] = v
            else:
                binding.bind_output(name, self.devices[name])
        self.sess.run_with_iobinding(binding)
        return self._outputs(binding, feeds)

    def _outputs(self, binding, feeds: dict) -> dict:
        """{output name: OrtValue}: a buffer's output is its input's OrtValue (the one bound to it), the others
        wrapped from the binding. ``IOBinding.get_outputs()`` wraps every output in a Python ``OrtValue``, ~120 of
        them a SmolLM2 step of which all but the logits are buffers: ~0.2 ms of the step, so only the others are
        wrapped here (from the binding's own list, where onnxruntime's Python API has it)."""
        import onnxruntime as ort

        raw = getattr(binding, "_iobinding", None)
        if raw is None:                                  # an onnxruntime without it: the public, slower way
            return dict(zip(self.outputs, binding.get_outputs()))
        values = raw.get_outputs()              # indexed, not iterated: an element by index is a copy of the value
        return {name: feeds[self.alias[name]] if name in self.alias else ort.OrtValue(values[i])  # (iteration
                for i, name in enumerate(self.outputs)}                  # yields views the next run overwrites)

    def release(self) -> None:
        """Drop this thread's kept binding and with it its hold on the last feeds' buffers."""
        self._local.last = None
