"""One policy step, every consumer: 3+ episodes, from tokens, against the independent reference (reference_sol.py).

Each consumer runs its own wiring (features, episode bookkeeping, LM calls) on the tiny Llama with a random policy
trained for episodes of E steps, teacher-forced over the same tokens at a half budget:

- the artifact's torch step (``ArtifactStep``), the portable artifact and the SolmEP artifact in ``SolmSession``,
  and ``torch.compile(backend="solm")``: the runtime's semantics ("carry": the policy restarts every E steps from
  the current hidden state, the KV cache goes on);
- evaluation (``PolicyController`` with episodes): SOL's lm-eval semantics ("replay": a dense replay at each
  boundary);
- training rollouts: one episode per rollout (the first episode of the reference).

Before the one ``PolicyStep``, the torch.compile backend never restarted its episode: its actions left the
reference's at step E.
"""

from __future__ import annotations

import pytest
import torch

from reference_sol import reference_actions
from require import need_ep
from tiny_lm import random_policy_file
from solm_compile.frontend.gated import GatedLM
from solm_compile.frontend.models import hf_model_info
from solm_compile.policy import checkpoint

E, P, N_STEPS = 4, 5, 3 * 4 + 2          # episode length, prompt tokens, controlled steps (> 3 episodes)
BUDGET = (0.5, 0.5, 8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import tiny_models

    torch.manual_seed(0)
    model = tiny_models()["llama-gqa"]().eval()
    lm = GatedLM.from_hf(model)
    ident = checkpoint.model_identity(hf_model_info(model, "tiny"))
    path = random_policy_file(tmp_path_factory.mktemp("policy") / "tiny.pt", ident, train_config={"T": E},
                              max_steps=16)
    loaded = checkpoint.load_policy(path, lm.info)
    grid = loaded.grid
    tokens = torch.randint(1, 160, (P + N_STEPS + 1,), generator=torch.Generator().manual_seed(7)).tolist()
    carry, logits = reference_actions(lm, loaded.policy, grid, E, tokens[:P + N_STEPS], P, BUDGET)
    replay, _ = reference_actions(lm, loaded.policy, grid, E, tokens[:P + N_STEPS], P, BUDGET, boundary="replay")
    dense = grid.dense_idx
    assert carry[:2] == [dense, dense] and len(set(carry[2:])) > 2      # warm-up dense, then the policy varies
    no_restart, _ = reference_actions(lm, loaded.policy, grid, 16, tokens[:P + N_STEPS], P, BUDGET)
    assert no_restart[:E] == carry[:E] and no_restart != carry         # so a missing episode restart shows
    return {"model": model, "lm": lm, "loaded": loaded, "path": path, "tokens": tokens, "carry": carry,
            "replay": replay, "logits": logits, "tmp": tmp_path_factory.mktemp("artifacts")}


def test_artifact_torch_step(setup):
    from solm_compile.artifact.step import ArtifactStep, initial_policy_state
    from solm_compile.policy.step import PolicyStep

    lm, tokens = setup["lm"], setup["tokens"]
    step = ArtifactStep(lm.model.gm, PolicyStep.from_loaded(setup["loaded"]), lm._embedding, lm.gate.min_len)
    budget = torch.tensor([[BUDGET[0], BUDGET[1], BUDGET[2] / 16]])
    with torch.no_grad():
        _, hid, cache = lm.prefill(torch.tensor([tokens[:P]]))
        state, past, actions = initial_policy_state(step.step, 1, hid[:, -1]), cache.tensors, []
        for t in range(N_STEPS):
            out = step(torch.tensor([[tokens[P + t]]]), torch.tensor([[P + t]]), past, *state, budget)
            n = len(past)
            past, state = list(out[1:1 + n]), tuple(out[1 + n:1 + n + 7])
            actions.append(int(out[1 + n + 7]))
            torch.testing.assert_close(out[0][0, -1], setup["logits"][t], atol=1e-4, rtol=1e-4)
    assert actions == setup["carry"]


@pytest.mark.parametrize("kind", ["portable", "solm"])
def test_artifact_in_onnxruntime(setup, kind):
    from solm_compile.artifact.write import write_artifact
    from solm_compile.runtime import ep
    from solm_compile.runtime.session import SolmSession

    if kind == "solm":
        need_ep(ep.library_path() is not None)
    path = write_artifact(setup["lm"], setup["tmp"] / f"tiny.{kind}.onnx", kind, setup["loaded"])
    sess = SolmSession(path, tokenizer=False, threads=1)
    tokens = setup["tokens"]
    steps = list(sess.steps([tokens[:P]], BUDGET, forced=[tokens[P:P + N_STEPS]]))[1:]
    assert [int(s["action"][0]) for s in steps] == setup["carry"]
    got = torch.tensor([s["logits"][0] for s in steps])
    torch.testing.assert_close(got, setup["logits"], atol=2e-3, rtol=1e-3)


def test_torch_compile(setup):
    from solm_compile.backend import dynamo

    torch._dynamo.reset()
    model, tokens = setup["model"], setup["tokens"]
    model.compile(backend="solm", options={"policy": str(setup["path"]), "attn_keep": BUDGET[0],
                                           "mlp_keep": BUDGET[1], "bits": BUDGET[2]})
    try:
        with torch.no_grad():
            out = model(torch.tensor([tokens[:P]]), use_cache=True)
            for t in range(N_STEPS):
                out = model(torch.tensor([[tokens[P + t]]]), past_key_values=out.past_key_values, use_cache=True)
        actions = [int(a[0]) for a in dynamo.controller(model).actions]
    finally:
        torch._dynamo.reset()
    assert actions == setup["carry"]


def test_evaluation_episodes(setup):
    from solm_compile.eval.evaluate import run_traces
    from solm_compile.eval.sources import ChoiceSource, PolicyController

    lm, loaded, tokens = setup["lm"], setup["loaded"], setup["tokens"]
    item = {"ctx": tokens[:P + 1], "conts": [tokens[P + 1:P + 1 + N_STEPS]], "label": 0, "chars": [N_STEPS]}
    targets = (BUDGET[0], BUDGET[1], BUDGET[2] / 16)
    make = PolicyController(lm, loaded.policy, loaded.grid, targets, episode=E).begin
    trace = run_traces(lm, ChoiceSource(lm, [item]), {"policy": make}, episode=E)["policy"]
    assert trace.actions[0].tolist()[2:] == setup["replay"][2:]        # (−1 marks the uncounted warm-up steps)


def test_training_rollout_first_episode(setup):
    from solm_compile.train.rollout import rollout

    lm, loaded, tokens = setup["lm"], setup["loaded"], setup["tokens"]
    blocks = torch.tensor([tokens[:P + E + 1]])
    targets = torch.tensor([[BUDGET[0], BUDGET[1], BUDGET[2] / 16]])
    ep = rollout(lm, loaded.policy, blocks, targets, loaded.grid, T=E, K=2, greedy=True)
    applied = torch.where(ep.eff, ep.actions, torch.full_like(ep.actions, loaded.grid.dense_idx))
    assert applied.tolist() == [setup["carry"][:E]] * 2


ROW_BUDGETS = [(0.5, 0.5, 8), (0.25, 0.75, 16), (0.9, 0.6, 5)]


@pytest.fixture(scope="module")
def rows(setup):
    """Three rows: different prompts and budgets; each row's reference is its own B = 1 run."""
    g = torch.Generator().manual_seed(11)
    toks = [torch.randint(1, 160, (P + N_STEPS,), generator=g).tolist() for _ in ROW_BUDGETS]
    refs = [reference_actions(setup["lm"], setup["loaded"].policy, setup["loaded"].grid, E, t, P, b)[0]
            for t, b in zip(toks, ROW_BUDGETS)]
    assert len({tuple(r) for r in refs}) == len(refs)                  # the rows really differ
    return toks, refs


def test_batch_equals_rows_in_the_artifact_step(setup, rows):
    from solm_compile.artifact.step import ArtifactStep, initial_policy_state
    from solm_compile.policy.step import PolicyStep

    lm, (toks, refs) = setup["lm"], rows
    step = ArtifactStep(lm.model.gm, PolicyStep.from_loaded(setup["loaded"]), lm._embedding, lm.gate.min_len)
    budget = torch.tensor([[k, r, b / 16] for k, r, b in ROW_BUDGETS])
    X = torch.tensor(toks)
    with torch.no_grad():
        _, hid, cache = lm.prefill(X[:, :P])
        state, past, actions = initial_policy_state(step.step, len(toks), hid[:, -1]), cache.tensors, []
        for t in range(N_STEPS):
            out = step(X[:, P + t:P + t + 1], torch.full((len(toks), 1), P + t), past, *state, budget)
            n = len(past)
            past, state = list(out[1:1 + n]), tuple(out[1 + n:1 + n + 7])
            actions.append(out[1 + n + 7].tolist())
    assert [list(a) for a in zip(*actions)] == refs


@pytest.mark.parametrize("kind", ["portable", "solm"])
def test_batch_equals_rows_in_onnxruntime(setup, rows, kind):
    from solm_compile.runtime import ep
    from solm_compile.runtime.session import SolmSession

    if kind == "solm":
        need_ep(ep.library_path() is not None)
    path = setup["tmp"] / f"tiny.{kind}.onnx"
    if not path.exists():
        from solm_compile.artifact.write import write_artifact

        write_artifact(setup["lm"], path, kind, setup["loaded"])
    toks, refs = rows
    sess = SolmSession(path, tokenizer=False, threads=1)
    steps = list(sess.steps([t[:P] for t in toks], ROW_BUDGETS, forced=[t[P:] for t in toks]))[1:]
    assert [[int(s["action"][i]) for s in steps] for i in range(len(toks))] == refs


def test_batch_equals_rows_in_torch_compile(setup, rows):
    """torch.compile with one budget per row (lists in the options): each row's actions are its B = 1 reference."""
    from solm_compile.backend import dynamo

    torch._dynamo.reset()
    model, (toks, refs) = setup["model"], rows
    per_row = {"attn_keep": [b[0] for b in ROW_BUDGETS], "mlp_keep": [b[1] for b in ROW_BUDGETS],
               "bits": [b[2] for b in ROW_BUDGETS]}
    # the FX graph, not inductor: per-row budgets are the controller's (inductor's numerics: test_dynamo)
    model.compile(backend="solm", options={"policy": str(setup["path"]), "inductor": False, **per_row})
    X = torch.tensor(toks)
    try:
        with torch.no_grad():
            out = model(X[:, :P], use_cache=True)
            for t in range(N_STEPS):
                out = model(X[:, P + t:P + t + 1], past_key_values=out.past_key_values, use_cache=True)
        actions = dynamo.controller(model).actions
        with pytest.raises(Exception, match="3 per-row budgets for a batch of 2 rows"):
            with torch.no_grad():
                out = model(X[:2, :P], use_cache=True)
                model(X[:2, P:P + 1], past_key_values=out.past_key_values, use_cache=True)
    finally:
        model._compiled_call_impl = None
        torch._dynamo.reset()
    assert [[int(a[i]) for a in actions] for i in range(len(toks))] == refs
