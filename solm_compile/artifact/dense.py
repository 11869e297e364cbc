"""The dense artifact's attention: fused into ``GroupQueryAttention`` only where that provably changes nothing.

``passes/fuse_attention.py`` rewrites the exported eager attention, with the KV cache as buffers written in place
(``buffer=True``: ``past_length`` and caches of a capacity; ``kv_cache`` in the returned metadata says "buffer");
here the fused and the unfused graphs both run
on probe steps (random ids and cache: 2 rows × 3 tokens with no cache, 2 rows × 1 token after 5 cached, 1 row ×
3 tokens after 5 cached) and the fused one is kept only if its logits and presents match to float32 rounding.
onnxruntime's GroupQueryAttention refuses the one remaining shape, several rows of several tokens over a non-empty
cache (its message says so); the dense artifact is the single-stream baseline, which never feeds it. A model whose attention the pass misreads (a sliding window,
a soft cap) keeps the exported graph, with a warning. After ``pack_weights``, ``fuse_dense_ops`` runs stock
onnxruntime's fused forms (onnxruntime-genai's int4 graph): packed MatMulNBits, RoPE inside GroupQueryAttention,
SkipSimplifiedLayerNormalization; each is exact up to float32 summation order (tests/test_dense_int4.py).
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

TOLERANCE = 1e-4           # relative to each output's magnitude; fusion only reorders float32 sums


PROBES = ((2, 3, 0), (2, 1, 5), (1, 3, 5))      # (rows, new tokens, cached tokens)


def _probe_feeds(session, rng, rows: int, new: int, past: int) -> dict:
    vocab = session.get_outputs()[0].shape[-1]                               # logits [B, T, V]
    vocab = vocab if isinstance(vocab, int) else 2
    feeds = {"input_ids": rng.integers(0, vocab, (rows, new)),
             "position_ids": np.tile(np.arange(past, past + new), (rows, 1))}
    for i in session.get_inputs()[2:]:
        feeds[i.name] = rng.standard_normal((rows, i.shape[1], past, i.shape[3])).astype(np.float32)
    return feeds


def _buffer_feeds(feeds: dict, rng) -> tuple[dict, int]:
    """The concat form's ``feeds`` for the buffer form: each cache in a buffer 3 rows longer than P + T whose spare
    rows hold noise (never to be read), and ``past_length``; returns them and P + T."""
    out, valid = dict(feeds), 0
    for name, v in feeds.items():
        if name.startswith("past_"):
            B, H, P, d = v.shape                                                    # [B, Hkv, P, d]
            valid = P + feeds["input_ids"].shape[1]
            buf = rng.standard_normal((B, H, valid + 3, d)).astype(np.float32)      # [B, Hkv, C, d]
            buf[:, :, :P] = v
            out[name] = buf
            out["past_length"] = np.full((B,), P, np.int64)                         # [B]
    return out, valid


def _agree(before: bytes, after: bytes) -> str | None:
    """None if both graphs compute the same outputs on the probe (a buffer form's presents: their valid rows);
    else what differs."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    a = ort.InferenceSession(before, opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(after, opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    buffered = "past_length" in {i.name for i in b.get_inputs()}
    for probe in PROBES:
        feeds = _probe_feeds(a, rng, *probe)
        fed, valid = _buffer_feeds(feeds, rng) if buffered else (feeds, None)
        for out, x, y in zip(a.get_outputs(), a.run(None, feeds), b.run(None, fed)):
            y = y[:, :, :valid] if buffered and out.name.startswith("present_") else y
            err = float(np.abs(x - y).max()) / max(float(np.abs(x).max()), 1e-6)
            if x.shape != y.shape or not err <= TOLERANCE:
                return f"{out.name} differs at (rows, new, cached) = {probe} (relative {err:.2g})"
    return None


def fuse_dense_attention(program) -> dict:
    """Fuse ``program.model``'s attention if the probe agrees (in place); returns metadata saying what happened."""
    from onnxscript import ir

    from solm_compile.passes.fuse_attention import fuse_attention

    before = program.model_proto.SerializeToString()
    fused = ir.from_proto(program.model_proto)
    try:
        result = fuse_attention(fused, buffer=True)
    except ValueError as e:                                    # a cache read elsewhere: the concat form
        log.warning("dense artifact: KV cache kept in the concat form (%s)", e)
        fused = ir.from_proto(program.model_proto)
        result = fuse_attention(fused)
    if not result.modified:
        return {"attention": "exported", "why": "; ".join(result.skipped[:3])}
    why = _agree(before, ir.to_proto(fused).SerializeToString())
    if why is not None:
        log.warning("dense artifact: kept the exported attention (GroupQueryAttention would change it: %s)", why)
        return {"attention": "exported", "why": why}
    program.model = fused
    layers = result.counts["group_query_attention"]
    return {"attention": "GroupQueryAttention", "layers": layers, "unfused": result.skipped,
            "kv_cache": "buffer" if result.counts.get("kv_buffer") else "concat"}


def _dense_passes() -> tuple:
    """The stock-onnxruntime fusions of the dense artifact, in order (after ``pack_weights``): genai's packed QKV
    (and gate/up) MatMulNBits, RoPE inside GroupQueryAttention on the packed q/k/v (``do_rotary``), and
    SkipSimplifiedLayerNormalization for each residual add + RMSNorm."""
    from solm_compile.passes.fuse_skip_norm import fuse_skip_norm
    from solm_compile.passes.gqa_rotary import gqa_rotary
    from solm_compile.passes.pack_matmuls import pack_matmuls

    return (pack_matmuls, gqa_rotary, fuse_skip_norm)


def fuse_dense_ops(program, passes=None) -> dict:
    """``passes`` (default ``_dense_passes()``) on ``program.model`` in place; returns their counts and the node
    count after (the metadata's ``dense_ops``; ``rotary_positions``: the rows of GroupQueryAttention's cos/sin
    caches, the positions the artifact can rotate, where ``gqa_rotary`` moved the RoPE inside)."""
    from solm_compile.passes.gqa_rotary import POSITIONS

    counts = {}
    for fuse in _dense_passes() if passes is None else passes:
        r = fuse(program.model)
        log.debug("%s: %s (skipped: %s)", r.name, dict(r.counts), r.skipped)
        counts.update(r.counts)
        if r.name == "gqa_rotary" and r.modified:
            counts["rotary_positions"] = POSITIONS
    return {**counts, "nodes": len(list(program.model.graph))}
