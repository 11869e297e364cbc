"""``--mlp-skip h`` wiring (issue 17): SolmConfig / CLI, pack_mlp's transposed down, the artifact's metadata.

The kernels themselves are checked in test_solm_ep_blocks_h.py (low-bit) and test_solm_ep_mlp_h.py (fp32); here: the
packed down is W_downᵀ to within its new 8-bit rounding (numpy on the source weights), a tiny fixed artifact at the
dense budget matches HF eager on the same weights, the portable kind on int4 weights (MatMulNBits, TopK over |h|, a
masked dense down) against a float64 masked MLP, and what still refuses h (--emit mlir) is one line.
"""

from __future__ import annotations

import collections
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxscript import ir

from solm_compile.errors import UserError
from solm_compile.quant.blocks import quantize_int4
from solm_compile.quant.weights import WeightTable

RNG = np.random.default_rng(4)


def _one_mlp(I=64, D=32, skip="h"):
    table, inits, src = WeightTable("test"), [], {}
    for name, shape in (("wg", (I, D)), ("wu", (I, D)), ("wd", (D, I))):
        bq = quantize_int4(RNG.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1]))
        table.add(bq.dequantize(), bq)
        src[name] = bq.dequantize()
        inits.append(numpy_helper.from_array(src[name], name))
    node = helper.make_node("SparseMLP", ["x", "wg", "", "wu", "", "wd", "", "rho", "bits"], ["y"],
                            domain="ai.solm", act="silu", skip=skip)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                            for n in ("x", "rho", "bits")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("ai.solm", 1)]))
    return model, table, src


def test_pack_mlp_stores_down_transposed_and_requantised():
    from solm_compile.passes.pack_weights import pack_weights

    model, table, src = _one_mlp()
    r = pack_weights(model, table)          # skip="h" from the node
    (blocks,) = [n for n in model.graph if n.op_type == "SparseMLPBlocks"]
    assert blocks.attributes["skip"].as_string() == "h" and blocks.attributes["bits_down"].as_int() == 8
    assert r.counts["mlp_downT_int8-rtn"] == 1 and r.counts["mlp_gate_int4-rtn"] == 1
    codes, scale, offset = (blocks.inputs[i].const_value.numpy() for i in (9, 10, 11))
    assert codes.shape == (64, 1, 32) and scale.shape == (64, 1)
    w_t = codes.astype(np.float64) * scale[..., None] + offset[..., None]              # 8-bit: one code a byte
    want = src["wd"].T                                                                   # [I, D]
    step = np.abs(want).max(1, keepdims=True) / 127                                      # one block per row (D 32)
    assert np.all(np.abs(w_t.reshape(64, 32) - want) <= step * 0.5 * 1.01 + 1e-7)


def test_packed_h_mlp_on_solm_ep_is_the_masked_mlp(tmp_path):
    """The packed one-node model on SolmEP against a float64 masked MLP on the source weights (gate/up dense, the
    ⌈ρ·I⌉ largest |h| kept): off only by down's 8-bit re-rounding (≤ half a step per weight)."""
    from require import need_ep

    from solm_compile.passes.pack_weights import pack_weights
    from solm_compile.runtime import ep

    need_ep(ep.register(ort))
    model, table, src = _one_mlp()
    pack_weights(model, table, mlp_activations="fp32")
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                ep.session_options_with_ep(ort.SessionOptions(), ort=ort))
    x = RNG.standard_normal((1, 1, 32)).astype(np.float32)
    rho = np.float32(0.5)
    got = sess.run(None, {"x": x, "rho": np.array([rho]), "bits": np.array([16.0], np.float32)})[0][0, 0]
    xd = x[0, 0].astype(np.float64)
    g, u = src["wg"] @ xd, src["wu"] @ xd
    h = g / (1 + np.exp(-g)) * u
    k = int(np.ceil(float(rho) * 64 - 1e-9))
    keep = np.abs(h) >= np.sort(np.abs(h))[::-1][k - 1]
    want = (h[keep, None] * src["wd"].T[keep]).sum(0)
    assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_config_and_cli_take_h_everywhere_but_mlir():
    from solm_compile.api import SolmConfig
    from solm_compile.cli.app import build_parser
    from solm_compile.config import GateConfig

    assert SolmConfig().mlp_skip == "x"
    for cmd in (["compile", "m", "--out", "m.onnx"], ["eval", "m"], ["verify", "m"], ["train", "m", "--out", "p.pt"]):
        args = build_parser().parse_args(cmd)
        assert args.mlp_skip == SolmConfig().mlp_skip == GateConfig().mlp_skip            # one default
    h = GateConfig(mlp_skip="h")
    assert SolmConfig(gate=h).mlp_skip == "h"                                           # read from the gate
    for kind in ("auto", "solm", "portable", "fixed", "dense"):                        # every ONNX kind, any weights
        for weights in ("fp32", "int4", "source"):
            assert SolmConfig(kind=kind, weights=weights, gate=h).mlp_skip == "h"
    with pytest.raises(UserError, match="--mlp-skip h: --emit mlir writes the gated step with rho on x only"):
        SolmConfig(emit="mlir", gate=h)                                                 # before torch-mlir loads
    with pytest.raises(UserError, match="--mlp-skip: must be one of x, h"):
        GateConfig(mlp_skip="z")
    from solm_compile.cli.common import load_gated                                      # the flag, before a model
    with pytest.raises(UserError, match="--mlp-skip: must be one of x, h, got 'z'"):
        load_gated(build_parser().parse_args(["eval", "m", "--mlp-skip", "z"]))


