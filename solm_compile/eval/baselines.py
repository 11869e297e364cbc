"""Baselines for ``solm eval``, matched to the policy's *realised* usage (shared/research/sol_method.md §7).

Every baseline gets the per-axis usage ū = (κ̄, ρ̄, b̄/16) that the greedy policy realised on the same blocks,
and spends it differently. Values live in control units (κ, ρ, bits); ``mask`` [n, T] marks the row-steps that
count (effective steps, and for multiple choice the real continuation tokens). Outside the mask every
baseline is dense (κ=1, ρ=1, b=16), as the engine forces anyway.

Open-loop schedules (a controls tensor [n, T, 3] fixed before the run):

- ``fixed``: per axis, the two grid levels around ū mixed so the mean matches: at each step the rows that
  count are given the high level round-robin (a pointer that advances, with a different start per axis),
  and the number of high entries is corrected over time (cumulative count = round(p_hi · entries so far)),
  so the realised mean is ū to within one entry out of n·T (SOL's ``evaluate_fixed_matched_keep``, with the
  residual correction on all three axes).
- ``random_k``: for every sequence, an independent random permutation per axis of that sequence's fixed
  schedule over its counted steps: the same counts per row and axis as ``fixed``, random placement
  (SOL's ``evaluate_randomized_matched_sparsity``; the evaluator reports the median and the best of N seeds).
- ``uniform``: one level for every token: κ = κ̄ and ρ = ρ̄ exactly (the ops take any value). Bits must be
  whole (the fake-quant rounds them), so bits are the nearest-integer mixture ⌊16·q̄⌋ / ⌈16·q̄⌉ spread like
  ``fixed`` (one integer when 16·q̄ is whole).
- ``static_attn`` / ``static_mlp`` / ``static_bits``: one axis at its ``uniform`` setting, the other two dense.
  Not budget-matched (they spend more); they show what each axis alone costs.
- ``schedule``: the action depends only on the step index t. Fit on training text (the Austen novels except
  the held-out one): for every non-dense level of every axis, the mean single-step KL(dense ‖ that level) at
  each step t, with a dense past (``fit_step_costs``). For target ū on an axis with neighbours lo < ū ≤ hi,
  steps are ranked by KL(lo) − KL(hi) and the cheapest m = (1 − p_hi)·E of the E effective steps get lo for
  every row; the boundary step gets lo on the fractional share of rows (round-robin), so the mean matches. A grid
  without a bits axis (one level, 16) fits no bits costs: the schedule's bits are then ``uniform``'s.

Closed-loop controllers (SOL's ``evaluate_emc_matched_structured`` / ``evaluate_drift_aware_matched_structured``):
per row and axis, the level required to stay on budget c_req = (ū·(done + R) − spent)/R (R = counted steps left,
this one included) is rounded to its two neighbouring grid levels; a signal s ∈ [0, 1] shifts the share of
the high level by γ·(s − 0.5), γ = 0.35; the high level is taken when the shifted share is ≥ 0.5; then the
choice is clamped into the band that keeps the target reachable with the remaining steps.
``emc``: s = normalised entropy of the previous step's next-token distribution (SOL's default mix = 1; the
prefill's last logits at t=0). ``dac``: s = cosine drift ½(1 − cos) of the last two final hidden states
(the embeddings of the last context token and the current one at t=0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from solm_compile.policy.actions import ActionGrid
from solm_compile.train.rollout import gate_of

GAMMA = 0.35
DENSE = (1.0, 1.0, 16.0)
INT_BITS = tuple(range(2, 17))          # what "uniform" mixes for a fractional mean bit width


# ---------------------------------------------------------------------------------------------- mixtures
def two_nearest(levels: Sequence[float], target: float) -> tuple[float, float, float]:
    """(lo, hi, p_hi): the levels around ``target`` and the share of hi that puts the mean on it (clamped)."""
    vs = sorted(float(v) for v in levels)
    if target <= vs[0]:
        return vs[0], vs[0], 0.0
    if target >= vs[-1]:
        return vs[-1], vs[-1], 1.0
    lo = max(v for v in vs if v <= target)
    hi = min(v for v in vs if v >= target)
    return lo, hi, (0.0 if hi == lo else (target - lo) / (hi - lo))


def mixture_schedule(levels: Sequence[float], target: float, mask: Tensor, dense: float,
                     offset: int = 0) -> Tensor:
    """[n, T] values: the two levels around ``target`` on the masked entries, round-robin across rows at each
    step with the high count corrected over time; ``dense`` elsewhere."""
    n, T = mask.shape
    lo, hi, p = two_nearest(levels, target)
    out = torch.full((n, T), float(dense))
    out[mask] = lo
    if lo == hi:
        return out
    seen = n_hi_total = 0
    ptr = offset
    for t in range(T):
        idx = mask[:, t].nonzero()[:, 0]
        m = len(idx)
        if m == 0:
            continue
        k = min(m, max(0, math.floor(p * (seen + m) + 0.5) - n_hi_total))
        if k:
            out[idx[(ptr + torch.arange(k)) % m], t] = hi
        ptr, seen, n_hi_total = (ptr + k) % m, seen + m, n_hi_total + k
    return out


def _stack(k: Tensor, r: Tensor, b: Tensor) -> Tensor:
    return torch.stack([k, r, b], dim=-1)                                   # [n, T, 3]


def fixed_controls(grid: ActionGrid, usage: Sequence[float], mask: Tensor) -> Tensor:
    """Two-nearest-level mixture per axis, round-robin with residual correction: [n, T, 3]."""
    n = mask.shape[0]
    return _stack(mixture_schedule(grid.kappa_levels, usage[0], mask, 1.0, 0),
                  mixture_schedule(grid.rho_levels, usage[1], mask, 1.0, n // 3),
                  mixture_schedule(grid.bit_levels, 16.0 * usage[2], mask, 16.0, (2 * n) // 3))


def random_controls(fixed: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
    """Per sequence and axis, a random permutation of ``fixed`` over that row's masked steps: [n, T, 3]."""
    out = fixed.clone()
    for i in range(fixed.shape[0]):
        idx = mask[i].nonzero()[:, 0]
        for a in range(3):
            out[i, idx, a] = fixed[i, idx[torch.randperm(len(idx), generator=generator)], a]
    return out


