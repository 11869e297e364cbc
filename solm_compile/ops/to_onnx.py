"""ONNX translations of the ``solm`` custom ops for ``torch.onnx.export(..., dynamo=True)``.

Two flavours, each a ``{torch op overload: translation function}`` table for ``custom_translation_table``:

- ``CUSTOM``: one node per op in domain ``ai.solm`` (version 1), run by SolmEP (``runtime/ep``); the schemas are
  the export forms of ``registry.py``'s entries (inputs, outputs and attributes are listed there). An absent
  optional input is an empty input name. The artifact form adds inputs and outputs after export (page state, KV
  cache buffers); the ops made by passes (SparseMLPBlocks, LinearBlocks,
  QuestAttentionRope) are translated only so their torch ops export.
- ``PORTABLE``: the same semantics (``reference.py``) in standard ONNX ops only (opset 18), so the exported model
  runs on stock onnxruntime with no registration. Selection is expressed as masks, like the SOL reference.

How the exporter calls these (torch 2.13, onnxscript 0.7.2): plain Python, traced: ``torch.onnx`` passes the FX
node's arguments in torch schema order (tensors as ``ir.Value``, ``None`` for an absent ``Tensor?``, Python scalars)
under an evaluator recording every ``op.X(...)`` as a node. Custom-domain ops need an ``onnx.defs.OpSchema`` to be
recorded, so ``ai.solm`` ops are built from local schemas (not registered with onnx); the exporter adds the opset.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from onnxscript import ir
from onnxscript.onnx_opset import opset18 as op
from onnxscript.onnx_types import TensorType

from solm_compile.ops import registry
from solm_compile.ops import torch_ops as _ops  # noqa: F401  (registers torch.ops.solm.*)
from solm_compile.ops.onnx_schema import DOMAIN, SOLM, VERSION, op_of as _op  # noqa: F401

_INT64_MAX = 2**63 - 1


_GATE = _op(registry.GATE_CONTROLS)
_QUEST = _op(registry.QUEST_ATTENTION)
_SPARSE_MLP = _op(registry.SPARSE_MLP)
_SPARSE_MLP_BLOCKS = _op(registry.SPARSE_MLP_BLOCKS)
_QUEST_ROPE = _op(registry.QUEST_ATTENTION_ROPE)
_LINEAR_BLOCKS = _op(registry.LINEAR_BLOCKS)

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


def _check_act(act: str, skip: str = "x") -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"solm.sparse_mlp: unknown activation {act!r}; expected one of {ACTIVATIONS}")
    if skip not in registry.MLP_SKIPS:
        raise ValueError(f"solm.sparse_mlp: skip must be one of {registry.MLP_SKIPS}, got {skip!r}")


def _default_scale(q) -> Optional[float]:
    d = q.shape[-1] if q.shape is not None else None
    return 1.0 / math.sqrt(d) if isinstance(d, int) else None


def _no_causal(is_causal: bool) -> None:
    if is_causal:
        raise NotImplementedError(
            "solm.quest_attention with is_causal=True has no ONNX translation: pass an explicit attn_mask "
            "(Hugging Face models always do in the graphs solm rewrites)")


# ---------------------------------------------------------------------------------------------- CUSTOM flavour
def gate_controls_custom(input_ids: TensorType, past_key: TensorType, kappa: TensorType, rho: TensorType,
                         bits: TensorType, min_len: int):
    kappa_e, rho_e, bits_e = _GATE(input_ids, past_key, kappa, rho, bits, min_len=int(min_len))
    return kappa_e, rho_e, bits_e


def quest_attention_custom(q: TensorType, k: TensorType, v: TensorType, attn_mask: Optional[TensorType],
                           kappa: TensorType, scale: Optional[float] = None, is_causal: bool = False,
                           page_size: int = 16, sinks: int = 0, window: int = 0):
    _no_causal(is_causal)
    if scale is None:
        scale = _default_scale(q)
        if scale is None:
            raise NotImplementedError("solm.quest_attention: scale=None needs a static head dim (q.shape[-1])")
    return _QUEST(q, k, v, attn_mask, kappa, scale=float(scale), page_size=int(page_size), sinks=int(sinks),
                  window=int(window))


def sparse_mlp_custom(x: TensorType, w_gate: Optional[TensorType], b_gate: Optional[TensorType],
                      w_up: TensorType, b_up: Optional[TensorType], w_down: TensorType,
                      b_down: Optional[TensorType], rho: TensorType, bits: TensorType, act: str,
                      skip: str = "x"):
    _check_act(act, skip)
    return _SPARSE_MLP(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act=str(act), skip=str(skip))


def sparse_mlp_blocks_custom(x, codes_gate, scale_gate, offset_gate, b_gate, codes_up, scale_up, offset_up, b_up,
                             codes_down, scale_down, offset_down, b_down, rho, bits, act: str, bits_gate: int,
                             bits_up: int, bits_down: int, block_size: int, activations: str = "fp32",
                             skip: str = "x", codes_down_dense=None, scale_down_dense=None, offset_down_dense=None,
                             bits_down_dense: int = 4):
    _check_act(act)
    return _SPARSE_MLP_BLOCKS(x, codes_gate, scale_gate, offset_gate, b_gate, codes_up, scale_up, offset_up, b_up,
                              codes_down, scale_down, offset_down, b_down, rho, bits, codes_down_dense,
                              scale_down_dense, offset_down_dense, act=str(act),
                              bits_gate=int(bits_gate), bits_up=int(bits_up), bits_down=int(bits_down),
                              block_size=int(block_size), activations=str(activations), skip=str(skip),
                              bits_down_dense=int(bits_down_dense))


def quest_attention_rope_custom(qkv, cos, sin, attn_mask, kappa, scale, page_size: int, sinks: int, window: int,
                                num_heads: int, kv_num_heads: int, interleaved: int):
    return _QUEST_ROPE(qkv, cos, sin, attn_mask, kappa, scale=float(scale), page_size=int(page_size), sinks=int(sinks),
                       window=int(window), num_heads=int(num_heads), kv_num_heads=int(kv_num_heads),
                       interleaved=int(interleaved))


def quest_attention_rope_portable(*args, **kwargs):   # a pass makes the op on the SolmEP kinds only
    raise NotImplementedError("solm.quest_attention_rope: made by passes/fuse_rope_attention.py for SolmEP only")


# ---------------------------------------------------------------------------------------------- PORTABLE helpers
def _i64(*vals: int):
    """1-D int64 constant."""
    return op.Constant(value_ints=list(vals))


def _i64s(val: int):
    """Scalar int64 constant."""
    return op.Constant(value_int=int(val))


def _f(val: float, like):
    """Scalar constant of ``like``'s dtype."""
    return op.CastLike(op.Constant(value_float=float(val)), like)


