"""Bytes per decode token from tensors (bench/tensor_bytes.py, benchmark protocol point 5), against hand counts.

The references are written here: initializer sizes from the shapes and dtypes this test chose, a GGUF's tensors from
the transformers model it was written from, and on SolmEP the dense budget's bytes from the KV length alone (so the
kernels' counters must say they read every K/V row and every MLP row), ρ's from ⌈ρ·I⌉ kept units.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from require import registered_ep
from solm_compile.bench import tensor_bytes as tb


def _graph(path):
    """Embedding [V, D] gathered by ids, a [D, D] matmul, a SparseMLPBlocks with blocks of known size, one layer's KV
    buffers (fp16, 2 KV heads, d 4) and page min/max (fp32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    V, D, I = 10, 8, 6
    inits = {"emb": np.zeros((V, D), np.float32), "w": np.zeros((D, D), np.float32),
             "gc": np.zeros((I, 1, 16), np.uint8), "gs": np.zeros((I, 1), np.float32), "go": np.zeros((I, 1), np.float32),
             "uc": np.zeros((I, 1, 16), np.uint8), "us": np.zeros((I, 1), np.float32), "uo": np.zeros((I, 1), np.float32),
             "dc": np.zeros((I, 1, 32), np.uint8), "ds": np.zeros((I, 1), np.float32), "do": np.zeros((I, 1), np.float32),
             "bias": np.zeros((D,), np.float32)}
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("SparseMLPBlocks", ["y", "gc", "gs", "go", "", "uc", "us", "uo", "", "dc", "ds", "do",
                                                  "bias", "rho", "bits"], ["z"], domain="ai.solm")]
    fp16 = lambda n, s: helper.make_tensor_value_info(n, TensorProto.FLOAT16, s)  # noqa: E731
    ins = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", 1]),
           fp16("past_key_0", ["B", 2, "C", 4]), fp16("past_value_0", ["B", 2, "C", 4]),
           helper.make_tensor_value_info("past_page_min_0", TensorProto.FLOAT, ["B", 2, "P", 4])]
    g = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.solm", 1)])
    m.metadata_props.add(key="solm.gate", value='{"page_size": 8}')
    onnx.save(m, str(path))
    return inits


def test_onnx_initializers_and_kv_inputs_by_hand(tmp_path):
    inits = _graph(tmp_path / "g.onnx")
    got = tb.onnx_bytes(tmp_path / "g.onnx")
    size = {n: a.nbytes for n, a in inits.items()}
    assert got.per_id == 8 * 4                                       # one row of the [10, 8] fp32 table
    assert got.full == size["w"] + size["bias"]
    assert got.gate_up == sum(size[n] for n in ("gc", "gs", "go", "uc", "us", "uo"))
    assert got.down == sum(size[n] for n in ("dc", "ds", "do"))
    assert got.kv_row == 2 * 4 * 2                                   # a K and a V row of d 4 in fp16
    assert got.kv_position == 2 * 2 * 4 * 2                          # ... of both KV heads
    assert got.meta_page == 2 * 2 * 4 * 4                            # min and max, 2 heads, d 4, fp32
    assert got.page_size == 8
    assert tb.per_token(got, 100) == got.weights + 100 * got.kv_position


def test_gguf_tensors_are_the_model_it_was_written_from(tmp_path):
    from test_loading import HEADS, KV_HEADS, LAYERS, tiny_hf_llama, write_tiny_gguf

    hf = tiny_hf_llama()
    got = tb.gguf_bytes(write_tiny_gguf(tmp_path / "t.gguf", hf))
    params = {k: v.numel() * 4 for k, v in hf.named_parameters()}   # written in F32
    emb = params.pop("model.embed_tokens.weight")
    assert got.full == sum(params.values())                          # untied: the LM head is its own tensor
    assert got.per_id == emb // hf.config.vocab_size
    d = hf.config.hidden_size // HEADS
    assert got.kv_position == 2 * LAYERS * KV_HEADS * d * 2 and got.kv_row == 2 * d * 2   # llama.cpp's f16 cache


def test_columns_by_hand():
    t = tb.TensorBytes(full=60e6, per_id=0, gate_up=0, down=0, kv_position=20_000, kv_row=0, meta_page=0)
    row = lambda name, kind, ms: {"engine": name, "kind": kind, "context": 1000, "steps": 3, "reps": 3,  # noqa: E731
                                  "tok_s": 1e3 / ms[1], "step_ms_reps": ms}
    block = [row("solm dense-budget", "solm", [10.0, 10.0, 12.0]), row("solm keep 0.5", "solm", [5.0, 8.0, 6.0]),
             row("llama.cpp", "llama.cpp", [9.0, 9.0, 9.0])]
    half = tb.TensorBytes(full=30e6, per_id=0, gate_up=0, down=0, kv_position=10_000, kv_row=0, meta_page=0)
    tb.add_columns(block, {"solm dense-budget": t, "solm keep 0.5": half, "llama.cpp": t}, {}, stream=10.0)
    dense, keep, peer = block
    assert dense["mb_token"] == pytest.approx(60 + 1002 * 0.02)      # L = 1000 + (3 + 1) / 2 over the steps
    assert dense["gb_s"] == pytest.approx(dense["mb_token"] / 1e3 * 100) and dense["bw_share"] == dense["gb_s"] / 10
    assert keep["ideal"] == pytest.approx(2.0)
    assert keep["speedup"] == pytest.approx(2.0)                     # per-round ratios 2, 1.25, 2: median 2
    assert keep["realised"] == pytest.approx(1.0)
    assert "ideal" not in peer


