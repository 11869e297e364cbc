"""SparseMLPBlocks with skip="h" (issue 17): ρ keeps units of h = act(gate)·up, down stored transposed.

Every check is against an independent reference written here: the blocks dequantised by a plain loop over rows and
blocks (from the unpacked codes, not through the packer), and a masked MLP in float64 numpy (gate/up dense, the
⌈ρ·I⌉ units of largest |h| kept, ties at the threshold kept, y = Σ_kept h_j·downT[j]). int8 activations: x is
quantised per block of 32 here too (d = max|x|/127 and x·(1/d) in float32, np.rint is half to even).

Tolerance: RTOL = 1e-4 of max|y| (test_solm_ep's _close). SolmEP sums in float32 (gate/up over D = 96 inputs, down
over ≤ I = 160 kept units, each term's fp32 rounding ≈ 6e-8 relative); the reference in float64. The kept set is
the same on both sides for these seeds: the k-th and (k+1)-th |h| are far apart next to float32 noise (checked by
``_kept``'s margin assert, so a seed that lands on a near-tie fails loudly instead of flaking).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper

from solm_compile.ops import reference as ref
from solm_compile.ops import torch_ops
from solm_compile.passes.pack_weights import _pack
from solm_compile.quant.blocks import BlockQuant, requantize_transposed
from solm_compile.runtime import ep
from test_ep_isa import report_under_cap
from test_solm_ep import _close, _session, lib  # noqa: F401  (lib: the fixture)
from test_solm_ep_blocks import blocks_model, q4_1

D, I = 96, 160


def deq_loop(bq: BlockQuant) -> np.ndarray:
    """W [N, K] float64: w = scale·code + offset, block by block."""
    n, nb, blk = bq.codes.shape
    w = np.zeros((n, nb * blk))
    for r in range(n):
        for b in range(nb):
            w[r, b * blk:(b + 1) * blk] = float(bq.scale[r, b]) * bq.codes[r, b].astype(np.float64) + float(
                bq.offset[r, b])
    return w


def lin_int8(x32: np.ndarray, bq: BlockQuant) -> np.ndarray:
    """y [N] = W·x̂ for one token, x̂ = d·q: x quantised per block (float32 steps as documented), every weight
    (offset included) meeting the quantised values, as llama.cpp's Q4_1 x Q8_1; sums in float64."""
    xb = x32.astype(np.float32).reshape(-1, 32)
    d = np.abs(xb).max(1) / np.float32(127)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[:, None]), -127, 127).astype(np.float64)
    xhat = d.astype(np.float64)[:, None] * q                                         # [nb, 32]
    w = bq.scale[..., None].astype(np.float64) * bq.codes + bq.offset[..., None]       # [N, nb, 32]
    return (w * xhat[None]).sum((1, 2))


ACT = {"silu": lambda v: v / (1 + np.exp(-v)),
       "gelu_tanh": lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))}


def _kept(h: np.ndarray, rho: float) -> np.ndarray:
    n = h.shape[-1]
    if rho >= 1:
        return np.ones(n, bool)
    k = min(max(math.ceil(rho * n - 1e-9), 1), n)
    a = np.sort(np.abs(h))[::-1]
    if k < n:
        assert a[k - 1] - a[k] > 2e-5 * a[0], "near-tie at the threshold: pick another seed"
    return np.abs(h) >= a[k - 1]


def masked_mlp(w, x, rho, act, biases=None, activations="fp32"):
    """The independent reference: y [B, T, D] (bits 16), w["down"] the blocks of W_downᵀ [I, D]."""
    biases, rho = biases or {}, np.asarray(rho, np.float32)   # ρ is a float32 input: 0.3 → k = ⌈0.30000001·I⌉
    wd = deq_loop(w["down"])                                                          # [I, D]
    wu = deq_loop(w["up"])
    wg = deq_loop(w["gate"]) if "gate" in w else None
    B, T, _ = x.shape
    out = np.zeros((B, T, wd.shape[1]))
    for b in range(B):
        for t in range(T):
            xt = x[b, t]
            if activations == "int8":
                u = lin_int8(xt, w["up"])
                g = lin_int8(xt, w["gate"]) if wg is not None else None
            else:
                u = wu @ xt.astype(np.float64)
                g = wg @ xt.astype(np.float64) if wg is not None else None
            u = u + biases.get("up", 0.0)
            h = ACT[act](g + biases.get("gate", 0.0)) * u if g is not None else ACT[act](u)
            keep = _kept(h, float(rho[b]))
            out[b, t] = (h[keep, None] * wd[keep]).sum(0) + biases.get("down", 0.0)
    return out


def h_weights(rng, gated=True, down_bits=8):
    """Q4_1 gate/up; down as a Q4_1 source W_down [D, I] re-quantised transposed (quant/blocks.py)."""
    w = {"up": q4_1(rng, I, D), "down": requantize_transposed(q4_1(rng, D, I), down_bits)}
    if gated:
        w["gate"] = q4_1(rng, I, D)
    return w


