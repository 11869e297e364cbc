import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_models():
    """Tiny random-init models from transformers configs, one per supported family (unit tests only)."""
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    common = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4)
    return {
        "llama-gqa": lambda: LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)),
        "llama-eager": lambda: LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2,
                                                            attn_implementation="eager")),
        "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=160, n_embd=64, n_layer=2, n_head=4,
                                                   bos_token_id=0, eos_token_id=0)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2)),
        "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=16,
                                                             sliding_window=16)),
    }


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny ops: threads only add jitter on a 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_llama():
    torch.manual_seed(0)
    return tiny_models()["llama-gqa"]().eval()


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory, tiny_llama):
    """A tiny portable artifact (random policy, word tokenizer, a chat template) for the `solm serve` tests."""
    from serve_helpers import build_artifact

    return build_artifact(tmp_path_factory.mktemp("serve"), tiny_llama)


@pytest.fixture(scope="session")
def served(serve_artifact):
    """`solm serve` in this process on an ephemeral loopback port: {url, app, artifact}."""
    pytest.importorskip("fastapi", reason="solm serve needs the serve extra")
    from serve_helpers import SERVE_CONFIG
    from solm_compile.runtime.session import SolmSession
    from solm_compile.serve import background, create_app

    app = create_app(SolmSession(serve_artifact, threads=1), SERVE_CONFIG)
    with background(app) as url:
        yield {"url": url, "app": app, "artifact": serve_artifact}


@pytest.fixture(scope="session")
def step_artifacts(tmp_path_factory, tiny_llama):
    """One tiny artifact of each kind (solm, fixed, dense, portable) of ``tiny_llama`` with a random policy and the
    word tokenizer, as solm-compile writes them (fp16 KV buffers): the step protocol's tests and the C++ driver's."""
    from test_artifact import word_tokenizer
    from tiny_lm import random_policy_file

    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy import checkpoint

    d = tmp_path_factory.mktemp("step")
    loaded = models._from_hf(tiny_llama, word_tokenizer(), name="tiny", source="<test>")
    lm = GatedLM.from_loaded(loaded)
    lp = checkpoint.load_policy(random_policy_file(d / "policy.pt", checkpoint.model_identity(lm.info), lm.gate,
                                                   seed=3), lm.info)
    return {kind: write_artifact(lm, d / f"tiny.{kind}.onnx", kind, lp, tokenizer=loaded.tokenizer)
            for kind in ("solm", "fixed", "dense", "portable")}
