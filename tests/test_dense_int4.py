"""The dense artifact on ``--weights int4`` (issue 16's stock-onnxruntime row): the fused ops it ships, and its
logits against HF eager run on the weights dequantised, in this file, from the artifact's own packed bytes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from solm_compile.runtime.session import read_metadata


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., n] → [..., 2n]: the low nibble first (MatMulNBits' order)."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _dequantized(path) -> list[np.ndarray]:
    """Every low-bit weight of the artifact as float32 [N, K] (Linear layout) or [V, D] (the embedding), from its
    initializers: w = scale · (code − zero point) per block, unpacked by hand."""
    g = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    out = []
    for node in g.node:
        if node.op_type == "MatMulNBits":
            a = _attrs(node)
            n, k, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
            codes, scale, zp = (init[x] for x in node.input[1:4])
            nb = k // block
            q = (_nibbles(codes) if bits == 4 else codes).reshape(n, nb, block).astype(np.float32)
            z = (_nibbles(zp)[:, :nb] if bits == 4 else zp).reshape(n, nb).astype(np.float32)
            w = ((q - z[..., None]) * scale.reshape(n, nb)[..., None]).reshape(n, k)
            out.extend(np.split(w, _packed_rows(g, node.output[0], init, n)))
        elif node.op_type == "GatherBlockQuantized":
            codes, scale, zp = (init[node.input[i]] for i in (0, 2, 3))
            a = _attrs(node)
            codes = _nibbles(codes) if a["bits"] == 4 else codes                 # [V, D]
            v, dim = codes.shape
            nb = dim // a["block_size"]
            z = (_nibbles(zp)[:, :nb] if a["bits"] == 4 else zp).astype(np.float32)   # [V, nb]
            q = codes.reshape(v, nb, a["block_size"]).astype(np.float32)
            out.append(((q - z[..., None]) * scale[..., None]).reshape(v, dim))
    return out


def _packed_rows(g, value: str, init: dict, n: int) -> list[int]:
    """Where a packed weight's rows split: by the Split reading it (gate/up), by GroupQueryAttention's heads when it
    is the attention's packed query (q, k, v), else nowhere."""
    for m in g.node:
        if m.op_type == "Split" and m.input[0] == value:
            return list(np.cumsum(init[m.input[1]])[:-1])
        if m.op_type == "GroupQueryAttention" and m.input[0] == value and not m.input[1]:
            a = _attrs(m)
            d = n // (a["num_heads"] + 2 * a["kv_num_heads"])
            return [a["num_heads"] * d, (a["num_heads"] + a["kv_num_heads"]) * d]
    return []


def _reference(model, weights: list[np.ndarray]):
    """``model`` with each Linear / Embedding weight replaced by the artifact weight nearest to it."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                w = mod.weight.detach().numpy()
                same = [x for x in weights if x.shape == w.shape]
                best = min(same, key=lambda x: float(np.abs(x - w).max()))
                assert np.abs(best - w).max() < 0.2 * np.abs(w).max()        # it is this weight, rounded
                mod.weight.copy_(torch.from_numpy(best))
    return model


def tiny_hf_llama():
    """test_loading's tiny Llama with head size 16 (onnxruntime's rotary inside GroupQueryAttention needs a
    multiple of 16) and 2 blocks of 32 per row."""
    from test_loading import LAYERS, _vocab
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(_vocab()), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense-int4")
    tiny_hf_llama().save_pretrained(d / "tiny")
    return d


def _decode(path, ids: np.ndarray, prompt: int, chunk: int = 1) -> np.ndarray:
    """Logits [T, V] of a prefill of ``prompt`` ids then one run per ``chunk`` ids, through SolmSession (buffers in
    place)."""
    from solm_compile.runtime.session import SolmSession

    s = SolmSession(path, tokenizer=False)
    feeds = {"input_ids": ids[:, :prompt], "position_ids": np.arange(prompt)[None],
             **s._empty_past(1, ids.shape[1])}
    out = s._run(feeds)
    rows = [out["logits"].numpy()[0]]
    s._carry(out, feeds)
    for t in range(prompt, ids.shape[1], chunk):
        feeds["input_ids"], feeds["position_ids"] = ids[:, t:t + chunk], np.arange(t, t + chunk)[None]
        out = s._run(feeds)
        rows.append(out["logits"].numpy()[0])
        s._carry(out, feeds)
    return np.concatenate(rows)                                             # [T, V]


def test_int4_dense_artifact_ships_the_fused_ops(tiny):
    """GroupQueryAttention on buffers, MatMulNBits with integer zero points at accuracy_level 4 and no Q4_1-style
    offset (ReduceSum + MatMul), RMSNormalization and RotaryEmbedding: no op of the unfused chains is left."""
    from solm_compile.api import SolmConfig, compile

    art = compile(str(tiny / "tiny"), SolmConfig(kind="dense", weights="int4"), tiny / "int4.onnx")
    meta = read_metadata(art)
    assert meta["kv_cache"] == {"layout": "buffer", "dtype": "float32"}
    g = onnx.load(str(art)).graph
    ops = [n.op_type for n in g.node]
    gqa = [_attrs(n) for n in g.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(a["do_rotary"] == 1 and a["rotary_interleaved"] == 0 for a in gqa)
    assert all(n.input[1] == n.input[2] == "" for n in g.node if n.op_type == "GroupQueryAttention")   # packed qkv
    # per layer: packed qkv, o, packed gate/up (+ Split), down; the first norm alone, 2·2 with the residual add
    assert ops.count("MatMulNBits") == 2 * 4 + 1 and ops.count("Split") == 2 and "RotaryEmbedding" not in ops
    assert ops.count("RMSNormalization") == 1 and ops.count("SkipSimplifiedLayerNormalization") == 2 * 2
    assert not {"MatMul", "ReduceSum", "Softmax", "Pow", "Sqrt", "Reciprocal", "Transpose", "Add"} & set(ops[8:])
    nbits = [_attrs(n) for n in g.node if n.op_type == "MatMulNBits"]
    assert all(a["accuracy_level"] == 4 and a["block_size"] == 32 for a in nbits)
    assert sorted(a["bits"] for a in nbits).count(4) == 2 * 4                 # every linear 4-bit, the head 8-bit
    assert sorted(a["N"] for a in nbits if a["bits"] == 4) == [64] * 4 + [128] * 2 + [256] * 2  # q+k+v, gate+up
    assert all(len(n.input) >= 4 and n.input[3] for n in g.node if n.op_type == "MatMulNBits")   # zero points


@pytest.mark.parametrize("activations, tol", [("fp32", 1e-4), ("int8", 0.05)])
def test_int4_dense_artifact_matches_pytorch_on_its_dequantized_weights(tiny, activations, tol):
    """Prefill 6 ids, then 3 steps: HF eager on the artifact's own weights (dequantised above). fp32 activations
    (accuracy_level 0) agree to float rounding; int8 activations per block of 32 (the default, accuracy_level 4)
    to a few percent of the logits' range, the greedy tokens mostly the same."""
    from solm_compile.api import SolmConfig, compile

    art = compile(str(tiny / "tiny"), SolmConfig(kind="dense", weights="int4", activations=activations),
                  tiny / f"int4-{activations}.onnx")
    ref = _reference(tiny_hf_llama().float().eval(), _dequantized(art))
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 9]])
    with torch.no_grad():
        want = ref(ids).logits[0].numpy()                                    # [9, V]
    got = _decode(art, ids.numpy(), 6)                                        # [9, V]
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= tol * scale
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 7 / 9


