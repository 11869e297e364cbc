"""Checkpoint selection (issue 18): a policy's score on fixed validation blocks, at the usage it realises.

For each budget of ``VAL_TARGETS`` the policy runs greedily over the blocks (the ``solm eval`` protocol) and
``uniform`` runs at the usage the policy realised; the score is the mean over budgets of NLL(policy) −
NLL(uniform), nats per token. A target below the grid's range is raised to its lowest level (a grid without a bits
axis, the default since issue 18, is validated at bits 16: its policy never saw another bits target). Lower is better; it compares checkpoints that realise different usage fairly
(overspending lowers the policy's NLL and uniform's alike), and below 0 the policy beats the static setting.
"""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from solm_compile.eval import offsets as eo
from solm_compile.eval.evaluate import PPLEvaluator, run_traces
from solm_compile.eval.sources import BlockSource
from solm_compile.eval.summarize import summarize
from solm_compile.policy.actions import ActionGrid

# (κ, ρ, b/16): the budgets solm eval's tables report (bits 8 where the grid has them)
VAL_TARGETS = ((0.3, 0.6, 0.5), (0.5, 0.75, 0.5), (0.7, 0.9, 0.5))


def validation_score(lm: Any, policy, grid: ActionGrid, blocks: Tensor, ctx: int, T: int,
                     targets: Sequence[Sequence[float]] = VAL_TARGETS, batch_rows: int = 32) -> dict:
    """{"score", "nll", "uniform_nll", "usage"}: score = mean over targets of NLL(policy) − NLL(matched uniform)."""
    targets = clamp_targets(grid, targets)
    ev = PPLEvaluator(lm, policy, grid, blocks, ctx=ctx, T=T, methods=("policy", "uniform"), batch_rows=batch_rows,
                      keep_passages=0)
    rows = []
    for t in targets:
        r = ev.run(tuple(float(x) for x in t))["methods"]
        rows.append((r["policy"]["nll"], r["uniform"]["nll"], r["policy"]["usage"]))
    n = len(rows)
    return {"score": sum(p - u for p, u, _ in rows) / n, "nll": [p for p, _, _ in rows],
            "uniform_nll": [u for _, u, _ in rows], "usage": [u for _, _, u in rows],
            "targets": [list(t) for t in targets], "blocks": int(blocks.shape[0])}


def clamp_targets(grid: ActionGrid, targets: Sequence[Sequence[float]]) -> list[tuple[float, ...]]:
    """Each target (κ, ρ, b/16) raised to the grid's lowest usage per axis (``ActionGrid.usage_range``)."""
    lows = [lo for lo, _ in grid.usage_range()]
    return [tuple(max(float(x), lo) for x, lo in zip(t, lows)) for t in targets]


def offsets_validation_score(lm: Any, policy, grid: ActionGrid, floor: dict, blocks: Tensor, ctx: int, T: int,
                             targets: Sequence[Sequence[float]] = VAL_TARGETS, batch_rows: int = 32) -> dict:
    """An offsets policy against its own floor: score = mean over targets of NLL(policy) − NLL(the floor at the same
    target), both greedy through ``OffsetController``; 0 at initialisation (the head starts at zero), below 0 only
    if the learnt deviations help. ``floor``: the checkpoint's floor record (``train/kinds.py``)."""
    targets = clamp_targets(grid, targets)
    src = BlockSource(lm, blocks, ctx, T)
    rows = []
    for t in targets:
        keeps = eo.checkpoint_floor(floor, int(lm.info.num_layers), t)                   # [L, 2]
        tr = run_traces(lm, src, {"policy": eo.policy_factory(lm, policy, grid, t, T, floor),
                                  "floor": eo.floor_factory(lm, policy.grid, keeps)}, batch_rows)
        rows.append((summarize(tr["policy"])["nll"], summarize(tr["floor"])["nll"], tr["policy"].usage()))
    n = len(rows)
    return {"score": sum(p - f for p, f, _ in rows) / n, "nll": [p for p, _, _ in rows],
            "floor_nll": [f for _, f, _ in rows], "usage": [list(u) for _, _, u in rows],
            "targets": [list(t) for t in targets], "blocks": int(blocks.shape[0])}
