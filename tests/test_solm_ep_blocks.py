"""SparseMLPBlocks (SparseMLP on low-bit block weights, issue 16) on SolmEP against the plain reference.

One-node ONNX models as in ``test_solm_ep.py``: the block operands are initializers (the kernel repacks them at
Compile), x / rho / bits graph inputs. Three weight kinds: GGUF Q4_1-style (fp16 scale, a non-integer offset), int4
round-to-nearest with a zero point, and 8-bit codes; ρ = 1 and ρ < 1; T = 1 (decode) and T > 1; every ISA variant
in a fresh process (SOLM_EP_ISA caps the dispatch; ``ep.isa_report`` says which variant ran).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from solm_compile.passes.pack_weights import _pack
from solm_compile.ops import reference as ref
from solm_compile.ops import torch_ops
from solm_compile.quant.blocks import BlockQuant, quantize_int4, quantize_int8
from solm_compile.runtime import ep
from test_ep_isa import report_under_cap
from test_solm_ep import RTOL, F, _close, _close_quantized, _model, _session, lib  # noqa: F401  (lib: the fixture)

U8 = 2  # TensorProto.UINT8


def q4_1(rng, n, k) -> BlockQuant:
    """GGUF Q4_1-style blocks: random codes, fp16 scale and offset (the offset not a multiple of the scale)."""
    codes = rng.integers(0, 16, (n, k // 32, 32), dtype=np.uint8)
    d = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    m = (-(rng.random((n, k // 32)) * 0.2)).astype(np.float16).astype(np.float32)
    return BlockQuant(codes, d, m, 4, "Q4_1")


def make_weights(rng, kind: str, D: int, I: int, gated: bool) -> dict[str, BlockQuant]:
    def one(n, k):
        w = rng.standard_normal((n, k), dtype=np.float32) / math.sqrt(k)
        return q4_1(rng, n, k) if kind == "q4_1" else quantize_int4(w) if kind == "int4" else quantize_int8(w)
    out = {"up": one(I, D), "down": one(D, I)}
    if gated:
        out["gate"] = one(I, D)
    return out


def blocks_model(w: dict[str, BlockQuant], act: str, biases: dict[str, np.ndarray] | None = None,
                 activations: str | None = None):
    inits, ins, attrs = [], [("x", F)], {"act": act, "block_size": 32}
    if activations is not None:                 # absent: SolmEP's default, fp32
        attrs["activations"] = activations
    biases = biases or {}
    for part in ("gate", "up", "down"):
        bq = w.get(part)
        if bq is None:
            ins += [None] * 4
            continue
        arrays = [(f"codes_{part}", _pack(bq.codes, bq.bits)), (f"scale_{part}", bq.scale),
                  (f"offset_{part}", bq.offset)]
        if part in biases:
            arrays.append((f"b_{part}", biases[part]))
        inits += arrays
        ins += [(arrays[0][0], U8), (arrays[1][0], F), (arrays[2][0], F),
                (f"b_{part}", F) if part in biases else None]
        attrs[f"bits_{part}"] = bq.bits
    ins += [("rho", F), ("bits", F)]
    return _model("SparseMLPBlocks", ins, ["y"], attrs, inits)


def reference(w, x, rho, bits, act, biases=None, activations="fp32"):
    biases = biases or {}
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    args = []
    for part in ("gate", "up", "down"):
        bq = w.get(part)
        args += [None] * 3 if bq is None else [t(_pack(bq.codes, bq.bits)), t(bq.scale), t(bq.offset)]
        args.append(t(biases.get(part)))
    bits_kw = [w[p].bits if p in w else 4 for p in ("gate", "up", "down")]
    return ref.sparse_mlp_blocks_ref(t(x), *args, t(rho), t(bits), act, *bits_kw, 32, activations).numpy()


def test_reference_is_sparse_mlp_on_the_dequantised_weights():
    rng = np.random.default_rng(0)
    w = make_weights(rng, "q4_1", 64, 96, True)
    x = rng.standard_normal((2, 3, 64), dtype=np.float32)
    rho, bits = np.array([1.0, 0.5], np.float32), np.array([16.0, 8.0], np.float32)
    t = torch.from_numpy
    want = ref.sparse_mlp_ref(t(x), t(w["gate"].dequantize()), None, t(w["up"].dequantize()), None,
                              t(w["down"].dequantize()), None, t(rho), t(bits), "silu").numpy()
    np.testing.assert_array_equal(reference(w, x, rho, bits, "silu"), want)
    args = [t(_pack(w[p].codes, 4)) if i == 0 else t(getattr(w[p], ("scale", "offset")[i - 1]))
            for p in ("gate", "up", "down") for i in range(3)]
    got = torch_ops.sparse_mlp_blocks(t(x), *args[:3], None, *args[3:6], None, *args[6:], None, t(rho), t(bits),
                                      "silu", 4, 4, 4, 32)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


CASES = [  # kind, gated, act, T, rho per row
    ("q4_1", True, "silu", 1, [1.0, 1.0]),
    ("q4_1", True, "silu", 1, [0.5, 0.2]),
    ("int4", True, "silu", 1, [1.0, 0.4]),
    ("int8", True, "silu", 1, [0.5, 1.0]),
    ("q4_1", True, "silu", 37, [1.0, 0.5]),
    ("int4", False, "gelu_tanh", 5, [0.3, 1.0]),
    ("int8", True, "silu", 40, [1.0, 0.25]),
]


@pytest.mark.parametrize("kind,gated,act,T,rho", CASES)
def test_blocks_match_reference(lib, kind, gated, act, T, rho):
    rng = np.random.default_rng(len(kind) * 100 + T)
    D, I, B = 96, 160, 2                        # I = 160: ten row groups (a partial chunk of four)
    w = make_weights(rng, kind, D, I, gated)
    biases = {} if gated else {"up": rng.standard_normal(I).astype(np.float32),
                               "down": rng.standard_normal(D).astype(np.float32)}
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    r = np.array(rho, np.float32)
    sess = _session(blocks_model(w, act, biases))
    for bits in ([16.0, 16.0], [8.0, 16.0]):
        b = np.array(bits, np.float32)
        got = sess.run(None, {"x": x, "rho": r, "bits": b})[0]
        want = reference(w, x, r, b, act, biases)
        if bits[0] >= 16:
            _close(got, want)
        else:
            _close_quantized(got, want, reference(w, x, r, np.full(B, 16.0, np.float32), act, biases), b)


def test_zero_blocks_are_skipped_exactly(lib):
    """ρ small enough that whole 32-channel blocks of x are zero: their block columns are not read (a NaN code
    column would show), and the result is the reference's."""
    rng = np.random.default_rng(5)
    D, I = 128, 64
    w = make_weights(rng, "q4_1", D, I, True)
    x = rng.standard_normal((1, 1, D), dtype=np.float32) * 0.01
    x[0, 0, 40:50] = np.arange(1, 11)           # the kept channels all in block 1
    for p in ("gate", "up"):
        w[p].scale[:, [0, 2, 3]] = np.nan       # blocks 0, 2, 3: must never be read
    r, b = np.array([10 / D], np.float32), np.array([16.0], np.float32)
    got = _session(blocks_model(w, "silu")).run(None, {"x": x, "rho": r, "bits": b})[0]
    keep = [p for p in ("gate", "up")]
    for p in keep:
        w[p].scale[:, [0, 2, 3]] = 0.0
    _close(got, reference(w, x, r, b, "silu"))


