"""Per-layer-group deviations from the floor (issue 18, docs/policy.md): the pure maths against hand-worked
numbers, and the engine controller against the floor's own trace on the tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from solm_compile.errors import UserError
from solm_compile.eval import baselines as bl
from solm_compile.eval import floor as fl
from solm_compile.eval.evaluate import run_traces
from solm_compile.eval.offsets import OffsetController, floor_keeps
from solm_compile.eval.sources import BlockSource, ScheduleController
from solm_compile.policy import offsets as off
from tiny_lm import gated_tiny_llama, random_blocks


def test_layer_groups_by_hand():
    assert off.layer_groups(30).tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert off.layer_groups(7).tolist() == [0, 0, 0, 1, 1, 2, 2]          # ⌊l·3/7⌋
    assert off.layer_groups(2, 2).tolist() == [0, 1]
    with pytest.raises(UserError, match="groups"):
        off.layer_groups(2, 3)


@pytest.mark.parametrize("kw, msg", [(dict(offsets=(0.1, 0.0)), "start with 0"), (dict(offsets=(0.0, 0.1, 0.1)),
                                     "distinct"), (dict(offsets=(0.0, 1.5)), "in \\(-1, 1\\)"),
                                     (dict(groups=0), "groups"), (dict(prior=-1.0), "prior")])
def test_offset_grid_validation(kw, msg):
    with pytest.raises(UserError, match=msg):
        off.OffsetGrid(**kw)


def test_keeps_by_hand():
    g = off.OffsetGrid(offsets=(0.0, -0.25, 0.25), groups=2, lowest=(0.125, 0.3))
    floor = torch.tensor([[0.5, 0.75], [0.25, 0.5], [0.5, 0.4], [1.0, 0.9]])      # 4 layers: groups 0 0 1 1
    choice = torch.tensor([[[2, 1], [1, 2]]])                                      # g0: κ +0.25, ρ −0.25; g1: κ −.25, ρ +.25
    k = g.keeps(floor, choice)[0]
    # layer 0: 0.75, 0.5; layer 1: 0.5, 0.3 (0.25 clamped up to ρ's lowest 0.3); layer 2: 0.25, 0.65;
    # layer 3: 0.75, 1.0 (1.15 clamped to 1)
    torch.testing.assert_close(k, torch.tensor([[0.75, 0.5], [0.5, 0.3], [0.25, 0.65], [0.75, 1.0]]))
    torch.testing.assert_close(g.keeps(floor, torch.zeros(1, 2, 2, dtype=torch.long))[0], floor)   # offset 0 = floor


def test_factored_distribution_by_hand():
    g = off.OffsetGrid(offsets=(0.0, -0.25, 0.25), groups=3, prior=1.0)
    head = torch.zeros(2, g.num_logits)                                            # an uninformative head
    lg = g.logits(head)                                                            # [2, 3, 2, 3]
    assert lg.shape == (2, 3, 2, 3) and torch.all(off.greedy(lg) == 0)             # greedy: the floor
    # each factor: logits (1, 0, 0): p0 = e/(e+2), p1 = p2 = 1/(e+2); six independent factors
    p0, p1 = math.e / (math.e + 2), 1 / (math.e + 2)
    c = torch.zeros(2, 3, 2, dtype=torch.long)
    c[1, 2, 0] = 1                                                                 # row 1: one factor off the floor
    torch.testing.assert_close(off.log_prob(lg, c), torch.tensor([6 * math.log(p0), 5 * math.log(p0) + math.log(p1)]))
    h1 = -(p0 * math.log(p0) + 2 * p1 * math.log(p1))
    torch.testing.assert_close(off.entropy(lg), torch.tensor([6 * h1, 6 * h1]))
    s = off.sample(lg[:1].expand(4000, 3, 2, 3).contiguous(), torch.Generator().manual_seed(0))
    assert abs(float((s == 0).double().mean()) - p0) < 0.01                      # 24000 draws: se 0.003


def test_floor_keeps_uniform_and_layers():
    torch.testing.assert_close(floor_keeps((0.4, 0.7, 1.0), 3), torch.tensor([[0.4, 0.7]] * 3))
    kl = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.05, 0.0]], dtype=torch.float64)   # layer 0 is the sensitive one
    costs = fl.LayerCosts(((0.25, 0.5, 1.0), (0.5, 0.75, 1.0)), (kl, kl), 1, 1)
    k = floor_keeps((0.5, 0.75, 1.0), 2, costs)
    # κ̄ 0.5 over 2 layers: both start at 0.25 (budget 0.5 left); layer 0's first upgrade saves 0.8/0.25 = 3.2 per
    # unit, layer 1's 0.15/0.25 = 0.6: layer 0 -> 0.5 (0.25 left), then 0.1/0.5 = 0.2 vs 0.6: layer 1 -> 0.5 (0 left)
    torch.testing.assert_close(k[:, 0], torch.tensor([0.5, 0.5]))
    # ρ̄ 0.75: start 0.5 each (0.5 left): layer 0 -> 0.75 (3.2), then layer 1 -> 0.75 (0.6 vs 0.4): 0 left
    torch.testing.assert_close(k[:, 1], torch.tensor([0.75, 0.75]))
    assert float(k.mean(0)[0]) == pytest.approx(0.5)


def test_controller_with_an_uninformative_head_is_the_floor():
    lm = gated_tiny_llama(0)
    L, ctx, T = lm.info.num_layers, 24, 5
    src = BlockSource(lm, random_blocks(3, ctx + T + 1, seed=7), ctx, T)
    grid = off.OffsetGrid(groups=2)
    floor = torch.tensor([[0.25, 0.5], [0.75, 0.9]])                               # [L=2, 2]
    mask = src.mask()
    sched = torch.tensor(bl.DENSE).repeat(3, T, L, 1)                              # the floor written out: [n, T, L, 3]
    sched[mask] = torch.cat([floor, torch.full((L, 1), 16.0)], -1)
    zero = lambda t, h, e, counted: torch.zeros(h.shape[0], grid.num_logits)               # noqa: E731
    tr = run_traces(lm, src, {"floor": ScheduleController(sched).begin,
                              "offsets": OffsetController(lm, zero, grid, floor).begin}, batch_rows=8)
    torch.testing.assert_close(tr["offsets"].nll, tr["floor"].nll, rtol=0, atol=1e-6)
    torch.testing.assert_close(tr["offsets"].controls, tr["floor"].controls)
    assert tr["offsets"].usage()[0] == pytest.approx(0.5) and tr["offsets"].usage()[1] == pytest.approx(0.7)


def test_controller_applies_each_groups_offset_to_its_layers():
    lm = gated_tiny_llama(0)
    L, ctx, T = lm.info.num_layers, 24, 4
    src = BlockSource(lm, random_blocks(2, ctx + T + 1, seed=8), ctx, T)
    grid = off.OffsetGrid(offsets=(0.0, -0.25, 0.25), groups=2, prior=0.0)
    floor = torch.tensor([[0.5, 0.75], [0.5, 0.75]])

    def head(t, h, e, counted):                                  # group 0 (layer 0): κ +0.25; group 1 (layer 1): ρ −0.25
        lg = torch.zeros(h.shape[0], 2, 2, 3)
        lg[:, 0, 0, 2] = 5.0
        lg[:, 1, 1, 1] = 5.0
        return lg.reshape(h.shape[0], -1)

    mask = src.mask()
    want = torch.tensor(bl.DENSE).repeat(2, T, L, 1)
    want[mask] = torch.tensor([[0.75, 0.75, 16.0], [0.5, 0.5, 16.0]])              # worked out by hand
    ctl = OffsetController(lm, head, grid, floor)
    tr = run_traces(lm, src, {"by_hand": ScheduleController(want).begin, "offsets": ctl.begin}, batch_rows=8)
    torch.testing.assert_close(tr["offsets"].nll, tr["by_hand"].nll, rtol=0, atol=1e-6)
    assert not torch.allclose(tr["offsets"].nll, run_traces(lm, src, {"floor": ScheduleController(
        torch.where(mask[..., None, None], torch.tensor([0.5, 0.75, 16.0]), want)).begin})["floor"].nll)
    assert ctl.choices[:, 0].tolist() == [[[2, 0], [0, 1]]] * 2


# ---------------------------------------------------------------------------------------------- the network
def _offset_policy(hidden: int, grid: off.OffsetGrid, scale: float = 0.0):
    from solm_compile.policy.network import PolicyConfig
    from solm_compile.policy.offset_network import OffsetPolicy

    torch.manual_seed(5)
    p = OffsetPolicy(hidden, grid, PolicyConfig(d_model=32, n_heads=2, max_steps=16)).eval()
    if scale:
        for w in p.parameters():
            w.data.normal_(0, scale)
    return p


def test_offset_policy_prev_ids_and_step_equals_sequence():
    grid = off.OffsetGrid()                                                        # G 3, O 5
    p = _offset_policy(8, grid, scale=0.3)
    choice = torch.tensor([[[1, 0], [0, 4], [2, 3]]])
    assert p.prev_ids(choice).tolist() == [[1, 5, 10, 19, 22, 28]]                # (g·2 + a)·5 + o
    g = torch.Generator().manual_seed(0)
    N, T = 2, 5
    h, e, s = torch.randn(N, T, 8, generator=g), torch.randn(N, T, 8, generator=g), torch.randn(N, T, 8, generator=g)
    prev = torch.randint(0, grid.num_logits + 1, (N, T, 6), generator=g)
    seq = p.forward_sequence(h, e, s, prev)                                        # [N, T, 30]
    key = torch.zeros(N, p.n_heads, T, p.head_dim)
    value = torch.zeros_like(key)
    for t in range(T):
        lg, key, value = p.step(h[:, t], e[:, t], s[:, t], prev[:, t], torch.full((N,), t), key, value)
        torch.testing.assert_close(lg, seq[:, t], rtol=1e-5, atol=1e-5)


def test_a_fresh_offset_policy_is_the_floor_and_a_trained_one_deviates():
    from solm_compile.policy.offset_step import OffsetHead

    lm = gated_tiny_llama(0)
    L, ctx, T = lm.info.num_layers, 24, 4
    src = BlockSource(lm, random_blocks(3, ctx + T + 1, seed=9), ctx, T)
    grid = off.OffsetGrid(groups=2)
    floor = torch.tensor([[0.5, 0.6], [0.5, 0.9]])
    sched = torch.tensor(bl.DENSE).repeat(3, T, L, 1)
    sched[src.mask()] = torch.cat([floor, torch.full((L, 1), 16.0)], -1)
    targets = (0.5, 0.75, 1.0)
    fresh = OffsetController(lm, OffsetHead(_offset_policy(32, grid), targets, T), grid, floor)
    tr = run_traces(lm, src, {"floor": ScheduleController(sched).begin, "fresh": fresh.begin}, batch_rows=8)
    torch.testing.assert_close(tr["fresh"].nll, tr["floor"].nll, rtol=0, atol=1e-6)
    assert torch.all(fresh.choices == 0)
    moved = OffsetController(lm, OffsetHead(_offset_policy(32, grid, scale=0.5), targets, T), grid, floor)
    run_traces(lm, src, {"moved": moved.begin}, batch_rows=8)
    assert bool((moved.choices != 0).any())                                        # the head's output is used
