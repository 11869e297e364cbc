"""The ``solm`` custom ops' torch implementations, listed in ``OPS``.

Each op's interface (names, ONNX domain, inputs, outputs, attributes) is written once, in ``registry.py``. Every
op has (1) a torch custom op with a fake impl (so torch.export / Dynamo can trace it), (2) a plain reference in
``reference.py``, (3) an ONNX translation (``to_onnx.py``) and (4) a C++ kernel in SolmEP (``runtime/ep``).
``tests/test_ops.py`` checks that each registry entry has all four and that the torch schemas and the built
SolmEP agree with the registry.

The torch implementations here are the fast path used for training and evaluation: vectorised over rows and
heads, exact at dense controls (they call the very same aten ops the original graph called).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from solm_compile.ops import reference as ref
from solm_compile.ops import registry


# ---------------------------------------------------------------------------------------------- gate_controls
@torch.library.custom_op(registry.GATE_CONTROLS.torch_qualname, mutates_args=())
def gate_controls(input_ids: Tensor, past_key: Tensor, kappa: Tensor, rho: Tensor, bits: Tensor,
                  min_len: int) -> tuple[Tensor, Tensor, Tensor]:
    T = input_ids.shape[1]
    L = past_key.shape[2] + T
    if T == 1 and L > min_len:
        return kappa.clone(), rho.clone(), bits.clone()
    return torch.ones_like(kappa), torch.ones_like(rho), torch.full_like(bits, 16.0)


@gate_controls.register_fake
def _(input_ids, past_key, kappa, rho, bits, min_len):
    return torch.empty_like(kappa), torch.empty_like(rho), torch.empty_like(bits)


# ---------------------------------------------------------------------------------------------- quest_attention
def page_scores(q: Tensor, k: Tensor, page_size: int) -> Tensor:
    """Quest page scores [B,H,P] of single-token queries q [B,H,1,d] over keys k [B,Hkv,L,d].

    Page bounds are taken once per KV head and scored by each of its G = H/Hkv query heads. The score
    Σ_d max(q_d·max_d, q_d·min_d) is computed as q⁺·max + q⁻·min (max ≥ min, so the larger product is the
    one whose bound has q's sign): two small matmuls instead of a [.., P, d] temporary. A partial last page's
    bounds are taken on its own (no padded copy of the keys).
    """
    B, H, _, d = q.shape
    Hkv, L, S = k.shape[1], k.shape[2], page_size
    G = H // Hkv
    Pf = L // S                                                           # full pages
    pages = k[:, :, :Pf * S].reshape(B, Hkv, Pf, S, d)                    # [B,Hkv,Pf,S,d]
    hi, lo = pages.amax(3), pages.amin(3)                                 # [B,Hkv,Pf,d]
    if Pf * S < L:
        tail = k[:, :, Pf * S:]                                           # [B,Hkv,L-Pf*S,d]
        hi = torch.cat([hi, tail.amax(2, keepdim=True)], dim=2)           # [B,Hkv,P,d]
        lo = torch.cat([lo, tail.amin(2, keepdim=True)], dim=2)           # [B,Hkv,P,d]
    qv = q[:, :, 0].reshape(B, Hkv, G, d)                                 # [B,Hkv,G,d]
    score = qv.clamp(min=0) @ hi.transpose(-1, -2) + qv.clamp(max=0) @ lo.transpose(-1, -2)  # [B,Hkv,G,P]
    return score.reshape(B, H, -1)                                        # [B,H,P]


def quest_keep(q: Tensor, k: Tensor, kappa: Tensor, page_size: int, sinks: int, window: int,
               attn_mask: Optional[Tensor] = None) -> Tensor:
    """Token keep mask [B,H,L] for single-token queries q [B,H,1,d] over keys k [B,Hkv,L,d].

    Under ``attn_mask`` (broadcastable to [B,H,1,L]) selection sees each row's unmasked keys only (``reference``):
    pages with none are never kept, and the budget is κ of the unmasked keys, among the pages holding one."""
    B, H = q.shape[:2]
    L, S = k.shape[2], page_size
    P = -(-L // S)
    score = page_scores(q, k, S)                                          # [B,H,P]
    kap = kappa.double().view(B, 1)                                       # [B,1]
    if attn_mask is None:
        Lv, page_ok, Pv = torch.full_like(kap, L), None, P                # [B,1]
    else:
        valid = ref.valid_keys(attn_mask).expand(B, H, 1, L)[:, :, 0]     # [B,H,L]
        Lv = valid.sum(-1).double()                                       # [B,H]
        page_ok = F.pad(valid, (0, P * S - L)).view(B, H, P, S).any(-1)   # [B,H,P] pages with an unmasked key
        Pv = page_ok.sum(-1)                                              # [B,H]
        score = score.masked_fill(~page_ok, float("-inf"))
    n = torch.minimum(torch.ceil(kap * Lv - 1e-9).clamp(min=0), Lv)      # [B,1|H]
    pb = torch.minimum(torch.ceil(n / S).long(), torch.as_tensor(Pv))     # [B,1|H]
    kmax = max(int(pb.max()), 1)
    top = score.topk(kmax, dim=-1).values                                 # [B,H,kmax] descending
    thr = top.gather(-1, (pb - 1).clamp(min=0)[..., None].expand(B, H, 1))   # [B,H,1]
    page_keep = (score >= thr) & (pb > 0)[..., None]                      # [B,H,P]
    if page_ok is not None:
        page_keep &= page_ok
    page_keep |= ((pb >= torch.as_tensor(Pv)) | (kap >= 1))[..., None]
    pos = torch.arange(L, device=q.device)                                # [L]
    keep = page_keep[..., pos // S]                                       # [B,H,L]
    keep |= (pos < sinks) | (pos >= L - window)
    if window == 0 and int(pb.min()) == 0:   # a head that keeps nothing keeps the last token
        keep[..., -1] |= ~keep.any(-1)
    return keep


def zero_masked_rows(out: Tensor, attn_mask: Optional[Tensor], keep: Optional[Tensor] = None) -> Tensor:
    """``out`` [B,H,T,dv] with zeros on the query rows that have no unmasked (and kept) key, where softmax over
    all −inf gives NaN (or an additive ``finfo.min`` mask a uniform average): ``reference``'s convention."""
    if attn_mask is None:
        return out
    ok = ref.valid_keys(attn_mask)
    if keep is not None:
        ok = ok & keep
    row = ok.any(-1, keepdim=True)                                        # [B|1,H|1,T,1]
    return out if bool(row.all()) else out.masked_fill(~row, 0.0)


def _sdpa(q, k, v, attn_mask, scale, is_causal, enable_gqa):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


@torch.library.custom_op(registry.QUEST_ATTENTION.torch_qualname, mutates_args=())
def quest_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kappa: Tensor,
                    scale: Optional[float], is_causal: bool, page_size: int, sinks: int,
                    window: int) -> Tensor:
    gqa = k.shape[1] != q.shape[1]
    if q.shape[2] != 1 or bool((kappa >= 1).all()):
        out = _sdpa(q, k, v, attn_mask, scale, is_causal, gqa)
        return zero_masked_rows(out, attn_mask).contiguous()   # the fake's layout (inductor checks)
    keep = quest_keep(q, k, kappa, page_size, sinks, window, attn_mask)[:, :, None, :]  # [B,H,1,L]
    out = _sdpa(q, k, v, with_keep(attn_mask, keep), scale, False, gqa)
    return zero_masked_rows(out, attn_mask, keep).contiguous()


