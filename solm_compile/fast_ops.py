"""Torch kernels that really skip the work a control prunes, for the ``torch.compile`` path.

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
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference as ref

MAX_ROWS = 64     # tokens per call above which the dense GEMM wins over per-token gathers
_PACKED: dict = {}
STATS = {"packed": 0, "gather_calls": 0}


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
                      act: str) -> Tensor:
    B, D = x.shape[0], x.shape[-1]
    N = x.numel() // D
    if N == 0 or N > MAX_ROWS or bool((rho >= 1).all()):
        return ops.sparse_mlp(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act)
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
def _(x, w_gate, b_gate, w_up, b_up, w_down, b_down, rho, bits, act):
    return x.new_empty(x.shape[:-1] + (w_down.shape[0],))


def use_gather_mlp(gm: torch.fx.GraphModule) -> int:
    """Point every ``solm.sparse_mlp`` of a gated graph at ``solm.sparse_mlp_gather``. Returns the count."""
    n = 0
    for node in gm.graph.nodes:
        if node.target is torch.ops.solm.sparse_mlp.default:
            node.target = torch.ops.solm.sparse_mlp_gather.default
            n += 1
    if n:
        gm.recompile()
    return n
