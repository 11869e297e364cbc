"""Low-bit weights (issue 16): GGUF blocks read bit-exactly, round-to-nearest bounds, and the ONNX packing checked
against onnxruntime's own MatMulNBits / GatherBlockQuantized kernels and against numpy on dequantised weights."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxscript import ir

from solm_compile.quant import gguf as qgguf
from solm_compile.quant.blocks import BlockQuant, quantize_int4, quantize_int8
from solm_compile.quant.weights import WeightTable

GG = pytest.importorskip("gguf")
T = GG.GGMLQuantizationType
RNG = np.random.default_rng(7)


# bytes per block, and where its fp16 scale(s) sit (random bytes there could be inf/NaN)
LAYOUT = {"Q4_0": (18, [0]), "Q4_1": (20, [0, 2]), "Q5_0": (22, [0]), "Q8_0": (34, [0]), "Q4_K": (144, [0, 2]),
          "Q6_K": (210, [208])}


def _random_blocks(kind: str, rows: int, nb: int) -> np.ndarray:
    """Raw GGUF bytes [rows, nb * bytes]: random codes and sub-scales, finite fp16 scales of either sign."""
    size, halves = LAYOUT[kind]
    raw = RNG.integers(0, 256, size=(rows, nb, size), dtype=np.uint8)
    for at in halves:
        raw[..., at:at + 2] = RNG.uniform(-0.05, 0.05, (rows, nb, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, nb * size)


@pytest.mark.parametrize("kind", sorted(LAYOUT))
def test_gguf_blocks_dequantize_bit_exactly_like_gguf(kind):
    raw = _random_blocks(kind, rows=16, nb=2)
    ours = qgguf.decode(kind, raw).dequantize()
    theirs = GG.quants.dequantize(raw, T[kind]).astype(np.float32)           # the gguf package's reader
    assert ours.shape == theirs.shape and ours.shape[0] == 16
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))     # bit for bit, signed zeros included


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_quantized_by_gguf_then_read_back_exactly(kind):
    w = RNG.standard_normal((8, 64)).astype(np.float32)
    raw = GG.quants.quantize(w, T[kind])                                     # gguf's own quantizer
    bq = qgguf.decode(kind, raw)
    assert np.array_equal(bq.dequantize(), GG.quants.dequantize(raw, T[kind]))             # values; ±0 alike
    if bq.zero_point is not None:                                            # w = d·(q − z) with an integer z
        z = bq.zero_point.astype(np.float32)[..., None]
        again = (bq.scale[..., None] * (bq.codes.astype(np.float32) - z)).reshape(w.shape)
        assert np.array_equal(again, bq.dequantize())


def test_match_undoes_a_row_permutation_and_refuses_a_changed_row():
    raw = GG.quants.quantize(RNG.standard_normal((12, 32)).astype(np.float32), T.Q4_1)
    bq = qgguf.decode("Q4_1", raw)
    perm = RNG.permutation(12)
    w = bq.dequantize()[perm]
    found = qgguf.match({"p": w, "other": RNG.standard_normal((12, 32)).astype(np.float32)}, {"t": bq})
    assert set(found) == {"p"}
    assert np.array_equal(found["p"].dequantize(), w)
    w2 = w.copy()
    w2[3, 5] = np.nextafter(w2[3, 5], np.float32(9))                        # one ulp off: not the same weights
    assert qgguf.match({"p": w2}, {"t": bq}) == {}


@pytest.mark.parametrize("quant,levels", [(quantize_int4, 15), (quantize_int8, 254)])
def test_round_to_nearest_error_is_at_most_half_a_step(quant, levels):
    w = (RNG.standard_normal((32, 96)) * RNG.uniform(0.01, 3, size=(32, 1))).astype(np.float32)
    bq = quant(w)
    err = np.abs(bq.dequantize() - w).reshape(32, 3, 32)
    step = bq.scale[..., None]
    assert (err <= 0.5 * step * (1 + 1e-3) + 1e-7).all()
    span = w.reshape(32, 3, 32)
    width = np.maximum(span.max(-1), 0) - np.minimum(span.min(-1), 0) if levels == 15 else 2 * np.abs(span).max(-1)
    assert (bq.scale <= width / levels * 1.001 + 1e-7).all()                # fp16 rounding of the scale at most


def test_block_quant_validates():
    codes = np.zeros((2, 1, 32), np.uint8)
    with pytest.raises(ValueError, match="exceeds 4 bits"):
        BlockQuant(codes + 16, np.ones((2, 1), np.float32), np.zeros((2, 1), np.float32), 4, "x")
    with pytest.raises(ValueError, match="scale"):
        BlockQuant(codes, np.ones((2, 2), np.float32), np.zeros((2, 1), np.float32), 4, "x")


# ------------------------------------------------------------------------------------------------ the ONNX rewrite
def _matmul_gather_model(w: np.ndarray, emb: np.ndarray) -> ir.Model:
    """y = Gather(emb, ids) @ w.T, as the exporter writes it (MatMul with the transposed weight [K, N])."""
    n, k = w.shape
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("MatMul", ["h", "WT"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "t"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "t", n])],
                              [numpy_helper.from_array(np.ascontiguousarray(w.T), "WT"),
                               numpy_helper.from_array(emb, "E")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"ids": ids})[0]


@pytest.mark.parametrize("fmt", ["int4", "int8", "Q4_1", "Q4_0", "Q8_0", "Q4_K", "Q6_K"])
def test_pack_weights_matches_numpy_on_dequantized_weights(fmt):
    from solm_compile.passes.pack_weights import pack_weights

    w = RNG.standard_normal((48, 256)).astype(np.float32)
    if fmt in ("int4", "int8"):
        bq = (quantize_int4 if fmt == "int4" else quantize_int8)(w)
    elif fmt.endswith("_K"):                                                 # gguf-py cannot quantize these
        bq = qgguf.decode(fmt, _random_blocks(fmt, rows=48, nb=1))
    else:
        bq = qgguf.decode(fmt, GG.quants.quantize(w, T[fmt]))
    emb_bq = quantize_int8(RNG.standard_normal((20, 256)).astype(np.float32))
    wq, emb = bq.dequantize(), emb_bq.dequantize()
    table = WeightTable("test")
    table.add(wq, bq)
    table.add(emb, emb_bq)
    model = _matmul_gather_model(wq, emb)
    result = pack_weights(model, table, accuracy_level=0)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert result.modified and ops["MatMulNBits"] == 1 and ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0
    assert (fmt in ("Q4_1", "Q4_K")) == (ops["ReduceSum"] == 1)             # the d·q + m form adds m·blocksum(x)
    assert not model.graph.initializers.get("WT") and not model.graph.initializers.get("E")   # fp32 copies gone
    ids = np.array([[3, 0, 19, 7]], np.int64)
    want = emb[ids[0]] @ wq.T                                                # [4, 48] numpy, float64-free
    got = _run(model, ids)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())   # fp32 summation order


def test_pack_weights_leaves_unknown_weights_and_keeps_output_names():
    from solm_compile.passes.pack_weights import pack_weights

    w = RNG.standard_normal((8, 32)).astype(np.float32)
    model = _matmul_gather_model(w, RNG.standard_normal((5, 32)).astype(np.float32))
    table = WeightTable("test")
    table.add(RNG.standard_normal((8, 32)).astype(np.float32), quantize_int4(w))   # a different weight's key
    assert not pack_weights(model, table).modified
    q = quantize_int4(w)
    table.add(q.dequantize(), q)
    model = _matmul_gather_model(q.dequantize(), RNG.standard_normal((5, 32)).astype(np.float32))
    assert pack_weights(model, table).counts == {"matmul_int4-rtn": 1}
    assert [v.name for v in model.graph.outputs] == ["y"]
    onnx.checker.check_model(ir.to_proto(model))


def test_pack_weights_reads_a_tied_head_through_its_transpose():
    """LM head = MatMul(h, Transpose(E)) over the embedding E: both uses get the 8-bit blocks, E's fp32 copy goes."""
    from solm_compile.passes.pack_weights import pack_weights

    bq = quantize_int8(RNG.standard_normal((24, 32)).astype(np.float32))
    emb = bq.dequantize()
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"]), helper.make_node("Transpose", ["E"], ["ET"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "ET"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "t"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "t", 24])],
                              [numpy_helper.from_array(emb, "E")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    table = WeightTable("test")
    table.add(emb, bq)
    assert pack_weights(model, table, accuracy_level=0).counts == {"matmul_int8-rtn": 1, "gather_int8-rtn": 1}
    assert "E" not in model.graph.initializers and not any(n.op_type == "Transpose" for n in model.graph)
    ids = np.array([[1, 23, 4]], np.int64)
    np.testing.assert_allclose(_run(model, ids)[0], emb[ids[0]] @ emb.T, rtol=1e-5, atol=1e-5)


def test_pack_weights_shares_one_table_between_gather_and_gathernd():
    """The policy looks rows up with GatherND(E, ids[..., 1]): it gets the same 8-bit table as the model's Gather."""
    from solm_compile.passes.pack_weights import pack_weights

    bq = quantize_int8(RNG.standard_normal((24, 32)).astype(np.float32))
    emb = bq.dequantize()
    nodes = [helper.make_node("Gather", ["E", "ids"], ["a"]), helper.make_node("Unsqueeze", ["ids", "ax"], ["ids1"]),
             helper.make_node("GatherND", ["E2", "ids1"], ["b"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 32]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 32])],
                              [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(emb.copy(), "E2"),
                               numpy_helper.from_array(np.array([-1], np.int64), "ax")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    model.graph.node(1).outputs[0].shape = ir.Shape([1, 3, 1])
    table = WeightTable("test")
    table.add(emb, bq)
    assert pack_weights(model, table).counts == {"gather_int8-rtn": 2}
    assert sum(v.const_value.dtype == ir.DataType.UINT8 for v in model.graph.initializers.values()) == 2   # codes, zp
    ids = np.array([[1, 23, 4]], np.int64)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    a, b = sess.run(None, {"ids": ids})
    assert np.array_equal(a[0], emb[ids[0]]) and np.array_equal(b[0], emb[ids[0]])


# ------------------------------------------------------------------------------------------- the whole pipeline
def _tiny_dir(tmp_path):
    from test_loading import tiny_hf_llama

    model = tiny_hf_llama()
    model.save_pretrained(tmp_path / "tiny")
    return model, tmp_path / "tiny"


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_dense_artifact_runs_the_quantized_weights(tmp_path, weights):
    """The artifact (MatMulNBits, int8 activations) against HF eager on the same dequantised weights."""
    from solm_compile.api import SolmConfig, compile
    from solm_compile.quant.weights import quantize_model
    from solm_compile.runtime.session import read_metadata

    model, d = _tiny_dir(tmp_path)
    art = compile(str(d), SolmConfig(kind="dense", weights=weights), tmp_path / "tiny.onnx")
    meta = read_metadata(art)["weights"]
    assert meta["weights"] == weights and sum(meta["packed"].values()) == 2 * 7 + 2   # 7 linears/layer, head, embedding
    ref = model.float()
    quantize_model(ref, weights)                                             # the same blocks, in the torch model
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        want = ref(ids).logits[0].numpy()                                    # [6, V]
    sess = ort.InferenceSession(str(art), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.numpy(), "position_ids": np.arange(6)[None]}
    for i in sess.get_inputs()[2:]:                                          # an empty KV cache of 8 rows
        if i.name == "past_length":
            feeds[i.name] = np.zeros(1, np.int64)
            continue
        _, h, _, hd = i.shape
        feeds[i.name] = np.zeros((1, h, 8, hd), np.float32)
    got = sess.run(["logits"], feeds)[0][0]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.05 * scale                           # int8 activations per block of 32
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 5 / 6


def test_gguf_source_blocks_are_found_for_every_quantized_tensor(tmp_path):
    """A GGUF with Q4_1 linears (q, k permuted by llama.cpp's layout) and a Q8_0 embedding: ``source`` finds every
    one of them losslessly."""
    from test_loading import HF_TO_GGUF, tiny_hf_llama, write_tiny_gguf

    from solm_compile.frontend.models import load

    quant = {f"{g}.weight": T.Q4_1 for g in HF_TO_GGUF.values()} | {"token_embd.weight": T.Q8_0}
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), quant)
    loaded = load(str(path), weights="source")
    table = loaded.weights
    assert table.formats == {"Q4_1": 2 * 7, "Q8_0": 1}
    q = loaded.hf.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(table.find(q).dequantize(), q)