def h_model(w, act="silu", biases=None, activations=None, skip="h"):
    m = blocks_model(w, act, biases, activations)
    m.graph.node[0].attribute.append(helper.make_attribute("skip", skip))
    return m


def run(w, x, rho, act="silu", biases=None, activations=None, bits=16.0, threads=1):
    sess = _session(h_model(w, act, biases, activations), threads=threads)
    B = x.shape[0]
    return sess.run(None, {"x": x, "rho": np.asarray(rho, np.float32), "bits": np.full(B, bits, np.float32)})[0]


def test_requantize_transposed_is_the_transpose():
    rng = np.random.default_rng(3)
    src = q4_1(rng, 64, 96)
    for bits, step in ((8, 1 / 127 / 2), (4, 1 / 15 / 2)):
        t = requantize_transposed(src, bits)
        assert t.shape == (96, 64) and t.bits == bits
        w = src.dequantize().T
        blk = np.abs(w).reshape(96, 2, 32).max(-1).repeat(32, -1) * 2     # the block's range bounds
        assert np.all(np.abs(deq_loop(t) - w) <= blk * step * 1.01 + 1e-6)


def test_reference_and_torch_op_match_the_masked_mlp():
    rng = np.random.default_rng(1)
    w = h_weights(rng)
    x = rng.standard_normal((2, 3, D), dtype=np.float32)
    rho = np.array([1.0, 0.5], np.float32)
    t = torch.from_numpy
    args = []
    for p in ("gate", "up", "down"):
        args += [t(_pack(w[p].codes, w[p].bits)), t(w[p].scale), t(w[p].offset), None]
    bits = t(np.full(2, 16.0, np.float32))
    got = ref.sparse_mlp_blocks_ref(t(x), *args, t(rho), bits, "silu", 4, 4, 8, 32, "fp32", "h").numpy()
    want = masked_mlp(w, x, rho, "silu")
    _close(got, want)
    op = torch_ops.sparse_mlp_blocks(t(x), *args, t(rho), bits, "silu", 4, 4, 8, 32, "fp32", "h").numpy()
    _close(op, want)


def test_portable_translation_matches_the_masked_mlp():
    """SparseMLPBlocks' portable decomposition (stock onnxruntime) with skip="h": the blocks dequantised, downT
    transposed back, TopK over |h| and a masked dense down; no SolmEP involved."""
    from test_onnx_ops import B, T, export, run as ort_run, session

    rng = np.random.default_rng(1)
    w = h_weights(rng)
    t = torch.from_numpy

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for p in ("gate", "up", "down"):
                for name, a in (("codes", _pack(w[p].codes, w[p].bits)), ("scale", w[p].scale),
                                ("offset", w[p].offset)):
                    self.register_buffer(f"{name}_{p}", t(np.ascontiguousarray(a)))

        def forward(self, x, rho, bits):
            args = [a for p in ("gate", "up", "down") for a in (getattr(self, f"codes_{p}"),
                    getattr(self, f"scale_{p}"), getattr(self, f"offset_{p}"), None)]
            return torch.ops.solm.sparse_mlp_blocks(x, *args, rho, bits, "silu", 4, 4, 8, 32, "fp32", "h")

    x = rng.standard_normal((2, 3, D), dtype=np.float32)
    rho, bits = np.array([1.0, 0.5], np.float32), np.full(2, 16.0, np.float32)
    proto = export(Blocks(), (t(x), t(rho), t(bits)), ({0: B, 1: T}, {0: B}, {0: B}), portable=True)
    assert "TopK" in {n.op_type for n in proto.graph.node}
    _close(ort_run(session(proto), t(x), t(rho), t(bits))[0].numpy(), masked_mlp(w, x, rho, "silu"))


CASES = [  # gated, act, T, rho per row, downT bits, activations, biases
    (True, "silu", 1, [1.0, 1.0], 8, "fp32", False),
    (True, "silu", 1, [0.5, 0.3], 8, "fp32", False),
    (True, "silu", 1, [0.75, 0.5], 4, "fp32", False),
    (True, "silu", 3, [0.5, 1.0], 8, "int8", False),
    (True, "silu", 1, [0.3, 0.75], 4, "int8", False),
    (False, "gelu_tanh", 4, [0.4, 1.0], 8, "fp32", True),
]


@pytest.mark.parametrize("gated,act,T,rho,dbits,acts,bias", CASES)
def test_h_skip_matches_masked_mlp(lib, gated, act, T, rho, dbits, acts, bias):
    rng = np.random.default_rng(T * 10 + dbits + len(acts))
    w = h_weights(rng, gated, dbits)
    biases = {"up": rng.standard_normal(I).astype(np.float32) * 0.1,
              "down": rng.standard_normal(D).astype(np.float32)} if bias else None
    x = rng.standard_normal((2, T, D), dtype=np.float32)
    _close(run(w, x, rho, act, biases, acts), masked_mlp(w, x, rho, act, biases, acts))


