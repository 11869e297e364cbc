"""Per-token compute: the cost model's bytes fraction of one generated token, and the colour scale's floor.

Shared by ``solm run --show`` / ``--json`` (cli/show.py) and ``solm serve`` (each streamed chunk's ``solm.token_cost``
and the web page's shading), so the terminal and the page show the same number for the same step. A token's compute
is the step that processed it: the cost model's bytes at that step's KV length L and controls (κ, ρ, bits) over the
dense bytes at the same L (``analysis.cost.CostModel``, the shapes kept in the artifact's ``solm.cost_shapes``).
"""

from __future__ import annotations

from solm_compile.analysis.cost import CostModel, ModelShapes
from solm_compile.config import GateConfig
from solm_compile.errors import UserError


class TokenCost:
    """Per-token bytes fraction of one artifact (``analysis.cost.CostModel``, memoised per (L, controls))."""

    def __init__(self, meta: dict, path: str = "the artifact"):
        if "cost_shapes" not in meta:
            raise UserError(f"{path}: compiled before artifacts carried their cost shapes; compile it again "
                            "for per-token costs (--show, --json)")
        self.model = CostModel(ModelShapes.from_dict(meta["cost_shapes"]), GateConfig.from_dict(meta.get("gate") or {}))
        self.meta = meta

    def __call__(self, L: int, controls) -> float:
        """The fraction at KV length ``L`` and ``controls`` (κ, ρ, bits); None controls: dense (1.0)."""
        return 1.0 if controls is None else self.model.fraction(int(L), *controls)[1]

    def floor(self, L: int, budget) -> float:
        """The cheapest this artifact can make a token at ``L``: its lowest-cost action (a fixed artifact: the
        budget itself; dense: 1)."""
        kind = self.meta.get("kind")
        if kind == "dense":
            return 1.0
        if kind == "fixed":
            return min(1.0, self(L, budget))
        g = self.meta.get("action_grid") or {}
        levels = [(k, r, b) for k in g.get("kappa_levels", [1.0]) for r in g.get("rho_levels", [1.0])
                  for b in g.get("bit_levels", [16])]
        return min(self(L, c) for c in levels)


def scale_floor(value: float) -> float:
    """``lo`` rounded down to a multiple of 0.05, so the legend reads in round numbers."""
    return max(0.0, int(value * 20 + 1e-9) / 20)
