"""Kernels that really skip the work a control prunes, for the ``torch.compile`` path.

On CPU fp32 single-token steps with contiguous inputs both ops below run SolmEP's C kernels through ``fast_c``
(the same ``solm::QuestAttention`` / ``solm::SparseMlp`` as onnxruntime). On SmolLM2's shapes, one thread: attention
3.4–4.4× this module's torch version (op level); the MLP 1.2–1.6× with cache-hot weights, parity when they stream
from memory, and a whole decode step 1.09–1.12× faster than with the torch MLP. The torch code here is the
fallback: no built library, other devices or dtypes, strided inputs, prefill.

``ops.sparse_mlp`` (the reference-exact fast path of training and evaluation) zeroes the pruned input channels and
still multiplies by the whole weight, so ρ < 1 saves nothing. ``solm::sparse_mlp_gather`` has the same schema and
the same numbers (up to float summation order) but reads only the kept channels' weights:

    gate|up = Σ_{j kept} x_j · Wᵀ[j]     one ``embedding_bag`` (mode "sum", per-sample weights) over the rows of a
                                         cached transposed copy Wᵀ = [W_gate; W_up]ᵀ  [D, 2I] (row j = channel j)

Each token is its own bag, so rows with different ρ (different kept counts) run in one call. The down projection
and the fake quantisation are unchanged. Dense rows (every ρ ≥ 1) and large prefills take ``ops.sparse_mlp``
exactly. Measured on SmolLM2's shapes (D 576, I 1536, 30 layers, one token, 2 busy CPU cores): the gate+up
products cost 26 ms dense, 16.6 / 9.9 / 5.1 ms at ρ = 0.75 / 0.5 / 0.25.

The transposed copy costs one extra gate+up weight per MLP in memory; it is made on first use and refreshed
when the weight is modified in place.

``ops.quest_attention`` likewise masks the pruned tokens and runs full SDPA. ``solm::quest_attention_gather``
(where no key is masked out; else it is ``ops.quest_attention``, whose selection sees the mask) selects the same
pages per query head (``ops.page_scores``; ties at the threshold keep more; forced sinks/window;
a head that keeps nothing keeps the last token) and reads only what some head keeps:

    per KV head: the union of its G query heads' kept full pages   (S-token windows of an as_strided view of the
                 + the sink pages and the last ⌈window/S⌉·S tokens   cache, one index_select into a reused buffer)
    per query head: SDPA over those tokens, masked to its own pages (G queries per KV head: q viewed [B,Hkv,G,d])

Per KV head rather than per query head because on SmolLM2 (9 query heads over 3 KV heads, pages of 8) a per-head
gather copies G× the pages: at κ = 0.5 that is 1.5× the whole cache, more than dense SDPA reads. The union is 68 %
of the pages at κ = 0.5 and 46 % at κ = 0.3 on SmolLM2's real keys (context 2048). Where the union plus the forced
windows would be the whole cache the op masks instead, from the same selection. Fresh multi-100-KB buffers
page-fault on every call on these VMs (~5 µs a page), hence the per-thread workspace. The page min/max pass still
reads all of K every step (Quest keeps it in the cache; here the cache is transformers'), and selection plus
the ~60 small eager ops cost more than dense SDPA itself at d = 64, so neither version beats dense SDPA on CPU.
Measured on SmolLM2's captured decode-step q/k/v (30 layers, one thread, 2 busy cores, medians of 15 interleaved
passes), gather/mask time: 1.08 / 1.05 at context 1025 (κ = 0.5 / 0.3), 1.00 / 1.00 at 2049; in the whole
model at context 2048 and κ̄ = ρ̄ = 0.5 the gather version ran 1.07× the mask version's speed (one A/B run).
"""

from __future__ import annotations

import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from solm_compile.ops import fast_c
from solm_compile.ops import torch_ops as ops  # noqa: F401  (registers torch.ops.solm.*)
from solm_compile.ops import reference as ref

# the listed ops' Python bodies: a fallback from one custom op to another skips a second dispatch (~0.1 ms a call)
_sparse_mlp = getattr(ops.sparse_mlp, "_init_fn", ops.sparse_mlp)
_quest_attention = getattr(ops.quest_attention, "_init_fn", ops.quest_attention)

MAX_ROWS = 64     # tokens per call above which the dense GEMM wins over per-token gathers
_PACKED: dict = {}
STATS = {"packed": 0, "gather_calls": 0, "attn_gather_calls": 0}


def _key(t: Tensor | None):
    return None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, t.device, t._version)


