"""Per-token compute: the cost model's bytes fraction of one generated token, and the colour scale's floor.

Shared by ``solm run --show`` / ``--json`` (cli/show.py) and ``solm serve`` (each streamed chunk's ``solm.token_cost``
and the web page's shading), so the terminal and the page show the same number for the same step. A token's compute
is the step that processed it: the cost model's bytes at that step's KV length L and controls (κ, ρ, bits) over the
dense bytes at the same L (``analysis.cost.CostModel``, the shapes kept in the artifact's ``solm.cost_shapes``), each
part's elements counted at the bytes its storage reads (``part_bytes``): the source blocks of a low-bit artifact, scales
included, its KV cache's precision, and under ``solm.mlp_skip`` "h" the transposed down it re-stored (only the kept
units' rows are read).
"""

from __future__ import annotations

from solm_compile.analysis.cost import CostModel, ModelShapes
from solm_compile.config import GateConfig
from solm_compile.errors import UserError


# bytes per weight of each block format, its scale (and min) included: what a kernel reading the blocks reads
BLOCK_BYTES = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q5_0": (22, 32), "Q5_1": (24, 32), "Q8_0": (34, 32),
               "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256)}
# SparseMLPBlocks' transposed down under --mlp-skip h (``mlp_downT_<fmt>``, passes/pack_mlp.py): re-quantised blocks of
# 32 that the kernel keeps as codes plus an fp32 scale and offset per block (BlockRows, runtime/ep/kernels.h)
DOWN_T_BYTES = {"int8-rtn": (32 + 8, 32), "int4-rtn": (16 + 8, 32)}
# ... except under int8 activations with a 4-bit source copy of down (``mlp_down_dense_<fmt>``): then the rows at ρ < 1
# read that copy's kept units too (SolmEP regroups it unit-major; scales as half when they round-trip, as a GGUF's)
FOUR_BIT = {"Q4_0": BLOCK_BYTES["Q4_0"], "Q4_1": BLOCK_BYTES["Q4_1"], "int4-rtn": (16 + 8, 32)}


def _format_bytes(packed: dict, prefixes: tuple[str, ...]) -> float | None:
    """Bytes per element of the most used format among the ``packed`` roles starting with ``prefixes``."""
    counts: dict[str, int] = {}
    for role, n in packed.items():
        for pre in prefixes:
            if role.startswith(pre) and role[len(pre):] in BLOCK_BYTES:
                counts[role[len(pre):]] = counts.get(role[len(pre):], 0) + n
    if not counts:
        return None
    nbytes, per = BLOCK_BYTES[max(counts, key=counts.get)]
    return nbytes / per


def part_bytes(meta: dict) -> tuple:
    """((part, bytes per element), ...) for ``CostModel`` from an artifact's metadata: fp32 unless its weights are
    packed blocks (``solm.weights``) or its KV cache is fp16 (``solm.kv_cache``). "mlp_down" is the down projection:
    the MLP's format, or under --mlp-skip h its transposed re-quantised blocks (``DOWN_T_BYTES``), or with int8
    activations and a 4-bit source copy that copy (``FOUR_BIT``)."""
    packed = (meta.get("weights") or {}).get("packed") or {}
    kv = 2 if (meta.get("kv_cache") or {}).get("dtype") == "float16" else 4
    dense = _format_bytes(packed, ("matmul_",)) or 4
    mlp = _format_bytes(packed, ("mlp_gate_", "mlp_up_", "mlp_down_")) or dense
    down_t = [DOWN_T_BYTES[r[len("mlp_downT_"):]] for r in packed
              if r.startswith("mlp_downT_") and r[len("mlp_downT_"):] in DOWN_T_BYTES]
    down = down_t[0][0] / down_t[0][1] if down_t else mlp
    copy = [r[len("mlp_down_dense_"):] for r in packed if r.startswith("mlp_down_dense_")]
    if (meta.get("weights") or {}).get("activations") == "int8" and copy and copy[0] in FOUR_BIT:
        down = FOUR_BIT[copy[0]][0] / FOUR_BIT[copy[0]][1]    # every row reads the 4-bit source copy's kept units
    head = _format_bytes(packed, ("gather_",)) or dense
    return (("attention", kv), ("mlp", mlp), ("mlp_down", down), ("dense", dense), ("head", head))


class TokenCost:
    """Per-token bytes fraction of one artifact (``analysis.cost.CostModel``, memoised per (L, controls))."""

    def __init__(self, meta: dict, path: str = "the artifact"):
        if "cost_shapes" not in meta:
            raise UserError(f"{path}: compiled before artifacts carried their cost shapes; compile it again "
                            "for per-token costs (--show, --json)")
        gate = dict(meta.get("gate") or {})
        if "mlp_skip" in meta:      # what the artifact's MLPs really skip (a dense artifact: x, whatever the gate said)
            gate["mlp_skip"] = meta["mlp_skip"]
        self.model = CostModel(ModelShapes.from_dict(meta["cost_shapes"]), GateConfig.from_dict(gate), part_bytes(meta))
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