def uniform_controls(usage: Sequence[float], mask: Tensor, axes: Sequence[bool] = (True, True, True)) -> Tensor:
    """κ = κ̄, ρ = ρ̄ on every counted step; bits the nearest-integer mixture of 16·q̄. ``axes`` picks which
    axes are controlled (the others stay dense): the static single-axis baselines. [n, T, 3]"""
    n, T = mask.shape
    k = torch.where(mask, torch.tensor(float(usage[0])), torch.tensor(1.0)) if axes[0] else torch.ones(n, T)
    r = torch.where(mask, torch.tensor(float(usage[1])), torch.tensor(1.0)) if axes[1] else torch.ones(n, T)
    b = (mixture_schedule(INT_BITS, 16.0 * usage[2], mask, 16.0, (2 * n) // 3) if axes[2]
         else torch.full((n, T), 16.0))
    return _stack(k, r, b)


# ---------------------------------------------------------------------------------------------- step schedule
@dataclass
class StepCosts:
    """Mean single-step KL(dense ‖ level) per step t for each axis' levels (dense level = 0), fit on training text.

    ``kl[a]`` is [len(levels[a]), T]; ``eff`` [T] marks the steps where controls apply."""

    levels: tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]
    kl: tuple[Tensor, Tensor, Tensor]
    eff: Tensor
    blocks: int

    def to_dict(self) -> dict:
        names = ("attn_keep", "mlp_keep", "bits")
        return {"blocks": self.blocks, "eff": [bool(e) for e in self.eff],
                "kl": {n: {f"{lv:g}": [round(float(x), 6) for x in row] for lv, row in zip(lvs, kl)}
                       for n, lvs, kl in zip(names, self.levels, self.kl)}}