def test_fixed_artifact_mlp_runs_on_blocks_on_solm_ep(tmp_path):
    """kind "fixed", --weights int4: every SparseMLP becomes SparseMLPBlocks (no float32 MLP weight left), and SolmEP
    runs it: logits against HF eager on the same dequantised weights (q/k/v/o are MatMulNBits: int8 activations)."""
    from solm_compile.api import SolmConfig, compile
    from solm_compile.runtime.session import read_metadata

    model, d = _tiny_dir(tmp_path)
    art = compile(str(d), SolmConfig(kind="fixed", weights="int4"), tmp_path / "tiny.onnx")
    meta = read_metadata(art)["weights"]
    assert meta["packed"]["sparse_mlp_blocks"] == 2
    proto = onnx.load(str(art))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["SparseMLPBlocks"] == 2 and ops["SparseMLP"] == 0
    assert ops["Split"] == 0 and read_metadata(art)["fused"]["qkv"] == 2   # q, k, v: one MatMulNBits a layer
    assert ops["QuestAttentionRope"] == 2 and read_metadata(art)["fused"]["rope_attention"] == 2   # its split inside
    assert read_metadata(art)["fused"]["identity_reshapes"] == 2          # the view after QuestAttention
    assert [a.s for n in proto.graph.node if n.op_type == "SparseMLPBlocks" for a in n.attribute
            if a.name == "activations"] == [b"int8"] * 2                    # the default: int8 activations
    floats = {i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT and len(i.dims) == 2}
    assert not [n for n in floats if "mlp" in n and "offset" not in n and "scale" not in n], floats
    assert_int4_artifact_matches_eager(model, art, controls=0.0)


