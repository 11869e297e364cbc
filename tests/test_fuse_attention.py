"""The dense artifact's attention fused into GroupQueryAttention (issue 16): same numbers as HF eager, and the probe
check keeps the exported graph whenever a fusion would change what it computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from solm_compile.runtime.session import read_metadata


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_loading import tiny_hf_llama

    d = tmp_path_factory.mktemp("fuse")
    model = tiny_hf_llama()
    model.save_pretrained(d / "tiny")
    return model, d


def _step(sess, ids, pos, past):
    feeds = {"input_ids": ids, "position_ids": pos, **past}
    outs = sess.run(None, feeds)
    names = [o.name for o in sess.get_outputs()]
    return outs[0], {n.replace("present", "past"): v for n, v in zip(names[1:], outs[1:])}


def test_fused_dense_artifact_matches_hf_eager_over_a_prefill_and_decode_steps(tiny):
    from solm_compile.api import SolmConfig, compile

    model, d = tiny
    art = compile(str(d / "tiny"), SolmConfig(kind="dense", weights="fp32"), d / "dense.onnx")
    meta = read_metadata(art)["dense_attention"]
    assert meta == {"attention": "GroupQueryAttention", "layers": 2, "unfused": []}
    graph = onnx.load(art).graph
    ops = {n.op_type for n in graph.node}
    assert "GroupQueryAttention" in ops and "Softmax" not in ops
    reads = {i for n in graph.node for i in n.input}
    assert not reads & {o.name for o in graph.output if o.name.startswith("present_")}   # nobody repeats the cache
    sess = ort.InferenceSession(str(art), providers=["CPUExecutionProvider"])
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 9]])                  # 6 prompt tokens, then 3 steps
    with torch.no_grad():
        want = model(ids).logits[0].numpy()                                  # [9, V]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[2:]}
    got, past = _step(sess, ids[:, :6].numpy(), np.arange(6)[None], past)
    rows = [got[0]]
    for t in range(6, 9):
        logits, past = _step(sess, ids[:, t:t + 1].numpy(), np.array([[t]]), past)
        rows.append(logits[0])
    got = np.concatenate(rows)                                               # [9, V]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_fusion_that_changes_the_numbers_is_refused(tiny, monkeypatch, caplog):
    """Plant a wrong scale in the fused nodes: the probe sees it and the artifact keeps the exported attention."""
    from onnxscript import ir

    import solm_compile.passes.fuse_attention as fa
    from solm_compile.api import SolmConfig, compile

    real = fa.fuse_attention

    def wrong_scale(model):
        result = real(model)
        for node in model.graph:
            if node.op_type == "GroupQueryAttention":
                node.attributes["scale"] = ir.AttrFloat32("scale", 0.9)
        return result

    monkeypatch.setattr(fa, "fuse_attention", wrong_scale)
    _, d = tiny
    art = compile(str(d / "tiny"), SolmConfig(kind="dense", weights="fp32"), d / "wrong.onnx")
    meta = read_metadata(art)["dense_attention"]
    assert meta["attention"] == "exported" and "differs" in meta["why"]
    assert "GroupQueryAttention" not in {n.op_type for n in onnx.load(art).graph.node}
    assert "kept the exported attention" in caplog.text
