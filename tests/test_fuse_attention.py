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


def _step(sess, ids, pos, past, length):
    """One run with each present bound to its past's OrtValue (the in-place path GroupQueryAttention takes when the
    buffers are shared); returns the logits."""
    binding = sess.io_binding()
    feeds = {"input_ids": ids, "position_ids": pos, "past_length": np.array([length], np.int64)}
    for name, v in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(v))
    for name, v in past.items():
        binding.bind_ortvalue_input(name, v)
    for o in sess.get_outputs():
        if o.name.startswith("present_"):
            binding.bind_ortvalue_output(o.name, past[o.name.replace("present_", "past_", 1)])
        else:
            binding.bind_output(o.name, "cpu")
    sess.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


def test_fused_dense_artifact_matches_hf_eager_over_a_prefill_and_decode_steps(tiny):
    """Prefill then decode steps, the caches written in place in buffers whose spare rows hold noise: the logits are
    HF eager's (a kernel reading past ``past_length``, or a copy that missed a row, would differ)."""
    from solm_compile.api import SolmConfig, compile

    model, d = tiny
    art = compile(str(d / "tiny"), SolmConfig(kind="dense", weights="fp32"), d / "dense.onnx")
    meta = read_metadata(art)
    assert meta["dense_attention"] == {"attention": "GroupQueryAttention", "layers": 2, "unfused": [],
                                       "kv_cache": "buffer"}
    assert meta["kv_cache"] == {"layout": "buffer", "dtype": "float32"} and meta["protocol"] == 1
    graph = onnx.load(art).graph
    ops = {n.op_type for n in graph.node}
    assert "GroupQueryAttention" in ops and "Softmax" not in ops
    pasts = {i.name for i in graph.input if i.name.startswith(("past_key", "past_value"))}
    assert all(n.op_type in ("GroupQueryAttention", "Shape") for n in graph.node if set(n.input) & pasts)
    reads = {i for n in graph.node for i in n.input}
    assert not reads & {o.name for o in graph.output if o.name.startswith("present_")}   # nobody repeats the cache
    sess = ort.InferenceSession(str(art), providers=["CPUExecutionProvider"])
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 9]])                  # 6 prompt tokens, then 3 steps
    with torch.no_grad():
        want = model(ids).logits[0].numpy()                                  # [9, V]
    rng = np.random.default_rng(0)
    past = {i.name: ort.OrtValue.ortvalue_from_numpy(                        # [1, Hkv, 16, d]: 7 rows never valid
        (100 * rng.standard_normal((1, i.shape[1], 16, i.shape[3]))).astype(np.float32))
        for i in sess.get_inputs() if i.name.startswith("past_") and i.name != "past_length"}
    before = {n: v.numpy().copy() for n, v in past.items()}
    rows = [_step(sess, ids[:, :6].numpy(), np.arange(6)[None], past, 0)[0]]
    for t in range(6, 9):
        rows.append(_step(sess, ids[:, t:t + 1].numpy(), np.array([[t]]), past, t)[0])
    got = np.concatenate(rows)                                               # [9, V]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for name, v in past.items():                                             # written in place: rows 0..8 only
        after = v.numpy()
        assert not np.array_equal(after[:, :, :9], before[name][:, :, :9])
        np.testing.assert_array_equal(after[:, :, 9:], before[name][:, :, 9:])


def test_a_fusion_that_changes_the_numbers_is_refused(tiny, monkeypatch, caplog):
    """Plant a wrong scale in the fused nodes: the probe sees it and the artifact keeps the exported attention."""
    from onnxscript import ir

    import solm_compile.passes.fuse_attention as fa
    from solm_compile.api import SolmConfig, compile

    real = fa.fuse_attention

    def wrong_scale(model, **kw):
        result = real(model, **kw)
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
