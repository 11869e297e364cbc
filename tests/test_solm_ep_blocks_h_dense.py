"""SparseMLPBlocks skip="h" with down also in its source layout (``*_down_dense``): rows at ρ ≥ 1 run y = down(h) on
the source blocks (lossless), rows at ρ < 1 the transposed, re-quantised downT as before, except under int8
activations with a 4-bit copy: there rows at ρ < 1 run the source down on their masked h (DownG's gathers for one
token, one GEMM for two or more: the same floats).

The references are written here, independently of the op's: ``masked_mlp`` (test_solm_ep_blocks_h: downT, float64)
for the sparse rows, and for the dense rows the source blocks dequantised by a plain loop (fp32 activations) or h
quantised per block of 32 as ``lin_int8`` does (int8 activations: d = max|h|/127 and h·(1/d) in float32, np.rint
half to even, integer sums in float64). The source down (Q4_1) and downT (8-bit, re-quantised) differ by more than
the tolerance, which ``test_the_two_downs_differ`` checks, so a dense row that ran downT fails.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from solm_compile.ops import reference as ref
from solm_compile.ops import torch_ops
from solm_compile.passes.pack_weights import _pack
from solm_compile.quant.blocks import BlockQuant, requantize_transposed
from test_solm_ep import _close, _session, lib  # noqa: F401  (lib: the fixture)
from test_solm_ep_blocks import q4_1
from test_solm_ep_blocks_h import ACT, D, I, _kept, deq_loop, h_model, lin_int8, masked_mlp


def weights(rng, gated=True):
    src = q4_1(rng, D, I)                                            # W_down [D, I] as the source holds it
    w = {"up": q4_1(rng, I, D), "down": requantize_transposed(src, 8)}
    if gated:
        w["gate"] = q4_1(rng, I, D)
    return w, src


def model(w, src: BlockQuant, activations=None):
    m = h_model(w, activations=activations)
    node = m.graph.node[0]
    names = ["codes_down_dense", "scale_down_dense", "offset_down_dense"]
    for name, a in zip(names, (_pack(src.codes, src.bits), src.scale, src.offset)):
        m.graph.initializer.append(helper.make_tensor(name, 2 if a.dtype == np.uint8 else 1, a.shape,
                                                      a.tobytes(), raw=True))
    node.input.extend(names)
    node.attribute.append(helper.make_attribute("bits_down_dense", src.bits))
    return m


def run(w, src, x, rho, activations=None, threads=1):
    sess = _session(model(w, src, activations), threads=threads)
    B = x.shape[0]
    return sess.run(None, {"x": x, "rho": np.asarray(rho, np.float32), "bits": np.full(B, 16.0, np.float32)})[0]


def want(w, src, x, rho, act="silu", activations="fp32"):
    """fp32: rows at ρ < 1 masked_mlp on downT, rows at ρ ≥ 1 the source down on all of h. int8 (a 4-bit source):
    every row the source down on h masked to its kept units, h quantised per block of 32 (lin_int8)."""
    out = masked_mlp(w, x, rho, act, activations=activations)
    wd = deq_loop(src)                                                                 # [D, I]
    rows = range(x.shape[0]) if activations == "int8" else np.flatnonzero(np.asarray(rho, np.float32) >= 1)
    for b in rows:
        for t in range(x.shape[1]):
            xt = x[b, t]
            if activations == "int8":
                u, g = lin_int8(xt, w["up"]), lin_int8(xt, w["gate"]) if "gate" in w else None
            else:
                u = deq_loop(w["up"]) @ xt.astype(np.float64)
                g = deq_loop(w["gate"]) @ xt.astype(np.float64) if "gate" in w else None
            h = ACT[act](g) * u if g is not None else ACT[act](u)
            if activations == "int8":
                keep = _kept(h, float(np.float32(rho[b])))
                out[b, t] = lin_int8(np.where(keep, h, 0.0).astype(np.float32), src)
            else:
                out[b, t] = wd @ h
    return out


def test_the_two_downs_differ():
    """The check below can tell which down a row ran: at ρ = 1 the two references differ well past _close's tolerance."""
    rng = np.random.default_rng(3)
    w, src = weights(rng)
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    a, b = masked_mlp(w, x, [1.0], "silu"), want(w, src, x, [1.0])
    assert np.abs(a - b).max() > 1e-3 * np.abs(b).max()     # _close: 1e-4 of max|y|