_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import onnxruntime as ort
import test_solm_ep_blocks as t
from solm_compile.runtime import ep
assert ep.register(ort, path=sys.argv[1])
rng = np.random.default_rng(1)
for kind, T in [("q4_1", 1), ("int8", 1), ("int4", 20), ("q4_1", 33)]:
    w = t.make_weights(rng, kind, 64, 96, True)
    x = rng.standard_normal((2, T, 64), dtype=np.float32)
    r, b = np.array([1.0, 0.5], np.float32), np.full(2, 16.0, np.float32)
    for acts in ("fp32", "int8"):
        got = t._session(t.blocks_model(w, "silu", activations=acts)).run(None, {"x": x, "rho": r, "bits": b})[0]
        want = t.reference(w, x, r, b, "silu", activations=acts)
        if acts == "int8":
            t.close_int8(got, want, w, x, r, "silu")
        else:
            t._close(got, want)
print("REPORT " + json.dumps(ep.isa_report(sys.argv[1])))
"""


def _host_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4", "x86-64-v4-vnni"])
def test_every_isa_variant(lib, cap):
    """Both activation modes under each cap; the int8 path has one more variant, x86-64-v4-vnni (AVX512_VNNI), which
    the cap x86-64-v4 turns off."""
    check_blocks_isa(cap, _SCRIPT)


def check_blocks_isa(cap: str, script: str) -> None:
    """Run ``script`` under the ISA ``cap`` in a fresh process: the MLP block families report the capped level (and
    the int8 path the cap itself, VNNI included); a VNNI cap on a CPU without it is skipped."""
    if cap.endswith("vnni") and not _host_vnni():
        pytest.skip("this CPU has no AVX512_VNNI")
    report = report_under_cap(cap, script, str(ep._registered), Path(__file__).parent)
    level = cap.removesuffix("-vnni")
    assert report["sparse_mlp_blocks"] == level and report["selected"] == level
    assert report["sparse_mlp_blocks_int8"] == cap


# ---------------------------------------------------------------------------------------------- int8 activations
# activations="int8" (llama.cpp's Q4_1 x Q8_1): x and h quantised per block of 32 (d = max|x|/127, round half to
# even), integer dot products with the codes, the offset term on the quantised block sums d·Σq. The reference models
# that exactly (reference.quantize_blocks_ref / linear_blocks_int8_ref), so the kernel differs from it only by the order
# of its float32 sums: RTOL of max|y|, and, through that order, h: an h element within float noise of a rounding
# boundary (x·(1/d) = k + ½) may round to the other side, which moves y_n by |scale·code|·d_h of that element. The
# check allows FLIPS such steps per output on top of RTOL (the x side has no such slack: x and its top-k are exact).
FLIPS = 2


def hidden_ref(w, x_row, rho, act, biases=None):
    """The reference's h of one token (int8 mode): for the size of one int8 step of h."""
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    biases = biases or {}
    xt = ref.topk_channels_ref(t(x_row), rho)
    lin = lambda p: ref.linear_blocks_int8_ref(xt, t(_pack(w[p].codes, w[p].bits)), t(w[p].scale), t(w[p].offset),
                                               w[p].bits, t(biases.get(p)))
    fn = ref.ACTIVATIONS[act]
    return (fn(lin("gate")) * lin("up") if "gate" in w else fn(lin("up"))).numpy()


