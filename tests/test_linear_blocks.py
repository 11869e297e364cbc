"""LinearBlocks (one dense low-bit projection, issue 17) on SolmEP against numpy written here.

The reference is independent of solm's: the blocks are dequantised in this file (w = scale·code + offset, codes
unpacked from the bytes by hand) and, for activations "int8", x is quantised per block of 32 here as llama.cpp's
Q8 does (d = max|x|/127 in float32, q = round half to even of x·(1/d)), and y = W·x̂ with x̂ = d·q, every
weight (offset included) meeting the quantised x as in llama.cpp's Q4_1 x Q8_1, summed in float64. Weight kinds:
GGUF Q4_1-style (a non-integer offset), int4 and int8 with an integer zero point (offset = −scale·zero, what
passes/fuse_linear_blocks.py writes); T = 1 and T > 1; N not a multiple of 16 (padded row group) and with a bias; 1
vs 2 threads bit-identical; T = 1 vs T > 1 bit-identical per token; every ISA variant.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from solm_compile.ops import torch_ops
from solm_compile.runtime import ep
from test_solm_ep import F, _model, _session, lib  # noqa: F401  (lib: the fixture)
from test_solm_ep_blocks import check_blocks_isa

U8 = 2  # TensorProto.UINT8


def weights(rng, kind: str, n: int, k: int):
    """(packed codes [N, K/32, 32·bits/8], scale, offset [N, K/32], bits) of one random projection. A kind ending in
    "h" has every scale and offset exactly a half, as a GGUF's blocks have them (SolmEP's int8 kernels then hold them
    as half: kernels.h BlockMatrix::half)."""
    half = kind.endswith("h")
    kind = kind.removesuffix("h")
    nb = k // 32
    bits = 8 if kind == "int8" else 4
    codes = rng.integers(0, 2 ** bits, (n, nb, 32), dtype=np.uint8)
    scale = (rng.random((n, nb)) * 0.02 + 0.001).astype(np.float32)
    if kind == "q4_1":
        offset = (-(rng.random((n, nb)) * 0.2)).astype(np.float32)
    else:
        zero = rng.integers(0, 2 ** bits, (n, nb)).astype(np.float32)
        offset = -(scale * zero)
    if half:
        scale, offset = (a.astype(np.float16).astype(np.float32) for a in (scale, offset))
    packed = codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return packed, scale, offset, bits


def unpack(packed, bits):
    if bits == 8:
        return packed.astype(np.int64)
    return np.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:2], 32).astype(np.int64)


def numpy_ref(x, packed, scale, offset, bits, bias, activations):
    """y [.., N] in float64 (cast to float32)."""
    q = unpack(packed, bits)                                                      # [N, nb, 32]
    rows = x.reshape(-1, x.shape[-1])
    n, nb = scale.shape
    out = np.empty((rows.shape[0], n))
    for t, xr in enumerate(rows):
        xb = xr.reshape(nb, 32)                                                   # float32
        if activations == "fp32":
            w = q * scale[..., None].astype(np.float64) + offset[..., None]       # [N, nb, 32]
            out[t] = (w * xb.astype(np.float64)).sum((1, 2))
            continue
        d = (np.abs(xb).max(1) / np.float32(127)).astype(np.float32)             # [nb]
        inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
        xq = np.clip(np.round(xb * inv[:, None]), -127, 127).astype(np.int64)   # half to even
        xhat = d.astype(np.float64)[:, None] * xq                                 # [nb, 32]: what the codes meet
        w = q * scale[..., None].astype(np.float64) + offset[..., None]           # [N, nb, 32]
        out[t] = (w * xhat).sum((1, 2))                                           # the offset meets x̂ too
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n).astype(np.float32)


def model(packed, scale, offset, bits, bias=None, activations=None):
    inits = [("codes", packed), ("scale", scale), ("offset", offset)] + ([("bias", bias)] if bias is not None else [])
    ins = [("x", F), ("codes", U8), ("scale", F), ("offset", F), ("bias", F) if bias is not None else None]
    attrs = {"bits": bits, "block_size": 32}
    if activations is not None:
        attrs["activations"] = activations
    return _model("LinearBlocks", ins, ["y"], attrs, inits)


def close(got, want):
    tol = 2e-5 * max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= tol, (np.abs(got - want).max(), tol)


CASES = [  # kind, N, K, T, bias
    ("q4_1", 80, 96, 1, False),
    ("q4_1", 72, 64, 37, True),        # N = 72: a padded row group
    ("int4", 160, 96, 1, True),
    ("int4", 64, 128, 5, False),
    ("int8", 96, 64, 1, False),
    ("int8", 40, 96, 33, True),
    ("q4_1h", 72, 64, 1, True),        # half scales and minima (a GGUF's): the int8 kernels' half path
    ("q4_1h", 200, 96, 19, False),
    ("int8h", 40, 96, 1, True),
]


@pytest.mark.parametrize("activations", ["fp32", "int8"])
@pytest.mark.parametrize("kind,N,K,T,with_bias", CASES)
def test_linear_blocks_match_numpy(lib, kind, N, K, T, with_bias, activations):
    rng = np.random.default_rng(N + K + T)
    packed, scale, offset, bits = weights(rng, kind, N, K)
    bias = rng.standard_normal(N).astype(np.float32) if with_bias else None
    x = rng.standard_normal((2, T, K), dtype=np.float32)
    x[0, 0, 32:64] = 0.0                                   # an all-zero block: skipped, exactly
    got = _session(model(packed, scale, offset, bits, bias, activations)).run(None, {"x": x})[0]
    assert got.shape == (2, T, N)
    want = numpy_ref(x, packed, scale, offset, bits, bias, activations)
    close(got, want)
    t = lambda a: None if a is None else torch.from_numpy(a)
    close(torch_ops.linear_blocks(t(x), t(packed), t(scale), t(offset), t(bias), bits, 32, activations).numpy(), want)
    if activations == "int8":        # the trade: off by ~1/254 of a block's max|x| per value, against fp32
        fp = numpy_ref(x, packed, scale, offset, bits, bias, "fp32")
        assert np.abs(got - fp).max() <= 0.02 * np.abs(fp).max()


def quantise_dequantise(x):
    """x̂ = d·q per block of 32 of the last axis (d = max|x|/127, q = round half to even of x·(1/d)), in numpy."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    d = (np.abs(xb).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    return (d * np.clip(np.round(xb * inv), -127, 127)).astype(np.float32).reshape(x.shape)


