"""SolmEP's fp32 SparseMLP with skip="h" (issue 17): gate/up dense, the ⌈ρ·I⌉ units of largest |h| kept, down reads
only the kept units' rows.

The reference is written here: a float64 numpy loop over tokens (h = act(W_g·x + b_g)·(W_u·x + b_u), keep
|h| ≥ the k-th largest |h| with k = clamp(⌈ρ·I − 1e-9⌉, 1, I) and ρ the float32 input, y = W_d[:, kept]·h[kept]
+ b_d). Tolerance: test_solm_ep's ``_close`` (1e-4 of max|y|): the kernel sums in float32. The kept set is the same on
both sides for these seeds: ``_kept`` asserts the k-th and (k+1)-th |h| are far apart next to float32 noise, so a
seed that lands on a near-tie fails loudly instead of flaking.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from test_ep_isa import report_under_cap
from test_solm_ep import _close, _close_quantized, _mlp_weights, _model, _session, lib  # noqa: F401
from test_solm_ep import F, _MLP_ORDER
from solm_compile.runtime import ep

ACT = {"silu": lambda v: v / (1 + np.exp(-v)), "relu": lambda v: np.maximum(v, 0),
       "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))}


def _kept(h: np.ndarray, rho) -> np.ndarray:
    """The units ρ keeps of one token's h [I] (ρ read as the float32 the op is given)."""
    rho, n = float(np.float32(rho)), h.shape[-1]
    if rho >= 1:
        return np.ones(n, bool)
    k = min(max(math.ceil(rho * n - 1e-9), 1), n)
    a = np.sort(np.abs(h))[::-1]
    if k < n:
        assert a[k - 1] - a[k] > 1e-5 * a[0], "near-tie at the threshold: pick another seed"
    return np.abs(h) >= a[k - 1]


def _h(w, xt, act):
    """h [I] of one token, float64."""
    g = lambda n: w[n].astype(np.float64) if n in w else None  # noqa: E731
    x = xt.astype(np.float64)
    u = g("w_up") @ x + (g("b_up") if "b_up" in w else 0.0)
    if "w_gate" not in w:
        return ACT[act](u)
    return ACT[act](g("w_gate") @ x + (g("b_gate") if "b_gate" in w else 0.0)) * u


def masked_mlp(x, w, rho, act):
    """y [B, T, Dout] in float64 at bits 16."""
    B, T, _ = x.shape
    wd = w["w_down"].astype(np.float64)
    out = np.zeros((B, T, wd.shape[0]))
    for b in range(B):
        for t in range(T):
            h = _h(w, x[b, t], act)
            keep = _kept(h, rho[b])
            out[b, t] = wd[:, keep] @ h[keep] + (w["b_down"].astype(np.float64) if "b_down" in w else 0.0)
    return out


def h_model(w, act, skip="h", as_initializers=True):
    ins = [(n, F) if (n in w or n in ("x", "rho", "bits")) else None for n in _MLP_ORDER]
    return _model("SparseMLP", ins, ["y"], {"act": act, "skip": skip}, list(w.items()) if as_initializers else ())


def run(w, x, rho, act="silu", bits=16.0, threads=1, **kw):
    B = x.shape[0]
    feeds = {"x": x, "rho": np.asarray(rho, np.float32), "bits": np.full(B, bits, np.float32)}
    if not kw.get("as_initializers", True):
        feeds.update(w)
    return _session(h_model(w, act, **kw), threads=threads).run(None, feeds)[0]


CASES = [  # gated, act, biases, B, T, D, I, rho per row
    (True, "silu", False, 3, 1, 48, 1000, [1.0, 0.5, 0.2]),    # I: two gate/up column slices, four down panels
    (True, "silu", True, 2, 3, 32, 96, [0.3, 0.75]),           # T = 3: a token block of 3 tokens
    (False, "gelu_tanh", True, 2, 1, 40, 64, [0.25, 1.0]),     # up-only MLP
    (True, "relu", False, 1, 2, 24, 80, [0.25]),               # relu: exact zeros of h below the threshold too
]


@pytest.mark.parametrize("gated,act,biases,B,T,D,I,rho", CASES)
def test_h_skip_matches_float64_masked_mlp(lib, gated, act, biases, B, T, D, I, rho):
    rng = np.random.default_rng(D * 1000 + I + 1)          # seeds whose k-th |h| has a clear margin
    w = _mlp_weights(rng, D, I, gated, biases)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    _close(run(w, x, rho, act), masked_mlp(x, w, rho, act))


