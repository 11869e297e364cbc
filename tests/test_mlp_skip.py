"""``--mlp-skip h`` wiring (issue 17): SolmConfig / CLI, pack_mlp's transposed down, the artifact's metadata.

The kernel itself is checked in test_solm_ep_blocks_h.py; here: the packed down is W_downᵀ to within its new 8-bit
rounding (numpy on the source weights), a tiny fixed artifact at the dense budget matches HF eager on the same
weights, and the refusals are one line (UserError, exit code 2).
"""

from __future__ import annotations

import collections

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


def test_config_and_cli_refuse_what_cannot_skip_h():
    from solm_compile.api import SolmConfig
    from solm_compile.cli.app import build_parser
    from solm_compile.config import GateConfig

    assert SolmConfig().mlp_skip == "x"
    for cmd in (["compile", "m", "--out", "m.onnx"], ["eval", "m"], ["verify", "m"], ["train", "m", "--out", "p.pt"]):
        args = build_parser().parse_args(cmd)
        assert args.mlp_skip == SolmConfig().mlp_skip == GateConfig().mlp_skip            # one default
    h = GateConfig(mlp_skip="h")
    assert SolmConfig(gate=h).mlp_skip == "h"                                           # read from the gate
    with pytest.raises(UserError, match="--mlp-skip h: needs a SolmEP artifact on low-bit weights"):
        SolmConfig(weights="fp32", gate=h)
    with pytest.raises(UserError, match="--mlp-skip h"):
        SolmConfig(kind="portable", weights="int4", gate=h)
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