@pytest.mark.parametrize("kind", ["q4_1", "q4_1h", "int4"])
def test_int8_activations_are_the_fp32_path_on_the_quantised_x(lib, kind):
    """SolmEP against itself: int8 activations on x give what its exact fp32 path gives on x̂ = d·q, for weights with
    an offset too (Q4_1's block minimum, int4's zero point), i.e. the offset meets x̂ as the codes do (llama.cpp's
    Q8_1 block sum). Until session 21 the offset met the fp32 Σx, off by offset·(Σx − Σx̂) per block."""
    rng = np.random.default_rng(21)
    packed, scale, offset, bits = weights(rng, kind, 96, 128)
    x = rng.standard_normal((1, 9, 128), dtype=np.float32)
    got = _session(model(packed, scale, offset, bits, activations="int8")).run(None, {"x": x})[0]
    want = _session(model(packed, scale, offset, bits, activations="fp32")).run(None, {"x": quantise_dequantise(x)})[0]
    close(got, want)
    old = want + ((quantise_dequantise(x) - x).reshape(1, 9, 4, 32).sum(-1) @ -offset.T)     # the fp32-Σx form
    assert np.abs(old - want).max() > 10 * 2e-5 * max(1.0, float(np.abs(want).max()))        # which close() refuses


@pytest.mark.parametrize("kind", ["q4_1", "q4_1h"])
@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_threads_and_token_count_are_bit_identical(lib, activations, kind):
    """Rows split over 2 threads give the 1-thread bits, and a token alone (T = 1) the bits it gets among 37."""
    rng = np.random.default_rng(7)
    packed, scale, offset, bits = weights(rng, kind, 400, 192)
    m = model(packed, scale, offset, bits, activations=activations)
    x = rng.standard_normal((1, 37, 192), dtype=np.float32)
    one, two = _session(m, threads=1), _session(m, threads=2)
    many = one.run(None, {"x": x})[0]
    np.testing.assert_array_equal(two.run(None, {"x": x})[0], many)
    for t in (0, 17, 36):
        alone = x[:, t:t + 1]
        np.testing.assert_array_equal(one.run(None, {"x": alone})[0][0, 0], many[0, t])
        np.testing.assert_array_equal(two.run(None, {"x": alone})[0][0, 0], many[0, t])


_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import onnxruntime as ort
import test_linear_blocks as t
from solm_compile.runtime import ep
assert ep.register(ort, path=sys.argv[1])
rng = np.random.default_rng(3)
for kind, N, T in [("q4_1", 80, 1), ("int8", 72, 1), ("int4", 96, 20), ("q4_1h", 80, 1), ("int8h", 48, 3)]:
    packed, scale, offset, bits = t.weights(rng, kind, N, 96)
    x = rng.standard_normal((2, T, 96), dtype=np.float32)
    for acts in ("fp32", "int8"):
        got = t._session(t.model(packed, scale, offset, bits, activations=acts)).run(None, {"x": x})[0]
        t.close(got, t.numpy_ref(x, packed, scale, offset, bits, None, acts))
print("REPORT " + json.dumps(ep.isa_report(sys.argv[1])))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4", "x86-64-v4-vnni"])
def test_every_isa_variant(lib, cap):
    """Both activation modes under each cap; LinearBlocks reports as the MLP block families (the same kernels)."""
    check_blocks_isa(cap, _SCRIPT)
