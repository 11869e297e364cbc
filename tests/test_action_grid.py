"""The action space since issue 18: the finer κ × ρ grid without a bits axis, carried through every consumer.

- the default grid's levels, indices and single-level bits axis (numbers written out by hand here);
- a single-level axis in training: penalty weight 0, the target fixed at 1, the policy's C_q / dev_q scalars and
  the realised usage (a rollout on ``FakeGatedLM``);
- checkpoint selection and ``solm eval`` targets are raised to the grid (a no-bits policy is validated at bits 16);
- every matched baseline on a single-level bits axis (the evaluator on the tiny Llama);
- ``solm train``'s grid flags (defaults from ``ActionGrid``, one-line refusals naming the flag, resume refuses a
  different grid);
- a 27-action checkpoint (the shipped smollm2.pt's grid) still loads and runs.
The artifact side (bits range [16, 16], ``--bits 8`` refused) is in test_cli_more's train → compile → generate test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from solm_compile.errors import UserError
from solm_compile.eval import baselines as bl
from solm_compile.eval.evaluate import METHODS, PPLEvaluator
from solm_compile.eval.select import VAL_TARGETS, clamp_targets
from solm_compile.policy import checkpoint
from solm_compile.policy.actions import GRID27, ActionGrid
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from solm_compile.policy.step import PolicyStep
from solm_compile.train import grpo
from solm_compile.train.config import TrainConfig
from solm_compile.train.loop import train
from solm_compile.train.rollout import rollout
from test_cli_more import one_line_error
from tiny_lm import FakeGatedLM, counting_blocks, gated_tiny_llama, random_blocks, random_policy_file

PCFG = PolicyConfig(d_model=32, n_heads=2, max_steps=16)


pytestmark = pytest.mark.usefixtures("one_thread")        # tests/conftest.py


def test_default_grid_levels_and_indices():
    g = ActionGrid()
    assert g.kappa_levels == (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)
    assert g.rho_levels == (0.3, 0.4, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert g.bit_levels == (16,) and g.shape == (6, 7, 1) and g.num_actions == 42
    assert g.single_level_axes() == (False, False, True)
    assert g.dense_idx == 41 and g.levels(41) == (1.0, 1.0, 16)
    assert g.levels(0) == (0.125, 0.3, 16) and g.levels(7 + 3) == (0.25, 0.625, 16)   # κ-major: row 1, ρ index 3
    assert g.usage_range() == ((0.125, 1.0), (0.3, 1.0), (1.0, 1.0))
    assert TrainConfig().grid == g                                  # training's default is the same grid


def test_single_level_axis_in_the_objective():
    g = ActionGrid()
    torch.testing.assert_close(grpo.penalty_alpha(g, (100.0, 300.0, 200.0)), torch.tensor([100.0, 300.0, 0.0]))
    C = grpo.sample_budgets(500, g, torch.Generator().manual_seed(0))              # [500, 3]
    assert torch.all(C[:, 2] == 1.0)                                              # b̄ fixed at 16/16
    assert float(C[:, 0].min()) >= 0.125 and float(C[:, 1].min()) >= 0.3 and float(C[:, 1].max()) <= 1.0
    # a q usage away from its target costs nothing on a single-level axis (the weight is 0)
    pen = grpo.budget_penalty(torch.tensor([[0.5, 0.5, 0.2]]), torch.tensor([[0.5, 0.5, 1.0]]),
                              grpo.penalty_alpha(g))
    torch.testing.assert_close(pen, torch.tensor([0.0]))


def test_rollout_without_a_bits_axis_keeps_bits_at_16():
    g, lm = ActionGrid(), FakeGatedLM()
    torch.manual_seed(0)
    policy = RecurrentActorCriticPolicy(16, g.num_actions, PCFG)
    blocks = counting_blocks(2, 12 + 8 + 1)
    ep = rollout(lm, policy, blocks, torch.tensor([[0.3, 0.5, 1.0], [0.6, 0.8, 1.0]]), g, T=8, K=3,
                 generator=torch.Generator().manual_seed(1))
    assert torch.all(ep.scalars[..., 4] == 1.0)                    # C_q
    assert torch.all(ep.scalars[..., 7] == 0.0)                    # dev_q: every step used bits 16/16 = C_q
    assert torch.all(ep.usage[:, 2] == 1.0)
    assert int(ep.eff.sum()) > 0 and not torch.all(ep.actions == g.dense_idx)    # it did act
    kappa, rho, bits = g.decode(ep.actions)
    assert torch.all(bits == 16.0)
    step = PolicyStep(policy, g, 8)                                  # the state machine's usage scale: b/16
    torch.testing.assert_close(step.table[:, 2], torch.full((42,), 16.0))


def test_validation_and_eval_targets_are_raised_to_the_grid():
    assert clamp_targets(ActionGrid(), VAL_TARGETS) == [(0.3, 0.6, 1.0), (0.5, 0.75, 1.0), (0.7, 0.9, 1.0)]
    assert clamp_targets(GRID27, VAL_TARGETS) == [(0.3, 0.6, 0.5), (0.5, 0.75, 0.5), (0.7, 0.9, 0.5)]
    assert clamp_targets(GRID27, [(0.1, 0.4, 0.25)]) == [(0.25, 0.5, 5 / 16)]


def test_every_baseline_on_a_single_level_bits_axis():
    lm, g = gated_tiny_llama(0), ActionGrid()
    torch.manual_seed(3)
    policy = RecurrentActorCriticPolicy(32, g.num_actions, PCFG)
    for p in policy.parameters():
        p.data.normal_(0, 0.3)                                       # actions that vary
    ctx, T = 24, 6
    ev = PPLEvaluator(lm, policy, g, random_blocks(4, ctx + T + 1, seed=1), ctx=ctx, T=T,
                      fit_blocks=random_blocks(2, ctx + T + 1, seed=2), random_seeds=2, methods=METHODS)
    r = ev.run((0.4, 0.6, 1.0))
    assert r["matched_usage"]["bits"] == 16.0 and r["targets"]["bits"] == 16.0
    for name, m in r["methods"].items():
        assert m["usage"]["bits"] == pytest.approx(16.0), name        # nobody quantises: b = 16 everywhere
    k_pol, r_pol = r["matched_usage"]["attn_keep"], r["matched_usage"]["mlp_keep"]
    assert k_pol < 1.0 and r_pol < 1.0
    for name, tol in (("uniform", 1e-6), ("fixed", 0.02), ("random_median", 0.02), ("schedule", 0.02), ("emc", 0.05),
                      ("dac", 0.05)):
        u = r["methods"][name]["usage"]
        assert u["attn_keep"] == pytest.approx(k_pol, abs=tol) and u["mlp_keep"] == pytest.approx(r_pol, abs=tol), name
    kl_bits = ev.step_costs.kl[2]                                    # the schedule fit has one (dense) bits level
    assert kl_bits.shape == (1, T) and torch.all(kl_bits == 0)
    c = bl.HeuristicController("emc", lm, g, (0.4, 0.6, 1.0))
    assert c.vals[2].tolist() == [1.0]


def test_train_grid_flags(capsys, tmp_path):
    from solm_compile.cli.app import build_parser

    a = build_parser().parse_args(["train", "smollm2", "--out", "p.pt"])
    assert (a.kappa_levels, a.rho_levels, a.bit_levels) == (list(ActionGrid().kappa_levels),
                                                             list(ActionGrid().rho_levels), [16])
    # refused before any model loads (the model does not exist), naming the flag
    base = ["train", "no-such-model", "--out", str(tmp_path / "p.pt")]
    one_line_error(capsys, base + ["--rho-levels", "0.75", "0.5", "1"], "--rho-levels", "strictly increasing")
    one_line_error(capsys, base + ["--bit-levels", "4.5", "16"], "--bit-levels", "whole numbers")
    one_line_error(capsys, base + ["--kappa-levels", "0.25", "0.5"], "--kappa-levels", "dense level 1")
    a = build_parser().parse_args(base + ["--kappa-levels", "0.5", "1", "--rho-levels", "0.4", "1",
                                          "--bit-levels", "8", "16"])
    from solm_compile.cli.train import action_grid
    assert action_grid(a) == ActionGrid((0.5, 1.0), (0.4, 1.0), (8, 16))


def test_resume_refuses_another_grid(tmp_path):
    cfg = TrainConfig(ctx=12, T=8, K=2, B=2, updates=1, buffer_decisions=32, minibatch_decisions=16, seed=3,
                      grid=GRID27, policy=PCFG)
    lm = FakeGatedLM()
    blocks = counting_blocks(8, 21)
    train(lm, blocks, cfg, tmp_path, progress=False)
    with pytest.raises(UserError, match="differs in grid"):
        train(lm, blocks, dataclasses.replace(cfg, updates=2, grid=ActionGrid()), tmp_path, resume=True,
              progress=False)


def test_a_27_action_checkpoint_still_loads_and_runs(tmp_path):
    lm = gated_tiny_llama(0)
    path = random_policy_file(tmp_path / "old.pt", checkpoint.model_identity(lm.info), lm.gate, hidden=32,
                              grid=GRID27)
    lp = checkpoint.load_policy(path, lm.info)
    assert lp.grid == GRID27 and lp.policy.num_actions == 27
    ev = PPLEvaluator(lm, lp.policy, lp.grid, random_blocks(3, 24 + 6 + 1, seed=4), ctx=24, T=6,
                      methods=("dense", "policy", "fixed", "uniform"), random_seeds=0)
    r = ev.run((0.5, 0.75, 0.5))                                   # its bits axis still works: b̄ 8
    b = r["methods"]["policy"]["usage"]["bits"]
    assert 5 <= b < 16 and r["methods"]["fixed"]["usage"]["bits"] == pytest.approx(b, abs=0.3)
    acts = r["methods"]["policy"]["actions"]
    assert set(acts) <= set(GRID27.tags())


def test_validation_score_runs_a_no_bits_policy_at_bits_16():
    from solm_compile.eval.select import validation_score

    lm, g = gated_tiny_llama(0), ActionGrid()
    torch.manual_seed(4)
    policy = RecurrentActorCriticPolicy(32, g.num_actions, PCFG)
    v = validation_score(lm, policy, g, random_blocks(2, 24 + 4 + 1, seed=6), 24, 4)
    assert [t[2] for t in v["targets"]] == [1.0, 1.0, 1.0]                      # VAL_TARGETS' bits 8 raised to 16
    assert all(u["bits"] == 16.0 for u in v["usage"])


def test_eval_cli_bits_default_16_and_refused_below_a_no_bits_grid(capsys, tmp_path):
    import json

    from solm_compile.frontend.models import load
    from test_cli_more import run_cli
    from test_evaluate import _tiny_model_dir

    model_dir = _tiny_model_dir(tmp_path)
    info = load(str(model_dir)).info
    path = random_policy_file(tmp_path / "p.pt", checkpoint.model_identity(info), hidden=32, grid=ActionGrid(),
                              train_config={"T": 4})
    text = tmp_path / "t.txt"
    text.write_text("it is a truth universally acknowledged, that a single man must be in want of a wife.\n" * 8)
    flags = ["eval", model_dir, "--policy", path, "--data", text, "--attn-keep", "0.5", "--mlp-keep", "0.75",
             "--blocks", "2", "--ctx", "24", "--T", "4", "--methods", "uniform"]
    code, out, err = run_cli(capsys, *flags, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["targets"]["bits"] == 16.0 and r["methods"]["uniform"]["usage"]["bits"] == 16.0
    one_line_error(capsys, flags + ["--bits", "8"], "--bits 8 is below the policy's lowest level 16")


def test_step_schedule_without_a_bits_axis_spends_bits_like_uniform():
    g, T = ActionGrid(), 16
    kl = tuple(torch.rand(len(lv), T, generator=torch.Generator().manual_seed(a)) * torch.tensor(
        [1.0] * (len(lv) - 1) + [0.0])[:, None] for a, lv in enumerate([g.kappa_levels, g.rho_levels, g.bit_levels]))
    costs = bl.StepCosts((g.kappa_levels, g.rho_levels, (16.0,)), kl, torch.ones(T, dtype=torch.bool), 4)
    mask = torch.ones(7, T, dtype=torch.bool)
    sch = bl.step_schedule_controls(costs, (0.437, 0.81, 9.4 / 16), mask)      # --policy static --bits 9.4
    assert set(sch[..., 2].unique().tolist()) == {9.0, 10.0}                    # the nearest-integer mixture
    assert float(sch[..., 2].mean()) == pytest.approx(9.4, abs=0.01)
    assert float(sch[..., 0].mean()) == pytest.approx(0.437, abs=0.005)
