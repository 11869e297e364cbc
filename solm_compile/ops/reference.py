"""Plain, obviously-correct PyTorch references for every ``solm`` op.

These are the specification: loops over rows and heads, no vectorisation tricks. The fast torch ops
(``ops.py``), the portable ONNX decomposition and the C++ kernels are each tested against these functions.

Semantics (SOL, shared/research/sol_method.md §2, plus solm's forced sinks/window):

- ``gate_controls``: controls apply only on single-token steps whose KV length L (past + current) exceeds
  ``min_len = ts + tw + 1``; otherwise κ=1, ρ=1, b=16 (dense).
- ``quest_attention``: on single-token steps, keys (post-RoPE) are split into pages of ``page_size`` tokens from
  position 0; per page the element-wise min and max of the keys; per query head the page score is
  Σ_d max(q_d·max_d, q_d·min_d); the top ⌈⌈κ·L⌉/S⌉ pages are kept (every page scoring ≥ the P_b-th largest, so
  ties keep more); then the first ``sinks`` and last ``window`` tokens are forced on; a head that keeps nothing
  keeps the last token. GQA keys are repeated to the query heads. κ ≥ 1 or a page budget covering every page is
  dense. Multi-token calls (prefill) are dense.
- under an attention mask (``valid_keys``): a key is masked for a query row where the mask is False (bool) or its
  additive value is ≤ the lowest finite value of the mask's dtype (−inf, or Hugging Face's ``finfo.min``). Page
  selection sees only that row's unmasked keys: a page with no unmasked key is never selected, and "keep κ" means
  κ of the unmasked keys, ⌈⌈κ·Lᵥ⌉/S⌉ pages (Lᵥ = unmasked keys) of the Pᵥ pages holding one, the row dense
  (every unmasked key) when that covers all Pᵥ. With no mask (or nothing masked) Lᵥ = L, Pᵥ = P: unchanged. Sinks,
  window and the last-token rule are positions, as above, still under the mask.
- the KV cache buffer form (``quest_attention_cache_ref``): the new keys/values are appended to pre-allocated
  caches (float32 or float16) at the valid length, then the above runs on the valid rows, read back as float32.
- a query row with no unmasked, kept key (every key masked) outputs zeros, not the NaN of softmax over all −inf;
  dense steps and prefill included.
- ``sparse_mlp_blocks``: ``sparse_mlp`` on the weights its low-bit blocks dequantise to, w = (scale·code) + offset
  in float32 (``dequantize_blocks_ref``). With ``activations="int8"`` each linear layer's input (the top-k masked x,
  then h) is quantised per block of 32 first (``quantize_blocks_ref``: d = max|x|/127 in fp32, q = round(x·(1/d)),
  half to even) and y_n = Σ_b scale·(d_b·Σ_i code·q) + offset·d_b·Σ_i q_i: integer dot products, and the offset
  term on the quantised block's sum, as llama.cpp's Q8_1 keeps it, so y = W·x̂ with x̂ = d·q exactly
  (``linear_blocks_int8_ref``). With ``skip="h"`` (``sparse_mlp_blocks_h_ref``) ρ keeps
  units of h instead: gate/up on all of x, the ⌈ρ·I⌉ units of largest |h| kept (``topk_channels_ref`` on h: ties at
  the threshold kept), y = Σ_kept h_j·downT[j, :] with down given transposed ([I, D] blocks); "int8" then
  quantises x only (h stays fp32). With the optional source-layout down (``*_down_dense``) a row at ρ ≥ 1 runs
  y = down(h) on it instead (int8: h quantised per block, as skip "x"); under "int8" with a 4-bit copy every row
  does, on the masked h (so downT is then unused).
- ``sparse_mlp``: per token keep the ⌈ρ·D⌉ input channels of largest |x| (every channel ≥ the k-th largest),
  zero the rest, run the MLP (``skip="h"``: run gate/up on all of x and keep the ⌈ρ·I⌉ units of largest |h| instead), then fake-quantise its output per token, symmetric, q_max = 2^(b−1)−1; b ≥ 16 is
  the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def gate_controls_ref(T: int, L: int, kappa, rho, bits, min_len: int):
    """Dense controls unless this is a single-token step with L > min_len."""
    if T == 1 and L > min_len:
        return kappa.clone(), rho.clone(), bits.clone()
    return torch.ones_like(kappa), torch.ones_like(rho), torch.full_like(bits, 16.0)


def page_budget(kappa: float, L: int, S: int) -> int:
    """Pages kept for keep fraction κ at KV length L: ⌈⌈κL⌉/S⌉, clamped to [0, #pages]."""
    n = min(max(math.ceil(kappa * L - 1e-9), 0), L)
    return min(math.ceil(n / S), math.ceil(L / S))


def valid_keys(m: torch.Tensor) -> torch.Tensor:
    """The unmasked keys of a mask (bool: True; additive: above the dtype's lowest finite value, NaN counted in)."""
    if m.dtype == torch.bool:
        return m
    return ~(m <= torch.finfo(m.dtype).min)


def quest_keep_ref(q_h: torch.Tensor, k_h: torch.Tensor, kappa: float, S: int, sinks: int, window: int,
                   valid: torch.Tensor | None = None):
    """Token keep mask [L] for one query head: q_h [d], k_h [L, d] (that head's keys), valid [L] its unmasked keys."""
    L = k_h.shape[0]
    P = math.ceil(L / S)
    valid = torch.ones(L, dtype=torch.bool) if valid is None else valid
    page_ok = [bool(valid[p * S:(p + 1) * S].any()) for p in range(P)]
    Pv = sum(page_ok)
    pb = min(page_budget(kappa, int(valid.sum()), S), Pv)
    if kappa >= 1.0 or pb >= Pv:
        return torch.ones(L, dtype=torch.bool)
    scores = []
    for p in range(P):
        page = k_h[p * S:(p + 1) * S]
        hi, lo = page.max(0).values, page.min(0).values
        scores.append(torch.maximum(q_h * hi, q_h * lo).sum())
    scores = torch.stack(scores)
    keep = torch.zeros(L, dtype=torch.bool)
    if pb > 0:
        thr = scores[torch.tensor(page_ok)].sort(descending=True).values[pb - 1]
        for p in range(P):
            if page_ok[p] and scores[p] >= thr:
                keep[p * S:(p + 1) * S] = True
    keep[:sinks] = True
    if window > 0:
        keep[max(L - window, 0):] = True
    if not keep.any():
        keep[L - 1] = True
    return keep


def quest_attention_ref(q, k, v, attn_mask, kappa, scale, page_size, sinks, window):
    """q [B,H,T,d], k/v [B,Hkv,L,d], attn_mask None | bool/float broadcastable to [B,H,T,L], kappa [B]."""
    B, H, T, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // (H // Hkv)], v[b, h // (H // Hkv)]
            logits = (q[b, h] @ kh.T) * scale  # [T, L]
            valid = torch.ones(T, L, dtype=torch.bool)
            if attn_mask is not None:
                m = attn_mask.expand(B, H, T, L)[b, h]
                valid = valid_keys(m)
                logits = logits.masked_fill(~valid, float("-inf")) if m.dtype == torch.bool else logits + m
            if T == 1:
                keep = quest_keep_ref(q[b, h, 0], kh, float(kappa[b]), page_size, sinks, window, valid[0])
                valid = valid & keep[None, :]
            logits = logits.masked_fill(~valid, float("-inf"))
            p = torch.softmax(logits, dim=-1).masked_fill(~valid.any(-1, keepdim=True), 0.0)  # all masked: zeros
            out[b, h] = p @ vh
    return out


def quest_attention_cache_ref(q, k, v, attn_mask, kappa, past_key, past_value, past_length, scale, page_size, sinks,
                              window):
    """QuestAttention's KV cache buffer form (registry.QUEST_ATTENTION): k/v [B,Hkv,T,d] the new rows (float32),
    past_key/past_value [B,Hkv,C,d] the caches (float32 or float16), past_length [B]. Returns (out,
    present_key, present_value): the new rows written at [P, P+T) in the cache's dtype (float16: rounded to nearest
    even, torch's cast), and ``quest_attention_ref`` over the L = P+T valid rows as float32. Rows of different
    lengths (step protocol 2; T = 1 only): each row on its own, over its own L_b keys (a mask's first L_b)."""
    P, T = int(past_length[0]), k.shape[2]
    if not bool((past_length == P).all()):
        assert T == 1, "rows of different lengths: single-token calls only"
        rows = []
        for b in range(q.shape[0]):
            Lb = int(past_length[b]) + T
            m = None if attn_mask is None else attn_mask[b:b + 1 if attn_mask.shape[0] > 1 else 1, ..., :Lb]
            rows.append(quest_attention_cache_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], m, kappa[b:b + 1],
                                                  past_key[b:b + 1], past_value[b:b + 1], past_length[b:b + 1],
                                                  scale, page_size, sinks, window))
        return tuple(torch.cat(x) for x in zip(*rows))
    assert bool((past_length == P).all()) and P + T <= past_key.shape[2]
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, P:P + T] = k.to(past_key.dtype)
    present_value[:, :, P:P + T] = v.to(past_value.dtype)
    keys = present_key[:, :, :P + T].to(torch.float32)                                  # [B, Hkv, L, d]
    values = present_value[:, :, :P + T].to(torch.float32)                              # [B, Hkv, L, dv]
    out = quest_attention_ref(q, keys, values, attn_mask, kappa, scale, page_size, sinks, window)
    return out, present_key, present_value