def packed_weight(w_gate: Tensor | None, w_up: Tensor) -> Tensor:
    """[D, I] or [D, 2I]: the input channels' rows of (W_gate; W_up), cached per weight storage and version."""
    key = (_key(w_gate), _key(w_up))
    hit = _PACKED.get(key)
    if hit is None:
        for old in [k for k in _PACKED if k[1][:4] == key[1][:4]]:
            del _PACKED[old]                      # the same weight modified in place: drop the stale copy
        w = w_up if w_gate is None else torch.cat([w_gate, w_up], dim=0)
        hit = _PACKED[key] = w.t().contiguous()
        STATS["packed"] += 1
        weakref.finalize(w_up, _PACKED.pop, key, None)    # freed with the model's weight
    return hit


@torch.library.custom_op("solm::sparse_mlp_gather", mutates_args=())
def sparse_mlp_gather(x: Tensor, w_gate: Optional[Tensor], b_gate: Optional[Tensor], w_up: Tensor,
                      b_up: Optional[Tensor], w_down: Tensor, b_down: Optional[Tensor], rho: Tensor, bits: Tensor,
                      act: str, skip: str = "x") -> Tensor:
    D = x.shape[-1]
    N = x.numel() // D
    if (skip != "x" or N == 0 or N > MAX_ROWS      # skip "h": gate/up are dense anyway, ops.sparse_mlp is it
            or all(r >= 1 for r in (rho if rho.dim() == 1 else rho.reshape(-1)).tolist())):
        return _sparse_mlp(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act, skip)
    y = fast_c.sparse_mlp(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act)
    if y is not None:                                                 # SolmEP's kernel (CPU fp32)
        return y
    STATS["gather_calls"] += 1
    xs = ops.topk_channels(x, rho).reshape(N, D)                      # [N, D] the kept channels, others 0
    rows, cols = xs.nonzero(as_tuple=True)                            # row-major: bag n's channels are contiguous
    counts = torch.bincount(rows, minlength=N)                        # [N]
    offsets = torch.cumsum(counts, 0) - counts                        # [N]
    w = packed_weight(w_gate, w_up)                                   # [D, (2)I]
    gu = F.embedding_bag(cols, w, offsets, mode="sum", per_sample_weights=xs[rows, cols])  # [N, (2)I]
    I = w_up.shape[0]
    up = gu[:, -I:] + b_up if b_up is not None else gu[:, -I:]
    fn = ref.ACTIVATIONS[act]
    if w_gate is not None:
        g = gu[:, :I] + b_gate if b_gate is not None else gu[:, :I]
        h = fn(g) * up
    else:
        h = fn(up)
    y = F.linear(h, w_down, b_down).reshape(*x.shape[:-1], w_down.shape[0])
    if not bool((bits >= 16).all()):
        y = ops.fake_quant(y, bits)
    return y


@sparse_mlp_gather.register_fake
def _(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act, skip="x"):
    return x.new_empty(x.shape[:-1] + (w_down.shape[0],))


def _retarget(gm: torch.fx.GraphModule, old, new) -> int:
    """Point every call of ``old`` in ``gm`` at ``new`` (same schema). Returns the count."""
    n = 0
    for node in gm.graph.nodes:
        if node.target is old:
            node.target = new
            n += 1
    if n:
        gm.recompile()
    return n


def use_gather_mlp(gm: torch.fx.GraphModule) -> int:
    """Point every ``solm.sparse_mlp`` of a gated graph at ``solm.sparse_mlp_gather``. Returns the count."""
    return _retarget(gm, torch.ops.solm.sparse_mlp.default, torch.ops.solm.sparse_mlp_gather.default)


# ---------------------------------------------------------------------------------------------- quest_attention
_TLS = threading.local()
_EXTRA: dict = {}


def _workspace(slot: str, n: int, like: Tensor) -> Tensor:
    """A per-thread flat buffer of ≥ n elements, reused across calls (a fresh buffer page-faults every call)."""
    ws = getattr(_TLS, "ws", None)
    if ws is None:
        ws = _TLS.ws = {}
    key = (slot, like.dtype, like.device)
    buf = ws.get(key)
    if buf is None or buf.numel() < n:
        buf = ws[key] = torch.empty(int(n * 1.25) + 1024, dtype=like.dtype, device=like.device)
    return buf[:n]


