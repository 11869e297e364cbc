"""GRPO maths as pure tensor functions (shared/research/sol_method.md §3, §5.3–§5.5).

Shapes: B sequences, K rollouts per sequence (same teacher-forced token path, different action schedules),
T controlled steps. Axis order everywhere is (tok, pru, q) with usage (κ, ρ/ρ_max, b/16).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from solm_compile.policy.actions import ActionGrid

ALPHA = (100.0, 100.0, 200.0)   # penalty weight per axis (tok, pru, q)
DEAD_ZONE = 0.02
GAMMA = 0.85


def discounted_returns(r: Tensor, gamma: float = GAMMA) -> Tensor:
    """G_t = sum_{j>=t} gamma^(j-t) r_j over the last dim: r [..., T] -> G [..., T]."""
    G = torch.empty_like(r)
    acc = torch.zeros_like(r[..., 0])
    for t in range(r.shape[-1] - 1, -1, -1):
        acc = r[..., t] + gamma * acc
        G[..., t] = acc
    return G


def penalty_alpha(grid: ActionGrid, alpha: tuple[float, float, float] = ALPHA) -> Tensor:
    """[3] penalty weights, 0 on an axis with a single level (its target is fixed)."""
    return torch.tensor([0.0 if single else a for a, single in zip(alpha, grid.single_level_axes())])


def budget_penalty(usage: Tensor, target: Tensor, alpha: Tensor, delta: float = DEAD_ZONE) -> Tensor:
    """sum_axis alpha * max(|u - C| - delta, 0)^2: usage, target [..., 3], alpha [3] -> [...]."""
    excess = ((usage - target).abs() - delta).clamp(min=0)           # [..., 3]
    return (alpha * excess.square()).sum(-1)                          # [...]


def realised_usage(usage_sum: Tensor, count: Tensor) -> Tensor:
    """Mean usage over effective steps: sums [..., 3], counts [...]; an episode with none counts as dense (1)."""
    mean = usage_sum / count.clamp(min=1)[..., None]                  # [..., 3]
    return torch.where(count[..., None] > 0, mean, torch.ones_like(mean))


def sample_budgets(n: int, grid: ActionGrid, generator: Optional[torch.Generator] = None) -> Tensor:
    """Per-sequence targets [n, 3] ~ U[min usage, 1] per axis (a single-level axis gets its fixed value 1)."""
    lo = torch.tensor([r[0] for r in grid.usage_range()])            # [3]
    u = torch.rand(n, 3, generator=generator)                         # [n, 3]
    return lo + (1.0 - lo) * u                                        # [n, 3]


def ll_reward(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(label): logits [..., V], labels [...] -> [...]."""
    logp = F.log_softmax(logits.float(), dim=-1)                      # [..., V]
    return logp.gather(-1, labels[..., None]).squeeze(-1)             # [...]


def kl_reward(logits_sparse: Tensor, logits_dense: Tensor) -> Tensor:
    """-KL(p_dense || p_sparse): logits [..., V] each -> [...]."""
    lp_s = F.log_softmax(logits_sparse.float(), dim=-1)               # [..., V]
    lp_d = F.log_softmax(logits_dense.float(), dim=-1)                # [..., V]
    return -(lp_d.exp() * (lp_d - lp_s)).sum(-1)                      # [...]


def group_advantages(R: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-8) -> Tensor:
    """Process-level GRPO: centre R [B,K,T] over K per (sequence, step), then whiten over the whole batch.

    ``mask`` [B,K,T] (bool) marks the decisions that count (effective steps); the rest get advantage 0 and are
    left out of the group means and the whitening statistics. Whitening uses the unbiased std.
    """
    m = torch.ones_like(R, dtype=torch.bool) if mask is None else mask.bool()
    mf = m.to(R.dtype)                                                # [B, K, T]
    n_k = mf.sum(1, keepdim=True).clamp(min=1)                        # [B, 1, T]
    A = (R - (R * mf).sum(1, keepdim=True) / n_k) * mf                # [B, K, T]
    n = mf.sum()
    mean = A.sum() / n.clamp(min=1)
    var = ((A - mean).square() * mf).sum() / (n - 1).clamp(min=1)
    return (A - mean) / (var.sqrt() + eps) * mf                       # [B, K, T]


def entropy(logits: Tensor) -> Tensor:
    """Entropy of Categorical(logits): [..., A] -> [...]."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_loss(logp_new: Tensor, logp_old: Tensor, adv: Tensor, ent: Tensor, mask: Optional[Tensor] = None,
                 clip: float = 0.2, entropy_coef: float = 0.05) -> tuple[Tensor, dict]:
    """-mean(min(r A, clip(r, 1±clip) A)) - c_H mean(H), r = exp(logp_new - logp_old); all [...] -> scalar.

    Means run over the decisions selected by ``mask`` (all when None).
    """
    m = torch.ones_like(adv) if mask is None else mask.to(adv.dtype)
    n = m.sum().clamp(min=1)
    ratio = (logp_new - logp_old).exp()                               # [...]
    surr = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    pg = -(surr * m).sum() / n
    h = (ent * m).sum() / n
    loss = pg - entropy_coef * h
    with torch.no_grad():
        clipped = (((ratio - 1).abs() > clip).to(adv.dtype) * m).sum() / n
    return loss, {"pg": pg.detach(), "entropy": h.detach(), "clip_frac": clipped}