def rotary_ref(x, cos, sin, interleaved: int):
    """ONNX RotaryEmbedding on x [B, N, T, d] with cos/sin [B|1, T, d/2] (no position ids): per pair (x1, x2), the
    halves x[i], x[i + d/2] (interleaved 0) or x[2i], x[2i + 1] (1), y1 = x1·cos − x2·sin, y2 = x2·cos + x1·sin."""
    c, s = cos[:, None], sin[:, None]                                           # [B|1, 1, T, d/2]
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)   # [B, N, T, d/2] each
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s                                   # [B, N, T, d/2] each
    if interleaved:
        return torch.stack((y1, y2), dim=-1).flatten(-2)                        # [B, N, T, d]
    return torch.cat((y1, y2), dim=-1)                                          # [B, N, T, d]


def quest_attention_rope_ref(qkv, cos, sin, attn_mask, kappa, scale, page_size, sinks, window, num_heads: int,
                             kv_num_heads: int, interleaved: int, past_key=None, past_value=None, past_length=None):
    """registry.QUEST_ATTENTION_ROPE: qkv [B, T, (H + 2·Hkv)·d] split into heads, q and k rotated (``rotary_ref``),
    QuestAttention over the T tokens (no cache) or in the buffer form (``quest_attention_cache_ref``: then returns
    (out, present_key, present_value)); out [B, T, H·d]."""
    B, T, N = qkv.shape
    H, Hkv = num_heads, kv_num_heads
    d = N // (H + 2 * Hkv)
    heads = qkv.view(B, T, H + 2 * Hkv, d).transpose(1, 2)                     # [B, H + 2·Hkv, T, d]
    q, k, v = heads.split([H, Hkv, Hkv], dim=1)                                 # [B, H|Hkv, T, d]
    q, k = rotary_ref(q, cos, sin, interleaved), rotary_ref(k, cos, sin, interleaved)
    if past_key is None:
        out = quest_attention_ref(q, k, v, attn_mask, kappa, scale, page_size, sinks, window)   # [B, H, T, d]
        return out.transpose(1, 2).reshape(B, T, H * d)                         # [B, T, H·d]
    out, present_key, present_value = quest_attention_cache_ref(q, k, v, attn_mask, kappa, past_key, past_value,
                                                                past_length, scale, page_size, sinks, window)
    return out.transpose(1, 2).reshape(B, T, H * d), present_key, present_value


