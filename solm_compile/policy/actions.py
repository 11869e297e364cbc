"""The joint action grid: one composite action (κ attention keep, ρ MLP keep, b bits) per token.

SOL semantics (shared/research/sol_method.md §2.1): the action set is the Cartesian product κ × ρ × b,
enumerated κ-major and b-minor, ``idx = iκ·(|P|·|Q|) + iρ·|Q| + ib``; tags read ``k{κ%:03d}-s{ρ%:03d}-q{b}``;
``dense_idx`` is (κ=1, ρ=1, b=16) and is forced on non-effective steps. Usage per axis (§3) is κ, ρ/ρ_max
(ρ_max = 1) and b/16.

Default grid (issue 18; 6 × 7 × 1 = 42 actions), for ρ acting on h (``--mlp-skip h``, the down projection's
input units), chosen from docs/measurements.md and shared/research/headroom.md:

- κ {0.125, 0.25, 0.375, 0.5, 0.75, 1}: with solm's sinks + 8-token local window Quest's page-phase artefact is
  gone and uniform κ 0.125 / 0.25 / 0.5 cost 0.090 / 0.038 / 0.014 nats (headroom §1), so 0.125 is a real low
  level; the evaluated budgets κ̄ 0.3 / 0.5 / 0.7 sit between 0.25 and 0.75, where the steps are finest.
- ρ {0.3, 0.4, 0.5, 0.625, 0.75, 0.875, 1}: ρ on h costs +14.3 % / +3.1 % / +0.3 % PPL at uniform 0.3 / 0.5 /
  0.75 (session 10, 64 blocks), convex, so the grid reaches down to 0.3 and is dense between 0.5 and 1, where the
  evaluated budgets ρ̄ 0.6 / 0.75 / 0.9 sit (SOL's grid {0.5, 0.75, 1} was for ρ on x, where 0.5 already costs
  +38 %).
- b {16}: SOL's b fake-quantises the MLP output after the MLP ran in full precision: on a CPU it saves no byte
  and no FLOP and costs quality, so the policy does not get it (a single-level axis: its target is fixed at 1,
  its budget penalty weight is 0). Grids with bit levels (``GRID27``, the shipped pre-issue-18 policy) still load
  and run everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from solm_compile.errors import UserError

AXES = ("tok", "pru", "q")


def _levels(name: str, values, lo: float, hi: float, integral: bool = False) -> tuple:
    try:
        vals = tuple(int(v) if integral else float(v) for v in values)
    except (TypeError, ValueError) as e:
        raise UserError(f"action grid: {name} must be a list of numbers, got {values!r}") from e
    if integral and any(float(v) != int(v) for v in values):
        raise UserError(f"action grid: {name} must be whole numbers, got {list(values)}")
    if not vals:
        raise UserError(f"action grid: {name} must have at least one level")
    inside = (lambda v: lo <= v <= hi) if integral else (lambda v: lo < v <= hi)
    if not all(inside(v) for v in vals):
        bound = f"[{lo:g}, {hi:g}]" if integral else f"({lo:g}, {hi:g}]"
        raise UserError(f"action grid: every {name} level must be in {bound}, got {list(vals)}")
    if any(a >= b for a, b in zip(vals, vals[1:])):
        raise UserError(f"action grid: {name} must be strictly increasing, got {list(vals)}")
    if vals[-1] != hi:
        raise UserError(f"action grid: {name} must include the dense level {hi:g}, got {list(vals)}")
    return vals


@dataclass(frozen=True)
class ActionGrid:
    """Levels per axis (strictly increasing, each ending at its dense level 1 / 1 / 16)."""

    kappa_levels: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
    rho_levels: tuple[float, ...] = (0.3, 0.4, 0.5, 0.625, 0.75, 0.875, 1.0)
    bit_levels: tuple[int, ...] = (16,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kappa_levels", _levels("kappa_levels", self.kappa_levels, 0.0, 1.0))
        object.__setattr__(self, "rho_levels", _levels("rho_levels", self.rho_levels, 0.0, 1.0))
        object.__setattr__(self, "bit_levels", _levels("bit_levels", self.bit_levels, 2, 16, integral=True))

    # ------------------------------------------------------------------------------------------ indexing
    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.kappa_levels), len(self.rho_levels), len(self.bit_levels)

    @property
    def num_actions(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.num_actions

    def index(self, ik: int, ir: int, ib: int) -> int:
        """Action id of level indices (iκ, iρ, ib): κ outermost, b innermost."""
        nk, nr, nb = self.shape
        if not (0 <= ik < nk and 0 <= ir < nr and 0 <= ib < nb):
            raise IndexError(f"level indices {(ik, ir, ib)} out of range for grid shape {self.shape}")
        return ik * (nr * nb) + ir * nb + ib

    def unravel(self, idx: int) -> tuple[int, int, int]:
        """Level indices (iκ, iρ, ib) of action ``idx``."""
        if not 0 <= idx < self.num_actions:
            raise IndexError(f"action {idx} out of range [0, {self.num_actions})")
        _, nr, nb = self.shape
        return idx // (nr * nb), (idx // nb) % nr, idx % nb

    @property
    def dense_idx(self) -> int:
        nk, nr, nb = self.shape
        return self.index(nk - 1, nr - 1, nb - 1)

    def levels(self, idx: int) -> tuple[float, float, int]:
        ik, ir, ib = self.unravel(idx)
        return self.kappa_levels[ik], self.rho_levels[ir], self.bit_levels[ib]

    def tag(self, idx: int) -> str:
        k, r, b = self.levels(idx)
        return f"k{round(k * 100):03d}-s{round(r * 100):03d}-q{b}"

    def tags(self) -> list[str]:
        return [self.tag(i) for i in range(self.num_actions)]

    # ------------------------------------------------------------------------------------------ tensors
    def table(self, device=None) -> Tensor:
        """[A, 3] float32 rows (κ, ρ, b) in action order."""
        k = torch.tensor(self.kappa_levels, dtype=torch.float32)
        r = torch.tensor(self.rho_levels, dtype=torch.float32)
        b = torch.tensor(self.bit_levels, dtype=torch.float32)
        grid = torch.cartesian_prod(k, r, b)                       # [A, 3], κ-major, b-minor
        return grid.to(device) if device is not None else grid

    def decode(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Action ids (any shape, int) -> (κ, ρ, bits) float32 tensors of the same shape."""
        rows = self.table(idx.device)[idx.long()]                 # [..., 3]
        return rows[..., 0], rows[..., 1], rows[..., 2]

    def usage(self, idx: Tensor) -> Tensor:
        """Per-axis usage (κ, ρ/ρ_max, b/16) of action ids: [..., 3] float32 (ρ_max = 1 by construction)."""
        rows = self.table(idx.device)[idx.long()]                 # [..., 3]
        return rows / torch.tensor([1.0, self.rho_levels[-1], 16.0], device=idx.device)

    def usage_range(self) -> tuple[tuple[float, float], ...]:
        """(min, max) usage per axis: ((κ_min, 1), (ρ_min, 1), (b_min/16, 1))."""
        return ((self.kappa_levels[0], 1.0), (self.rho_levels[0], 1.0), (self.bit_levels[0] / 16.0, 1.0))

    def single_level_axes(self) -> tuple[bool, bool, bool]:
        return tuple(n == 1 for n in self.shape)

    # ------------------------------------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict:
        return {"kappa_levels": list(self.kappa_levels), "rho_levels": list(self.rho_levels),
                "bit_levels": list(self.bit_levels)}

    @classmethod
    def from_dict(cls, d: dict) -> "ActionGrid":
        unknown = set(d) - {"kappa_levels", "rho_levels", "bit_levels"}
        if unknown:
            raise UserError(f"action grid: unknown field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) for k, v in d.items()})


# The default grid before issue 18 (SOL's 3L shape: κ {0.25, 0.5, 1} × ρ {0.5, 0.75, 1} × b {5, 8, 16}, ρ on x): the
# shipped smollm2.pt was trained on it; checkpoints carry their own grid, so it still loads and runs.
GRID27 = ActionGrid((0.25, 0.5, 1.0), (0.5, 0.75, 1.0), (5, 8, 16))