def _extra_windows(L: int, S: int, sinks: int, window: int, last: bool, device):
    """The S-token windows every KV head reads besides its full pages: the sink pages and the last
    ⌈max(window, partial page, last)/S⌉·S tokens (start L-S·j). Per window token (E = windows·S):
    page [E] (clamped to the full pages), forced [E] (a sink/window token), tail [E] (in the partial last
    page), first [E] (not a duplicate of an earlier window token), is_last [E]; and starts [windows]."""
    key = (L, S, sinks, window, last, device)
    hit = _EXTRA.get(key)
    if hit is None:
        Pf, tail_len = L // S, L % S
        starts = list(range(0, min(sinks, L), S))
        n_end = -(-max(window, tail_len, int(last)) // S)
        starts += [max(L - S * j, 0) for j in range(n_end, 0, -1)]
        pos = [s0 + i for s0 in starts for i in range(S)]
        seen, first = set(), []
        for p in pos:
            first.append(p not in seen)
            seen.add(p)
        forced = [p < sinks or p >= L - window for p in pos]
        t = lambda xs, dt=torch.long: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
        if len(_EXTRA) > 4096:
            _EXTRA.clear()
        hit = _EXTRA[key] = (t(starts), t([min(p // S, Pf - 1) for p in pos]), t(forced, torch.bool),
                             t([p >= Pf * S for p in pos], torch.bool), t(first, torch.bool),
                             t([last and p == L - 1 for p in pos], torch.bool), t(pos))
    return hit


def page_keep_of(score: Tensor, pbs: list[int]) -> Tensor:
    """Kept pages [B,H,P] exactly as ``ops.quest_keep`` selects them: every page scoring ≥ the pb-th largest."""
    B, H, P = score.shape
    top = score.topk(max(max(pbs), 1), dim=-1).values                             # [B,H,kmax] descending
    if min(pbs) == max(pbs):                                                      # one budget (B = 1): slices
        return score >= top[..., pbs[0] - 1:pbs[0]] if pbs[0] > 0 else torch.zeros_like(score, dtype=torch.bool)
    pb = torch.tensor(pbs, device=score.device)                                   # [B]
    thr = top.gather(-1, (pb - 1).clamp(min=0).view(B, 1, 1).expand(B, H, 1))    # [B,H,1]
    return (score >= thr) & (pb > 0).view(B, 1, 1)                               # [B,H,P]


def _windows(x: Tensor, starts: Tensor, S: int, slot: str) -> Tensor:
    """Rows of S tokens of x [B,Hkv,L,d] (contiguous) starting at flat token offsets starts [n] → [n, S*d]."""
    d = x.shape[-1]
    win = x.reshape(-1).as_strided((x.numel() // d - S + 1, S * d), (d, 1))     # row r = tokens r..r+S-1
    out = _workspace(slot, starts.numel() * S * d, x).view(-1, S * d)            # [n, S*d]
    return torch.index_select(win, 0, starts, out=out)


@torch.library.custom_op("solm::quest_attention_gather", mutates_args=())
def quest_attention_gather(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kappa: Tensor,
                           scale: Optional[float], is_causal: bool, page_size: int, sinks: int,
                           window: int) -> Tensor:
    B, H, T, d = q.shape
    Hkv, L, S = k.shape[1], k.shape[2], page_size
    G, P, Pf = H // Hkv, -(-L // S), L // S
    kl = (kappa if kappa.dim() == 1 else kappa.reshape(-1)).tolist()  # one read of the tiny control, no tensor ops
    if T == 1 and not all(x >= 1 for x in kl):                # (all dense: torch's SDPA, exactly the original op)
        out = fast_c.quest_attention(q, k, v, attn_mask, kappa, scale, page_size, sinks, window)
        if out is not None:                                   # SolmEP's kernel (CPU fp32)
            return out
    elif T == 1:
        fast_c.fold_dense_step(k, page_size)                  # keep the carried page min/max current
    if T == 1 and attn_mask is not None and not bool(ref.valid_keys(attn_mask).all()):
        # keys masked out: per-row budgets over the unmasked pages (reference), selected by the torch op
        return _quest_attention(q, k, v, attn_mask, kappa, scale, is_causal, page_size, sinks, window)
    pbs = [ref.page_budget(x, L, S) for x in kl]
    if T != 1 or min(pbs) >= P or Pf == 0:                     # prefill, dense (κ ≥ 1 ⇒ pb = P), tiny L
        return _quest_attention(q, k, v, attn_mask, kappa, scale, is_causal, page_size, sinks, window)
    if max(pbs) >= P:                                          # dense rows among sparse ones: split the batch
        return _split_dense_rows(q, k, v, attn_mask, kappa, scale, is_causal, page_size, sinks, window, pbs, P)
    page_keep = page_keep_of(ops.page_scores(q, k, S), pbs)                       # [B,H,P]
    # the union of the G query heads' full pages per KV head: read once, masked per query head
    ukeep = page_keep[..., :Pf].reshape(B, Hkv, G, Pf).any(2)                    # [B,Hkv,Pf]
    Mu = int(ukeep.sum(-1).max())
    last = window == 0 and sinks == 0 and min(pbs) == 0       # a head that keeps nothing keeps the last token
    wstart, wpage, wforced, wtail, wfirst, wlast, wpos = _extra_windows(L, S, sinks, window, last, q.device)
    W, E = wstart.shape[0], wpos.shape[0]
    if (Mu + W) * S >= L:                         # as many tokens as the dense kernel reads: mask instead
        return _masked(q, k, v, attn_mask, scale, page_keep, pbs, S, sinks, window)
    STATS["attn_gather_calls"] += 1
    uidx = ukeep.to(torch.uint8).topk(Mu, dim=-1).indices if Mu else ukeep.new_zeros(B, Hkv, 0, dtype=torch.long)
    base = (torch.arange(B * Hkv, device=q.device) * L).view(B, Hkv, 1)          # [B,Hkv,1]
    starts = torch.cat([uidx * S, wstart.expand(B, Hkv, W)], dim=-1) + base       # [B,Hkv,Mu+W]
    N = (Mu + W) * S
    kg = _windows(k, starts.reshape(-1), S, "k").view(B, Hkv, N, d)               # [B,Hkv,N,d]
    vg = _windows(v, starts.reshape(-1), S, "v").view(B, Hkv, N, -1)              # [B,Hkv,N,dv]
    pval = page_keep.reshape(B, Hkv, G, P).gather(-1, uidx[:, :, None].expand(B, Hkv, G, Mu))  # [B,Hkv,G,Mu]
    # a window token counts once: a kept partial last page or a forced token outside the head's pages
    wval = wfirst & torch.where(wtail, page_keep[..., -1:] | wforced, wforced & ~page_keep[..., wpage])  # [B,H,E]
    if last:
        wval |= wlast & (torch.tensor(pbs, device=q.device) == 0).view(B, 1, 1)
    val = torch.cat([pval[..., None].expand(B, Hkv, G, Mu, S).reshape(B, Hkv, G, Mu * S),
                     wval.view(B, Hkv, G, E)], dim=-1)                            # [B,Hkv,G,N]
    if attn_mask is None:
        mask = val
    else:
        tok = torch.cat([(uidx[..., None] * S + torch.arange(S, device=q.device)).reshape(B, Hkv, Mu * S),
                         wpos.expand(B, Hkv, E)], dim=-1)                         # [B,Hkv,N]
        m = attn_mask.expand(B, H, 1, L).reshape(B, Hkv, G, L)                    # [B,Hkv,G,L]
        m = m.gather(-1, tok[:, :, None].expand(B, Hkv, G, N))                    # [B,Hkv,G,N]
        mask = m & val if m.dtype == torch.bool else m.masked_fill(~val, float("-inf"))
    out = ops._sdpa(q.reshape(B, Hkv, G, d), kg, vg, mask, scale, False, False)  # [B,Hkv,G,dv]
    return out.reshape(B, H, 1, -1)


def _masked(q, k, v, attn_mask, scale, page_keep, pbs, S, sinks, window) -> Tensor:
    """``ops.quest_attention``'s masked full SDPA from already selected pages (``ops.quest_keep``'s tail)."""
    L = k.shape[2]
    pos = torch.arange(L, device=q.device)                                        # [L]
    keep = page_keep[..., pos // S]                                               # [B,H,L]
    keep |= (pos < sinks) | (pos >= L - window)
    if window == 0 and min(pbs) == 0:
        keep[..., -1] |= ~keep.any(-1)
    mask = ops.with_keep(attn_mask, keep[:, :, None, :])                          # [B,H,1,L]
    return ops._sdpa(q, k, v, mask, scale, False, k.shape[1] != q.shape[1]).contiguous()


def _split_dense_rows(q, k, v, attn_mask, kappa, scale, is_causal, page_size, sinks, window, pbs, P):
    """Rows whose page budget covers every page run dense; the others gather. Results put back in order."""
    dense = torch.tensor([p >= P for p in pbs], device=q.device)                 # [B]
    out = q.new_empty(q.shape[:-1] + (v.shape[-1],))                              # [B,H,1,dv]
    for rows in (dense.nonzero().flatten(), (~dense).nonzero().flatten()):
        m = attn_mask
        if m is not None and m.dim() == 4 and m.shape[0] == q.shape[0]:
            m = m[rows]
        out[rows] = _gather_impl(q[rows], k[rows], v[rows], m, kappa[rows], scale, is_causal, page_size,
                                           sinks, window)
    return out


@quest_attention_gather.register_fake
def _(q, k, v, attn_mask, kappa, scale, is_causal, page_size, sinks, window):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


_gather_impl = getattr(quest_attention_gather, "_init_fn", quest_attention_gather)


def use_gather_attention(gm: torch.fx.GraphModule) -> int:
    """Point every ``solm.quest_attention`` of a gated graph at ``solm.quest_attention_gather``. Returns the count."""
    return _retarget(gm, torch.ops.solm.quest_attention.default, torch.ops.solm.quest_attention_gather.default)