def _f64(val: float):
    return op.Constant(value=ir.tensor(np.array(val, dtype=np.float64)))


def _dim(x, i: int):
    """x.shape[i] as a 1-D int64 [1] tensor."""
    return op.Shape(x, start=i, end=i + 1) if i != -1 else op.Shape(x, start=-1)


def _static(x, i: int):
    shape = x.shape
    if shape is None:
        return None
    d = shape[i]
    return d if isinstance(d, int) else None


def _repeat_heads(x, q):
    """[B, Hkv, N, d] -> [B, H, N, d], head h reading kv head h // (H // Hkv) (repeat_interleave)."""
    H, Hkv = _static(q, 1), _static(x, 1)
    if H is not None and H == Hkv:
        return x
    B, Hk, N, d = _dim(x, 0), _dim(x, 1), _dim(x, 2), _dim(x, 3)
    G = op.Div(_dim(q, 1), Hk)
    x5 = op.Expand(op.Unsqueeze(x, _i64(2)), op.Concat(B, Hk, G, N, d, axis=0))   # [B,Hkv,G,N,d]
    return op.Reshape(x5, op.Concat(B, _dim(q, 1), N, d, axis=0))


def _row(x, rank: int):
    """Per-row control [B] -> [B, 1, ..., 1] (rank dims) for broadcasting."""
    return op.Reshape(x, _i64(-1, *([1] * (rank - 1))))


def _valid(attn_mask):
    """The unmasked keys of a mask (bool: itself; additive: above its dtype's lowest finite value, as reference)."""
    if attn_mask.dtype == ir.DataType.BOOL:
        return attn_mask
    low = float(torch.finfo(_TORCH_DTYPES.get(attn_mask.dtype, torch.float32)).min)
    return op.Not(op.LessOrEqual(attn_mask, op.CastLike(op.Constant(value_float=low), attn_mask)))


