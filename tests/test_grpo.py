"""GRPO maths on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from solm_compile.train import grpo
from solm_compile.policy.actions import ActionGrid, GRID27
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from solm_compile.policy.step import PolicyStep


def test_discounted_returns():
    r = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 1.0]])
    G = grpo.discounted_returns(r, gamma=0.5)
    torch.testing.assert_close(G, torch.tensor([[1.5, 1.0, 2.0], [1.75, 1.5, 1.0]]))
    G = grpo.discounted_returns(torch.tensor([1.0, 1.0]))            # default γ = 0.85
    torch.testing.assert_close(G, torch.tensor([1.85, 1.0]))


def test_dead_zone_penalty():
    usage = torch.tensor([[0.5, 0.5, 0.5], [0.51, 1.0, 0.3]])
    target = torch.tensor([[0.5, 0.6, 0.3], [0.5, 1.0, 0.3]])
    alpha = torch.tensor([100.0, 100.0, 200.0])
    pen = grpo.budget_penalty(usage, target, alpha, delta=0.02)
    # row 0: tok inside the dead zone; pru 100·(0.1−0.02)² = 0.64; q 200·(0.2−0.02)² = 6.48. row 1: all inside.
    torch.testing.assert_close(pen, torch.tensor([0.64 + 6.48, 0.0]))


def test_penalty_alpha_zero_on_single_level_axis():
    torch.testing.assert_close(grpo.penalty_alpha(GRID27), torch.tensor([100.0, 100.0, 200.0]))
    grid = ActionGrid((0.1, 1.0), (1.0,), (16,))
    torch.testing.assert_close(grpo.penalty_alpha(grid), torch.tensor([100.0, 0.0, 0.0]))


def test_group_advantages_centre_then_whiten():
    R = torch.tensor([[[1.0], [3.0]]])                                 # B=1, K=2, T=1
    torch.testing.assert_close(grpo.group_advantages(R), torch.tensor([[[-1.0], [1.0]]]) / math.sqrt(2))
    # B=2, K=2, T=2: centred per (sequence, step) -> ±1, ±2, ±0, ±3 ; then /std over all 8 (mean 0)
    R = torch.tensor([[[0.0, 5.0], [2.0, 1.0]],
                      [[7.0, 1.0], [7.0, 7.0]]])
    centred = torch.tensor([[[-1.0, 2.0], [1.0, -2.0]],
                            [[0.0, -3.0], [0.0, 3.0]]])
    std = math.sqrt((1 + 4 + 1 + 4 + 0 + 9 + 0 + 9) / 7)
    torch.testing.assert_close(grpo.group_advantages(R), centred / std)


def test_group_advantages_mask():
    R = torch.tensor([[[1.0, 10.0], [3.0, 20.0], [5.0, 30.0]]])       # B=1, K=3, T=2
    mask = torch.tensor([[[True, False], [True, False], [True, False]]])
    A = grpo.group_advantages(R, mask)
    torch.testing.assert_close(A[..., 1], torch.zeros(1, 3))
    torch.testing.assert_close(A[..., 0], torch.tensor([[-1.0, 0.0, 1.0]]))   # centred ±2, std 2


def test_clipped_loss():
    logp_old = torch.zeros(2)
    logp_new = torch.log(torch.tensor([1.5, 1.5]))                    # ratio 1.5
    ent = torch.tensor([1.0, 3.0])
    loss, st = grpo.clipped_loss(logp_new, logp_old, torch.tensor([1.0, -1.0]), ent, clip=0.2, entropy_coef=0.05)
    # +A: min(1.5, 1.2) = 1.2; −A: min(−1.5, −1.2) = −1.5  ->  −mean(1.2, −1.5) − 0.05·2
    torch.testing.assert_close(loss, torch.tensor(-(1.2 - 1.5) / 2 - 0.1))
    assert st["clip_frac"] == 1.0 and st["entropy"] == 2.0
    loss, _ = grpo.clipped_loss(logp_new, logp_old, torch.tensor([1.0, -1.0]), ent,
                                mask=torch.tensor([True, False]), clip=0.2, entropy_coef=0.0)
    torch.testing.assert_close(loss, torch.tensor(-1.2))
    # on-policy (ratio 1) the gradient is REINFORCE: d/dlogp = −A / n
    lp = torch.zeros(2, requires_grad=True)
    grpo.clipped_loss(lp, torch.zeros(2), torch.tensor([2.0, -1.0]), torch.zeros(2), entropy_coef=0.0)[0].backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-1.0, 0.5]))


def test_entropy():
    torch.testing.assert_close(grpo.entropy(torch.zeros(4)), torch.tensor(math.log(4)))


def test_budget_sampler_uses_grid_ranges():
    grid = ActionGrid((0.25, 1.0), (1.0,), (5, 8, 16))
    C = grpo.sample_budgets(2000, grid, torch.Generator().manual_seed(0))
    assert C.shape == (2000, 3)
    assert C[:, 0].min() >= 0.25 and C[:, 0].max() <= 1.0 and C[:, 0].min() < 0.27 and C[:, 0].max() > 0.98
    assert torch.all(C[:, 1] == 1.0)                                  # single level -> fixed target
    assert C[:, 2].min() >= 5 / 16 and C[:, 2].max() <= 1.0
    again = grpo.sample_budgets(2000, grid, torch.Generator().manual_seed(0))
    assert torch.equal(C, again)


def test_rewards():
    logits = torch.tensor([[0.0, math.log(3.0)]])                     # p = (1/4, 3/4)
    torch.testing.assert_close(grpo.ll_reward(logits, torch.tensor([1])), torch.tensor([math.log(0.75)]))
    assert grpo.kl_reward(logits, logits).abs().item() < 1e-7
    dense = torch.tensor([[0.0, 0.0]])                                # p_dense = (1/2, 1/2)
    kl = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    torch.testing.assert_close(grpo.kl_reward(logits, dense), torch.tensor([-kl]))


def test_realised_usage_and_scalars():
    u = grpo.realised_usage(torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(u, torch.tensor([[0.5, 1.0, 0.25], [1.0, 1.0, 1.0]]))
    C = torch.tensor([[0.5, 0.6, 0.7]])
    grid = GRID27
    step = PolicyStep(RecurrentActorCriticPolicy(4, grid.num_actions, PolicyConfig(d_model=8, n_heads=2)), grid, 16)
    st = step.start(1, torch.zeros(1, 4))
    s0 = step.scalars(st, torch.tensor([True]), C)
    torch.testing.assert_close(s0, torch.tensor([[1 / 16, 1.0, 0.5, 0.6, 0.7, 0.0, 0.0, 0.0]]))
    st3 = st._replace(usage=torch.tensor([[1.5, 1.5, 1.5]]), count=torch.tensor([3.0]), step=torch.tensor([3]))
    s3 = step.scalars(st3, torch.tensor([False]), C)
    torch.testing.assert_close(s3, torch.tensor([[4 / 16, 0.0, 0.5, 0.6, 0.7, 0.0, -0.1, -0.2]]))


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_returns_edge_gammas(gamma):
    r = torch.tensor([1.0, 2.0, 3.0])
    want = r if gamma == 0.0 else torch.tensor([6.0, 5.0, 3.0])
    torch.testing.assert_close(grpo.discounted_returns(r, gamma), want)
