"""Loading a user's .gguf: refusals in one line, and a valid tiny GGUF that is the HF model it was written from.

The tiny GGUF is written here with the ``gguf`` package the way llama.cpp's converter lays a Llama out (tensor
names, q/k rows permuted for its rotary layout, a byte-level BPE vocabulary), so "loads correctly" is checked
against the transformers model the file was written from, not against anything solm computed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from solm_compile.cli import app as cli
from solm_compile.data import assets
from solm_compile.frontend import models

HEADS, KV_HEADS, LAYERS = 4, 2, 2
MERGES = ["h e", "l l", "he ll"]
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (rows of q/k regrouped per rotary pair)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)] + ["he", "ll", "hell", "<|endoftext|>"]


def tiny_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(_vocab()), hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval()


def write_tiny_gguf(path: Path, model, quant: dict | None = None) -> Path:
    """``quant``: GGUF tensor-name suffix (e.g. "attn_q.weight") -> a GGMLQuantizationType to store it in."""
    import gguf

    tokens = _vocab()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(64)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(32 // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(MERGES)
    w.add_token_types([1] * (len(tokens) - 1) + [3])            # the last one is a control token
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(LAYERS):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight" for hf, g in HF_TO_GGUF.items()})
    for hf, g in names.items():
        t = sd[hf]
        if g.endswith("attn_q.weight"):
            t = _llama_cpp_permute(t, HEADS)
        elif g.endswith("attn_k.weight"):
            t = _llama_cpp_permute(t, KV_HEADS)
        qtype = next((q for suffix, q in (quant or {}).items() if g.endswith(suffix)), None)
        if qtype is None:
            w.add_tensor(g, np.ascontiguousarray(t, dtype=np.float32))
        else:
            raw = gguf.quants.quantize(np.ascontiguousarray(t, dtype=np.float32), qtype)
            w.add_tensor(g, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    model = tiny_hf_llama()
    return model, write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", model)


def one_line_error(capsys, argv, *needles):
    code = cli.main(argv)
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


IDS = torch.tensor([[5, 80, 258, 3, 100, 7, 256, 44]])


def _logits(hf) -> torch.Tensor:
    with torch.no_grad():
        return hf(IDS).logits


# ---------------------------------------------------------------------------------------------- refusals
def test_junk_named_gguf_is_bad_magic(capsys, tmp_path):
    junk = tmp_path / "x.gguf"
    junk.write_bytes(b"\x00not a gguf at all" * 50)
    one_line_error(capsys, ["inspect", str(junk)], "x.gguf", "not a GGUF", "bad magic")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    one_line_error(capsys, ["verify", str(empty)], "empty.gguf", "bad magic")


@pytest.mark.parametrize("cut", ["header", "metadata", "tensors"])
def test_truncated_gguf_is_one_line(capsys, tmp_path, tiny_gguf, cut):
    """Cut inside the fixed header, inside the key/value metadata, and inside the tensor data: each fails in a
    different place of the GGUF reader (struct.error, ...), and each must still be one line naming the file."""
    data = tiny_gguf[1].read_bytes()
    n = {"header": 20, "metadata": 200, "tensors": len(data) - 100}[cut]
    bad = tmp_path / f"cut-{cut}.gguf"
    bad.write_bytes(data[:n])
    one_line_error(capsys, ["inspect", str(bad)], f"cut-{cut}.gguf", "GGUF")


def test_corrupt_version_gguf_is_one_line(capsys, tmp_path, tiny_gguf):
    data = bytearray(tiny_gguf[1].read_bytes())
    data[4:8] = (999).to_bytes(4, "little")                     # a version no reader knows
    bad = tmp_path / "v999.gguf"
    bad.write_bytes(bytes(data))
    one_line_error(capsys, ["inspect", str(bad)], "v999.gguf")


# ---------------------------------------------------------------------------------------------- a valid tiny GGUF
def test_tiny_gguf_loads_as_the_model_it_was_written_from(tiny_gguf):
    hf, path = tiny_gguf
    loaded = models.load(str(path))
    assert loaded.info.architecture == "LlamaForCausalLM" and loaded.info.num_layers == LAYERS
    assert loaded.info.vocab_size == len(_vocab()) and loaded.info.hidden_size == 32
    torch.testing.assert_close(_logits(loaded.hf), _logits(hf), atol=1e-5, rtol=0)
    # the byte-level BPE from the file's merges: "hell" is one token (id 258), "o" is the byte 'o'
    assert loaded.tokenizer("hello", add_special_tokens=False)["input_ids"] == [258, ord("o")]


def test_alias_gguf_is_converted_once_then_reloaded_from_fp32(tiny_gguf, tmp_path, monkeypatch):
    """The alias path: the first load dequantises the GGUF and caches an fp32 HF directory beside it; the second
    load must use that directory and never touch the GGUF reader again (which here fails if called)."""
    hf, src = tiny_gguf
    gguf = tmp_path / "models" / "tiny" / "tiny.gguf"
    gguf.parent.mkdir(parents=True)
    shutil.copyfile(src, gguf)
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: gguf)
    calls = []
    real = models._load_gguf
    monkeypatch.setattr(models, "_load_gguf", lambda p: calls.append(p) or real(p))

    first = models.load("smollm2")
    assert calls == [gguf]
    cache = gguf.parent / "hf-fp32"
    assert (cache / "config.json").is_file() and list(cache.glob("*.safetensors"))
    assert sorted(p.name for p in gguf.parent.iterdir()) == ["hf-fp32", "tiny.gguf"]   # no scratch left behind

    monkeypatch.setattr(models, "_load_gguf", lambda p: pytest.fail(f"converted {p} a second time"))
    second = models.load("smollm2")
    assert second.info == first.info                              # same weights hash, same shapes
    assert next(second.hf.parameters()).dtype == torch.float32
    torch.testing.assert_close(_logits(second.hf), _logits(hf), atol=1e-5, rtol=0)
    assert second.tokenizer("hello", add_special_tokens=False)["input_ids"] == [258, ord("o")]


# ---------------------------------------------------------------------------------------------- the export, on use
def test_the_decode_step_is_exported_once_on_first_use(tiny_gguf, monkeypatch, capsys):
    """load() gives the transformers model without exporting (torch.compile and HF-only users never need the
    ExportedProgram); ``ep`` exports on first use, once. A model whose export fails loads, and its first use is a
    one-line error naming the model (here through `solm verify`)."""
    from solm_compile.frontend import export

    hf, path = tiny_gguf
    calls = []
    real = export.export_decode_step
    monkeypatch.setattr(export, "export_decode_step", lambda m: calls.append(m) or real(m))
    loaded = models.load(str(path))
    assert calls == []
    ep = loaded.ep
    assert calls == [loaded.hf] and loaded.ep is ep
    users = [n for n in ep.graph.nodes if n.op == "placeholder"]
    assert len(users) > 2 * LAYERS                                  # ids, positions and a K, V per layer at least

    def broken(m):
        raise RuntimeError("data-dependent control flow\nsecond line")

    monkeypatch.setattr(export, "export_decode_step", broken)
    assert models.load(str(path)).hf is not None                   # loading alone does not fail
    capsys.readouterr()
    code = cli.main(["verify", str(path)])
    err = capsys.readouterr().err                                 # the GGUF reader's progress bars, then the error
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("solm: error: tiny: torch.export of the decode step failed "
                                            "(RuntimeError: data-dependent control flow)")