def test_fixed_artifact_with_h_skip_matches_eager_at_the_dense_budget(tmp_path):
    """kind fixed, --weights int4 --mlp-skip h --activations fp32: metadata says h, every MLP is SparseMLPBlocks with
    skip=h, and at the dense budget (ρ = 1: every unit kept) the logits are HF eager's on the same int4 weights up
    to down's 8-bit re-rounding."""
    from test_quant import _tiny_dir, assert_int4_artifact_matches_eager

    from solm_compile.api import SolmConfig, compile
    from solm_compile.config import GateConfig
    from solm_compile.runtime.session import read_metadata

    model, d = _tiny_dir(tmp_path)
    art = compile(str(d), SolmConfig(kind="fixed", weights="int4", gate=GateConfig(mlp_skip="h"),
                                      activations="fp32"),
                  tmp_path / "tiny.onnx")
    meta = read_metadata(art)
    assert meta["mlp_skip"] == "h" and meta["weights"]["packed"]["mlp_downT_int8-rtn"] == 2
    proto = onnx.load(str(art))
    assert collections.Counter(n.op_type for n in proto.graph.node)["SparseMLP"] == 0
    assert [a.s for n in proto.graph.node if n.op_type == "SparseMLPBlocks" for a in n.attribute
            if a.name == "skip"] == [b"h"] * 2
    assert_int4_artifact_matches_eager(model, art, controls=1.0)       # the dense budget: every unit kept


def _int4_mlp_weights(rng, D, I):
    """gate/up [I, D], down [D, I] rounded to int4 (nn.Linear layout): the dequantised float32 values and the table."""
    table, deq = WeightTable("test"), {}
    for name, shape in (("wg", (I, D)), ("wu", (I, D)), ("wd", (D, I))):
        bq = quantize_int4(rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1]))
        deq[name] = bq.dequantize()
        table.add(deq[name], bq)
    return deq, table


def test_portable_h_on_int4_weights_is_the_masked_mlp():
    """solm.sparse_mlp(skip="h") exported portable, then pack_weights with int4 blocks (the portable artifact's
    --weights int4 --mlp-skip h): gate, up and down become MatMulNBits, h is masked by TopK over |h| and down multiplies
    the masked h densely (stock onnxruntime reads all of down; SolmEP's kernels read only the kept rows). Against a
    float64 loop on the dequantised weights (fp32 activations: accuracy_level 0), ρ 1, 0.5 and 0.25 per row."""
    from test_onnx_ops import B, T, export

    from solm_compile.passes.pack_weights import pack_weights

    D, I = 32, 64
    rng = np.random.default_rng(12)
    deq, table = _int4_mlp_weights(rng, D, I)

    class MLPh(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, a in deq.items():
                self.register_parameter(n, torch.nn.Parameter(torch.from_numpy(a)))

        def forward(self, x, rho, bits):
            return torch.ops.solm.sparse_mlp(x, self.wg, None, self.wu, None, self.wd, None, rho, bits, "silu", "h")

    x = torch.from_numpy(rng.standard_normal((3, 1, D)).astype(np.float32))
    rho, bits = torch.tensor([1.0, 0.5, 0.25]), torch.full((3,), 16.0)
    model = ir.from_proto(export(MLPh(), (x, rho, bits), ({0: B, 1: T}, {0: B}, {0: B}), portable=True))
    assert pack_weights(model, table, accuracy_level=0).counts["matmul_int4-rtn"] == 3
    proto = ir.to_proto(model)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["MatMulNBits"] == 3 and ops["TopK"] == 1 and ops["MatMul"] == 0        # TopK: h's, x is whole
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], (x.numpy(), rho.numpy(), bits.numpy()))))[0]
    for b in range(3):
        xd = x[b, 0].numpy().astype(np.float64)
        g, u = deq["wg"].astype(np.float64) @ xd, deq["wu"].astype(np.float64) @ xd
        h = g / (1 + np.exp(-g)) * u
        k = min(math.ceil(float(rho[b]) * I - 1e-9), I)
        a = np.sort(np.abs(h))[::-1]
        assert k == I or a[k - 1] - a[k] > 1e-5 * a[0]                                  # no near-tie: a clear set
        keep = np.abs(h) >= a[k - 1]
        want = deq["wd"].astype(np.float64)[:, keep] @ h[keep]
        assert np.abs(got[b, 0] - want).max() < 1e-4 * np.abs(want).max(), b