@torch.no_grad()
def fit_step_costs(lm, blocks: Tensor, grid: ActionGrid, ctx: int, T: int, batch_rows: int = 32) -> StepCosts:
    """For each step t: dense past, then one step at every non-dense level of one axis (others dense);
    average KL(dense ‖ variant) over ``blocks`` [n, ≥ ctx+T+1]."""
    levels = (tuple(grid.kappa_levels), tuple(grid.rho_levels), tuple(float(b) for b in grid.bit_levels))
    variants = [(a, lv) for a, lvs in enumerate(levels) for lv in lvs[:-1]]
    ctl = torch.tensor([DENSE] + [tuple(lv if i == a else DENSE[i] for i in range(3)) for a, lv in variants])
    V = len(ctl)
    sums = torch.zeros(len(variants), T)
    eff = torch.zeros(T, dtype=torch.bool)
    min_len = gate_of(lm).min_len
    per = max(1, batch_rows // V)
    for s in range(0, blocks.shape[0], per):
        blk = blocks[s:s + per]
        B = blk.shape[0]
        _, _, cache = lm.prefill(blk[:, :ctx])
        for t in range(T):
            eff[t] = cache.length + 1 > min_len
            tiled = cache.repeat_interleave(V)                                   # rows b·V + v
            c = ctl.repeat(B, 1)                                                 # [B·V, 3]
            ids = blk[:, ctx + t].repeat_interleave(V)[:, None]                  # [B·V, 1]
            lg, _, new = lm.step(ids, tiled, c[:, 0].contiguous(), c[:, 1].contiguous(), c[:, 2].contiguous())
            lp = F.log_softmax(lg[:, 0].float(), dim=-1).view(B, V, -1)          # [B, V, vocab]
            kl = (lp[:, :1].exp() * (lp[:, :1] - lp[:, 1:])).sum(-1)            # [B, V-1]
            sums[:, t] += kl.sum(0)
            cache = map_cache(new, lambda x: x[::V])                            # the dense rows
    mean = sums / blocks.shape[0]
    kl = []
    for a, lvs in enumerate(levels):
        rows = [mean[variants.index((a, lv))] for lv in lvs[:-1]] + [torch.zeros(T)]
        kl.append(torch.stack(rows))                                             # [levels, T]
    return StepCosts(levels, tuple(kl), eff, int(blocks.shape[0]))


def map_cache(cache, fn):
    """A cache of the same type with ``fn`` applied to every per-layer tensor (rows are dim 0)."""
    if hasattr(cache, "tensors"):                                  # gated.Cache
        return type(cache)([fn(x) for x in cache.tensors])
    return type(cache)([fn(x) for x in cache.layers])              # tests/tiny_lm.FakeCache


def step_schedule_controls(costs: StepCosts, usage: Sequence[float], mask: Tensor) -> Tensor:
    """A step-indexed schedule matched to ``usage``: [n, T, 3] (see the module docstring)."""
    n, T = mask.shape
    if T > costs.kl[0].shape[1]:
        raise ValueError(f"step costs were fit for {costs.kl[0].shape[1]} steps, asked for {T}")
    if not bool((mask == mask[:1]).all()):
        raise ValueError("a step schedule needs the same counted steps in every row")
    steps = mask[0].nonzero()[:, 0].tolist()
    out = []
    for a, (lvs, kl) in enumerate(zip(costs.levels, costs.kl)):
        if a == 2 and len(lvs) == 1:          # no bits axis in the grid (issue 18): bits as uniform's, like layers
            out.append(uniform_controls(usage, mask, (False, False, True))[..., 2])
            continue
        target = usage[a] * (16.0 if a == 2 else 1.0)
        lo, hi, p = two_nearest(lvs, target)
        col = torch.full((n, T), DENSE[a])
        col[:, steps] = hi
        if lo != hi and steps:
            d = kl[lvs.index(lo), :T] - kl[lvs.index(hi), :T]                  # extra KL of lo over hi
            order = sorted(steps, key=lambda t: (float(d[t]), t))
            m = (1.0 - p) * len(steps)
            full = min(len(steps), math.floor(m + 1e-9))
            for t in order[:full]:
                col[:, t] = lo
            if full < len(steps):
                k = min(n, math.floor((m - full) * n + 0.5))
                col[(torch.arange(k) + a * (n // 3)) % n, order[full]] = lo
        out.append(col)
    return _stack(*out)


# ---------------------------------------------------------------------------------------------- EMC / DAC
def _choose(c_req: Tensor, signal: Tensor, cum_val: Tensor, cum_steps: Tensor, R: Tensor, target: float,
            vals: Tensor, gamma: float) -> Tensor:
    """SOL's hi/lo choice around c_req with a signal bias and a feasibility clamp; returns values [N]."""
    A, vmin, vmax = vals.numel(), float(vals[0]), float(vals[-1])
    c = c_req.clamp(vmin, vmax)
    hi = torch.searchsorted(vals, c, right=False).clamp(0, A - 1)
    lo = (hi - 1).clamp(0, A - 1)
    lo_v, hi_v = vals[lo], vals[hi]
    p_hi = torch.where(hi_v - lo_v > 1e-8, (c - lo_v) / (hi_v - lo_v).clamp_min(1e-8), torch.ones_like(c))
    p_mod = (p_hi + gamma * (signal - 0.5)).clamp(0.0, 1.0)
    chosen = torch.where((p_mod >= 0.5) & (hi != lo), hi, lo)
    R_post = (R - 1.0).clamp_min(0.0)
    total = target * (cum_steps + 1.0 + R_post)
    allowed_min = (total - cum_val - vmax * R_post).clamp(vmin, vmax)
    allowed_max = (total - cum_val - vmin * R_post).clamp(vmin, vmax)
    lo_f = torch.searchsorted(vals, allowed_min, right=False)
    hi_f = torch.searchsorted(vals, allowed_max, right=True) - 1
    lo_f, hi_f = torch.minimum(lo_f, hi_f).clamp(0, A - 1), torch.maximum(lo_f, hi_f).clamp(0, A - 1)
    return vals[torch.minimum(torch.maximum(chosen, lo_f), hi_f)]


def _entropy01(logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return (-(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1] + 1e-12)).clamp(0.0, 1.0)


def _drift01(a: Tensor, b: Tensor) -> Tensor:
    return (0.5 * (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8))).clamp(0.0, 1.0)


class HeuristicController:
    """``emc`` (entropy signal) or ``dac`` (hidden-state drift signal), matched to ``usage`` (κ̄, ρ̄, q̄)."""

    def __init__(self, kind: str, lm, grid: ActionGrid, usage: Sequence[float], gamma: float = GAMMA):
        if kind not in ("emc", "dac"):
            raise ValueError(f"unknown heuristic controller {kind!r}")
        self.kind, self.lm, self.gamma = kind, lm, gamma
        self.vals = [torch.tensor(grid.kappa_levels), torch.tensor(grid.rho_levels),
                     torch.tensor([b / 16.0 for b in grid.bit_levels])]
        self.targets = [float(u) for u in usage]

    def begin(self, x) -> "HeuristicController":
        n = x.ids.shape[0]
        self.mask = x.mask                                                       # [n, T]
        self.left = x.mask.flip(1).cumsum(1).flip(1).float()                     # counted steps from t on
        self.cum_val, self.cum_steps = torch.zeros(n, 3), torch.zeros(n)
        if self.kind == "emc":
            self.signal = _entropy01(x.logits)                                   # u from the prefill's last logits
        else:
            self.h1 = self.h2 = x.hid.float()                                    # h_{t-1}, h_{t-2}
            self.s0 = _drift01(self.lm.embed(x.last_ids[:, None])[:, 0], self.lm.embed(x.ids[:, :1])[:, 0])
        return self

    def act(self, t: int, eff: bool) -> Tensor:
        m = self.mask[:, t]
        n = m.shape[0]
        out = torch.tensor(DENSE).repeat(n, 1)                                   # [n, 3]
        if not bool(m.any()):
            return out
        sig = self.signal if self.kind == "emc" else (self.s0 if t == 0 else _drift01(self.h1, self.h2))
        R = self.left[:, t].clamp_min(1.0)
        for a in range(3):
            c_req = (self.targets[a] * (self.cum_steps + R) - self.cum_val[:, a]) / R
            v = _choose(c_req, sig, self.cum_val[:, a], self.cum_steps, R, self.targets[a], self.vals[a], self.gamma)
            out[:, a] = torch.where(m, v * (16.0 if a == 2 else 1.0), out[:, a])
        return out

    def observe(self, t: int, logits: Tensor, hid: Tensor, applied: Tensor) -> None:
        m = self.mask[:, t].float()
        use = applied / torch.tensor([1.0, 1.0, 16.0])
        self.cum_val += m[:, None] * use
        self.cum_steps += m
        if self.kind == "emc":
            self.signal = _entropy01(logits)
        else:
            self.h2, self.h1 = self.h1, hid.float()

    def refresh(self, t: int, hid: Tensor, logits: Tensor) -> None:
        """After a dense replay of the history: the signal comes from it (the budget accounting runs on)."""
        if self.kind == "emc":
            self.signal = _entropy01(logits.float())
        else:
            self.h1 = self.h2 = hid.float()