def test_int4_head_bits_4_stores_the_table_at_4_bits_and_matches_pytorch(tiny):
    """``head_bits=4``: the embedding lookup (GatherBlockQuantized bits 4) and the LM head (MatMulNBits bits 4) on
    the 4-bit table; fp32 activations give HF eager's logits on those weights, dequantised here from the bytes."""
    from solm_compile.api import SolmConfig, compile

    art = compile(str(tiny / "tiny"), SolmConfig(kind="dense", weights="int4", head_bits=4, activations="fp32"),
                  tiny / "int4-head4.onnx")
    g = onnx.load(str(art)).graph
    assert all(_attrs(n)["bits"] == 4 for n in g.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized"))
    assert [n.op_type for n in g.node].count("GatherBlockQuantized") == 1
    assert read_metadata(art)["weights"]["head_bits"] == 4
    weights = _dequantized(art)
    vocab = tiny_hf_llama().config.vocab_size
    assert sum(w.shape[0] == vocab for w in weights) == 2                    # the embedding and the head
    ref = _reference(tiny_hf_llama().float().eval(), weights)
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 9]])
    with torch.no_grad():
        want = ref(ids).logits[0].numpy()                                    # [9, V]
    got = _decode(art, ids.numpy(), 6)                                        # [9, V]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("weights, bits", [("int8", 4), ("int4", 6), ("source", 4)])
def test_head_bits_refuses_what_it_cannot_mean(weights, bits):
    from solm_compile.api import SolmConfig
    from solm_compile.errors import UserError

    with pytest.raises(UserError, match="--head-bits"):
        SolmConfig(weights=weights, head_bits=bits)


@pytest.mark.parametrize("activations, tol", [("fp32", 1e-5), ("int8", 1e-5)])
def test_dense_fusions_give_the_unfused_artifacts_logits(tiny, monkeypatch, activations, tol):
    """Packed q/k/v and gate/up MatMulNBits, RoPE inside GroupQueryAttention (cos/sin caches) and
    SkipSimplifiedLayerNormalization compute what the unfused graph does (the same int8-quantized activations per
    block; cos and sin from a table): prefill 96 ids then 6 steps on the KV buffer, or 3 ids per run."""
    import solm_compile.artifact.dense as dense
    from solm_compile.api import SolmConfig, compile

    cfg = SolmConfig(kind="dense", weights="int4", activations=activations)
    fused = compile(str(tiny / "tiny"), cfg, tiny / f"fused-{activations}.onnx")
    monkeypatch.setattr(dense, "_dense_passes", lambda: ())
    plain = compile(str(tiny / "tiny"), cfg, tiny / f"plain-{activations}.onnx")
    ops = {p: [n.op_type for n in onnx.load(str(p)).graph.node] for p in (fused, plain)}
    assert "SkipSimplifiedLayerNormalization" not in ops[plain] and ops[plain].count("MatMulNBits") == 2 * 7 + 1
    # per layer: q/k/v 3 → 1, 2 RotaryEmbedding and 2 adds; once: the angles' Unsqueeze, Cast, Mul, Cos, Sin
    assert len(ops[fused]) == len(ops[plain]) - 2 * (2 + 2 + 2) - 5
    ids = np.random.default_rng(0).integers(0, tiny_hf_llama().config.vocab_size, (1, 102))
    for chunk in (1, 3):                                                      # steps; a continued prefill
        want, got = _decode(plain, ids, 96, chunk), _decode(fused, ids, 96, chunk)  # [102, V] each
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