def topk_channels_ref(x_row: torch.Tensor, rho: float) -> torch.Tensor:
    """Keep the ⌈ρ·D⌉ channels of largest |x| (ties at the threshold kept); zero the rest. x_row [D]."""
    D = x_row.shape[-1]
    if rho >= 1.0:
        return x_row
    k = min(max(math.ceil(rho * D - 1e-9), 1), D)
    thr = x_row.abs().sort(descending=True).values[k - 1]
    return torch.where(x_row.abs() >= thr, x_row, torch.zeros_like(x_row))


def fake_quant_ref(y_row: torch.Tensor, bits: float) -> torch.Tensor:
    """Symmetric per-token fake quantisation with q_max = 2^(b−1)−1; b ≥ 16 is the identity. y_row [D]."""
    if bits >= 16:
        return y_row
    qmax = 2 ** (int(round(bits)) - 1) - 1
    s = y_row.abs().max() / qmax
    if s == 0:
        return y_row
    return torch.clamp(torch.round(y_row / s), -qmax, qmax) * s


def sparse_mlp_ref(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act: str, skip: str = "x"):
    """x [B,T,D]; weights in nn.Linear layout ([out, in]); rho, bits [B]. Gated if ``w_gate`` is given. ``skip``
    "x": ρ keeps input channels of x; "h": gate/up on all of x, ρ keeps the units of h (``topk_channels_ref``)."""
    if skip not in ("x", "h"):
        raise ValueError(f"sparse_mlp: skip must be x or h, got {skip!r}")
    fn = ACTIVATIONS[act]
    B, T, D = x.shape
    out = torch.empty(B, T, w_down.shape[0], dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            xt = topk_channels_ref(x[b, t], float(rho[b])) if skip == "x" else x[b, t]
            up = F.linear(xt, w_up, b_up)
            h = fn(F.linear(xt, w_gate, b_gate)) * up if w_gate is not None else fn(up)
            if skip == "h":
                h = topk_channels_ref(h, float(rho[b]))
            out[b, t] = fake_quant_ref(F.linear(h, w_down, b_down), float(bits[b]))
    return out


def unpack_codes_ref(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, nb, block·bits/8] uint8 -> [N, nb, block] codes; 4 bits: two per byte, the even one in the low nibble."""
    if bits == 8:
        return codes
    lo, hi = codes & 15, codes >> 4
    return torch.stack([lo, hi], dim=-1).reshape(codes.shape[0], codes.shape[1], -1)


def dequantize_blocks_ref(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """W [N, K] float32 = (scale·code) + offset per block (quant/blocks.py ``BlockQuant.dequantize``)."""
    q = unpack_codes_ref(codes, bits).to(torch.float32)                        # [N, nb, block]
    w = q * scale[..., None] + offset[..., None]
    return w.reshape(q.shape[0], -1)


def quantize_blocks_ref(x_row: torch.Tensor, block: int = 32):
    """x [K] float32 -> q [K/block, block] (integers, as float32), d [K/block], block sums [K/block]: d = max|x|/127,
    q = round(x·(1/d)) half to even (torch.round), 0 where d = 0, sum d·Σq (the quantised block's, llama.cpp's Q8_1
    s); every step a float32 operation, as SolmEP does."""
    xb = x_row.to(torch.float32).reshape(-1, block)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.round(xb * inv[:, None]).clamp(-127, 127)
    return q, d, d * q.sum(-1)


def linear_blocks_int8_ref(x_row, codes, scale, offset, bits: int, bias=None):
    """y [N] = Σ_b scale·(d_b·Σ_i code_i·q_i) + offset·d_b·Σ_i q_i (+ bias): x quantised per block, the integer
    sums exact (float64), the rest summed in float64 too (SolmEP sums in float32: the tests' tolerance)."""
    q, d, xs = quantize_blocks_ref(x_row, x_row.shape[-1] // codes.shape[1])
    isum = (unpack_codes_ref(codes, bits).to(torch.float64) * q.to(torch.float64)).sum(-1)      # [N, nb]
    y = (scale.double() * (d.double() * isum) + offset.double() * xs.double()).sum(-1)
    return (y if bias is None else y + bias.double()).to(torch.float32)


def linear_blocks_ref(x, codes, scale, offset, bias, bits: int, block_size: int, activations: str = "fp32"):
    """y [.., N] = x [.., K] · Wᵀ (+ bias), W dequantised from its blocks; "int8": ``linear_blocks_int8_ref`` per
    row (x quantised per block of ``block_size``)."""
    if activations == "fp32":
        return F.linear(x.to(torch.float32), dequantize_blocks_ref(codes, scale, offset, bits), bias)
    if activations != "int8":
        raise ValueError(f"linear_blocks: activations must be fp32 or int8, got {activations!r}")
    rows = x.reshape(-1, x.shape[-1]).to(torch.float32)
    y = torch.stack([linear_blocks_int8_ref(r, codes, scale, offset, bits, bias) for r in rows])
    return y.reshape(*x.shape[:-1], codes.shape[0])


def _sparse_mlp_blocks_int8(x, g, u, dn, rho, bits, act):
    """``sparse_mlp_ref`` with int8 activations; g/u/dn: (codes, scale, offset, bits, bias), g None if not gated."""
    fn = ACTIVATIONS[act]
    B, T, _ = x.shape
    out = torch.empty(B, T, dn[0].shape[0], dtype=torch.float32)
    for b in range(B):
        for t in range(T):
            xt = topk_channels_ref(x[b, t], float(rho[b]))
            up = linear_blocks_int8_ref(xt, *u)
            h = fn(linear_blocks_int8_ref(xt, *g)) * up if g is not None else fn(up)
            out[b, t] = fake_quant_ref(linear_blocks_int8_ref(h, *dn), float(bits[b]))
    return out


def sparse_mlp_blocks_h_ref(x, g, u, dn, rho, bits, act: str, activations: str = "fp32", dense=None):
    """skip="h": g/u/dn (codes, scale, offset, bits, bias), g None if not gated, dn the blocks of W_downᵀ [I, D].
    Per token: up/gate on all of x (int8 activations: x quantised per block as ``linear_blocks_int8_ref``), h =
    act(gate)·up, keep the ⌈ρ·I⌉ largest |h| (ties kept), y = Σ_kept h_j·downT[j] + b_down, fake-quantised.
    ``dense`` (codes, scale, offset, bits): down in its source layout [D, I]; a row whose ρ ≥ 1 then takes
    y = down(h) + b_down on it (int8: h quantised per block, ``linear_blocks_int8_ref``) instead of downT. With
    activations "int8" and a 4-bit copy every row does, on its masked h (a dropped unit quantises to 0)."""
    fn = ACTIVATIONS[act]
    if activations not in ("fp32", "int8"):
        raise ValueError(f"sparse_mlp_blocks: activations must be fp32 or int8, got {activations!r}")
    wd_t = dequantize_blocks_ref(*dn[:4])                                        # [I, D]
    if activations == "fp32":
        wu = dequantize_blocks_ref(*u[:4])
        wg = None if g is None else dequantize_blocks_ref(*g[:4])
    B, T, _ = x.shape
    out = torch.empty(B, T, wd_t.shape[1], dtype=torch.float32)
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            if activations == "int8":
                up = linear_blocks_int8_ref(xt, *u)
                h = fn(linear_blocks_int8_ref(xt, *g)) * up if g is not None else fn(up)
            else:
                up = F.linear(xt, wu, u[4])
                h = fn(F.linear(xt, wg, g[4])) * up if g is not None else fn(up)
            hk = topk_channels_ref(h, float(rho[b]))
            kept = hk != 0                                                       # a kept 0 adds nothing
            if dense is not None and activations == "int8" and dense[3] == 4:    # every row: the source's down
                y = linear_blocks_ref(hk, *dense[:3], None, dense[3], 32, activations)   # on the masked h
            elif dense is not None and float(rho[b]) >= 1:
                y = linear_blocks_ref(h, *dense[:3], None, dense[3], 32, activations)
            else:
                y = hk[kept] @ wd_t[kept]
            out[b, t] = fake_quant_ref(y if dn[4] is None else y + dn[4], float(bits[b]))
    return out


def sparse_mlp_blocks_ref(x, codes_gate, scale_gate, offset_gate, b_gate, codes_up, scale_up, offset_up, b_up,
                          codes_down, scale_down, offset_down, b_down, rho, bits, act: str, bits_gate: int,
                          bits_up: int, bits_down: int, block_size: int, activations: str = "fp32", skip: str = "x",
                          dense=None):
    """``sparse_mlp_ref`` on the dequantised weights (block_size: the codes' last axis at 8 bits); activations
    "int8": each layer's input quantised per block (``linear_blocks_int8_ref``); skip "h": ``sparse_mlp_blocks_h_ref``
    (down given transposed; ``dense``: the optional source-layout down for rows at ρ ≥ 1)."""
    if skip == "h":
        g = None if codes_gate is None else (codes_gate, scale_gate, offset_gate, bits_gate, b_gate)
        return sparse_mlp_blocks_h_ref(x, g, (codes_up, scale_up, offset_up, bits_up, b_up),
                                       (codes_down, scale_down, offset_down, bits_down, b_down), rho, bits, act,
                                       activations, dense)
    if dense is not None:
        raise ValueError("sparse_mlp_blocks: a dense down copy is for skip='h' only")
    if skip != "x":
        raise ValueError(f"sparse_mlp_blocks: skip must be x or h, got {skip!r}")
    if activations == "int8":
        g = None if codes_gate is None else (codes_gate, scale_gate, offset_gate, bits_gate, b_gate)
        return _sparse_mlp_blocks_int8(x, g, (codes_up, scale_up, offset_up, bits_up, b_up),
                                       (codes_down, scale_down, offset_down, bits_down, b_down), rho, bits, act)
    if activations != "fp32":
        raise ValueError(f"sparse_mlp_blocks: activations must be fp32 or int8, got {activations!r}")
    wg = None if codes_gate is None else dequantize_blocks_ref(codes_gate, scale_gate, offset_gate, bits_gate)
    wu = dequantize_blocks_ref(codes_up, scale_up, offset_up, bits_up)
    wd = dequantize_blocks_ref(codes_down, scale_down, offset_down, bits_down)
    return sparse_mlp_ref(x, wg, b_gate, wu, b_up, wd, b_down, rho, bits, act)