def assert_int4_artifact_matches_eager(model, art, controls: float) -> None:
    """The artifact's prefill logits over 6 ids (an empty KV buffer of 8 positions, past_length 0; every control
    input ``controls``, bits 16·controls) against HF eager on the same model's weights rounded to int4."""
    from require import need_ep
    from solm_compile.quant.weights import quantize_model
    from solm_compile.runtime import ep

    need_ep(ep.register(ort))
    ref = model.float()
    quantize_model(ref, "int4")
    ids = torch.tensor([[5, 17, 99, 3, 250, 42]])
    with torch.no_grad():
        want = ref(ids).logits[0].numpy()
    sess = ort.InferenceSession(str(art), ep.session_options_with_ep(ort.SessionOptions(), ort=ort))
    feeds = {"input_ids": ids.numpy(), "position_ids": np.arange(6)[None]}
    for i in sess.get_inputs()[2:]:
        shape = [1 if s in ("batch", "B") or not isinstance(s, int) and i.shape.index(s) == 0 else
                 ((1 if i.name.startswith("past_page_") else 8 if i.name.startswith("past_") else 0)
                  if not isinstance(s, int) else s) for s in i.shape]       # 8 KV rows: 1 page of the page buffers
        dtype = {"tensor(float16)": np.float16, "tensor(int64)": np.int64}.get(i.type, np.float32)
        fill = 16.0 * controls if i.name == "bits" else controls if i.name in ("attn_keep", "mlp_keep") else 0
        feeds[i.name] = np.full(shape, fill, dtype)
    got = sess.run(["logits"], feeds)[0][0]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.05 * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 5 / 6