@pytest.mark.parametrize("acts,T,rho", [("fp32", 1, [1.0, 0.5]), ("int8", 1, [1.0, 0.3]), ("int8", 3, [0.5, 1.0]),
                                        ("fp32", 2, [1.0, 1.0]), ("int8", 1, [0.4, 0.6])])
def test_dense_rows_run_the_source_down(lib, acts, T, rho):
    rng = np.random.default_rng(T * 7 + len(acts))
    w, src = weights(rng)
    x = rng.standard_normal((2, T, D), dtype=np.float32)
    _close(run(w, src, x, rho, acts), want(w, src, x, rho, activations=acts))


def test_a_mixed_batch_equals_its_rows_one_by_one(lib):
    rng = np.random.default_rng(5)
    w, src = weights(rng)
    x = rng.standard_normal((4, 1, D), dtype=np.float32)
    rho = np.array([1.0, 0.3, 1.0, 0.7], np.float32)
    got = run(w, src, x, rho, "int8", threads=2)
    for b in range(4):
        np.testing.assert_array_equal(got[b], run(w, src, x[b:b + 1], rho[b:b + 1], "int8")[0])


def test_a_batch_below_rho_1_streams_down_once_and_equals_its_rows(lib):
    """Two or more tokens at ρ < 1 (int8, 4-bit copy) run one GEMM of the source down on their masked h, reading
    each block once for the batch instead of each token's kept units; every row equals the same row run alone
    (DownG's gathers), bit for bit, and the work counters say which path ran (whole blocks, not units)."""
    from solm_compile.runtime import ep

    rng = np.random.default_rng(21)
    w, src = weights(rng)
    x = rng.standard_normal((4, 1, D), dtype=np.float32)
    rho = np.array([0.3, 0.5, 0.7, 0.5], np.float32)
    sess = _session(model(w, src, "int8"), threads=2)

    def go(xb, rb):
        before = ep.work_counters()
        y = sess.run(None, {"x": xb, "rho": rb, "bits": np.full(len(rb), 16.0, np.float32)})[0]
        return y, ep.work_counters()["mlp_down_dense_rows"] - before["mlp_down_dense_rows"]

    got, rows = go(x, rho)
    _close(got, want(w, src, x, rho, activations="int8"))
    alone = [go(x[b:b + 1], rho[b:b + 1]) for b in range(4)]
    for b in range(4):
        np.testing.assert_array_equal(got[b], alone[b][0][0])
    assert all(abs(n - I * float(r)) <= 1 for (_, n), r in zip(alone, rho))  # DownG: the kept units (k = ⌈ρ·I⌉)
    assert rows == 4 * I                                           # the GEMM: every block (some unit kept in each)


@pytest.mark.parametrize("rho", [[1.0, 1.0], [0.5, 0.3]])
def test_int8_rows_never_read_down_transposed(lib, rho):
    """downT poisoned whole (NaN scales, huge offsets): under int8 with a 4-bit copy every row reads the source's
    down, at ρ = 1 and below, so the batch stays finite and equal to the reference."""
    rng = np.random.default_rng(9)
    w, src = weights(rng)
    x = rng.standard_normal((2, 1, D), dtype=np.float32)
    clean = want(w, src, x, rho, activations="int8")
    dn = w["down"]
    w["down"] = BlockQuant(np.full_like(dn.codes, 255), np.full_like(dn.scale, np.nan), np.full_like(dn.offset, 3e38),
                           dn.bits, dn.fmt)
    got = run(w, src, x, rho, "int8")
    assert np.isfinite(got).all()
    _close(got, clean)


