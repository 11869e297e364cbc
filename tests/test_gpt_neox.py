"""GPT-NeoX (issue 15): ``solm verify`` is exact on a tiny random GPTNeoXForCausalLM, in-process and from a saved
directory through the CLI.

The CLI crash was not the export: a directory holding only config.json and weights still gets a tokenizer from
transformers (GPTNeoXTokenizer, named by the config's model type) with no vocabulary; it encoded the prompt to
[], verify built a float [1, 0] tensor of "ids" and the embedding refused it. Such a tokenizer is now ignored
(``models.usable_tokenizer``) and verify falls back to its seeded random prompt.
"""

import json

import pytest
import torch

from solm_compile.analysis.verify import verify
from solm_compile.cli import app as cli
from solm_compile.frontend import models
from solm_compile.frontend.gated import compile_gated


def tiny_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4)
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("neox") / "tiny-neox"
    tiny_neox().save_pretrained(path)
    return path


def test_verify_is_exact_in_process():
    loaded = models._from_hf(tiny_neox(), None, name="tiny-neox", source="<test>")
    gated = compile_gated(loaded)
    assert len(gated.gated) == 2 * loaded.info.num_layers      # attention and MLP of every layer rewritten
    r = verify(loaded, gated, steps=16)
    assert r["tokens_match"] and r["ok"], r
    assert r["rel_diff"] <= r["tolerance"], r


def test_a_vocabulary_less_tokenizer_is_ignored(neox_dir):
    loaded = models.load(str(neox_dir))
    assert loaded.info.architecture == "GPTNeoXForCausalLM"
    assert loaded.tokenizer is None


def test_cli_verify_on_a_saved_directory(capsys, neox_dir):
    code = cli.main(["verify", str(neox_dir), "--json", "--steps", "8"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in err
    r = json.loads(out)
    assert r["ok"] and r["tokens_match"] and r["rel_diff"] <= r["tolerance"], r
