"""The callables the solm Dynamo backend hands back to Dynamo (``dynamo.py``): each call asks the
``PolicyController`` for the controls, runs the compiled graph and gives the controller the hidden state.

``_Dense`` is for graphs whose controls are dense on every call (a dense budget, no policy, or no LM head for the
policy to read): it runs the graph inductor compiles from Dynamo's graph unchanged, since the gated ops at dense
controls compute exactly what the original ops do, and only keeps the controller's books (calls, history). Measured
on SmolLM2 at context 1024/2048 (one thread): the gated graph at a dense budget ran at 0.87×/0.92× inductor —
the custom ops' dispatch and inductor's lost fusions across them — where this path runs inductor's own graph.
"""

from __future__ import annotations

import torch

from solm_compile.ops.fast_c import carrying


class _Dense:
    """The compiled callable for a graph that is dense on every call: inductor's graph, the controller's books."""

    def __init__(self, fn, ids_arg: int, past_arg: int | None, ctl):
        self.fn, self.ids_arg, self.past_arg, self.ctl = fn, ids_arg, past_arg, ctl

    def __call__(self, *args):
        past_len = int(args[self.past_arg].shape[-2]) if self.past_arg is not None else 0
        with self.ctl._lock:
            self.ctl.before(args[self.ids_arg], past_len, False)
        return self.fn(*args)


class _Gated:
    """The compiled callable Dynamo gets for a gated graph."""

    def __init__(self, fn, keep, ids_pos, past_pos, n_out, with_hidden, ctl, fallback):
        self.fn, self.keep, self.ids_pos, self.past_pos = fn, keep, ids_pos, past_pos
        self.n_out, self.with_hidden, self.ctl, self.fallback = n_out, with_hidden, ctl, fallback
        self.failed = False

    def __call__(self, *args):
        if self.failed:
            return self.fallback(*args)
        dyn = [args[i] for i in self.keep]
        ids = dyn[self.ids_pos]
        past_len = int(dyn[self.past_pos].shape[-2]) if self.past_pos is not None else 0
        with torch.no_grad():
            with self.ctl._lock:
                kappa, rho, bits = self.ctl.before(ids, past_len, self.with_hidden)
                try:
                    with carrying(self.ctl.page_states, id(self)):
                        out = self.fn(*dyn, kappa, rho, bits)
                except Exception as e:  # noqa: BLE001 - a run-time compile failure must not end generation
                    self.ctl.reset()
                    self.failed = True
                    from solm_compile.backend.once import warn_once as _warn_once

                    _warn_once("run-fallback", f"solm: the gated graph failed at run time ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:200] if str(e) else ''}); running it uncompiled")
                    return self.fallback(*args)
                if self.with_hidden:
                    self.ctl.after(out[-1])
        return tuple(out[:self.n_out])