def test_reference_and_torch_op_take_the_dense_down():
    rng = np.random.default_rng(4)
    w, src = weights(rng)
    x = rng.standard_normal((2, 2, D), dtype=np.float32)
    rho = np.array([1.0, 0.5], np.float32)
    t = torch.from_numpy
    args = [a for p in ("gate", "up", "down") for a in (t(_pack(w[p].codes, w[p].bits)), t(w[p].scale),
                                                        t(w[p].offset), None)]
    dense = (t(_pack(src.codes, src.bits)), t(src.scale), t(src.offset))
    bits = t(np.full(2, 16.0, np.float32))
    for acts in ("fp32", "int8"):
        expect = want(w, src, x, rho, activations=acts)
        got = ref.sparse_mlp_blocks_ref(t(x), *args, t(rho), bits, "silu", 4, 4, 8, 32, acts, "h", (*dense, 4))
        _close(got.numpy(), expect)
        op = torch_ops.sparse_mlp_blocks(t(x), *args, t(rho), bits, "silu", 4, 4, 8, 32, acts, "h", *dense, 4)
        _close(op.numpy(), expect)


def test_portable_translation_takes_the_dense_down():
    from test_onnx_ops import B, T, export, run as ort_run, session

    rng = np.random.default_rng(8)
    w, src = weights(rng)
    t = torch.from_numpy
    parts = {**w, "down_dense": src}

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for p, bq in parts.items():
                for name, a in (("codes", _pack(bq.codes, bq.bits)), ("scale", bq.scale), ("offset", bq.offset)):
                    self.register_buffer(f"{name}_{p}", t(np.ascontiguousarray(a)))

        def forward(self, x, rho, bits):
            args = [a for p in ("gate", "up", "down") for a in (getattr(self, f"codes_{p}"),
                    getattr(self, f"scale_{p}"), getattr(self, f"offset_{p}"), None)]
            return torch.ops.solm.sparse_mlp_blocks(x, *args, rho, bits, "silu", 4, 4, 8, 32, "fp32", "h",
                                                    self.codes_down_dense, self.scale_down_dense,
                                                    self.offset_down_dense, 4)

    x = rng.standard_normal((2, 3, D), dtype=np.float32)
    rho, bits = np.array([1.0, 0.5], np.float32), np.full(2, 16.0, np.float32)
    proto = export(Blocks(), (t(x), t(rho), t(bits)), ({0: B, 1: T}, {0: B}, {0: B}), portable=True)
    _close(ort_run(session(proto), t(x), t(rho), t(bits))[0].numpy(), want(w, src, x, rho))


def test_bad_dense_down_is_refused(lib):
    rng = np.random.default_rng(2)
    w, src = weights(rng)
    for acts in (None, "int8"):          # int8: refused before the copy is regrouped (it would read past a short one)
        with pytest.raises(Exception, match="down_dense must be \\[96, 160\\]"):
            _session(model(w, q4_1(rng, D, 128), acts))
    m = model(w, src)
    for a in m.graph.node[0].attribute:
        if a.name == "skip":
            a.s = b"x"
    with pytest.raises(Exception, match="codes_down_dense is for skip=h only"):
        _session(m)