def test_h_skip_fake_quant_and_weights_as_graph_inputs(lib):
    rng = np.random.default_rng(5)
    D, I = 32, 128
    w = _mlp_weights(rng, D, I, True, True)
    x = rng.standard_normal((2, 1, D), dtype=np.float32)
    rho, bits = [0.5, 0.25], np.array([8.0, 8.0], np.float32)
    want = masked_mlp(x, w, rho, "silu")
    qmax = 127
    s = np.abs(want).max(-1, keepdims=True) / qmax
    _close_quantized(run(w, x, rho, bits=8.0), np.clip(np.round(want / s), -qmax, qmax) * s, want, bits)
    _close(run(w, x, rho, as_initializers=False), want)     # re-laid out per call: the skip attribute still holds


def test_skipped_units_rows_of_down_are_never_read(lib):
    """The columns of W_down (rows of downᵀ) of the units no token keeps are NaN: the output stays finite and equal
    to the clean reference, so not one of those weights was multiplied (not even by 0). One token, and a block of
    3 tokens (the kernel's multi-token path reads the union of the block's kept units)."""
    rng = np.random.default_rng(17)
    D, I = 32, 96
    w = _mlp_weights(rng, D, I, True, False)
    for T, rho in ((1, 0.25), (3, 0.25)):
        x = rng.standard_normal((1, T, D), dtype=np.float32)
        want = masked_mlp(x, w, [rho], "silu")
        kept = np.zeros(I, bool)
        for t in range(T):
            kept |= _kept(_h(w, x[0, t], "silu"), rho)
        assert 0 < (~kept).sum() < I
        poisoned = {**w, "w_down": w["w_down"].copy()}
        poisoned["w_down"][:, ~kept] = np.nan
        got = run(poisoned, x, [rho])
        assert np.isfinite(got).all(), T
        _close(got, want)


def test_h_skip_work_counters_diagnostic(lib):
    """Diagnostic: every input row of gate/up is read (h needs all of x) and ⌈ρ·I⌉ rows of down per token."""
    rng = np.random.default_rng(9)
    D, I, rho = 40, 120, 0.25
    w = _mlp_weights(rng, D, I, True, False)
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    sess = _session(h_model(w, "silu"))
    before = ep.work_counters()
    sess.run(None, {"x": x, "rho": np.array([rho], np.float32), "bits": np.array([16.0], np.float32)})
    after = ep.work_counters()
    d = {k: after[k] - before[k] for k in after}
    assert d["mlp_in_rows"] == d["mlp_in_rows_dense"] == D
    assert d["mlp_down_rows"] == math.ceil(rho * I) == 30 and d["mlp_down_rows_dense"] == I


def test_a_batch_equals_its_rows_one_by_one_and_threads_agree(lib):
    rng = np.random.default_rng(23)
    D, I = 48, 200
    w = _mlp_weights(rng, D, I, True, False)
    x = rng.standard_normal((4, 1, D), dtype=np.float32)
    rho = np.array([0.3, 1.0, 0.6, 0.1], np.float32)
    one, two = run(w, x, rho), run(w, x, rho, threads=2)
    np.testing.assert_array_equal(one, two)
    for b in range(4):
        np.testing.assert_array_equal(one[b], run(w, x[b:b + 1], rho[b:b + 1])[0])


def test_bad_skip_is_refused(lib):
    w = _mlp_weights(np.random.default_rng(1), 8, 16, True, False)
    with pytest.raises(Exception, match="SparseMLP skip must be x \\| h, got 'y'"):
        _session(h_model(w, "silu", skip="y"))


_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import onnxruntime as ort
import test_solm_ep_mlp_h as t
from test_solm_ep import _close
from solm_compile.runtime import ep
assert ep.register(ort, path=sys.argv[1])
rng = np.random.default_rng(3)
w = t._mlp_weights(rng, 40, 300, True, True)
for T in (1, 9):                                   # one token, and a dense multi-token block (prefill's GEMM path)
    x = rng.standard_normal((2, T, 40), dtype=np.float32)
    rho = [0.5, 1.0] if T == 1 else [1.0, 1.0]
    _close(t.run(w, x, rho), t.masked_mlp(x, w, rho, "silu"))
print("REPORT " + json.dumps(ep.isa_report(sys.argv[1])))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_every_isa_variant(lib, cap):
    """The h path under each SOLM_EP_ISA cap, in a fresh process: gate/up and down run the SparseMLP family's
    micro-kernels (gemv/gemm over rows), which must report exactly the capped variant."""
    from solm_compile.runtime import ep

    report = report_under_cap(cap, _SCRIPT, str(ep._registered), Path(__file__).parent)
    assert report["sparse_mlp"] == cap and report["selected"] == cap
