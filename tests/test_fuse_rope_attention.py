"""passes/fuse_rope_attention: the Reshape/Transpose/Split to heads, the two RotaryEmbedding nodes and the Transpose/
Reshape back after QuestAttention fold into one QuestAttentionRope, and the graph computes what it computed, bit for bit
on SolmEP: a hand-built layer in the fixed artifact's form (prefill and decode steps carrying the caches), and a tiny
Llama's fixed ``--weights int4`` artifact compiled with and without the pass (prefill + 8 decode steps, 1 and 2 threads,
the dense budget and κ = ρ = 0.4)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxscript import ir
from require import registered_ep

from solm_compile.passes.fuse_rope_attention import fuse_rope_attention

ort = pytest.importorskip("onnxruntime")

F, F16, I64, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL
B, H, HKV, D, C, S = 2, 4, 2, 16, 32, 8
N = (H + 2 * HKV) * D


@pytest.fixture(scope="module")
def lib():
    return registered_ep()


def _layer(kv_type=F16, buffer=True):
    """One attention layer as fuse_qkv, fuse_norm_rope and kv_buffer leave it (module doc of the pass)."""
    n = helper.make_node
    inits = [numpy_helper.from_array(np.array([0, 0, -1, D], np.int64), "heads"),
             numpy_helper.from_array(np.array([H, HKV, HKV], np.int64), "head_sizes"),
             numpy_helper.from_array(np.array([0, 0, H * D], np.int64), "merged")]
    qa_in = ["q", "k", "v", "mask", "kappa", "past_page_min", "past_page_max"]
    qa_in += ["past_key", "past_value", "past_length"] if buffer else []
    nodes = [n("Reshape", ["qkv", "heads"], ["r"]), n("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             n("Split", ["t", "head_sizes"], ["q0", "k0", "v"], axis=1),
             n("RotaryEmbedding", ["q0", "cos", "sin"], ["q"], interleaved=0),
             n("RotaryEmbedding", ["k0", "cos", "sin"], ["k"], interleaved=0),
             n("QuestAttention", qa_in, ["o", "present_page_min", "present_page_max"] +
               (["present_key", "present_value"] if buffer else []), domain="ai.solm", scale=D ** -0.5, page_size=S,
               sinks=2, window=4),
             n("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]), n("Reshape", ["ot", "merged"], ["y"])]
    types = {"qkv": F, "cos": F, "sin": F, "mask": BOOL, "kappa": F, "past_page_min": F, "past_page_max": F}
    types |= {"past_key": kv_type, "past_value": kv_type, "past_length": I64} if buffer else {}
    outs = [("y", F), ("present_page_min", F), ("present_page_max", F)]
    outs += [("present_key", kv_type), ("present_value", kv_type)] if buffer else []
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(k, t, None) for k, t in types.items()],
                          [helper.make_tensor_value_info(k, t, None) for k, t in outs], initializer=inits)
    return helper.make_model(g, ir_version=10, opset_imports=[helper.make_opsetid("", 23),
                                                              helper.make_opsetid("ai.solm", 1)])


def _fused(proto):
    model = ir.serde.deserialize_model(proto)
    res = fuse_rope_attention(model)
    return ir.serde.serialize_model(model), res


def _session(proto, threads=1):
    from solm_compile.runtime import ep

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), ep.session_options_with_ep(so, ort=ort))


def _steps(sess, kv_dtype, seed=0):
    """A prefill of 13 tokens then 4 decode steps (κ 0.3 / 0.6), each fed the previous call's caches."""
    rng = np.random.default_rng(seed)
    state = {"past_key": np.zeros((B, HKV, C, D), kv_dtype), "past_value": np.zeros((B, HKV, C, D), kv_dtype),
             "past_page_min": np.zeros((B, HKV, C // S, D), np.float32),
             "past_page_max": np.zeros((B, HKV, C // S, D), np.float32)}
    got, past = [], 0
    for T, kappa in [(13, 1.0)] + [(1, 0.3)] * 2 + [(1, 0.6)] * 2:
        inv = 10000.0 ** (-np.arange(0, D, 2) / D)                                          # [d/2]
        ang = np.arange(past, past + T)[None, :, None] * inv + np.arange(B)[:, None, None]    # [B, T, d/2]
        mask = np.tril(np.ones((T, past + T), bool), k=past)[None, None].repeat(B, 0)
        feeds = {"qkv": rng.standard_normal((B, T, N)).astype(np.float32), "cos": np.cos(ang).astype(np.float32),
                 "sin": np.sin(ang).astype(np.float32), "mask": mask, "kappa": np.full(B, kappa, np.float32),
                 "past_length": np.full(B, past, np.int64), **state}
        out = sess.run(None, feeds)
        got.append(out[0])
        state = dict(zip(["past_page_min", "past_page_max", "past_key", "past_value"], out[1:]))
        past += T
    return got


@pytest.mark.parametrize("kv_type,kv_dtype", [(F, np.float32), (F16, np.float16)])
def test_layer_folds_and_computes_the_same_bits(lib, kv_type, kv_dtype):
    proto = _layer(kv_type)
    fused, res = _fused(proto)
    assert res.modified and res.counts["fused"] == 1 and res.counts["nodes_removed"] == 7
    assert [nd.op_type for nd in fused.graph.node] == ["QuestAttentionRope"]
    node = fused.graph.node[0]
    assert list(node.input[:3]) == ["qkv", "cos", "sin"] and node.output[0] == "y"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["interleaved"], attrs["page_size"]) == (H, HKV, 0, S)
    for threads in (1, 2):
        want, got = _steps(_session(proto, threads), kv_dtype), _steps(_session(fused, threads), kv_dtype)
        assert all(np.array_equal(a, b) for a, b in zip(want, got))
    assert fuse_rope_attention(ir.serde.deserialize_model(fused)).modified is False     # twice changes nothing


def test_a_layer_without_the_kv_buffer_is_left_alone():
    _, res = _fused(_layer(buffer=False))
    assert not res.modified and res.skipped == [(res.skipped[0][0], "no KV cache buffer")]


def test_a_rotated_q_read_elsewhere_is_left_alone():
    proto = _layer()
    proto.graph.output.append(helper.make_tensor_value_info("q", F, None))
    _, res = _fused(proto)
    assert not res.modified and "another reader" in res.skipped[0][1]


def _decode(path, budget, threads, ids):
    from solm_compile.bench.engines import ArtifactEngine, EngineSpec

    e = ArtifactEngine(EngineSpec("solm", "x", str(path), "int4", budget), threads, len(ids) + 16)
    out = [e.prefill(ids)]
    for _ in range(8):
        out.append(e.step(int(np.argmax(out[-1]))))
    return np.stack(out)


def test_tiny_fixed_artifact_loses_seven_nodes_a_layer_and_keeps_its_logits(lib, tmp_path, monkeypatch):
    import onnx
    from test_quant import _tiny_dir

    from solm_compile.api import SolmConfig, compile
    from solm_compile.passes import fuse_rope_attention as mod
    from solm_compile.runtime.session import read_metadata

    _, d = _tiny_dir(tmp_path)
    new = compile(str(d), SolmConfig(kind="fixed", weights="int4"), tmp_path / "new.onnx")
    with monkeypatch.context() as m:        # the artifact as it was before the pass
        m.setattr(mod, "fuse_rope_attention", lambda model: mod.PassResult("off"))
        old = compile(str(d), SolmConfig(kind="fixed", weights="int4"), tmp_path / "old.onnx")
    ops_old = collections.Counter(nd.op_type for nd in onnx.load(str(old)).graph.node)
    ops_new = collections.Counter(nd.op_type for nd in onnx.load(str(new)).graph.node)
    layers = ops_old["QuestAttention"]
    assert layers == 2 and ops_new["QuestAttentionRope"] == layers and ops_new["QuestAttention"] == 0
    assert ops_new["RotaryEmbedding"] == ops_new["Split"] == 0
    assert ops_old["Transpose"] - ops_new["Transpose"] == 2 * layers
    # per layer 2 Reshape, 2 Transpose, a Split, 2 RotaryEmbedding go, QuestAttention becomes QuestAttentionRope;
    # whatever else went is the shape arithmetic only the merging Reshapes read
    gone = ops_old - ops_new - collections.Counter(Reshape=2 * layers, Transpose=2 * layers, Split=layers,
                                                     RotaryEmbedding=2 * layers, QuestAttention=layers)
    assert set(gone) <= {"Concat", "Shape", "Gather", "Unsqueeze", "Squeeze", "Slice", "Mul"}, gone
    assert sum(ops_old.values()) - sum(ops_new.values()) == 7 * layers + sum(gone.values())
    assert read_metadata(new)["fused"]["rope_attention"] == layers
    ids = list(np.random.default_rng(0).integers(3, 250, 37))
    for budget in ((1.0, 1.0, 16.0), (0.4, 0.4, 16.0)):
        for threads in (1, 2):
            assert np.array_equal(_decode(old, budget, threads, ids), _decode(new, budget, threads, ids))
