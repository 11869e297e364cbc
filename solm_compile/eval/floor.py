"""The static floor (issue 18): calibrated per-layer keeps (``layers``), and ``floor`` = the best static allocation.

Calibration (``fit_layer_costs``), on the training genres' validation split, never on the text evaluated: for
each block a dense prefill of ctx tokens, then ``steps`` single-token steps with a dense past; at each step every
variant "layer l alone at level v of axis a (κ or ρ), everything else dense" runs once, and its KL(dense ‖
variant) of the final next-token distribution is averaged over blocks and steps: ``kl[a]`` [L, levels]
(dense level = 0).

Allocation (``allocate``), per axis: for a target mean keep ū, choose per-layer keeps k_l with (1/L)·Σ k_l = ū
— the PLAIN mean over layers (SmolLM2's layers are equal-sized, so it is the bytes-weighted mean too; it is what
"matched usage" means for this baseline) — minimising Σ_l cost_l(k_l), cost_l the piecewise-linear interpolation
of layer l's measured KL between grid levels. Greedy marginal cost on each layer's lower convex hull: every layer
starts at the lowest level and the upgrade with the largest KL drop per unit of keep is bought until the budget
is spent, the last one partially (κ and ρ take any value). On convex curves this is the exact optimum of the
interpolated problem; off the hull a level is never chosen (a mix of its neighbours is cheaper). Bits are not
allocated per layer: every layer gets ``uniform``'s bits (the nearest-integer mixture of 16·b̄).

The calibration is saved as a small JSON (a "static policy" file: ``save_static`` / ``load_static``) with the
model's identity, the grid levels, the per-layer KL and the calibration data's mixture record, so ``solm eval``
can reuse it without recomputing.

``floor``: at the usage being matched, uniform, schedule and layers are each run on the calibration blocks and
the one with the lowest NLL there is the floor (``choose_floor``); it is chosen on calibration text only, never
on the evaluated held-out text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from solm_compile.errors import UserError
from solm_compile.eval import baselines as bl
from solm_compile.io import atomic_write_text
from solm_compile.policy.actions import ActionGrid

FORMAT = "solm-static-policy"
VERSION = 1
AXES = ("attn_keep", "mlp_keep")
FLOOR_OF = ("uniform", "schedule", "layers")


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer sensitivities: ``kl[a]`` [L, len(levels[a])] for a = κ, ρ (the last level is dense: 0)."""

    levels: tuple[tuple[float, ...], tuple[float, ...]]
    kl: tuple[Tensor, Tensor]
    blocks: int
    steps: int

    def __post_init__(self) -> None:
        for name, lv, kl in zip(AXES, self.levels, self.kl):
            if list(lv) != sorted(lv) or not lv or lv[-1] != 1.0:
                raise UserError(f"static policy: {name} levels {list(lv)} must ascend to 1")
            if kl.dim() != 2 or kl.shape[1] != len(lv) or kl.shape[0] != self.kl[0].shape[0]:
                raise UserError(f"static policy: {name} KL table {list(kl.shape)} is not [layers, {len(lv)}]")

    @property
    def num_layers(self) -> int:
        return int(self.kl[0].shape[0])

    def to_dict(self) -> dict:
        return {"blocks": self.blocks, "steps": self.steps,
                "kl": {n: {f"{v:g}": [round(float(x), 7) for x in kl[:, i]] for i, v in enumerate(lv)}
                       for n, lv, kl in zip(AXES, self.levels, self.kl)}}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerCosts":
        levels, kls = [], []
        for n in AXES:
            per = d["kl"][n]
            lv = sorted(per, key=float)
            levels.append(tuple(float(v) for v in lv))
            kls.append(torch.tensor([per[v] for v in lv], dtype=torch.float64).T.contiguous())   # [L, levels]
        return cls(tuple(levels), tuple(kls), int(d["blocks"]), int(d["steps"]))


@torch.no_grad()
def fit_layer_costs(lm: Any, blocks: Tensor, grid: ActionGrid, ctx: int, steps: int,
                    batch_rows: int = 32) -> LayerCosts:
    """Mean KL(dense ‖ one layer at one non-dense level of κ or ρ) per layer and level over ``blocks`` [n, ≥
    ctx+steps] and ``steps`` steps each (module docstring)."""
    L = int(lm.info.num_layers)
    levels = (tuple(float(v) for v in grid.kappa_levels), tuple(float(v) for v in grid.rho_levels))
    variants = [(a, lv, layer) for a, lvs in enumerate(levels) for lv in lvs[:-1] for layer in range(L)]
    ctl = torch.tensor([[1.0, 1.0, 16.0]]).repeat(len(variants), L, 1)          # [V, L, 3]
    for i, (a, lv, layer) in enumerate(variants):
        ctl[i, layer, a] = lv
    sums = torch.zeros(len(variants), dtype=torch.float64)
    min_len = lm.gate.min_len
    for b in range(blocks.shape[0]):
        _, _, cache = lm.prefill(blocks[b:b + 1, :ctx])
        for t in range(steps):
            if cache.length + 1 <= min_len:
                raise UserError(f"calibration: ctx {ctx} leaves step {t} dense (the gate's min_len is {min_len})")
            ids = blocks[b:b + 1, ctx + t, None]                                  # [1, 1]
            one = torch.ones(1)
            lg, _, nxt = lm.step(ids, cache, one, one, one * 16)                  # [1, 1, V]
            ref = F.log_softmax(lg[:, 0].double(), -1)                            # [1, vocab]
            for s in range(0, len(variants), batch_rows):
                c = ctl[s:s + batch_rows]                                         # [m, L, 3]
                m = c.shape[0]
                lg_v, _, _ = lm.step(ids.expand(m, 1), cache.repeat_interleave(m), c[..., 0].contiguous(),
                                     c[..., 1].contiguous(), c[..., 2].contiguous())   # [m, 1, vocab]
                lp = F.log_softmax(lg_v[:, 0].double(), -1)                       # [m, vocab]
                sums[s:s + m] += (ref.exp() * (ref - lp)).sum(-1)                 # [m]
            cache = nxt
    mean = sums / (blocks.shape[0] * steps)
    kl = []
    for a, lvs in enumerate(levels):
        tab = torch.zeros(L, len(lvs), dtype=torch.float64)                      # [L, levels]
        for i, (va, lv, layer) in enumerate(variants):
            if va == a:
                tab[layer, lvs.index(lv)] = mean[i]
        kl.append(tab)
    return LayerCosts(levels, tuple(kl), int(blocks.shape[0]), steps)