@pytest.mark.parametrize("kwargs,want", [({}, "int8"), ({"accuracy_level": 0}, "fp32"),
                                         ({"mlp_activations": "fp32"}, "fp32"),
                                         ({"accuracy_level": 0, "mlp_activations": "int8"}, "int8")])
def test_pack_mlp_writes_the_activations_mode(kwargs, want):
    """SparseMLP -> SparseMLPBlocks carries activations="int8" under accuracy_level 4 (pack_weights' default, the
    artifacts' trade) and "fp32" under 0; mlp_activations overrides either."""
    from solm_compile.passes.pack_weights import pack_weights

    table, inits = WeightTable("test"), []
    for name, shape in (("wg", (64, 32)), ("wu", (64, 32)), ("wd", (32, 64))):
        bq = quantize_int4(RNG.standard_normal(shape).astype(np.float32))
        table.add(bq.dequantize(), bq)
        inits.append(numpy_helper.from_array(bq.dequantize(), name))
    node = helper.make_node("SparseMLP", ["x", "wg", "", "wu", "", "wd", "", "rho", "bits"], ["y"],
                            domain="ai.solm", act="silu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                            for n in ("x", "rho", "bits")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                                  helper.make_opsetid("ai.solm", 1)]))
    pack_weights(model, table, **kwargs)
    (blocks,) = [n for n in model.graph if n.op_type == "SparseMLPBlocks"]
    assert blocks.attributes["activations"].as_string() == want
