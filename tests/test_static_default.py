"""`solm compile` without --policy writes the static floor (issue 18): no learned policy has beaten a constant
allocation on held-out text (docs/policy.md "Verdict"), so the default artifact on SolmEP runs every layer at the
requested budget: the `fixed` kind, budgets as inputs. These tests check it does exactly that against the torch gated
graph driven with the same constant controls, and that the policy names are one-line errors where they cannot apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from require import registered_ep
from solm_compile import cli
from solm_compile.frontend import models
from solm_compile.frontend.gated import GatedLM
from solm_compile.runtime.session import SolmSession, read_metadata
from test_artifact import one_line_error
from test_evaluate import _tiny_model_dir

PROMPT = "the cat sat on the mat and then the dog ran off the road, so the cat went home."
NEW = 12                 # scored tokens after the prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory.mktemp("static"))


def torch_logprobs(model_dir, ids: list[int], context: int, budget: tuple[float, float, float]) -> torch.Tensor:
    """The gated torch graph (fp32) teacher-forced: dense prefill of ids[:context], then one step per token at the
    constant controls ``budget``; the log-prob of each of ids[context:] [n]."""
    lm = GatedLM.from_loaded(models.load(str(model_dir)))
    logits, _, cache = lm.prefill(torch.tensor([ids[:context]]))             # [1, context, V]
    out = [torch.log_softmax(logits[0, -1], -1)[ids[context]]]
    k, r, b = (torch.tensor([v]) for v in budget)                            # [1] each
    for t in range(context, len(ids) - 1):
        logits, _, cache = lm.step(torch.tensor([[ids[t]]]), cache, k, r, b)     # [1, 1, V]
        out.append(torch.log_softmax(logits[0, -1], -1)[ids[t + 1]])
    return torch.stack(out).double()                                         # [n]


@pytest.mark.parametrize("policy", [[], ["--policy", "static"]])
def test_compile_without_a_policy_is_the_static_floor(tiny, tmp_path, capsys, policy):
    registered_ep()
    out = tmp_path / "m.solm.onnx"
    assert cli.main(["compile", str(tiny), "--out", str(out), "--kv", "fp32", *policy]) == 0
    said, _ = capsys.readouterr()
    assert "(fixed," in said and "static" in said, said
    meta = read_metadata(out)
    assert meta["kind"] == "fixed" and "policy" not in meta, meta
    sess = SolmSession(out, threads=1)
    ids = sess.tokenizer.encode(PROMPT).ids
    context = len(ids) - NEW
    dense = torch_logprobs(tiny, ids, context, (1.0, 1.0, 16.0))
    for budget in ((1.0, 1.0, 16.0), (0.5, 0.5, 16.0), (0.25, 0.25, 16.0)):
        want = torch_logprobs(tiny, ids, context, budget)
        if budget[0] < 1:                        # the budget reaches the logits (else the check below is moot)
            assert (want - dense).abs().max() > 1e-3, budget
        got = torch.from_numpy(sess.score(ids, context, budget))
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0, msg=lambda m: f"{budget}: {m}")


def test_per_row_budgets_equal_the_rows_run_alone(tiny, tmp_path):
    """The default (fixed) artifact takes one budget per batch row, as a policy artifact does: a batch of two rows at
    different budgets gives each row the logits it gets alone at its budget."""
    registered_ep()
    out = tmp_path / "m.solm.onnx"
    assert cli.main(["compile", str(tiny), "--out", str(out), "--kv", "fp32"]) == 0
    sess = SolmSession(out, threads=1)
    ids = sess.tokenizer.encode(PROMPT).ids
    prompt, forced = ids[:-NEW], ids[-NEW:]
    budgets = [(0.25, 0.5, 16.0), (1.0, 1.0, 16.0)]
    both = [s["logits"] for s in sess.steps([prompt, prompt], budgets, forced=[forced, forced])]      # [2, V] each
    for row, b in enumerate(budgets):
        alone = [s["logits"] for s in sess.steps([prompt], b, forced=[forced])]                       # [1, V] each
        for t, (x, y) in enumerate(zip(both, alone)):
            np.testing.assert_allclose(x[row], y[0], atol=1e-5, rtol=0, err_msg=f"row {row} step {t}")
    assert np.abs(both[-1][0] - both[-1][1]).max() > 1e-3        # the two budgets really differ


def test_policy_names_that_cannot_apply_are_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    one_line_error(capsys, ["compile", str(tiny), "--out", str(out), "--policy", "static", "--portable"],
                   "--policy static", "portable", "--policy shipped")
    one_line_error(capsys, ["compile", str(tiny), "--out", str(out), "--policy", "shipped"],
                   "no policy shipped", "solm train")
    one_line_error(capsys, ["compile", str(tiny), "--out", str(out), "--policy", "statik"],
                   "--policy statik", "static, shipped")
    assert not out.exists()
