"""passes/fuse_norm_rope: the exporter's RMSNorm and RoPE chains become RMSNormalization / RotaryEmbedding, and
compute what they computed (numpy references written here from the definitions, not from the pass)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript import ir

from solm_compile.passes.fuse_norm_rope import fuse_rms_norm, fuse_rotary

B, H, T, D = 2, 3, 5, 8
EPS = 1e-5


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a), name)


def _graph(exponent=2.0):
    """x [B,T,H·D] → RMSNorm (the exporter's six nodes) → [B,H,T,D] → RoPE (its fourteen) → y; f [B,T,D/2]."""
    n = helper.make_node
    nodes = [
        n("Pow", ["x", "two"], ["sq"]), n("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
        n("Add", ["ms", "eps"], ["ms_eps"]), n("Sqrt", ["ms_eps"], ["rms"]), n("Reciprocal", ["rms"], ["inv"]),
        n("Mul", ["x", "inv"], ["xn"]), n("Mul", ["w", "xn"], ["normed"]),
        n("Reshape", ["normed", "shape4"], ["r4"]), n("Transpose", ["r4"], ["q"], perm=[0, 2, 1, 3]),
        n("Concat", ["f", "f"], ["ff"], axis=-1), n("Cos", ["ff"], ["cos3"]), n("Sin", ["ff"], ["sin3"]),
        n("Unsqueeze", ["cos3", "one"], ["cos"]), n("Unsqueeze", ["sin3", "one"], ["sin"]),
        n("Slice", ["q", "zero", "half", "last"], ["lo"]), n("Slice", ["q", "half", "big", "last"], ["hi"]),
        n("Neg", ["hi"], ["nhi"]), n("Concat", ["nhi", "lo"], ["rot"], axis=-1),
        n("Mul", ["q", "cos"], ["qc"]), n("Mul", ["rot", "sin"], ["rs"]), n("Add", ["qc", "rs"], ["y"]),
    ]
    rng = np.random.default_rng(0)
    inits = [_init("two", np.float32(exponent)), _init("axes", np.array([-1], np.int64)),
             _init("eps", np.float32(EPS)), _init("w", rng.standard_normal(H * D).astype(np.float32)),
             _init("shape4", np.array([B, T, H, D], np.int64)), _init("one", np.array([1], np.int64)),
             _init("zero", np.array([0], np.int64)), _init("half", np.array([D // 2], np.int64)),
             _init("big", np.array([2 ** 62], np.int64)), _init("last", np.array([-1], np.int64))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, H * D]),
                                       helper.make_tensor_value_info("f", TensorProto.FLOAT, [B, T, D // 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, H, T, D])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), inits[3]


def _reference(x, f, w):
    xn = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + EPS) * w       # [B,T,H·D]
    q = xn.reshape(B, T, H, D).transpose(0, 2, 1, 3)                                     # [B,H,T,D]
    c, s = np.cos(f)[:, None], np.sin(f)[:, None]                                        # [B,1,T,D/2]
    a, b = q[..., :D // 2], q[..., D // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)                           # rotate by angle f


def _run(model, x, f):
    return ort.InferenceSession(model.SerializeToString()).run(None, {"x": x, "f": f})[0]


def test_fused_graph_equals_the_definition_and_the_unfused_graph():
    proto, w = _graph()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, H * D)).astype(np.float32)
    f = rng.uniform(-20, 20, (B, T, D // 2)).astype(np.float32)
    before = _run(proto, x, f)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))   # the exporter annotates shapes too
    norm, rope = fuse_rms_norm(model), fuse_rotary(model)
    assert (dict(norm.counts), dict(rope.counts)) == ({"rms_norm": 1}, {"rotary": 1})
    fused = ir.to_proto(model)
    ops = [n.op_type for n in fused.graph.node]
    assert "Pow" not in ops and "Neg" not in ops and ops.count("RMSNormalization") == 1
    assert ops.count("RotaryEmbedding") == 1 and fused.opset_import[0].version == 23
    after = _run(fused, x, f)
    want = _reference(x, f, numpy_helper.to_array(w))
    np.testing.assert_allclose(before, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-5)


def test_a_chain_that_is_not_rms_norm_is_left_alone():
    proto, _ = _graph(exponent=3.0)
    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))   # the exporter annotates shapes too
    r = fuse_rms_norm(model)
    assert not r.modified and any("exponent" in s for s in r.skipped)
    assert "RMSNormalization" not in [n.op_type for n in ir.to_proto(model).graph.node]


@pytest.mark.parametrize("family", ["gemma3"])   # q/k norms, sliding layers; Llama goes through every artifact test
def test_the_exporter_chains_of_real_architectures_are_all_fused(family, tmp_path):
    """Every norm and every q/k rotary of an exported tiny model matches (so the patterns above are the exporter's):
    no Pow or Neg is left, and each layer has its two RotaryEmbedding nodes."""
    import torch
    from conftest import tiny_models

    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM

    torch.manual_seed(0)
    lm = GatedLM.from_loaded(models._from_hf(tiny_models()[family]().eval(), None, name=family, source="<test>"))
    ops = [n.op_type for n in onnx.load(str(write_artifact(lm, tmp_path / "t.onnx", "dense"))).graph.node]
    assert "Pow" not in ops and "Neg" not in ops and "RMSNormalization" in ops
    assert ops.count("RotaryEmbedding") == 2 * 2                       # q and k, 2 layers
