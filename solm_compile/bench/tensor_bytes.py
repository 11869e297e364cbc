"""Bytes one decode token reads, summed from tensors, and the machine's streaming bandwidth (protocol point 5).

shared/benchmark_protocol.md asks for "share of the bytes limit" and "ideal speedup" from the bytes of the tensors
actually read per token (weights at their stored precision, KV pages read, metadata), summed from the artifact, not
from the cost model under test. This module does that:

- ``onnx_bytes(path)`` sorts every initializer of an ONNX file (a solm artifact, onnxruntime-genai's model) by how a
  decode token reads it, at its stored dtype and shape (or at half where SolmEP holds an int8 kernel's float32
  scale/offset as half: ``HALF_SCALES``) (the file's tensor protos, weights not loaded):
  ``full`` (q/k/v/o, norms, the LM head, the policy), ``per_id`` (a table only gathered by token ids: one row per
  token), ``gate_up`` and ``down`` (a SparseMLP/SparseMLPBlocks node's matrices, read in part under ρ); and the KV
  cache's graph inputs: bytes of one position's K and V over every KV head and layer, and the page metadata's bytes
  per page (solm's ``past_page_min_i``/``max_i``).
- ``gguf_bytes(path)`` does the same for a GGUF file (llama.cpp reads every tensor but the token embedding, which is
  gathered, unless it is also the output matrix; its KV cache is f16).
- ``per_token(...)`` adds them up for one decode token at KV length ``L``: everything dense, or, for a SolmEP run,
  with the fractions SolmEP's work counters (``runtime.ep.work_counters``) say its kernels really read: K/V rows
  (``attn_kv_rows_read``), gate/up rows and down rows. Page metadata counts as read, every page of every KV head,
  on steps whose attention selected pages (fewer keys scored than dense).
- ``stream_gb_s()`` times a large streaming read on one thread.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# SparseMLP(x, Wg, bg, Wu, bu, Wd, bd, ...) and SparseMLPBlocks(x, gate codes/scale/offset, bg, up ..., bu,
# down ..., bd, rho, bits, down_dense codes/scale/offset): the input positions of each matrix (ops/registry.py's
# schemas). down_dense: skip="h"'s source-layout copy of down, which the tokens at ρ ≥ 1 read instead of downᵀ.
MLP_INPUTS = {"SparseMLP": ({1, 3}, {5}), "SparseMLPBlocks": ({1, 2, 3, 5, 6, 7}, {9, 10, 11})}
DOWN_DENSE = {"SparseMLPBlocks": {15, 16, 17}}
GATHERS = ("Gather", "GatherBlockQuantized")
# scale/offset inputs SolmEP's int8 kernels hold as half when every value is exactly a half (runtime/ep/kernels.h
# BlockMatrix::half), a matrix's (scale, offset) pair together: LinearBlocks' and SparseMLPBlocks' matrices with
# activations="int8" (down only with skip="x": skip="h" reads downᵀ rows, which stay fp32)
HALF_SCALES = {"LinearBlocks": [(2, 3)], "SparseMLPBlocks": [(2, 3), (6, 7), (10, 11), (16, 17)]}


@dataclass(frozen=True)
class TensorBytes:
    full: int            # read whole by every decode token
    per_id: int          # one row of each id-gathered table
    gate_up: int         # the MLP's gate and up matrices (all layers)
    down: int            # the MLP's down matrices (all layers)
    kv_position: int     # K and V of one position, every KV head of every layer
    kv_row: int          # K and V of one position of one KV head (what attn_kv_rows_read counts)
    meta_page: int       # page min and max of one page, every KV head of every layer (0: no page metadata)
    page_size: int = 0
    down_dense: int = 0  # skip="h" artifacts: down's source-layout copy (all layers), read instead of down at ρ ≥ 1

    @property
    def weights(self) -> int:
        """What a dense-budget token reads: down's source-layout copy where the artifact has one."""
        return self.full + self.per_id + self.gate_up + (self.down_dense or self.down)


def _nbytes(t) -> int:
    from onnx.helper import tensor_dtype_to_np_dtype

    return math.prod(t.dims) * np.dtype(tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _input_dims(vi) -> tuple[list, int]:
    from onnx.helper import tensor_dtype_to_np_dtype

    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return dims, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type)).itemsize


