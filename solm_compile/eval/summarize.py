"""How ``evaluate`` reports a trace: the cost model as exact arithmetic, and per-method summaries."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from solm_compile.analysis import cost as cm
from solm_compile.analysis.cost import CostModel  # noqa: F401 - evaluate.py and the CLI import it from here
from solm_compile.policy.actions import ActionGrid
from solm_compile.eval.sources import Trace


# ---------------------------------------------------------------------------------------------- summaries
def _spend(tr: Trace, cost: Optional[CostModel]) -> dict:
    u = tr.usage()
    out = {"usage": {"attn_keep": u[0], "mlp_keep": u[1], "bits": 16 * u[2], "bits_ratio": u[2]},
           "net_keep": cm.net_keep(u[0], u[1], 16 * u[2]), "counted_steps": int(tr.mask.sum())}
    if cost is not None:
        if bool(tr.mask.any()):
            L = (tr.L0[:, None] + torch.arange(tr.mask.shape[1])[None] + 1)[tr.mask]
            f, b = cost.mean_fraction(L, tr.controls[tr.mask])
            L_mid = int(L.double().mean().floor())
        else:
            f, b, L_mid = 1.0, 1.0, int(tr.L0.double().mean() + tr.mask.shape[1] / 2)
        fm, bm = cost.fraction(L_mid, u[0], u[1], 16 * u[2])
        out.update(flops_fraction=f, bytes_fraction=b, flops_fraction_at_mean=fm, bytes_fraction_at_mean=bm,
                   cost_L=L_mid)
    return out


def _row_nll(tr: Trace) -> Tensor:
    v = tr.valid.double()
    return (tr.nll.double() * v).sum(1) / v.sum(1).clamp_min(1)


def summarize(tr: Trace, cost: Optional[CostModel] = None, ref: Optional[Trace] = None) -> dict:
    """ppl, its delta-method standard error over per-block mean NLL, usage, net keep and cost fractions."""
    rows = _row_nll(tr)
    n = rows.numel()
    v = tr.valid.double()
    mean = float((tr.nll.double() * v).sum() / v.sum().clamp_min(1))
    ppl = math.exp(mean)
    sd = float(rows.std()) if n > 1 else float("nan")
    out = {"ppl": ppl, "ppl_se": ppl * sd / math.sqrt(n) if n > 1 else None, "nll": mean,
           "nll_se": sd / math.sqrt(n) if n > 1 else None, "blocks": n, "tokens": int(v.sum())}
    if ref is not None:
        d = rows - _row_nll(ref)
        out["delta_nll_vs_policy"] = float(d.mean())
        out["delta_nll_vs_policy_se"] = float(d.std()) / math.sqrt(n) if n > 1 else None
    out.update(_spend(tr, cost))
    return out


def action_histogram(tr: Trace, grid: ActionGrid) -> dict:
    a = tr.actions[tr.mask] if tr.actions is not None else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(a[a >= 0], minlength=grid.num_actions)
    return {grid.tag(i): int(c) for i, c in enumerate(counts) if c}