_TORCH_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
                 ir.DataType.BFLOAT16: torch.bfloat16, ir.DataType.DOUBLE: torch.float64}


def _quest_keep(q, k, kappa, page_size: int, sinks: int, window: int, valid=None):
    """Token keep mask [B, H, L] (bool) from the LAST query position of q [B,H,T,d] over keys k [B,Hkv,L,d];
    ``valid`` (bool, broadcastable to [B,H,T,L]) the unmasked keys: selection sees only those (``reference``)."""
    S = int(page_size)
    if S < 1:
        raise ValueError(f"solm.quest_attention: page_size must be ≥ 1, got {page_size}")
    B, H = _dim(q, 0), _dim(q, 1)
    L = _dim(k, 2)                                                              # [1]
    L_s = op.Squeeze(L)                                                         # []
    P = op.Div(op.Add(L, _i64(S - 1)), _i64(S))                                 # [1] = ceil(L/S)
    # pad the last partial page by repeating the last key (min/max of a page are unchanged by a duplicate)
    src = op.Min(op.Range(_i64s(0), op.Squeeze(op.Mul(P, _i64(S))), _i64s(1)), op.Sub(L_s, _i64s(1)))
    kp = op.Gather(k, src, axis=2)                                              # [B,Hkv,P*S,d]
    pages = op.Reshape(kp, op.Concat(_i64(0, 0), P, _i64(S, -1), axis=0))       # [B,Hkv,P,S,d]
    hi = _repeat_heads(op.ReduceMax(pages, _i64(3), keepdims=0), q)             # [B,H,P,d]
    lo = _repeat_heads(op.ReduceMin(pages, _i64(3), keepdims=0), q)             # [B,H,P,d]
    qv = op.Slice(q, _i64(-1), _i64(_INT64_MAX), _i64(2))                       # [B,H,1,d] last query
    score = op.ReduceSum(op.Max(op.Mul(qv, hi), op.Mul(qv, lo)), _i64(-1), keepdims=0)   # [B,H,P]
    # page budget pb = min(ceil(clamp(ceil(κ·Lv − 1e-9), 0, Lv) / S), Pv), in double; Lv, Pv: the unmasked keys
    # and the pages holding one ([B,H,1]; L and P with no mask)
    Ld, Pd = op.Cast(L, to=ir.DataType.DOUBLE), op.Cast(P, to=ir.DataType.DOUBLE)
    page_ok = None
    if valid is not None:
        vrow = op.Slice(valid, _i64(-1), _i64(_INT64_MAX), _i64(2))             # [B|1,H|1,1,L] last query
        vrow = op.Squeeze(op.Expand(vrow, op.Concat(B, H, _i64(1), L, axis=0)), _i64(2))   # [B,H,L]
        vpad = op.Pad(op.Cast(vrow, to=ir.DataType.INT64), op.Concat(_i64(0, 0, 0, 0, 0), op.Sub(op.Mul(P, _i64(S)), L),
                                                                     axis=0))   # [B,H,P*S], 0 past L
        page_ok = op.Greater(op.ReduceMax(op.Reshape(vpad, op.Concat(B, H, P, _i64(S), axis=0)), _i64(-1),
                                          keepdims=0), _i64s(0))                # [B,H,P]
        Ld = op.Cast(op.ReduceSum(vpad, _i64(-1), keepdims=1), to=ir.DataType.DOUBLE)        # [B,H,1]
        Pd = op.Cast(op.ReduceSum(op.Cast(page_ok, to=ir.DataType.INT64), _i64(-1), keepdims=1),
                     to=ir.DataType.DOUBLE)                                     # [B,H,1]
        score = op.Where(page_ok, score, _f(float("-inf"), score))
    kd = _row(op.Cast(kappa, to=ir.DataType.DOUBLE), 3)                        # [B,1,1]
    n = op.Ceil(op.Sub(op.Mul(kd, Ld), _f64(1e-9)))
    n = op.Max(op.Min(n, Ld), _f64(0.0))
    pb3 = op.Cast(op.Min(op.Ceil(op.Div(n, _f64(float(S)))), Pd), to=ir.DataType.INT64)   # [B,1|H,1]
    Pv3 = op.Cast(Pd, to=ir.DataType.INT64)
    top, _ = op.TopK(score, P, axis=-1, largest=1, sorted=1)                    # [B,H,P] descending
    at = op.Expand(op.Max(op.Sub(pb3, _i64(1)), _i64(0)), op.Concat(B, H, _i64(1), axis=0))
    thr = op.GatherElements(top, at, axis=-1)                                   # [B,H,1] pb-th largest
    page_keep = op.And(op.GreaterOrEqual(score, thr), op.Greater(pb3, _i64(0)))  # ties keep
    if page_ok is not None:
        page_keep = op.And(page_keep, page_ok)
    dense = op.Or(op.GreaterOrEqual(pb3, Pv3), op.GreaterOrEqual(_row(kappa, 3), _f(1.0, kappa)))
    page_keep = op.Or(page_keep, dense)                                         # [B,H,P]
    pos = op.Range(_i64s(0), L_s, _i64s(1))                                     # [L]
    keep = op.Gather(page_keep, op.Div(pos, _i64s(S)), axis=2)                  # [B,H,L] pages -> tokens
    if sinks > 0 or window > 0:
        forced = op.Or(op.Less(pos, _i64s(sinks)), op.GreaterOrEqual(pos, op.Sub(L_s, _i64s(window))))
        keep = op.Or(keep, forced)
    # a head that keeps nothing keeps the last token
    none = op.Equal(op.ReduceMax(op.Cast(keep, to=ir.DataType.INT32), _i64(-1), keepdims=1), op.Constant(
        value=ir.tensor(np.array(0, dtype=np.int32))))                          # [B,H,1]
    keep = op.Or(keep, op.And(none, op.Equal(pos, op.Sub(L_s, _i64s(1)))))
    return keep


