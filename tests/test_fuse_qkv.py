"""passes/fuse_qkv: three MatMulNBits over one input (with GGUF Q4_1's block-offset MatMul) become one and a Split,
and the graph computes what it computed: bit for bit against the unfused graph, and against a numpy reference
written here from MatMulNBits' definition (w = (code − zero) · scale, plus offset · Σ block of x)."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript import ir

from solm_compile.passes.fuse_qkv import fuse_qkv

B, T, K, BLK = 2, 3, 96, 32
NB = K // BLK
D = 8                      # head dim
NS = (48, 16, 16)          # q, k, v columns: 6, 2 and 2 heads


def _weights(rng, n):
    codes = rng.integers(0, 16, (n, K)).astype(np.uint8)                          # [N, K] 4-bit codes
    zero = rng.integers(0, 16, (n, NB)).astype(np.uint8)                          # [N, nb]
    scale = rng.uniform(0.01, 0.1, (n, NB)).astype(np.float32)                    # [N, nb]
    offset = rng.uniform(-0.2, 0.2, (NB, n)).astype(np.float32)                   # [nb, N]
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).reshape(n, NB, BLK // 2)    # [N, nb, 16]: even k low
    zpad = np.concatenate([zero, np.zeros((n, NB % 2), np.uint8)], 1)            # [N, 2·⌈nb/2⌉]
    zpacked = zpad[:, 0::2] | (zpad[:, 1::2] << 4)                                # [N, ⌈nb/2⌉]
    w = (codes.astype(np.float32) - np.repeat(zero, BLK, 1)) * np.repeat(scale, BLK, 1)   # [N, K]
    return (packed, scale, zpacked, offset), w


def _model(with_offset=True, accuracy_level=0, seed=0, heads=False):
    """x [B,T,K] → q/k/v projections as pack_weights writes them → each Reshape'd to [B,T,N], or (``heads``) to
    [B,T,H,D] and transposed to [B,H,T,D] as the exporter writes attention's heads."""
    rng = np.random.default_rng(seed)
    n, inits, nodes, outs, refs = helper.make_node, [], [], [], []
    inits += [numpy_helper.from_array(np.array([0, 0, NB, BLK], np.int64), "bs.shape"),
              numpy_helper.from_array(np.array([-1], np.int64), "bs.axes"),
              numpy_helper.from_array(np.array([B, T, -1], np.int64), "shape3"),
              numpy_helper.from_array(np.array([B, T, -1, D], np.int64), "shape4")][:4 if heads else 3]
    nodes += [n("Reshape", ["x", "bs.shape"], ["xb"]), n("ReduceSum", ["xb", "bs.axes"], ["s"], keepdims=0)]
    for j, N in enumerate(NS):
        (packed, scale, zp, offset), w = _weights(rng, N)
        inits += [numpy_helper.from_array(a, f"w{j}.{k}") for a, k in
                  ((packed, "q"), (scale, "scale"), (zp, "zp"), (offset, "offset"))[:4 if with_offset else 3]]
        nodes.append(n("MatMulNBits", ["x", f"w{j}.q", f"w{j}.scale", f"w{j}.zp"], [f"y{j}"], domain="com.microsoft",
                       K=K, N=N, bits=4, block_size=BLK, accuracy_level=accuracy_level))
        last = f"y{j}"
        if with_offset:
            nodes += [n("MatMul", ["s", f"w{j}.offset"], [f"o{j}"]), n("Add", [f"y{j}", f"o{j}"], [f"a{j}"])]
            last = f"a{j}"
        if heads:
            nodes += [n("Reshape", [last, "shape4"], [f"h{j}"], allowzero=1),
                      n("Transpose", [f"h{j}"], [f"out{j}"], perm=[0, 2, 1, 3])]
            outs.append(helper.make_tensor_value_info(f"out{j}", TensorProto.FLOAT, [B, N // D, T, D]))
        else:
            nodes.append(n("Reshape", [last, "shape3"], [f"out{j}"]))
            outs.append(helper.make_tensor_value_info(f"out{j}", TensorProto.FLOAT, [B, T, N]))
        refs.append((w, offset if with_offset else None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, T, K])], outs,
                          initializer=inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    # the static [B,T,H,D] the pass reads (the torch exporter writes it; onnx's inference does not know MatMulNBits)
    proto.graph.value_info.extend(helper.make_tensor_value_info(f"h{j}", TensorProto.FLOAT, [B, T, N // D, D])
                                  for j, N in enumerate(NS) if heads)
    return proto, refs


def _run(proto, x):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _fused(proto):
    model = ir.serde.deserialize_model(proto)
    res = fuse_qkv(model)
    return ir.serde.serialize_model(model), res


@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_fused_graph_is_the_unfused_graph_bit_for_bit(with_offset, accuracy_level):
    proto, refs = _model(with_offset, accuracy_level)
    fused, res = _fused(proto)
    assert res.modified and res.counts["fused"] == 1 and res.counts["projections"] == 3
    ops = [nd.op_type for nd in fused.graph.node]
    assert ops.count("MatMulNBits") == 1 and ops.count("Split") == 1
    assert ops.count("MatMul") == ops.count("Add") == (1 if with_offset else 0)
    assert len(fused.graph.node) == len(proto.graph.node) - (5 if with_offset else 1)
    names = lambda m: {t.name for t in m.graph.initializer}                            # noqa: E731
    used = {i for nd in fused.graph.node for i in nd.input}
    assert names(fused) <= used                              # the unfused weights are gone with their nodes
    assert sum(t.ByteSize() for t in fused.graph.initializer) < sum(t.ByteSize() for t in proto.graph.initializer) + 64
    x = np.random.default_rng(1).standard_normal((B, T, K)).astype(np.float32)
    before, after = _run(proto, x), _run(fused, x)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    if accuracy_level == 0:           # exact fp32 path: the definition, up to summation order
        s = x.reshape(B, T, NB, BLK).sum(-1)                                       # [B, T, nb]
        for (w, offset), y in zip(refs, after):
            ref = x @ w.T + (s @ offset if offset is not None else 0)              # [B, T, N]
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def test_nothing_to_fuse_and_mixed_groups_are_left_alone():
    proto, _ = _model(with_offset=True)
    fused, res = _fused(proto)
    again, res2 = _fused(fused)                       # idempotent: one MatMulNBits per input is left
    assert not res2.modified and len(again.graph.node) == len(fused.graph.node)
    # a member with another accuracy level is not fused with the others (their int8 rounding would differ)
    odd = helper.make_model(proto.graph, opset_imports=proto.opset_import, ir_version=10)
    for nd in odd.graph.node:
        if nd.output[0] == "y2":
            next(a for a in nd.attribute if a.name == "accuracy_level").i = 4
    kept, res3 = _fused(odd)
    assert not res3.modified and res3.skipped and "differ" in res3.skipped[0][1]
    assert len(kept.graph.node) == len(odd.graph.node)


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_parts_going_to_heads_are_split_by_heads_after_one_transpose(accuracy_level):
    proto, refs = _model(True, accuracy_level, heads=True)
    fused, res = _fused(proto)
    assert res.counts["fused"] == 1 and res.counts["split_by_heads"] == 1
    ops = [nd.op_type for nd in fused.graph.node]
    assert ops.count("Transpose") == 1 and ops.count("Split") == 1 and ops.count("MatMulNBits") == 1
    assert len(fused.graph.node) == len(proto.graph.node) - 5 - 4      # 9 → 4 projection nodes, 7 → 3 head nodes
    x = np.random.default_rng(2).standard_normal((B, T, K)).astype(np.float32)
    before, after = _run(proto, x), _run(fused, x)
    for a, b, N in zip(before, after, NS):
        assert b.shape == (B, N // D, T, D)
        np.testing.assert_array_equal(a, b)
    if accuracy_level == 0:
        s = x.reshape(B, T, NB, BLK).sum(-1)                                       # [B, T, nb]
        for (w, offset), y, N in zip(refs, after, NS):
            ref = (x @ w.T + s @ offset).reshape(B, T, N // D, D).transpose(0, 2, 1, 3)   # [B, H, T, D]
            np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