def close_int8(got, want, w, x, rho, act, biases=None, step=None):
    """got == want (both int8 mode) up to RTOL and FLIPS h-rounding steps per row; ``step`` [B]: a fake-quantisation
    step of the output that an element may also cross."""
    dn = w["down"]
    wmax = float(np.abs(dn.codes * dn.scale[..., None]).max())          # max |scale·code| of down
    for b, t in np.ndindex(*got.shape[:2]):
        hmax = float(np.abs(hidden_ref(w, x[b, t], float(rho[b]), act, biases)).max())
        tol = RTOL * max(1.0, float(np.abs(want).max())) + FLIPS * wmax * hmax / 127
        tol += 0.0 if step is None else float(step[b]) * 1.001
        err = np.abs(got[b, t] - want[b, t]).max()
        assert err <= tol, f"token {(b, t)}: {err} > {tol}"


def test_int8_quantizer_rounds_half_to_even():
    """d = max|x|/127; x·(1/d) on a tie rounds to the even integer; an all-zero block is zeros with d = 0; the block
    sum is the quantised values' (127 + 2 + 4 − 2 + 0 + 1 = 132), not x's (131.4999999)."""
    x = np.zeros(64, np.float32)
    x[:6] = [127.0, 2.5, 3.5, -2.5, -0.5, 1.4999999]       # d = 1 exactly: the products are the values
    q, d, s = ref.quantize_blocks_ref(torch.from_numpy(x))
    assert d.tolist() == [1.0, 0.0] and s.tolist() == [132.0, 0.0]
    assert q[0, :6].tolist() == [127, 2, 4, -2, 0, 1] and not q[1].any()