def _is_key(name: str) -> bool:
    return (name.startswith("past_key_") and name[9:].isdigit()) or (name.startswith("past_key_values.")
                                                                      and name.endswith(".key"))


def onnx_bytes(path: str | Path) -> TensorBytes:
    """What each initializer and KV input of the ONNX file at ``path`` (or the one .onnx in a folder) costs."""
    import onnx

    path = Path(path)
    if path.is_dir():
        path = next(iter(sorted(path.glob("*.onnx"))))
    model = onnx.load(str(path), load_external_data=False)
    size = {t.name: _nbytes(t) for t in model.graph.initializer}
    rows = {t.name: (t.dims[0] if t.dims else 1) for t in model.graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    for name in _half_scales(model, inits):
        size[name] //= 2
    role: dict[str, str] = {}
    for node in model.graph.node:
        gate_up, down = MLP_INPUTS.get(node.op_type, (set(), set()))
        down_dense = DOWN_DENSE.get(node.op_type, set())
        for i, name in enumerate(node.input):
            if name not in size:
                continue
            r = ("gate_up" if i in gate_up else "down" if i in down else "down_dense" if i in down_dense
                 else "row" if node.op_type in GATHERS else "full")
            if role.get(name, "row") == "row":           # a tensor both gathered and multiplied is read in full
                role[name] = r
    by = {"full": 0, "per_id": 0, "gate_up": 0, "down": 0, "down_dense": 0}
    gathered = {}
    for name, r in role.items():
        if r == "row":
            gathered[name] = size[name] / rows[name]
        else:
            by[r] += size[name]
    # a gathered table's scales and zero points are rows of the same table: one row of each per id
    by["per_id"] = int(round(sum(gathered.values())))
    kv_position = kv_row = meta_page = 0
    inputs = {vi.name: vi for vi in model.graph.input}
    for name, vi in inputs.items():
        if _is_key(name):
            dims, item = _input_dims(vi)
            heads, d = dims[1], dims[-1] or _genai_head_size(path)
            kv_row += 0 if kv_row else 2 * d * item       # K and V rows of one head (every layer alike)
            kv_position += 2 * heads * d * item
        if name.startswith("past_page_min_"):
            dims, item = _input_dims(vi)
            meta_page += 2 * dims[1] * dims[-1] * item    # min and max
    meta = {p.key: p.value for p in model.metadata_props}
    page = 0
    if "solm.gate" in meta:
        import json

        page = int(json.loads(meta["solm.gate"]).get("page_size", 0))
    return TensorBytes(by["full"], by["per_id"], by["gate_up"], by["down"], kv_position, kv_row, meta_page, page,
                       by["down_dense"])


def _half_scales(model, inits: dict) -> set[str]:
    """The float32 scale/offset initializers SolmEP keeps as half (HALF_SCALES), i.e. whose values are all exactly
    halves."""
    from onnx import helper, numpy_helper

    out = set()
    for node in model.graph.node:
        if node.domain != "ai.solm" or node.op_type not in HALF_SCALES:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("activations", b"fp32") != b"int8":
            continue
        pairs = HALF_SCALES[node.op_type]
        if attrs.get("skip", b"x") == b"h":
            pairs = pairs[:2] + pairs[3:]                 # downᵀ's stay fp32; the source-layout copy's may be half
        for pair in pairs:
            names = [node.input[i] if i < len(node.input) else "" for i in pair]
            ts = [inits.get(n) for n in names]
            if any(t is None or t.data_type != 1 for t in ts):
                continue
            arrays = [numpy_helper.to_array(t) for t in ts]
            if all(np.array_equal(a.astype(np.float16).astype(np.float32), a) for a in arrays):
                out.update(names)
    return out


def _genai_head_size(path: Path) -> int:
    """onnxruntime-genai's KV inputs leave the head size symbolic; its genai_config.json beside the model says it."""
    import json

    cfg = path.parent / "genai_config.json"
    if not cfg.is_file():
        raise ValueError(f"{path}: the KV cache inputs have no head size and there is no genai_config.json")
    return int(json.loads(cfg.read_text())["model"]["decoder"]["head_size"])


def gguf_bytes(path: str | Path) -> TensorBytes:
    """llama.cpp on a GGUF: every tensor read whole except a token embedding it only gathers; f16 KV cache."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tensors = {t.name: int(t.n_bytes) for t in r.tensors}
    emb = tensors.pop("token_embd.weight", 0)
    tied = "output.weight" not in tensors                    # the embedding is the LM head too: read in full
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def field(key: str, default: int | None = None) -> int:
        f = r.fields.get(f"{arch}.{key}")
        return default if f is None else int(f.parts[f.data[0]][0])

    layers, heads, embd = field("block_count"), field("attention.head_count"), field("embedding_length")
    kv_heads, d = field("attention.head_count_kv", heads), field("attention.key_length", embd // heads)
    vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    full = sum(tensors.values()) + (emb if tied else 0)
    return TensorBytes(full, 0 if tied else emb // vocab, 0, 0, 2 * layers * kv_heads * d * 2, 2 * d * 2, 0)


def per_token(tb: TensorBytes, L: float, counters: dict | None = None, steps: int = 1) -> float:
    """Bytes one decode token reads at KV length ``L`` (its mean over the timed steps): dense without ``counters``;
    with the difference of two ``runtime.ep.work_counters`` readings over ``steps`` tokens, what SolmEP read."""
    if counters is None:
        return tb.weights + L * tb.kv_position
    c = counters
    frac_in = c["mlp_in_rows"] / c["mlp_in_rows_dense"] if c["mlp_in_rows_dense"] else 1.0
    frac_down = c["mlp_down_rows"] / c["mlp_down_rows_dense"] if c["mlp_down_rows_dense"] else 1.0
    frac_dd = c.get("mlp_down_dense_rows", 0) / c["mlp_down_rows_dense"] if c["mlp_down_rows_dense"] else 0.0
    kv = c["attn_kv_rows_read"] * tb.kv_row / steps
    selected = c["attn_keys_scored"] < c["attn_keys_dense"]
    meta = math.ceil(L / tb.page_size) * tb.meta_page if selected and tb.page_size else 0
    return tb.full + tb.per_id + tb.gate_up * frac_in + tb.down * frac_down + tb.down_dense * frac_dd + kv + meta


def stream_gb_s(mb: int = 512, reps: int = 5) -> float:
    """The best of ``reps`` one-thread sums over ``mb`` MB of float32 (larger than any cache): GB/s read. torch's
    vectorised sum reaches the memory bound on one thread (numpy's pairwise sum is compute-bound at ~1/4 of it)."""
    import torch

    a = torch.ones(mb * (1 << 20) // 4, dtype=torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return a.numel() * 4 / best / 1e9


def for_spec(spec) -> TensorBytes | None:
    """The tensors an engine row of ``solm bench --engines`` reads (bench/engines.py's EngineSpec), None if unknown."""
    try:
        return gguf_bytes(spec.path) if spec.engine == "llama.cpp" else onnx_bytes(spec.path)
    except (OSError, ValueError, KeyError, StopIteration):
        return None


def add_columns(block: list[dict], tbs: dict, counters: dict, stream: float | None) -> None:
    """Per row of one (context, threads) block: ``mb_token`` (MB read per decode token), ``gb_s`` (that times tok/s),
    ``bw_share`` (of the measured streaming bandwidth ``stream``); on SolmEP rows beside a dense-budget row,
    ``ideal`` (dense-budget bytes over this row's: the speedup if time followed bytes), ``speedup`` (median per-round
    time ratio to the dense-budget row) and ``realised`` = speedup / ideal."""
    for r in block:
        tb = tbs.get(r["engine"])
        L = r["context"] + (r["steps"] + 1) / 2                      # mean KV length over the timed steps
        c = counters.get(r["engine"])
        if tb is None:
            r.update(mb_token=None, gb_s=None, bw_share=None)
            continue
        b = per_token(tb, L, c, r["steps"] * r["reps"]) if c else per_token(tb, L)
        r.update(mb_token=b / 1e6, gb_s=b * r["tok_s"] / 1e9, bw_share=b * r["tok_s"] / 1e9 / stream if stream else None)
    base = next((r for r in block if r["engine"] == "solm dense-budget" and r.get("mb_token")), None)
    for r in block:
        if base is None or r["kind"] != "solm" or not r.get("mb_token"):
            continue
        speedup = statistics.median(a / b for a, b in zip(base["step_ms_reps"], r["step_ms_reps"]))
        r.update(ideal=base["mb_token"] / r["mb_token"], speedup=speedup)
        r["realised"] = speedup / r["ideal"]