# ---------------------------------------------------------------------------------------------- allocation
def _hull(levels: Sequence[float], cost: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of the points (level, cost), left to right."""
    hull: list[int] = []
    for i in range(len(levels)):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = ((levels[j], cost[j]) for j in hull[-2:])
            x2, y2 = levels[i], cost[i]
            if (y1 - y0) * (x2 - x0) >= (y2 - y0) * (x1 - x0):                  # hull[-1] is on or above
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(levels: Sequence[float], kl: Tensor, target: float) -> list[float]:
    """Per-layer keeps [L] with plain mean ``target`` minimising the interpolated summed KL (``kl`` [L, levels];
    module docstring). A target below the lowest level gives every layer the lowest level, above 1 all dense."""
    L = kl.shape[0]
    lv = [float(v) for v in levels]
    if target <= lv[0]:
        return [lv[0]] * L
    if target >= lv[-1]:
        return [lv[-1]] * L
    hulls = [_hull(lv, [float(x) for x in kl[layer]]) for layer in range(L)]
    pos = [0] * L                                                   # index into each layer's hull
    keep = [lv[h[0]] for h in hulls]
    budget = target * L - sum(keep)

    def gain(layer: int) -> float:                                  # KL saved per unit of keep by the next upgrade
        h, p = hulls[layer], pos[layer]
        i, j = h[p], h[p + 1]
        return float(kl[layer, i] - kl[layer, j]) / (lv[j] - lv[i])

    while budget > 1e-12:
        open_ = [layer for layer in range(L) if pos[layer] + 1 < len(hulls[layer])]
        if not open_:
            break
        best = max(open_, key=lambda layer: (gain(layer), -layer))   # ties: the earlier layer
        step = lv[hulls[best][pos[best] + 1]] - keep[best]
        if step <= budget + 1e-12:
            keep[best] += step
            pos[best] += 1
            budget -= step
        else:
            keep[best] += budget
            budget = 0.0
    return keep


def layer_controls(costs: LayerCosts, usage: Sequence[float], mask: Tensor) -> Tensor:
    """[n, T, L, 3]: per-layer κ and ρ from ``allocate`` on every counted step, dense elsewhere; bits as
    ``uniform`` (the same in every layer)."""
    n, T = mask.shape
    L = costs.num_layers
    out = torch.tensor(bl.DENSE).repeat(n, T, L, 1)                              # [n, T, L, 3]
    for a in range(2):
        k = torch.tensor(allocate(costs.levels[a], costs.kl[a], float(usage[a])), dtype=torch.float32)   # [L]
        out[..., a] = torch.where(mask[..., None], k, out[..., a])
    bits = bl.uniform_controls(usage, mask, (False, False, True))[..., 2]        # [n, T]
    out[..., 2] = bits[..., None]
    return out


# ---------------------------------------------------------------------------------------------- the file
def save_static(path: Path, costs: LayerCosts, ident: dict, model_name: str, calibration: dict) -> None:
    """Write the static policy JSON atomically: format, model identity and name, per-layer KL, calibration data."""
    d = {"format": FORMAT, "version": VERSION, "model_name": model_name, "model": ident,
         "calibration": calibration, "layer_costs": costs.to_dict()}
    atomic_write_text(Path(path), json.dumps(d, indent=1) + "\n")


def load_static(path: Path, ident: dict, mlp_skip: str = "x") -> tuple[LayerCosts, dict]:
    """(LayerCosts, the file's dict); a one-line UserError naming the file if it is not one, is for another model or
    was calibrated with ρ on another MLP skip (``mlp_skip``: the graph's; a file without it was calibrated on x)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable static policy file ({e.__class__.__name__})") from e
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != VERSION:
        raise UserError(f"{path}: not a {FORMAT} v{VERSION} file")
    if d.get("model") != ident:
        raise UserError(f"{path}: calibrated for {d.get('model_name')} ({str(d.get('model'))[:80]}), not this model")
    calibrated = ((d.get("calibration") or {}).get("gate") or {}).get("mlp_skip", "x")
    if calibrated != mlp_skip:
        raise UserError(f"{path}: calibrated with ρ on {calibrated} (--mlp-skip {calibrated}), not on {mlp_skip}: "
                        f"its per-layer costs do not transfer")
    try:
        costs = LayerCosts.from_dict(d["layer_costs"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: static policy file is malformed ({e.__class__.__name__}: {e})") from e
    return costs, d


def choose_floor(ppl_by_method: dict[str, float]) -> str:
    """The floor: the method of ``FLOOR_OF`` with the lowest calibration-set perplexity (ties: the simpler one)."""
    have = [m for m in FLOOR_OF if m in ppl_by_method and math.isfinite(ppl_by_method[m])]
    if not have:
        raise ValueError(f"no calibration perplexity for any of {FLOOR_OF}")
    return min(have, key=lambda m: (ppl_by_method[m], FLOOR_OF.index(m)))
