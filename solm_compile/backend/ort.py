"""``runtime="onnxruntime"`` for the solm Dynamo backend: the gated graph run by onnxruntime instead of inductor.

``dynamo._lower_and_gate`` gates a graph with the same passes whatever the runtime; with this runtime it hands
the gated GraphModule (its inputs: Dynamo's kept tensors, then κ, ρ, bits [B]; its outputs: Dynamo's, then the
last hidden state the controller reads) to ``compile_ort`` before the torch-only rewrites (the gather kernels have
no ONNX form)::

    gated GraphModule ──torch.onnx.export(dynamo=True, onnx_ops.translation_table)──► <tmp>/<key>.onnx
        (dynamic axes: the dims ``prep.dynamic`` marks — KV length, sequence, batch — and the controls' batch)
    ──► onnxruntime.InferenceSession (SolmEP in front of the CPU EP; intra-op threads = torch.get_num_threads())
    ──► ``OrtGraph``: torch tensors → numpy (zero-copy for contiguous CPU tensors), run, numpy → torch tensors
        in the graph's flat output tuple, so ``dynamo_run._Gated`` and transformers' cache handling are unchanged.

SolmEP or not is decided as ``solm compile`` decides: when ``runtime.ep.register()`` fails (library not built,
onnxruntime too old) the custom ops are exported in their portable form (standard ONNX ops, same semantics),
with one warning saying why. Exported models and their sessions are cached per process by a key of the graph's
code, its input specs, its constants' identity (storage, version) and the flavour, so a recompile that produces
the same graph (``torch._dynamo.reset()``, a second controller) reuses the session; at most ``CACHE_SIZE`` are
kept and the temporary directory is removed at exit. Anything that fails here (an int or bfloat16 input, an
export error, a session that will not load) returns None with one warning naming the reason, and the caller
runs the torch runtime.

The ONNX model holds its own copy of the weights, taken at export: a session does not see later in-place edits
of the model's parameters (a recompile after one exports anew: the key changes), and the weights are held twice
in memory. Hugging Face passes ``is_causal=True`` rather than a mask in prefill graphs; the ONNX translation takes
masks only, so the exported copy of the graph gets the same mask explicitly (``_explicit_causal``).

Graphs that are dense on every call (a dense budget, no policy) are not exported: they run inductor's own graph
(``dynamo_run._Dense``) whatever the runtime. The session runs on the CPU: a graph with inputs on another
device, or of a dtype numpy lacks (bfloat16), runs the torch runtime.

Measured on SmolLM2 (κ̄ = ρ̄ = 0.5 at 16 bits, shipped policy, one thread, 2 busy cores; 5 × 16 teacher-forced
decode steps interleaved with the torch runtime, medians, one run each): 47 / 59 ms per token at context
1024 / 2048 against 88 / 99 for the torch runtime (gather kernels + inductor), the same actions. Compile + prefill
+ 3 warm steps took 89 / 98 s (two exports) against 69 / 106 s for inductor.
"""

from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

aten = torch.ops.aten

CACHE_SIZE = 16
_CACHE: "OrderedDict[str, OrtGraph]" = OrderedDict()
_LOCK = threading.Lock()
_DIR: Path | None = None


class OrtGraph:
    """The callable for one exported graph: flat torch inputs in, the graph's flat output tuple out."""

    def __init__(self, sess, in_names: list[str], n_args: int, path: Path, portable: bool):
        self.sess, self.path, self.portable = sess, path, portable
        present = {i.name for i in sess.get_inputs()}           # the exporter may drop an unused input
        self.feed = [(name, i) for i, name in enumerate(in_names[:n_args]) if name in present]
        self.out_names = [o.name for o in sess.get_outputs()]
        self.runs = 0

    @property
    def providers(self) -> list[str]:
        return self.sess.get_providers()

    def __call__(self, *args):
        feeds = {name: _numpy(args[i]) for name, i in self.feed}
        outs = self.sess.run(self.out_names, feeds)
        self.runs += 1
        return tuple(torch.from_numpy(o) for o in outs)


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().numpy()        # a view of the tensor's memory when it is contiguous already


def _dir() -> Path:
    global _DIR
    if _DIR is None:
        _DIR = Path(tempfile.mkdtemp(prefix="solm-ort-"))
        atexit.register(shutil.rmtree, _DIR, True)
    return _DIR


def _key(gm: fx.GraphModule, examples, dynamic, portable: bool) -> str:
    h = hashlib.sha256(gm.code.encode())
    for ex, dyn in zip(examples, dynamic):
        dims = [-1 if dyn and d in dyn else s for d, s in enumerate(ex.shape)]
        h.update(f"{ex.dtype}{dims};".encode())
    for name, t in (*gm.named_parameters(), *gm.named_buffers()):
        h.update(f"{name}{t.dtype}{tuple(t.shape)}{t.data_ptr()}{t._version};".encode())
    h.update(b"portable" if portable else b"custom")
    return h.hexdigest()[:24]


