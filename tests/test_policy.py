"""Action grid indexing and the policy network (step == forward_sequence, size)."""

from __future__ import annotations

import pytest
import torch

from solm_compile.policy.actions import ActionGrid, GRID27
from solm_compile.errors import UserError
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy, num_params


# ---------------------------------------------------------------------------------------------- actions
def test_index_round_trip_and_order():
    grid = ActionGrid((0.25, 0.5, 1.0), (0.5, 0.75, 1.0), (5, 8, 16))
    assert grid.num_actions == 27 == len(grid)
    for idx in range(27):
        assert grid.index(*grid.unravel(idx)) == idx
    assert grid.index(1, 0, 0) == 9 and grid.index(0, 1, 0) == 3 and grid.index(0, 0, 1) == 1   # κ-major, b-minor
    assert grid.dense_idx == 26 and grid.levels(26) == (1.0, 1.0, 16)
    assert grid.tag(0) == "k025-s050-q5" and grid.tag(grid.dense_idx) == "k100-s100-q16"
    assert grid.tag(grid.index(1, 1, 1)) == "k050-s075-q8"
    assert len(set(grid.tags())) == 27


def test_decode_and_usage_match_levels():
    grid = GRID27
    idx = torch.arange(grid.num_actions).view(3, 9)
    kappa, rho, bits = grid.decode(idx)
    assert kappa.shape == rho.shape == bits.shape == (3, 9)
    for i in range(grid.num_actions):
        assert (kappa.flatten()[i].item(), rho.flatten()[i].item(), int(bits.flatten()[i])) == grid.levels(i)
    u = grid.usage(torch.tensor([0, grid.dense_idx]))
    torch.testing.assert_close(u, torch.tensor([[0.25, 0.5, 5 / 16], [1.0, 1.0, 1.0]]))


def test_grid_dict_round_trip_and_single_axes():
    grid = ActionGrid((0.1, 1.0), (1.0,), (5, 16))
    assert ActionGrid.from_dict(grid.to_dict()) == grid
    assert grid.single_level_axes() == (False, True, False)
    assert grid.usage_range() == ((0.1, 1.0), (1.0, 1.0), (5 / 16, 1.0))


@pytest.mark.parametrize("kw, msg", [
    (dict(kappa_levels=(0.5, 0.25, 1.0)), "strictly increasing"),
    (dict(kappa_levels=(0.25, 0.5)), "dense level"),
    (dict(rho_levels=(0.0, 1.0)), "rho_levels"),
    (dict(bit_levels=(1, 16)), "bit_levels"),
    (dict(bit_levels=(4.5, 16)), "whole numbers"),
    (dict(bit_levels=()), "at least one"),
])
def test_grid_validation(kw, msg):
    with pytest.raises(UserError, match=msg):
        ActionGrid(**kw)


# ---------------------------------------------------------------------------------------------- policy
def _inputs(N=3, T=7, D=12, A=27, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, e = torch.randn(N, T, D, generator=g), torch.randn(N, T, D, generator=g)
    s = torch.rand(N, T, 8, generator=g)
    prev = torch.randint(0, A + 1, (N, T), generator=g)
    prev[:, 0] = A                                                      # BOS
    return h, e, s, prev


def test_forward_sequence_equals_steps():
    torch.manual_seed(0)
    policy = RecurrentActorCriticPolicy(12, 27, PolicyConfig(d_model=32, n_heads=4, max_steps=16)).eval()
    h, e, s, prev = _inputs()
    with torch.no_grad():
        seq = torch.log_softmax(policy.forward_sequence(h, e, s, prev, tau=1.3), -1)     # [N, T, A]
        N, T = h.shape[:2]
        key = value = torch.full((N, policy.n_heads, T + 2, policy.head_dim), 1e4)   # unwritten slots: poison
        steps = []
        for t in range(T):
            logits, key, value = policy.step(h[:, t], e[:, t], s[:, t], prev[:, t], torch.full((N,), t), key, value,
                                             tau=1.3)
            steps.append(torch.log_softmax(logits, -1))
    torch.testing.assert_close(torch.stack(steps, 1), seq, atol=1e-5, rtol=0)


def test_step_rows_at_different_positions_equal_their_own_sequences():
    """Rows of one batched step may sit at different in-episode positions; each equals its own episode."""
    torch.manual_seed(0)
    policy = RecurrentActorCriticPolicy(12, 27, PolicyConfig(d_model=32, n_heads=4, max_steps=16)).eval()
    h, e, s, prev = _inputs(N=2, T=5)
    with torch.no_grad():
        seq = policy.forward_sequence(h, e, s, prev)                                       # [2, 5, A]
        key = value = torch.zeros(2, policy.n_heads, 5, policy.head_dim)
        for t in range(3):                       # row 0 runs steps 0..2 alone
            _, k0, v0 = policy.step(h[:1, t], e[:1, t], s[:1, t], prev[:1, t], torch.tensor([t]), key[:1], value[:1])
            key, value = torch.cat([k0, key[1:]]), torch.cat([v0, value[1:]])
        # one batched call: row 0 at step 3, row 1 at step 0
        logits, _, _ = policy.step(torch.stack([h[0, 3], h[1, 0]]), torch.stack([e[0, 3], e[1, 0]]),
                                   torch.stack([s[0, 3], s[1, 0]]), torch.stack([prev[0, 3], prev[1, 0]]),
                                   torch.tensor([3, 0]), key, value)
    torch.testing.assert_close(logits, torch.stack([seq[0, 3], seq[1, 0]]), atol=1e-5, rtol=0)


def test_policy_heads_and_temperature():
    policy = RecurrentActorCriticPolicy(12, 27, PolicyConfig(d_model=32, n_heads=2, max_steps=16))
    assert torch.count_nonzero(policy.pi_head.bias) == 0
    assert policy.bos == 27 and policy.action_emb.num_embeddings == 28
    h, e, s, prev = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(policy(h, e, s, prev, 2.0) * 2.0, policy(h, e, s, prev, 1.0))


def test_policy_size_for_smollm2():
    n = num_params(RecurrentActorCriticPolicy(576, 27, PolicyConfig()))
    assert n <= 0.02 * 134.5e6            # ≤ 2 % of SmolLM2-135M
    assert 300_000 < n < 500_000          # ≈0.40 M with the default dims (d=128, 256 positions)


def test_policy_config_validation():
    assert PolicyConfig.from_dict(PolicyConfig(d_model=64).to_dict()) == PolicyConfig(d_model=64)
    with pytest.raises(UserError, match="divisible"):
        PolicyConfig(d_model=30, n_heads=4)
    with pytest.raises(UserError, match="positive integer"):
        PolicyConfig(max_steps=0)