def test_solm_ep_counters_give_the_bytes_its_kernels_read(tmp_path):
    """A tiny fixed artifact with ρ on h on SolmEP: at the dense budget the counters' bytes equal the dense count
    from the KV length alone; at ρ 0.5 (κ 1) the down projection reads ⌈0.5·I⌉ of I units' rows; at κ 0.5 the K/V
    rows read fall below dense."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from solm_compile.artifact.write import write_artifact
    from solm_compile.bench import engines as E
    from solm_compile.config import GateConfig
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.runtime import ep

    registered_ep()
    torch.manual_seed(0)
    I = 128
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=I, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    lm = GatedLM.from_loaded(models._from_hf(hf, None, name="tiny", source="<test>"), GateConfig(mlp_skip="h"))
    path = write_artifact(lm, tmp_path / "fixed.onnx", "fixed")
    t = tb.onnx_bytes(path)
    assert t.down > 0 and t.gate_up > 0 and t.meta_page > 0
    ids = [int(x) for x in np.random.default_rng(0).integers(0, 160, 80)]
    prompt, steps = 60, 12
    L = prompt + (steps + 1) / 2                                     # step t attends over prompt + t + 1 keys

    def run(kappa, rho):
        e = E.make_engine(E.EngineSpec("solm", "x", str(path), "fp32", (kappa, rho, 16.0)), 1, 128)
        e.prefill(ids[:prompt])
        before = ep.work_counters()
        for tok in ids[prompt:prompt + steps]:
            e.step(tok)
        after = ep.work_counters()
        return {k: after[k] - before[k] for k in after}

    dense = run(1.0, 1.0)
    assert tb.per_token(t, L, dense, steps) == pytest.approx(tb.per_token(t, L))
    mlp = run(1.0, 0.5)
    want = t.full + t.per_id + t.gate_up + t.down * math.ceil(0.5 * I) / I + L * t.kv_position
    assert tb.per_token(t, L, mlp, steps) == pytest.approx(want)
    attn = run(0.5, 1.0)
    kv = tb.per_token(t, L, attn, steps) - t.weights                 # K/V rows read plus every page's min/max
    assert attn["attn_kv_rows_read"] < dense["attn_kv_rows_read"]
    assert kv >= math.ceil(L / 8) * t.meta_page


def test_half_scales_of_the_int8_kernels_count_half(tmp_path):
    """SolmEP's int8 kernels hold a matrix's scale and offset as half when both are exactly halves (kernels.h
    BlockMatrix::half): those count 2 bytes a value; downᵀ under skip="h", fp32 activations and a pair with one
    value that is not a half count 4."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    I = 6
    halfs = lambda v: np.full((I, 1), v, np.float32)                # noqa: E731  (0.5, 0.25: exactly halves)
    inits = {"gc": np.zeros((I, 1, 16), np.uint8), "gs": halfs(0.5), "go": halfs(-0.25),
             "uc": np.zeros((I, 1, 16), np.uint8), "us": halfs(0.5), "uo": np.full((I, 1), 0.1, np.float32),
             "dc": np.zeros((I, 1, 32), np.uint8), "ds": halfs(0.5), "do": halfs(0.5),
             "lc": np.zeros((I, 1, 16), np.uint8), "ls": halfs(0.5), "lo": halfs(0.5),
             "fc": np.zeros((I, 1, 16), np.uint8), "fs": halfs(0.5), "fo": halfs(0.5),
             "ec": np.zeros((I, 1, 16), np.uint8), "es": halfs(0.5), "eo": halfs(0.75)}
    mlp = helper.make_node("SparseMLPBlocks", ["x", "gc", "gs", "go", "", "uc", "us", "uo", "", "dc", "ds", "do", "",
                                               "rho", "bits", "ec", "es", "eo"], ["z"], domain="ai.solm",
                           activations="int8", skip="h")
    lin8 = helper.make_node("LinearBlocks", ["x", "lc", "ls", "lo"], ["y"], domain="ai.solm", activations="int8")
    lin32 = helper.make_node("LinearBlocks", ["x", "fc", "fs", "fo"], ["w"], domain="ai.solm")
    g = helper.make_graph([mlp, lin8, lin32], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "zyw"],
                          [numpy_helper.from_array(a, n) for n, a in inits.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("ai.solm", 1)]),
              str(tmp_path / "h.onnx"))
    got = tb.onnx_bytes(tmp_path / "h.onnx")
    n = I * 4                                                        # one [I, 1] fp32 tensor
    assert got.gate_up == 2 * I * 16 + n // 2 * 2 + 2 * n            # gate's pair half; up's 0.1 keeps both fp32
    assert got.down == I * 32 + 2 * n                                # downᵀ (skip="h"): fp32
    assert got.down_dense == I * 16 + n // 2 * 2                     # the source-layout copy: a BlockMatrix, half
    assert got.weights == got.full + got.gate_up + got.down_dense    # the dense budget reads that copy, not downᵀ
    dense = {"mlp_in_rows": 1, "mlp_in_rows_dense": 1, "mlp_down_rows": 0, "mlp_down_rows_dense": I,
             "mlp_down_dense_rows": I, "attn_kv_rows_read": 0, "attn_keys_scored": 0, "attn_keys_dense": 0}
    assert tb.per_token(got, 0, dense) == got.weights
    half = dict(dense, mlp_down_rows=I // 2, mlp_down_dense_rows=0)  # ρ 0.5: half of downᵀ's rows, no copy
    assert tb.per_token(got, 0, half) == got.full + got.gate_up + got.down / 2
    assert got.full == 2 * I * 16 + n // 2 * 2 + 2 * n               # int8 LinearBlocks half; fp32 activations not