@pytest.mark.parametrize("kind,gated,act,T,rho", CASES)
def test_int8_blocks_match_reference(lib, kind, gated, act, T, rho):
    """Against the int8 reference (tight, see above) and, looser, against the fp32 reference on the dequantised
    weights. The expected error of int8 activations: each value is off by up to 1/254 of its block's max|x| (rms
    1/440 of it), ~0.5 % of a layer's output for Gaussian x, more for h (a product of two layers, heavier-tailed
    blocks) and compounded over the two layers: in these cases rms 1.3-3 % of rms y, at most 3.4 % of max|y| per
    element (the same trade as MatMulNBits accuracy_level 4). The check allows 6 % of max|y|."""
    rng = np.random.default_rng(len(kind) * 100 + T)
    D, I, B = 96, 160, 2
    w = make_weights(rng, kind, D, I, gated)
    biases = {} if gated else {"up": rng.standard_normal(I).astype(np.float32),
                               "down": rng.standard_normal(D).astype(np.float32)}
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    r = np.array(rho, np.float32)
    sess = _session(blocks_model(w, act, biases, activations="int8"))
    for bits in ([16.0, 16.0], [8.0, 16.0]):
        b = np.array(bits, np.float32)
        got = sess.run(None, {"x": x, "rho": r, "bits": b})[0]
        want = reference(w, x, r, b, act, biases, activations="int8")
        step = None
        if bits[0] < 16:
            unq = reference(w, x, r, np.full(B, 16.0, np.float32), act, biases, activations="int8")
            step = np.abs(unq).reshape(B, -1).max(1) / np.where(b < 16, 2 ** (b - 1) - 1, np.inf)
        close_int8(got, want, w, x, r, act, biases, step)
        fp = reference(w, x, r, b, act, biases)
        assert np.abs(got - fp).max() <= 0.06 * np.abs(fp).max() + (0 if step is None else step.max())


def test_int8_tokens_are_independent_of_the_batch(lib):
    """T > 1 (the multi-token kernel: codes loaded once per tile) gives each token exactly what T = 1 gives it."""
    rng = np.random.default_rng(9)
    for kind in ("q4_1", "int8"):
        w = make_weights(rng, kind, 64, 96, True)
        x = rng.standard_normal((1, 6, 64), dtype=np.float32)
        r, b = np.array([0.6], np.float32), np.array([16.0], np.float32)
        sess = _session(blocks_model(w, "silu", activations="int8"))
        many = sess.run(None, {"x": x, "rho": r, "bits": b})[0]
        for t in range(6):
            one = sess.run(None, {"x": x[:, t:t + 1], "rho": r, "bits": b})[0]
            np.testing.assert_array_equal(one[0, 0], many[0, t])


def test_int8_zero_blocks_are_skipped(lib):
    """As test_zero_blocks_are_skipped_exactly, in int8 mode: the NaN-scaled block columns are never read."""
    rng = np.random.default_rng(5)
    D, I = 128, 64
    w = make_weights(rng, "q4_1", D, I, True)
    x = rng.standard_normal((1, 1, D), dtype=np.float32) * 0.01
    x[0, 0, 40:50] = np.arange(1, 11)
    for p in ("gate", "up"):
        w[p].scale[:, [0, 2, 3]] = np.nan
    r, b = np.array([10 / D], np.float32), np.array([16.0], np.float32)
    got = _session(blocks_model(w, "silu", activations="int8")).run(None, {"x": x, "rho": r, "bits": b})[0]
    for p in ("gate", "up"):
        w[p].scale[:, [0, 2, 3]] = 0.0
    close_int8(got, reference(w, x, r, b, "silu", activations="int8"), w, x, r, "silu")


def test_bad_activations_attribute_is_refused(lib):
    rng = np.random.default_rng(0)
    with pytest.raises(Exception, match=r"activations must be fp32 \| int8"):
        _session(blocks_model(make_weights(rng, "int4", 64, 32, True), "silu", activations="int4"))