def with_keep(attn_mask: Optional[Tensor], keep: Tensor) -> Tensor:
    """The attention mask with the tokens outside ``keep`` [B,H,1,L] removed (bool: and; additive: -inf)."""
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


@quest_attention.register_fake
def _(q, k, v, attn_mask, kappa, scale, is_causal, page_size, sinks, window):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


# ---------------------------------------------------------------------------------------------- sparse_mlp
def topk_channels(x: Tensor, rho: Tensor) -> Tensor:
    """Zero all but the ⌈ρ·D⌉ largest-|x| channels of each token (ties kept). x [B,T,D], rho [B]."""
    D = x.shape[-1]
    k = torch.ceil(rho.double() * D - 1e-9).clamp(1, D).long()             # [B]
    mag = x.abs()                                                         # [B,T,D]
    top = mag.sort(dim=-1, descending=True).values                        # [B,T,D]
    thr = top.gather(-1, (k - 1).view(-1, 1, 1).expand(x.shape[0], x.shape[1], 1))  # [B,T,1]
    return torch.where(mag >= thr, x, torch.zeros_like(x))


def fake_quant(y: Tensor, bits: Tensor) -> Tensor:
    """Per-token symmetric fake quantisation; rows with bits ≥ 16 are untouched. y [B,T,D], bits [B]."""
    qmax = (2.0 ** (torch.round(bits) - 1) - 1).view(-1, 1, 1)            # [B,1,1]
    s = y.abs().amax(-1, keepdim=True) / qmax                             # [B,T,1]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    yq = torch.clamp(torch.round(y / safe), -qmax, qmax) * safe           # [B,T,D]
    return torch.where((bits >= 16).view(-1, 1, 1) | (s == 0), y, yq)