# ---------------------------------------------------------------------------------------------- PORTABLE flavour
def gate_controls_portable(input_ids: TensorType, past_key: TensorType, kappa: TensorType, rho: TensorType,
                           bits: TensorType, min_len: int):
    shape_ids = op.Shape(input_ids)
    T = op.Gather(shape_ids, _i64s(1))                                          # []
    L = op.Add(op.Gather(op.Shape(past_key), _i64s(2)), T)                      # []
    on = op.And(op.Equal(T, _i64s(1)), op.Greater(L, _i64s(int(min_len))))     # []
    return (op.Where(on, kappa, _f(1.0, kappa)), op.Where(on, rho, _f(1.0, rho)),
            op.Where(on, bits, _f(16.0, bits)))


def quest_attention_portable(q: TensorType, k: TensorType, v: TensorType, attn_mask: Optional[TensorType],
                             kappa: TensorType, scale: Optional[float] = None, is_causal: bool = False,
                             page_size: int = 16, sinks: int = 0, window: int = 0):
    _no_causal(is_causal)
    if scale is None:
        scale = _default_scale(q)
    scale_v = (_f(scale, q) if scale is not None
               else op.Div(_f(1.0, q), op.Sqrt(op.CastLike(_dim(q, -1), q))))
    T = _static(q, 2)
    valid = None if attn_mask is None else _valid(attn_mask)                    # unmasked keys
    keep = None
    if T is None or T == 1:      # selection only on single-token steps; T > 1 (prefill) is dense
        keep = _quest_keep(q, k, kappa, page_size, sinks, window, valid)        # [B,H,L]
        if T is None:
            keep = op.Or(keep, op.Not(op.Equal(_dim(q, 2), _i64(1))))
        keep = op.Unsqueeze(keep, _i64(2))                                      # [B,H,1,L]
    kr, vr = _repeat_heads(k, q), _repeat_heads(v, q)                           # [B,H,L,d]
    logits = op.Mul(op.MatMul(q, op.Transpose(kr, perm=[0, 1, 3, 2])), scale_v)   # [B,H,T,L]
    if attn_mask is not None and attn_mask.dtype != ir.DataType.BOOL:
        logits = op.Add(logits, op.CastLike(attn_mask, logits))
    mask = keep if valid is None else valid if keep is None else op.And(valid, keep)
    if mask is None:
        return op.MatMul(op.Softmax(logits, axis=-1), vr)
    logits = op.Where(mask, logits, _f(float("-inf"), logits))
    out = op.MatMul(op.Softmax(logits, axis=-1), vr)
    # a row with no unmasked, kept key: zeros (reference), not softmax(all −inf) = NaN
    row = op.ReduceMax(op.Cast(mask, to=ir.DataType.INT32), _i64(-1), keepdims=1)        # [B|1,H|1,T,1]
    return op.Where(op.Greater(row, op.Constant(value=ir.tensor(np.array(0, dtype=np.int32)))), out,
                    _f(0.0, out))


