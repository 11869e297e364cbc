"""SparseMLPBlocks (SparseMLP on low-bit block weights, issue 16) on SolmEP against the plain reference.

One-node ONNX models as in ``test_solm_ep.py``: the block operands are initializers (the kernel repacks them at
Compile), x / rho / bits graph inputs. Three weight kinds: GGUF Q4_1-style (fp16 scale, a non-integer offset), int4
round-to-nearest with a zero point, and 8-bit codes; ρ = 1 and ρ < 1; T = 1 (decode) and T > 1; every ISA variant
in a fresh process (SOLM_EP_ISA caps the dispatch; ``ep.isa_report`` says which variant ran).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from solm_compile.passes.pack_weights import _pack
from solm_compile.ops import reference as ref
from solm_compile.ops import torch_ops
from solm_compile.quant.blocks import BlockQuant, quantize_int4, quantize_int8
from solm_compile.runtime import ep
from test_ep_isa import host_isa
from test_solm_ep import F, _close, _close_quantized, _model, _session, lib  # noqa: F401  (lib: the fixture)

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


def blocks_model(w: dict[str, BlockQuant], act: str, biases: dict[str, np.ndarray] | None = None):
    inits, ins, attrs = [], [("x", F)], {"act": act, "block_size": 32}
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


def reference(w, x, rho, bits, act, biases=None):
    biases = biases or {}
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    args = []
    for part in ("gate", "up", "down"):
        bq = w.get(part)
        args += [None] * 3 if bq is None else [t(_pack(bq.codes, bq.bits)), t(bq.scale), t(bq.offset)]
        args.append(t(biases.get(part)))
    bits_kw = [w[p].bits if p in w else 4 for p in ("gate", "up", "down")]
    return ref.sparse_mlp_blocks_ref(t(x), *args, t(rho), t(bits), act, *bits_kw, 32).numpy()


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
for kind, T in [("q4_1", 1), ("int8", 1), ("int4", 20)]:
    w = t.make_weights(rng, kind, 64, 96, True)
    x = rng.standard_normal((2, T, 64), dtype=np.float32)
    r, b = np.array([1.0, 0.5], np.float32), np.full(2, 16.0, np.float32)
    got = t._session(t.blocks_model(w, "silu")).run(None, {"x": x, "rho": r, "bits": b})[0]
    t._close(got, t.reference(w, x, r, b, "silu"))
print("REPORT " + json.dumps(ep.isa_report(sys.argv[1])))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_every_isa_variant(lib, cap):
    rank = {"baseline": 0, "x86-64-v3": 1, "x86-64-v4": 2}
    if rank[cap] > rank[host_isa()]:
        pytest.skip(f"this CPU runs at most {host_isa()}")
    env = {**os.environ, "SOLM_EP_ISA": cap}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(ep._registered), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    assert report["sparse_mlp_blocks"] == cap and report["selected"] == cap