def test_work_counters_say_which_down_was_read(lib):
    """mlp_down_dense_rows counts the units a row read through the source-layout copy (all of them at ρ ≥ 1, the
    kept ones below under int8), mlp_down_rows only downᵀ's rows (bench/tensor_bytes.py turns them into bytes)."""
    from solm_compile.runtime import ep

    rng = np.random.default_rng(12)
    w, src = weights(rng)
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    sess = _session(model(w, src, "int8"))

    def count(rho):
        before = ep.work_counters()
        sess.run(None, {"x": x, "rho": np.float32([rho]), "bits": np.float32([16])})
        after = ep.work_counters()
        return {k: after[k] - before[k] for k in after}

    dense, half = count(1.0), count(0.5)
    assert (dense["mlp_down_dense_rows"], dense["mlp_down_rows"], dense["mlp_down_rows_dense"]) == (I, 0, I)
    assert (half["mlp_down_dense_rows"], half["mlp_down_rows"]) == (I // 2, 0)


_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import onnxruntime as ort
import test_solm_ep_blocks_h_dense as t
from test_solm_ep import _close
from test_solm_ep_blocks import q4_1
from solm_compile.quant.blocks import requantize_transposed
from solm_compile.runtime import ep
assert ep.register(ort, path=sys.argv[1])
rng = np.random.default_rng(3)
for dout in (96, 576):   # one tile of 128 rows (padded), and 4.5 tiles (SmolLM2's 576)
    src = q4_1(rng, dout, t.I)
    w = {"up": q4_1(rng, t.I, t.D), "gate": q4_1(rng, t.I, t.D), "down": requantize_transposed(src, 8)}
    x = rng.standard_normal((3, 2, t.D), dtype=np.float32)
    rho = [1.0, 0.5, 0.3]
    batch = t.run(w, src, x, rho, "int8", threads=2)     # 4 tokens at rho < 1: the GEMM on their masked h
    _close(batch, t.want(w, src, x, rho, activations="int8"))
    for b in range(3):                                    # one token: the regrouped down (DownG) at rho < 1
        for k in range(2):
            np.testing.assert_array_equal(t.run(w, src, x[b:b + 1, k:k + 1], rho[b:b + 1], "int8")[0, 0], batch[b, k])
print("REPORT " + json.dumps(ep.isa_report(sys.argv[1])))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v4"])
def test_every_isa_variant_of_the_regrouped_down(lib, cap):
    """The regrouped source down (int8 h, rows at ρ < 1 too) under SOLM_EP_ISA caps without VNNI, in a fresh
    process: the plain variant, against the reference (the vpdpbusd one runs in this process: the tests above)."""
    from pathlib import Path

    from solm_compile.runtime import ep
    from test_ep_isa import report_under_cap

    report = report_under_cap(cap, _SCRIPT, str(ep._registered), Path(__file__).parent)
    assert report["sparse_mlp_blocks_int8"] == cap


@pytest.mark.parametrize("scales", ["half", "fp32"])
@pytest.mark.parametrize("dout", [576, 352])
def test_many_tiles_of_output_rows(lib, dout, scales):
    """SmolLM2's 576 rows are 4.5 tiles of 128 (two work items of 3 and 2 tiles), 352 is 2.75: padding rows
    never reach y; one and two threads give the same bits. The regrouped copy keeps the scales as IEEE half when
    they all round-trip (a GGUF's do: q4_1's), else fp32 (a scale nudged off every half value)."""
    rng = np.random.default_rng(dout)
    src = q4_1(rng, dout, I)
    if scales == "fp32":
        src = BlockQuant(src.codes, (src.scale * np.float32(1 + 2**-20)).astype(np.float32), src.offset, src.bits,
                         src.fmt)
        assert not np.array_equal(src.scale.astype(np.float16).astype(np.float32), src.scale)
    w = {"up": q4_1(rng, I, D), "gate": q4_1(rng, I, D), "down": requantize_transposed(src, 8)}
    x = rng.standard_normal((2, 1, D), dtype=np.float32)
    rho = [0.5, 0.3]
    for b in range(2):  # one token at a time: DownG's tiles
        one = run(w, src, x[b:b + 1], rho[b:b + 1], "int8")
        _close(one, want(w, src, x[b:b + 1], rho[b:b + 1], activations="int8"))
        np.testing.assert_array_equal(run(w, src, x[b:b + 1], rho[b:b + 1], "int8", threads=2), one)