def _use_portable() -> tuple[bool, str]:
    """(export the portable form?, why): SolmEP registered → custom ``ai.solm`` nodes, else portable."""
    from solm_compile.runtime import ep

    with warnings.catch_warnings(record=True) as why:
        warnings.simplefilter("always")
        available = ep.register()
    if available:
        return False, ""
    return True, str(why[0].message) if why else "SolmEP is not available"


def _check_inputs(examples) -> None:
    for i, ex in enumerate(examples):
        if not isinstance(ex, torch.Tensor):
            raise NotImplementedError(f"input {i} is a Python int, not a tensor")
        if ex.dtype in (torch.bfloat16, torch.complex32) or ex.device.type != "cpu":
            raise NotImplementedError(f"input {i} is {ex.dtype} on {ex.device} (CPU numpy dtypes only)")


def _explicit_causal(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph (sharing gm's weights) with each ``quest_attention(is_causal=True)`` given the same mask
    explicitly, SDPA's top-left rule ``key j <= query i``: the ONNX translation takes masks only. Hugging Face
    passes ``is_causal`` in multi-token (prefill) calls, which the gate keeps dense."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for n in list(graph.nodes):
        if n.target is not torch.ops.solm.quest_attention.default or len(n.args) < 7 or not n.args[6] \
                or n.args[3] is not None:
            continue
        q, k = n.args[0], n.args[1]
        val = q.meta.get("val")
        dev = val.device if isinstance(val, torch.Tensor) else torch.device("cpu")
        with graph.inserting_before(n):
            rows, cols = (graph.call_function(aten.arange.default, (graph.call_function(aten.sym_size.int, (x, 2)),),
                                              {"dtype": torch.long, "device": dev}) for x in (q, k))
            mask = graph.call_function(aten.le.Tensor, (graph.call_function(aten.unsqueeze.default, (cols, 0)),
                                                        graph.call_function(aten.unsqueeze.default, (rows, 1))))
        n.args = (*n.args[:3], mask, n.args[4], n.args[5], False, *n.args[7:])
    graph.lint()
    return fx.GraphModule(gm, graph).eval()      # (export warns about a module in training mode)


def export_graph(gm: fx.GraphModule, args: tuple, dynamic: tuple, portable: bool, path: Path) -> list[str]:
    """torch.onnx.export the gated graph with the project's translation table; returns the input names."""
    from solm_compile.ops.onnx_export import export
    from solm_compile.ops.to_onnx import translation_table

    names = [f"in_{i}" for i in range(len(args))]
    export(gm, args, translation_table(portable), dynamic, names).save(str(path))
    return names


def open_session(path: Path, portable: bool):
    import onnxruntime as ort

    from solm_compile.runtime.session import session_options

    so = session_options(ort, max(1, torch.get_num_threads()))
    if not portable:
        from solm_compile.runtime import ep

        so = ep.session_options_with_ep(so, ort=ort)
    return ort.InferenceSession(str(path), so)


def _build(gm: fx.GraphModule, examples: tuple, dynamic: list, ids_pos: int) -> OrtGraph:
    _check_inputs(examples)
    portable, why = _use_portable()
    if portable:
        from solm_compile.backend.once import warn_once as _warn_once

        _warn_once("ort-portable", f"solm: runtime='onnxruntime': {why}; running the portable ONNX form of the "
                   "gated ops (same semantics in standard ONNX ops, no skipped work)")
    ids = examples[ids_pos]
    ids_dyn = dynamic[ids_pos] or {}
    B = ids.shape[0]
    row = {0: ids_dyn[0]} if 0 in ids_dyn else None
    args = (*examples, torch.ones(B), torch.ones(B), torch.full((B,), 16.0))
    dyn = (*dynamic, row, row, row)
    key = _key(gm, examples, dynamic, portable)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    path = _dir() / f"{key}.onnx"
    names = export_graph(_explicit_causal(gm), args, dyn, portable, path)
    fn = OrtGraph(open_session(path, portable), names, len(args), path, portable)
    n_out = len(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])
    if len(fn.out_names) != n_out:
        raise RuntimeError(f"the ONNX model has {len(fn.out_names)} outputs, the graph {n_out}")
    with _LOCK:
        _CACHE[key] = fn
        while len(_CACHE) > CACHE_SIZE:
            _, old = _CACHE.popitem(last=False)
            old.path.unlink(missing_ok=True)
            old.path.with_name(old.path.name + ".data").unlink(missing_ok=True)    # external weights (> 2 GB)
    return fn


def compile_ort(gm: fx.GraphModule, examples: tuple, dynamic: list, ids_pos: int) -> OrtGraph | None:
    """The onnxruntime callable for a gated graph, or None (after one warning naming why) to run torch instead."""
    from solm_compile.backend.once import warn_once as _warn_once
    from solm_compile.backend.lower import _isolated

    try:
        with _isolated():
            return _build(gm, examples, dynamic, ids_pos)
    except Exception as e:  # noqa: BLE001 - the torch runtime is always there to fall back to
        while e.__cause__ is not None:      # the exporter wraps the real reason in a chain of ConversionErrors
            e = e.__cause__
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        _warn_once("ort", f"solm: runtime='onnxruntime' cannot run this graph ({type(e).__name__}: {msg}); "
                   "running the torch runtime")
        return None
