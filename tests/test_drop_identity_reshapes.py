"""passes/drop_identity_reshapes: a Reshape that keeps its input's shape (by the graph's own shapes) goes, one that
changes it or whose shapes are unknown stays, and the graph computes the same values (numpy reference)."""

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxscript import ir

from solm_compile.passes.drop_identity_reshapes import drop_identity_reshapes


def _model():
    """x [B, 3, T, 4] (B, T symbolic) → Reshape to its own shape (computed by Shape) → Transpose → Reshape [B, T, 12]
    → Reshape to an unknown shape [?, ?] (shape unknown: kept) → y."""
    n = helper.make_node
    nodes = [n("Shape", ["x"], ["xs"]), n("Reshape", ["x", "xs"], ["same"]),
             n("Transpose", ["same"], ["t"], perm=[0, 2, 1, 3]), n("Reshape", ["t", "s3"], ["flat"]),
             n("Reshape", ["flat", "s2"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0, 0, 12], np.int64), "s3"),
             numpy_helper.from_array(np.array([-1, 12], np.int64), "s2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, "T", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits,
                          value_info=[helper.make_tensor_value_info("same", TensorProto.FLOAT, ["B", 3, "T", 4]),
                                      helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["B", "T", 12])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_identity_reshape_goes_others_stay_values_unchanged():
    proto = _model()
    model = ir.serde.deserialize_model(proto)
    res = drop_identity_reshapes(model)
    out = ir.serde.serialize_model(model)
    assert res.modified and res.counts["reshape"] == 1
    assert [nd.op_type for nd in out.graph.node] == ["Transpose", "Reshape", "Reshape"]   # Shape went with its user
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    want = x.transpose(0, 2, 1, 3).reshape(-1, 12)                                         # [B·T, 12]
    for p in (proto, out):
        got = ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, want)
    assert not drop_identity_reshapes(model).modified                                       # nothing left to drop
