"""passes/fuse_linear_blocks (and fuse_skip_norm in the SolmEP kinds): each low-bit projection, with GGUF Q4_1's
block-sum offset chain, becomes one LinearBlocks node, and the graph computes what it computed.

On a hand-built graph (test_fuse_qkv's q/k/v projections: MatMulNBits with zero points and an offset over the
block sums) against the unfused graph on stock onnxruntime and against the numpy definition; on a tiny GGUF Q4_1
model's fixed artifact: the node count drops by the expected amount and the logits over a prefill and 8 decode
steps equal the artifact built without the two passes (fp32 activations: to float rounding; int8: within the
int8-activation tolerance, since SolmEP's per-block int8 x is not MatMulNBits' own).
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxscript import ir

from solm_compile.passes.base import PassResult
from solm_compile.passes.fuse_linear_blocks import fuse_linear_blocks
from solm_compile.runtime import ep
from test_fuse_qkv import BLK, NB, NS, B, K, T, _model, _run
from test_solm_ep import lib  # noqa: F401  (the fixture: SolmEP built and registered)


def _fused(proto):
    model = ir.serde.deserialize_model(proto)
    res = fuse_linear_blocks(model)
    return ir.serde.serialize_model(model), res


def _run_ep(proto, x, threads=1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(proto.SerializeToString(), ep.session_options_with_ep(so, ort=ort))
    return sess.run(None, {"x": x})


@pytest.mark.parametrize("with_offset", [True, False])
@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_projections_become_one_node_each(lib, with_offset, accuracy_level):
    proto, refs = _model(with_offset, accuracy_level)
    fused, res = _fused(proto)
    ops = collections.Counter(nd.op_type for nd in fused.graph.node)
    assert res.modified and res.counts["linear_blocks"] == 3
    assert ops["LinearBlocks"] == 3 and ops["MatMulNBits"] == ops["MatMul"] == ops["Add"] == 0
    assert ops["ReduceSum"] == (0 if with_offset else 1)        # without offsets the graph's own block sums stay
    # per projection MatMulNBits (+ MatMul, Add) -> 1; the shared block sums (Reshape, ReduceSum) go once
    assert len(fused.graph.node) == len(proto.graph.node) - (3 * 2 + 2 if with_offset else 0)
    acts = {a.s for nd in fused.graph.node for a in nd.attribute if a.name == "activations"}
    assert acts == {b"int8" if accuracy_level == 4 else b"fp32"}
    used = {i for nd in fused.graph.node for i in nd.input}
    assert {t.name for t in fused.graph.initializer} <= used
    x = np.random.default_rng(1).standard_normal((B, T, K)).astype(np.float32)
    x[0, 0, :BLK] = 0.0                                                          # an all-zero block
    before, after = _run(proto, x), _run_ep(fused, x)
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in after]),
                                  np.concatenate([a.ravel() for a in _run_ep(fused, x, threads=2)]))
    s = x.reshape(B, T, NB, BLK).sum(-1)                                         # [B, T, nb]
    for (w, offset), y, y0, N in zip(refs, after, before, NS):
        want = x.astype(np.float64) @ w.T + (s @ offset if offset is not None else 0)    # the definition
        scale = np.abs(want).max()
        if accuracy_level == 0:
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * scale)
            np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5 * scale)
        else:                              # int8 x per block: off by up to 1/254 of each block's max|x| per value
            assert np.abs(y - want).max() <= 0.02 * scale
            assert np.abs(y - y0).max() <= 0.02 * scale


def test_the_lm_head_and_odd_formats_are_left_alone():
    proto, _ = _model(with_offset=False)
    for nd in proto.graph.node:
        if nd.output[0] == "y1":
            next(a for a in nd.attribute if a.name == "block_size").i = 64
    proto.graph.output.append(onnx.helper.make_tensor_value_info("y2", onnx.TensorProto.FLOAT, None))
    fused, res = _fused(proto)
    assert res.counts["linear_blocks"] == 1
    why = [w for _, w in res.skipped]
    assert len(why) == 2 and any("block_size 64" in w for w in why) and any("LM head" in w for w in why)
    again, res2 = _fused(fused)
    assert not res2.counts["linear_blocks"] and len(again.graph.node) == len(fused.graph.node)


# ---------------------------------------------------------------------------------------------- a whole artifact
def _artifact(tmp_path, name, gguf, activations, passes_on):
    from solm_compile.api import SolmConfig, compile
    from solm_compile.passes import fuse_linear_blocks as flb, fuse_skip_norm as fsn

    mp = pytest.MonkeyPatch()
    if not passes_on:
        mp.setattr(flb, "fuse_linear_blocks", lambda m: PassResult("fuse_linear_blocks"))
        mp.setattr(fsn, "fuse_skip_norm", lambda m: PassResult("fuse_skip_norm"))
    try:
        return compile(str(gguf), SolmConfig(kind="fixed", weights="source", activations=activations),
                       tmp_path / f"{name}.onnx")
    finally:
        mp.undo()


def _logits(art, threads, budget):
    from solm_compile.runtime.session import SolmSession

    sess = SolmSession(art, threads=threads, tokenizer=False)
    prompt = [[5, 17, 30, 3, 25, 42, 8, 11, 2, 19]]
    return np.stack([s["logits"][0] for s in sess.steps(prompt, budget, forced=[[7, 1, 22, 9, 14, 4, 33, 6]])])


@pytest.mark.parametrize("activations", ["fp32", "int8"])
def test_tiny_gguf_artifact_with_and_without_the_passes(lib, tmp_path, activations):
    from gguf import GGMLQuantizationType as Q

    from solm_compile.runtime.session import read_metadata
    from test_loading import HF_TO_GGUF, LAYERS, tiny_hf_llama, write_tiny_gguf

    quant = {f"{g}.weight": Q.Q4_1 for k, g in HF_TO_GGUF.items() if "norm" not in k}
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), quant)
    new = _artifact(tmp_path, "new", gguf, activations, True)
    old = _artifact(tmp_path, "old", gguf, activations, False)
    ops_new = collections.Counter(n.op_type for n in onnx.load(str(new)).graph.node)
    ops_old = collections.Counter(n.op_type for n in onnx.load(str(old)).graph.node)
    # per layer: qkv and o, 5 nodes each (Reshape, ReduceSum, MatMulNBits, MatMul, Add) -> 1; two Add + norm -> 1
    assert ops_new["LinearBlocks"] == 2 * LAYERS and ops_new["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    assert sum(ops_old.values()) - sum(ops_new.values()) == 10 * LAYERS
    assert ops_new["MatMulNBits"] == ops_old["MatMulNBits"] - 2 * LAYERS       # the LM head's is left
    meta = read_metadata(new)["fused"]
    assert meta["linear_blocks"] == 2 * LAYERS and meta["skip_norm"] == 2 * LAYERS
    for budget in ((1.0, 1.0, 16), (0.4, 0.4, 16)):
        want = _logits(old, 1, budget)
        got = _logits(new, 1, budget)
        np.testing.assert_array_equal(got, _logits(new, 2, budget))
        scale = np.abs(want).max()
        tol = 1e-4 if activations == "fp32" else 0.05
        assert np.abs(got - want).max() <= tol * scale, (np.abs(got - want).max(), scale)