@torch.library.custom_op(registry.SPARSE_MLP.torch_qualname, mutates_args=())
def sparse_mlp(x: Tensor, w_gate: Optional[Tensor], b_gate: Optional[Tensor], w_up: Tensor,
               b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor], rho: Tensor, bits: Tensor,
               act: str, skip: str = "x") -> Tensor:
    fn = ref.ACTIVATIONS[act]
    if skip not in registry.MLP_SKIPS:
        raise ValueError(f"solm.sparse_mlp: skip must be one of {registry.MLP_SKIPS}, got {skip!r}")
    sparse = not bool((rho >= 1).all())
    if sparse and skip == "x":
        x = topk_channels(x, rho)
    up = F.linear(x, w_up, b_up)
    h = fn(F.linear(x, w_gate, b_gate)) * up if w_gate is not None else fn(up)
    if sparse and skip == "h":
        h = topk_channels(h, rho)             # the units of h: the same top-k (ties kept), over I instead of D
    y = F.linear(h, w_down, b_down)
    if not bool((bits >= 16).all()):
        y = fake_quant(y, bits)
    return y


@sparse_mlp.register_fake
def _(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act, skip="x"):
    return x.new_empty(x.shape[:-1] + (w_down.shape[0],))


# ---------------------------------------------------------------------------------------------- sparse_mlp_blocks
# Made by an ONNX pass (passes/pack_mlp.py), never traced from a model: the torch op is the reference's
# dequantisation followed by the fast sparse_mlp, enough to run and test the op from torch.
@torch.library.custom_op(registry.SPARSE_MLP_BLOCKS.torch_qualname, mutates_args=())
def sparse_mlp_blocks(x: Tensor, codes_gate: Optional[Tensor], scale_gate: Optional[Tensor],
                      offset_gate: Optional[Tensor], b_gate: Optional[Tensor], codes_up: Tensor, scale_up: Tensor,
                      offset_up: Tensor, b_up: Optional[Tensor], codes_down: Tensor, scale_down: Tensor,
                      offset_down: Tensor, b_down: Optional[Tensor], rho: Tensor, bits: Tensor, act: str,
                      bits_gate: int, bits_up: int, bits_down: int, block_size: int,
                      activations: str = "fp32", skip: str = "x", codes_down_dense: Optional[Tensor] = None,
                      scale_down_dense: Optional[Tensor] = None, offset_down_dense: Optional[Tensor] = None,
                      bits_down_dense: int = 4) -> Tensor:
    if activations != "fp32" or skip != "x":   # int8 activations, h skip: the reference itself (slow, exact)
        dense = None if codes_down_dense is None else (codes_down_dense, scale_down_dense, offset_down_dense,
                                                       bits_down_dense)
        return ref.sparse_mlp_blocks_ref(x, codes_gate, scale_gate, offset_gate, b_gate, codes_up, scale_up,
                                         offset_up, b_up, codes_down, scale_down, offset_down, b_down, rho, bits, act,
                                         bits_gate, bits_up, bits_down, block_size, activations, skip, dense)
    deq = ref.dequantize_blocks_ref
    wg = None if codes_gate is None else deq(codes_gate, scale_gate, offset_gate, bits_gate)
    return sparse_mlp(x, wg, b_gate, deq(codes_up, scale_up, offset_up, bits_up), b_up,
                      deq(codes_down, scale_down, offset_down, bits_down), b_down, rho, bits, act)


