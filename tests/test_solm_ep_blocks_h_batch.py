"""SparseMLPBlocks skip="h" with many tokens (B > 1 rows, or T > 1): the union tile (kernels_mlp_blocks_h.cc
DownTileMany) streams each unit kept by any token of a group once and gives the tokens that dropped it coefficient 0.

References are independent of the kernel: test_solm_ep_blocks_h's masked MLP in float64 numpy (each token's own
⌈ρ·I⌉ units of largest |h|, its own mask), the blocks dequantised by a plain loop. Budgets are high (ρ 0.7–1) and the
batches large (16 rows, or 3 rows × 5 tokens), so the kernel's cost estimate takes the union tile for these groups
(a group of tokens that mostly keep the same units); ρ = 1 rows are the dense budget.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from solm_compile.quant.blocks import BlockQuant
from solm_compile.runtime import ep
from test_ep_isa import report_under_cap
from test_solm_ep import _close, lib  # noqa: F401  (lib: the fixture)
from test_solm_ep_blocks_h import ACT, D, _kept, deq_loop, h_weights, masked_mlp, run

RHO16 = np.array([1.0, 0.9, 0.8, 0.7, 1.0, 0.85, 0.75, 0.95, 0.7, 1.0, 0.8, 0.9, 0.75, 0.85, 1.0, 0.7], np.float32)


def _rows(rng, B, T=1):
    return rng.standard_normal((B, T, D), dtype=np.float32)


@pytest.mark.parametrize("dbits", [8, 4])
@pytest.mark.parametrize("acts", ["fp32", "int8"])
def test_sixteen_rows_with_their_own_budgets_match_masked_mlp(lib, dbits, acts):
    rng = np.random.default_rng(101)
    w = h_weights(rng, True, dbits)
    x = _rows(rng, 16)
    _close(run(w, x, RHO16, activations=acts), masked_mlp(w, x, RHO16, "silu", activations=acts))


def test_many_tokens_per_row_match_masked_mlp(lib):
    """T = 5 tokens in each of 3 rows (15 tokens: a full group and a partial one), a bias on down."""
    rng = np.random.default_rng(51)
    w = h_weights(rng, True, 8)
    biases = {"down": rng.standard_normal(D).astype(np.float32)}
    x = _rows(rng, 3, 5)
    rho = np.array([0.9, 1.0, 0.8], np.float32)
    _close(run(w, x, rho, biases=biases), masked_mlp(w, x, rho, "silu", biases))


def test_union_batch_equals_its_rows_one_by_one(lib):
    """The union tile gives each row the floats the per-token tile gives it alone (same terms, same order, zeros
    added): bit-identical, with rows in parallel work items (2 threads)."""
    rng = np.random.default_rng(61)
    w = h_weights(rng, True, 8)
    x = _rows(rng, 16)
    got = run(w, x, RHO16, threads=2)
    for b in range(16):
        np.testing.assert_array_equal(got[b], run(w, x[b:b + 1], RHO16[b:b + 1])[0])


def test_units_no_row_keeps_are_never_read(lib):
    """Units that no row of the batch keeps are poisoned (NaN scale, huge offset and codes): the union holds only
    units some row kept, so the output stays finite and equal to the clean reference."""
    rng = np.random.default_rng(71)
    w = h_weights(rng, True, 8)
    up = w["up"]
    scale, offset = up.scale.copy(), up.offset.copy()
    scale[:24], offset[:24] = 0, 0                      # units 0..23: up = 0, so h = 0, kept by no row at ρ 0.7
    w["up"] = BlockQuant(up.codes, scale, offset, up.bits, up.fmt)
    x = _rows(rng, 16)
    rho = np.full(16, 0.7, np.float32)
    want = masked_mlp(w, x, rho, "silu")
    wu, wg = deq_loop(w["up"]), deq_loop(w["gate"])
    kept_any = np.zeros(wu.shape[0], bool)
    for b in range(16):
        xt = x[b, 0].astype(np.float64)
        kept_any |= _kept(ACT["silu"](wg @ xt) * (wu @ xt), float(rho[b]))
    assert 0 < (~kept_any).sum(), "every unit kept by some row: nothing to poison"
    dn = w["down"]
    scale, offset, codes = dn.scale.copy(), dn.offset.copy(), dn.codes.copy()
    scale[~kept_any], offset[~kept_any], codes[~kept_any] = np.nan, 3e38, 255
    w["down"] = BlockQuant(codes, scale, offset, 8, dn.fmt)
    got = run(w, x, rho)
    assert np.isfinite(got).all()
    _close(got, want)


_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import onnxruntime as ort
import test_solm_ep_blocks_h as t
from test_solm_ep_blocks_h_batch import RHO16
from test_solm_ep import _close
from solm_compile.runtime import ep
assert ep.register(ort, path=sys.argv[1])
rng = np.random.default_rng(3)
for dbits in (8, 4):
    w = t.h_weights(rng, True, dbits)
    x = rng.standard_normal((16, 1, t.D), dtype=np.float32)
    _close(t.run(w, x, RHO16), t.masked_mlp(w, x, RHO16, "silu"))
print("REPORT " + json.dumps(ep.isa_report(sys.argv[1])))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_every_isa_variant(lib, cap):
    """The union tile at AVX2 (2 tokens a tile) and AVX-512 (8), the per-token tile at baseline."""
    report = report_under_cap(cap, _SCRIPT, str(ep._registered), Path(__file__).parent)
    assert report["sparse_mlp_blocks"] == cap
