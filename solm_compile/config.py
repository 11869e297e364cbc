"""Frozen, validated configuration, grouped by concern.

Each dataclass checks itself in ``__post_init__`` and raises ``UserError`` naming the field, so a bad value is
refused where it enters (CLI flag, checkpoint, artifact metadata) rather than deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from solm_compile.errors import UserError
from solm_compile.ops.registry import MLP_SKIP_DEFAULT, MLP_SKIPS

ATTN_SELECT = ("solm", "sol")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass(frozen=True)
class GateConfig:
    """How the gated ops interpret the per-row controls κ (attention keep), ρ (MLP keep), b (bits).

    ``attn_select="solm"`` is Quest page selection plus ``sinks`` first tokens and a local ``window`` of the most
    recent tokens that are always kept; ``"sol"`` is the SOL reference exactly (no forced tokens). Controls apply
    only on single-token steps with ``L > ts + tw + 1`` (L counts the current token); every other step is dense.

    ``mlp_skip`` (issue 17) is what ρ keeps in every MLP: "x" (SOL's input channels; the shipped policies) or "h"
    (the units of the down projection's input). The one source of truth: ``passes/gate_mlp.py`` writes it on each
    ``solm.sparse_mlp``, ``passes/pack_mlp.py`` copies it to SparseMLPBlocks, the artifact records ``solm.mlp_skip``
    and a policy checkpoint keeps it (``policy/checkpoint.check_mlp_skip``).
    """

    page_size: int = 8
    sinks: int = 4
    window: int = 8
    attn_select: str = "solm"
    ts: int = 4
    tw: int = 2
    mlp_skip: str = MLP_SKIP_DEFAULT

    def __post_init__(self) -> None:
        _check(self.page_size >= 1, f"--page-size must be >= 1, got {self.page_size}")
        _check(self.sinks >= 0, f"--sinks must be >= 0, got {self.sinks}")
        _check(self.window >= 0, f"--window must be >= 0, got {self.window}")
        _check(self.ts >= 0 and self.tw >= 0, f"--ts/--tw must be >= 0, got {self.ts}/{self.tw}")
        _check(self.attn_select in ATTN_SELECT,
               f"--attn-select must be one of {', '.join(ATTN_SELECT)}, got {self.attn_select!r}")
        _check(self.mlp_skip in MLP_SKIPS, f"--mlp-skip: must be one of {', '.join(MLP_SKIPS)}, got {self.mlp_skip!r}")

    @property
    def forced_sinks(self) -> int:
        return self.sinks if self.attn_select == "solm" else 0

    @property
    def forced_window(self) -> int:
        return self.window if self.attn_select == "solm" else 0

    @property
    def min_len(self) -> int:
        """Controls apply only when the KV length (with the current token) exceeds this."""
        return self.ts + self.tw + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GateConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Budget:
    """Per-axis budget targets: attention keep κ̄ in [0.05, 1], MLP keep ρ̄ in [0.1, 1], bits in [2, 16]."""

    attn_keep: float = 1.0
    mlp_keep: float = 1.0
    bits: float = 16.0

    def __post_init__(self) -> None:
        _check(0.05 <= self.attn_keep <= 1.0, f"--attn-keep must be in [0.05, 1], got {self.attn_keep}")
        _check(0.1 <= self.mlp_keep <= 1.0, f"--mlp-keep must be in [0.1, 1], got {self.mlp_keep}")
        _check(2.0 <= self.bits <= 16.0, f"--bits must be in [2, 16], got {self.bits}")

    @property
    def is_dense(self) -> bool:
        return self.attn_keep >= 1.0 and self.mlp_keep >= 1.0 and self.bits >= 16.0