@sparse_mlp_blocks.register_fake
def _(x, codes_gate, scale_gate, offset_gate, b_gate, codes_up, scale_up, offset_up, b_up, codes_down, scale_down,
      offset_down, b_down, rho, bits, act, bits_gate, bits_up, bits_down, block_size, activations="fp32", skip="x",
      codes_down_dense=None, scale_down_dense=None, offset_down_dense=None, bits_down_dense=4):
    dout = scale_down.shape[1] * block_size if skip == "h" else codes_down.shape[0]   # h: down given transposed
    return x.new_empty(x.shape[:-1] + (dout,))


# ---------------------------------------------------------------------------------------------- quest_attention_rope
# Made by an ONNX pass (passes/fuse_rope_attention.py), never traced from a model: the torch op is the reference,
# enough to run and test the op from torch.
@torch.library.custom_op(registry.QUEST_ATTENTION_ROPE.torch_qualname, mutates_args=())
def quest_attention_rope(qkv: Tensor, cos: Tensor, sin: Tensor, attn_mask: Optional[Tensor], kappa: Tensor,
                         scale: Optional[float], page_size: int, sinks: int, window: int, num_heads: int,
                         kv_num_heads: int, interleaved: int) -> Tensor:
    return ref.quest_attention_rope_ref(qkv, cos, sin, attn_mask, kappa, scale, page_size, sinks, window, num_heads,
                                        kv_num_heads, interleaved).contiguous()


@quest_attention_rope.register_fake
def _(qkv, cos, sin, attn_mask, kappa, scale, page_size, sinks, window, num_heads, kv_num_heads, interleaved):
    d = qkv.shape[-1] // (num_heads + 2 * kv_num_heads)
    return qkv.new_empty(qkv.shape[:-1] + (num_heads * d,))


# ---------------------------------------------------------------------------------------------- linear_blocks
# Made by an ONNX pass (passes/fuse_linear_blocks.py), never traced: the torch op is the reference.
@torch.library.custom_op(registry.LINEAR_BLOCKS.torch_qualname, mutates_args=())
def linear_blocks(x: Tensor, codes: Tensor, scale: Tensor, offset: Tensor, bias: Optional[Tensor], bits: int,
                  block_size: int, activations: str = "fp32") -> Tensor:
    return ref.linear_blocks_ref(x, codes, scale, offset, bias, bits, block_size, activations)


@linear_blocks.register_fake
def _(x, codes, scale, offset, bias, bits, block_size, activations="fp32"):
    return x.new_empty(x.shape[:-1] + (codes.shape[0],))


# ---------------------------------------------------------------------------------------------- the list
@dataclass(frozen=True)
class OpDef:
    sig: registry.OpSig   # the interface: torch.ops.solm.<sig.name>; ONNX: ai.solm::<sig.onnx_name>
    torch_op: object
    reference: object

    @property
    def name(self) -> str:
        return self.sig.name

    @property
    def onnx_name(self) -> str:
        return self.sig.onnx_name


OPS = (
    OpDef(registry.GATE_CONTROLS, gate_controls, ref.gate_controls_ref),
    OpDef(registry.QUEST_ATTENTION, quest_attention, ref.quest_attention_ref),
    OpDef(registry.SPARSE_MLP, sparse_mlp, ref.sparse_mlp_ref),
    OpDef(registry.SPARSE_MLP_BLOCKS, sparse_mlp_blocks, ref.sparse_mlp_blocks_ref),
    OpDef(registry.QUEST_ATTENTION_ROPE, quest_attention_rope, ref.quest_attention_rope_ref),
    OpDef(registry.LINEAR_BLOCKS, linear_blocks, ref.linear_blocks_ref),
)
ONNX_DOMAIN = registry.DOMAIN

# Torch-only implementations of a listed op (same schema, same numbers up to summation order), used where a
# faster torch kernel matters (``fast_ops``: the torch.compile path). They add no semantics, so they have no
# reference, ONNX translation or C++ kernel of their own.
ALTERNATE_IMPLS = {"sparse_mlp_gather": "sparse_mlp", "quest_attention_gather": "quest_attention"}