@pytest.mark.parametrize("dout", [576, 352, 416])
def test_wide_outputs_in_work_items_of_nine_blocks(lib, dout):
    """Down's outputs go in work items of 9 blocks of 32 (AVX-512: one pass over the kept units per item): SmolLM2's
    576 is two items, 352 is 9 + 2 and 416 is 9 + 4 (the tails of 2 and 4 blocks in one pass each); 1 and 2 threads
    give the same bits."""
    rng = np.random.default_rng(dout)
    w = {"up": q4_1(rng, I, D), "gate": q4_1(rng, I, D), "down": requantize_transposed(q4_1(rng, dout, I), 8)}
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    for rho in ([0.5], [1.0]):
        one = run(w, x, rho)
        assert one.shape == (1, 1, dout)
        _close(one, masked_mlp(w, x, rho, "silu"))
        np.testing.assert_array_equal(run(w, x, rho, threads=2), one)


def test_fake_quantised_output_matches_reference(lib):
    rng = np.random.default_rng(11)
    w = h_weights(rng)
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    want = masked_mlp(w, x, [0.5], "silu")[0, 0]
    s = np.abs(want).max() / 127
    got = run(w, x, [0.5], bits=8.0)[0, 0]
    assert np.all(np.abs(got - np.round(want / s) * s) <= s * 1.001)      # one step where rounding ties move


@pytest.mark.parametrize("dbits", [8, 4])
def test_skipped_units_are_never_read(lib, dbits):
    """The rows of the units h does not keep are poisoned (NaN scale, huge offset and codes): the output stays finite
    and equal to the clean reference, so not a byte of them was used."""
    rng = np.random.default_rng(7 + dbits)
    w = h_weights(rng, True, dbits)
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    rho = [0.3]
    want = masked_mlp(w, x, rho, "silu")
    wu, wg = deq_loop(w["up"]), deq_loop(w["gate"])
    h = ACT["silu"](wg @ x[0, 0].astype(np.float64)) * (wu @ x[0, 0].astype(np.float64))
    skipped = ~_kept(h, float(np.float32(rho[0])))
    assert 0 < skipped.sum() < I
    dn = w["down"]
    scale, offset, codes = dn.scale.copy(), dn.offset.copy(), dn.codes.copy()
    scale[skipped], offset[skipped], codes[skipped] = np.nan, 3e38, (1 << dbits) - 1
    w["down"] = BlockQuant(codes, scale, offset, dbits, dn.fmt)
    got = run(w, x, rho)
    assert np.isfinite(got).all()
    _close(got, want)


def test_a_batch_equals_its_rows_one_by_one(lib):
    """Per-row ρ in one batch (2 threads: rows in parallel work items) = each row run alone."""
    rng = np.random.default_rng(21)
    w = h_weights(rng)
    x = rng.standard_normal((3, 1, D), dtype=np.float32)
    rho = np.array([0.3, 1.0, 0.6], np.float32)
    got = run(w, x, rho, threads=2)
    for b in range(3):
        np.testing.assert_array_equal(got[b], run(w, x[b:b + 1], rho[b:b + 1])[0])


def test_bad_skip_and_shapes_are_refused(lib):
    rng = np.random.default_rng(2)
    w = h_weights(rng)
    with pytest.raises(Exception, match="skip must be x \\| h"):
        _session(h_model(w, skip="y"))
    w["down"] = requantize_transposed(q4_1(rng, D, 128), 8)                          # 128 units, up has 160
    with pytest.raises(Exception, match="skip=h: down \\(transposed\\) has 128 rows"):
        _session(h_model(w))


_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import onnxruntime as ort
import test_solm_ep_blocks_h as t
from test_solm_ep import _close
from solm_compile.runtime import ep
assert ep.register(ort, path=sys.argv[1])
rng = np.random.default_rng(1)
for dbits, T in [(8, 1), (4, 1), (8, 3)]:
    w = t.h_weights(rng, True, dbits)
    x = rng.standard_normal((2, T, t.D), dtype=np.float32)
    rho = [1.0, 0.5]
    for acts in ("fp32", "int8"):
        _close(t.run(w, x, rho, activations=acts), t.masked_mlp(w, x, rho, "silu", activations=acts))
print("REPORT " + json.dumps(ep.isa_report(sys.argv[1])))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_every_isa_variant(lib, cap):
    """The down kernel (family sparse_mlp_blocks) under each SOLM_EP_ISA cap, in a fresh process, with gate/up in
    both activation modes (int8: family sparse_mlp_blocks_int8, whose VNNI variant the x86-64-v4 cap excludes)."""
    report = report_under_cap(cap, _SCRIPT, str(ep._registered), Path(__file__).parent)
    assert report["sparse_mlp_blocks"] == cap and report["selected"] == cap
    assert report["sparse_mlp_blocks_int8"] == cap