def _linear(x, w, b):
    y = op.MatMul(x, op.Transpose(w, perm=[1, 0]))
    return y if b is None else op.Add(y, b)


def _activation(h, act: str):
    if act == "silu":
        return op.Mul(h, op.Sigmoid(h))
    if act == "relu":
        return op.Relu(h)
    if act == "gelu":            # 0.5·x·(1 + erf(x/√2))
        return op.Mul(op.Mul(h, _f(0.5, h)), op.Add(_f(1.0, h), op.Erf(op.Mul(h, _f(1 / math.sqrt(2), h)))))
    if act == "gelu_tanh":       # 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
        inner = op.Mul(_f(math.sqrt(2 / math.pi), h), op.Add(h, op.Mul(_f(0.044715, h), op.Mul(h, op.Mul(h, h)))))
        return op.Mul(op.Mul(h, _f(0.5, h)), op.Add(_f(1.0, h), op.Tanh(inner)))
    raise ValueError(f"solm.sparse_mlp: unknown activation {act!r}")


def _topk_keep(x, rho, rank: int):
    """Per token: k = clamp(ceil(ρD − 1e-9), 1, D); keep |x| ≥ k-th largest |x| (ties kept), zero the rest."""
    D = _dim(x, -1)                                                             # [1]
    Dd = op.Cast(D, to=ir.DataType.DOUBLE)
    kk = op.Ceil(op.Sub(op.Mul(op.Cast(rho, to=ir.DataType.DOUBLE), Dd), _f64(1e-9)))
    kk, mag = op.Cast(op.Min(op.Max(kk, _f64(1.0)), Dd), to=ir.DataType.INT64), op.Abs(x)   # [B], |x|
    top, _ = op.TopK(mag, D, axis=-1, largest=1, sorted=1)                      # [..., D] descending
    at = op.Expand(_row(op.Sub(kk, _i64s(1)), rank), op.Concat(op.Shape(x, end=-1), _i64(1), axis=0))
    thr = op.GatherElements(top, at, axis=-1)                                   # [..., 1]
    return op.Where(op.GreaterOrEqual(_row(rho, rank), _f(1.0, rho)), x,       # ρ ≥ 1: untouched
                    op.Where(op.GreaterOrEqual(mag, thr), x, _f(0.0, x)))


def sparse_mlp_portable(x: TensorType, w_gate: Optional[TensorType], b_gate: Optional[TensorType],
                        w_up: TensorType, b_up: Optional[TensorType], w_down: TensorType,
                        b_down: Optional[TensorType], rho: TensorType, bits: TensorType, act: str,
                        skip: str = "x", w_down_dense=None):
    _check_act(act, skip)
    rank = len(x.shape) if x.shape is not None else 3
    xs = _topk_keep(x, rho, rank) if skip == "x" else x
    up = _linear(xs, w_up, b_up)
    h = (op.Mul(_activation(_linear(xs, w_gate, b_gate), act), up) if w_gate is not None
         else _activation(up, act))
    hk = _topk_keep(h, rho, rank) if skip == "h" else h                       # ρ on h: mask, then a dense down
    y = _linear(hk, w_down, b_down)
    if w_down_dense is not None:              # rows at ρ ≥ 1 (every unit kept): down's source-layout copy on all of h
        y = op.Where(op.GreaterOrEqual(_row(rho, rank), _f(1.0, rho)), _linear(h, w_down_dense, b_down), y)
    # per-token symmetric fake quantisation, q_max = 2^(round(b) − 1) − 1; b ≥ 16 or s == 0: untouched
    bits_r = _row(bits, rank)
    qmax = op.CastLike(op.Sub(op.Pow(_f(2.0, bits), op.Sub(op.Round(bits_r), _f(1.0, bits))), _f(1.0, bits)), y)
    s = op.Div(op.ReduceMax(op.Abs(y), _i64(-1), keepdims=1), qmax)            # [..., 1]
    safe = op.Where(op.Greater(s, _f(0.0, s)), s, _f(1.0, s))
    yq = op.Mul(op.Max(op.Min(op.Round(op.Div(y, safe)), qmax), op.Neg(qmax)), safe)
    identity = op.Or(op.GreaterOrEqual(bits_r, _f(16.0, bits)), op.Equal(s, _f(0.0, s)))
    return op.Where(identity, y, yq)