def test_portable_artifact_on_int4_weights_with_h_skip(tmp_path):
    """write_artifact kind portable, --weights int4 --mlp-skip h (a random policy trained "on h"): metadata says h,
    every MLP matmul is MatMulNBits with one TopK per MLP, it runs on stock onnxruntime, and its dense prefill is HF
    eager's on the same int4 weights."""
    from pathlib import Path

    from test_quant import _tiny_dir

    from solm_compile.artifact.write import write_artifact
    from solm_compile.config import GateConfig
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.frontend.models import load
    from solm_compile.policy.actions import ActionGrid
    from solm_compile.policy.checkpoint import LoadedPolicy
    from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
    from solm_compile.quant.weights import quantize_model
    from solm_compile.runtime.session import SolmSession, read_metadata

    torch.manual_seed(0)
    model, d = _tiny_dir(tmp_path)
    loaded, h = load(str(d), weights="int4"), GateConfig(mlp_skip="h")
    lm = GatedLM.from_loaded(loaded, h)
    grid = ActionGrid()
    policy = RecurrentActorCriticPolicy(lm.info.hidden_size, grid.num_actions, PolicyConfig(d_model=32, max_steps=32))
    art = write_artifact(lm, tmp_path / "tiny.onnx", "portable", LoadedPolicy(policy.eval(), grid, h, {}, 0,
                                                                                Path("p.pt")),
                         weights=loaded.weights, activations="fp32")
    meta = read_metadata(art)
    assert meta["mlp_skip"] == "h" and meta["weights"]["packed"]["matmul_int4-rtn"] >= 2 * 7
    ops = collections.Counter(n.op_type for n in onnx.load(str(art)).graph.node)
    assert ops["TopK"] >= 2 and ops["SparseMLP"] == ops["SparseMLPBlocks"] == 0
    ref = model.float()
    quantize_model(ref, "int4")
    ids = [[5, 17, 99, 3, 250, 42, 7, 8, 9]]
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits[0, -1].numpy()
    sess = SolmSession(art, tokenizer=False)
    steps = list(sess.steps(ids, budget=(1.0, 0.5, 16), max_new_tokens=3))
    assert np.abs(steps[0]["logits"][0] - want).max() < 1e-3 * np.abs(want).max()
    assert all(np.isfinite(s["logits"]).all() for s in steps)


def test_mlp_down_bits_4_reaches_the_artifact(tmp_path):
    """--mlp-down-bits 4 (SolmConfig.mlp_down_bits, the CLI's default is the API's): downᵀ stored as 4-bit blocks
    (two codes a byte: [I, D/32, 16]), bits_down 4 on every SparseMLPBlocks, recorded in the metadata; other values
    are one-line errors."""
    from test_quant import _tiny_dir

    from solm_compile.api import SolmConfig, compile
    from solm_compile.cli.app import build_parser
    from solm_compile.config import GateConfig
    from solm_compile.runtime.session import read_metadata

    assert build_parser().parse_args(["compile", "m", "--out", "m.onnx"]).mlp_down_bits == SolmConfig().mlp_down_bits
    with pytest.raises(UserError, match="--mlp-down-bits: must be 4 or 8, got 5"):
        SolmConfig(mlp_down_bits=5)
    model, d = _tiny_dir(tmp_path)
    art = compile(str(d), SolmConfig(kind="fixed", weights="int4", gate=GateConfig(mlp_skip="h"), mlp_down_bits=4),
                  tmp_path / "tiny.onnx")
    meta = read_metadata(art)
    assert meta["weights"]["mlp_down_bits"] == 4 and meta["weights"]["packed"]["mlp_downT_int4-rtn"] == 2
    proto = onnx.load(str(art))
    inits = {t.name: t for t in proto.graph.initializer}
    blocks = [n for n in proto.graph.node if n.op_type == "SparseMLPBlocks"]
    I, D = model.config.intermediate_size, model.config.hidden_size
    for n in blocks:
        assert next(a.i for a in n.attribute if a.name == "bits_down") == 4
        assert list(inits[n.input[9]].dims) == [I, D // 32, 16]