def _dequantize(codes, scale, offset, bits: int):
    """W [N, K] = (scale·code) + offset per block; 4-bit codes two per byte, the even one low."""
    if bits == 4:
        c = op.Unsqueeze(codes, _i64(-1))
        codes = op.Concat(op.BitwiseAnd(c, op.Constant(value=ir.tensor(np.array(15, np.uint8)))),
                          op.BitShift(c, op.Constant(value=ir.tensor(np.array(4, np.uint8))), direction="RIGHT"),
                          axis=-1)                                              # [N, nb, block/2, 2]
    q = op.Reshape(op.Cast(codes, to=ir.DataType.FLOAT), _i64(0, 0, -1))       # [N, nb, block]
    w = op.Add(op.Mul(q, op.Unsqueeze(scale, _i64(-1))), op.Unsqueeze(offset, _i64(-1)))
    return op.Reshape(w, _i64(0, -1))                                           # [N, K]


def sparse_mlp_blocks_portable(x, codes_gate, scale_gate, offset_gate, b_gate, codes_up, scale_up, offset_up, b_up,
                               codes_down, scale_down, offset_down, b_down, rho, bits, act: str, bits_gate: int,
                               bits_up: int, bits_down: int, block_size: int, activations: str = "fp32", skip="x",
                               codes_down_dense=None, scale_down_dense=None, offset_down_dense=None,
                               bits_down_dense: int = 4):
    if activations != "fp32":   # never exported (a pass makes the op); int8 has no portable decomposition here
        raise NotImplementedError("sparse_mlp_blocks: the portable translation has fp32 activations only")
    wg = None if codes_gate is None else _dequantize(codes_gate, scale_gate, offset_gate, bits_gate)
    wu = _dequantize(codes_up, scale_up, offset_up, bits_up)
    wd = _dequantize(codes_down, scale_down, offset_down, bits_down)     # [Dout, I]; skip h: W_downᵀ [I, Dout]
    wdd = None if codes_down_dense is None else _dequantize(codes_down_dense, scale_down_dense, offset_down_dense,
                                                             bits_down_dense)
    return sparse_mlp_portable(x, wg, b_gate, wu, b_up, op.Transpose(wd, perm=[1, 0]) if skip == "h" else wd, b_down,
                               rho, bits, act, skip, wdd)


def linear_blocks_custom(x, codes, scale, offset, bias, bits: int, block_size: int, activations: str = "fp32"):
    return _LINEAR_BLOCKS(x, codes, scale, offset, bias, bits=int(bits), block_size=int(block_size),
                          activations=str(activations))


def linear_blocks_portable(x, codes, scale, offset, bias, bits: int, block_size: int, activations: str = "fp32"):
    if activations != "fp32":   # as sparse_mlp_blocks_portable: no portable int8 decomposition
        raise NotImplementedError("linear_blocks: the portable translation has fp32 activations only")
    return _linear(x, _dequantize(codes, scale, offset, bits), bias)


# ---------------------------------------------------------------------------------------------- tables
CUSTOM = {
    torch.ops.solm.gate_controls.default: gate_controls_custom,
    torch.ops.solm.quest_attention.default: quest_attention_custom,
    torch.ops.solm.sparse_mlp.default: sparse_mlp_custom,
    torch.ops.solm.sparse_mlp_blocks.default: sparse_mlp_blocks_custom,
    torch.ops.solm.quest_attention_rope.default: quest_attention_rope_custom,
    torch.ops.solm.linear_blocks.default: linear_blocks_custom,
}

PORTABLE = {
    torch.ops.solm.gate_controls.default: gate_controls_portable,
    torch.ops.solm.quest_attention.default: quest_attention_portable,
    torch.ops.solm.sparse_mlp.default: sparse_mlp_portable,
    torch.ops.solm.sparse_mlp_blocks.default: sparse_mlp_blocks_portable,
    torch.ops.solm.quest_attention_rope.default: quest_attention_rope_portable,
    torch.ops.solm.linear_blocks.default: linear_blocks_portable,
}


def translation_table(portable: bool) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``: standard ONNX ops when ``portable``
    (runs on stock onnxruntime), else one ``ai.solm`` node per op (needs SolmEP)."""
    return dict(PORTABLE if portable else CUSTOM)
