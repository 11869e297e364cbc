"""Rollouts, GRPO training, checkpoints, resume determinism and a 2-process DDP run, on tiny LMs.

The real ``GatedLM`` (a random 2-layer Llama) carries the plumbing tests; ``FakeGatedLM`` the ones that need the
reward to respond to the controls in a known way (see tests/tiny_lm.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiny_lm import FakeGatedLM, counting_blocks, gated_tiny_llama, random_blocks
from solm_compile.policy import checkpoint
from solm_compile.errors import UserError
from solm_compile.policy.actions import GRID27
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from solm_compile.train.config import TrainConfig
from solm_compile.train.loop import train
from solm_compile.train.rollout import rollout

TINY = TrainConfig(ctx=12, T=8, K=4, B=2, updates=2, checkpoint_every=1, buffer_decisions=128,
                   minibatch_decisions=64, grad_accum=1, lr=1e-2, seed=3, grid=GRID27,
                   policy=PolicyConfig(d_model=32, n_heads=2, max_steps=16))   # 3 axes: the learning test moves each
REAL = dataclasses.replace(TINY, ctx=24)      # the real LM: past the sinks + window, so controls act
TIMING = ("rollout_s", "update_s")


pytestmark = pytest.mark.usefixtures("one_thread")        # tests/conftest.py


def _blocks(cfg: TrainConfig, n: int = 32, seed: int = 0) -> torch.Tensor:
    return counting_blocks(n, cfg.ctx + cfg.T + 1, seed=seed)


def _real_blocks(n: int = 32, seed: int = 0) -> torch.Tensor:
    return random_blocks(n, REAL.ctx + REAL.T + 1, seed=seed)


def _strip(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# ---------------------------------------------------------------------------------------------- config
def test_train_config_round_trip_and_validation():
    assert TrainConfig.from_dict(TINY.to_dict()) == TINY
    for kw, msg in [(dict(K=1), "K must be"), (dict(reward="xent"), "reward"), (dict(T=32), "position table"),
                    (dict(minibatch_decisions=4), "one episode"), (dict(ctx=0), "ctx")]:
        with pytest.raises(UserError, match=msg):
            dataclasses.replace(TINY, **kw)


# ---------------------------------------------------------------------------------------------- rollouts
def _biased_policy(action: int) -> RecurrentActorCriticPolicy:
    policy = RecurrentActorCriticPolicy(16, TINY.grid.num_actions, TINY.policy)
    with torch.no_grad():
        policy.pi_head.bias.copy_(20.0 * (torch.arange(TINY.grid.num_actions) == action))
    return policy


def test_rollout_effective_steps_and_usage():
    lm = FakeGatedLM()
    blocks = counting_blocks(2, 3 + 8 + 1)                     # ctx 3: L = 4 + t, effective iff L > 7, i.e. t >= 4
    targets = torch.tensor([[0.5, 0.5, 0.5], [0.9, 1.0, 1.0]])   # (an all-ones budget would force dense)
    run = lambda policy: rollout(lm, policy, blocks, targets, TINY.grid, T=8, K=3, tau=1.3,  # noqa: E731
                                 generator=torch.Generator().manual_seed(0))
    ep, dense = run(_biased_policy(0)), run(_biased_policy(TINY.grid.dense_idx))
    N = 6
    assert ep.h.shape == (N, 8, 16) and ep.scalars.shape == (N, 8, 8) and ep.reward.shape == (N, 8)
    assert torch.equal(ep.eff, torch.tensor([False] * 4 + [True] * 4).expand(N, 8))
    assert torch.all(ep.prev[:, 0] == TINY.grid.num_actions)  # BOS
    assert torch.all(ep.prev[:, 1:5] == TINY.grid.dense_idx)  # non-effective steps feed back the dense action
    assert torch.all(ep.prev[:, 5:] == 0)
    torch.testing.assert_close(ep.scalars[:, :, 1], ep.eff.float())
    assert torch.all(ep.scalars[:, :5, 5:] == 0)              # no effective step yet -> dev = 0
    assert torch.all(ep.actions == 0)                         # the biased policy picks action 0 ...
    torch.testing.assert_close(ep.usage, TINY.grid.usage(torch.zeros(N, dtype=torch.long)))   # ... counted on 4 steps
    torch.testing.assert_close(dense.usage, torch.ones(N, 3))
    torch.testing.assert_close(ep.logp_true[:, :4], dense.logp_true[:, :4])   # forced dense before min_len
    assert torch.all(ep.logp_true[:, 4:] < dense.logp_true[:, 4:])           # compressed steps cost likelihood
    torch.testing.assert_close(ep.targets, targets.repeat_interleave(3, 0))
    torch.testing.assert_close(ep.scalars[:, 0, 0], torch.full((N,), 1 / 8))


def test_rollout_kl_reward_is_zero_when_dense():
    lm = FakeGatedLM()
    policy = RecurrentActorCriticPolicy(16, TINY.grid.num_actions, TINY.policy)
    blocks = _blocks(TINY, 2)
    ep = rollout(lm, policy, blocks, torch.full((2, 3), 0.99), TINY.grid, T=8, K=2, reward="kl",
                 generator=torch.Generator().manual_seed(1))
    dense = ep.actions == TINY.grid.dense_idx
    assert torch.all(ep.reward <= 1e-6)
    assert torch.all(ep.reward[dense].abs() < 1e-5) and torch.all(ep.reward[~dense] < -1e-4)


def test_greedy_rollout_is_deterministic():
    lm = FakeGatedLM()
    policy = RecurrentActorCriticPolicy(16, TINY.grid.num_actions, TINY.policy)
    blocks = _blocks(TINY, 3)
    a = rollout(lm, policy, blocks, torch.full((3, 3), 0.6), TINY.grid, T=8, K=1, greedy=True)
    b = rollout(lm, policy, blocks, torch.full((3, 3), 0.6), TINY.grid, T=8, K=1, greedy=True)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.logp_true, b.logp_true)


# ---------------------------------------------------------------------------------------------- learning
def test_budget_conditioning_moves_usage(tmp_path):
    cfg = dataclasses.replace(TINY, updates=80, checkpoint_every=1000, buffer_decisions=256, minibatch_decisions=128,
                              grad_accum=0, seed=1234)
    lm = FakeGatedLM()
    res = train(lm, _blocks(cfg, 64), cfg, tmp_path, progress=False)
    ev = _blocks(cfg, 16, seed=5)
    low = torch.tensor([[0.25, 0.5, 5 / 16]]).expand(16, 3)       # the grid minima
    lo = rollout(lm, res.policy, ev, low, cfg.grid, T=cfg.T, K=1, greedy=True)
    hi = rollout(lm, res.policy, ev, torch.ones(16, 3), cfg.grid, T=cfg.T, K=1, greedy=True)
    u_lo, u_hi = lo.usage.mean(0), hi.usage.mean(0)
    assert torch.all(u_lo < u_hi - 0.1), (u_lo, u_hi)
    assert (-hi.logp_true.mean()) < (-lo.logp_true.mean())     # more compute -> lower NLL on this LM
    first, last = res.history[0], res.history[-1]
    assert last["penalty"] < first["penalty"] and last["entropy"] < first["entropy"]


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_refusals(tmp_path):
    lm = gated_tiny_llama(0)
    res = train(lm, _real_blocks(), REAL, tmp_path, progress=False)
    path = tmp_path / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)                   # plain containers only
    assert raw["format"] == "solm-policy" and raw["step"] == 2
    assert raw["model"] == {k: getattr(lm.info, k) for k in checkpoint.IDENTITY}
    assert raw["grid"] == REAL.grid.to_dict() and raw["gate"] == lm.gate.to_dict()
    loaded = checkpoint.load_policy(path, lm.info)
    assert loaded.grid == REAL.grid and loaded.step == 2 and loaded.gate == lm.gate
    assert TrainConfig.from_dict(loaded.train_config) == REAL
    for k, v in res.policy.state_dict().items():
        assert torch.equal(loaded.policy.state_dict()[k], v), k
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2

    other = gated_tiny_llama(1)                                 # same shapes, different weights
    with pytest.raises(UserError, match=r"checkpoint\.pt: policy was trained for LlamaForCausalLM .*but the model is"):
        checkpoint.load_policy(path, other.info)
    wider = dataclasses.replace(lm.info, hidden_size=48)
    with pytest.raises(UserError, match="hidden 32.*hidden 48"):
        checkpoint.load_policy(path, wider)

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="junk.pt: not a readable solm policy checkpoint"):
        checkpoint.load_policy(junk, lm.info)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(UserError, match="truncated.pt: not a readable"):
        checkpoint.load_policy(truncated, lm.info)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "solm-policy", "obj": FakeGatedLM()}, pickled)   # a pickled class: refused, not run
    with pytest.raises(UserError, match="pickled.pt: not a readable"):
        checkpoint.load_policy(pickled, lm.info)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(UserError, match="plain.pt: not a solm policy checkpoint"):
        checkpoint.load_policy(plain, lm.info)
    with pytest.raises(UserError, match="missing.pt: no such"):
        checkpoint.load_policy(tmp_path / "missing.pt", lm.info)
    assert not list(tmp_path.glob(".*.tmp"))                    # atomic writes leave no temp files


def test_resume_is_deterministic(tmp_path):
    lm, cfg = gated_tiny_llama(0), dataclasses.replace(REAL, updates=4, checkpoint_every=2)
    straight = train(lm, _real_blocks(), cfg, tmp_path / "a", progress=False)
    train(lm, _real_blocks(), dataclasses.replace(cfg, updates=2), tmp_path / "b", progress=False)
    resumed = train(lm, _real_blocks(), cfg, tmp_path / "b", resume=True, progress=False)
    assert _strip(resumed.history) == _strip(straight.history)
    for k, v in straight.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[k], v), k

    with pytest.raises(UserError, match="exists; pass resume=True"):
        train(lm, _real_blocks(), cfg, tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="differs in K"):
        train(lm, _real_blocks(), dataclasses.replace(cfg, K=2, updates=6), tmp_path / "a", resume=True, progress=False)
    with pytest.raises(UserError, match="no such policy checkpoint"):
        train(lm, _real_blocks(), cfg, tmp_path / "c", resume=True, progress=False)
    with pytest.raises(UserError, match="trained for"):
        train(gated_tiny_llama(1), _real_blocks(), dataclasses.replace(cfg, updates=6), tmp_path / "a", resume=True,
              progress=False)


def test_resume_may_change_the_optimisation_schedule_and_weights(tmp_path):
    lm, cfg = gated_tiny_llama(0), dataclasses.replace(REAL, updates=1)
    first = train(lm, _real_blocks(), cfg, tmp_path / "a", progress=False)
    chunks = -(-cfg.buffer_decisions // cfg.minibatch_decisions)          # minibatches per pass over the buffer
    assert first.history[0]["opt_steps"] == chunks                         # grad_accum=1: a step per minibatch
    more = dataclasses.replace(cfg, updates=2, lr=5e-3, ppo_epochs=3, grad_accum=0, alpha=(50.0, 400.0, 200.0),
                               entropy_coef=0.01)
    resumed = train(lm, _real_blocks(), more, tmp_path / "a", resume=True, progress=False)
    first_row, last = resumed.history[0], resumed.history[-1]
    assert last["opt_steps"] == 3 and last["lr"] == 5e-3                   # one step per pass (grad_accum 0)
    assert (first_row["alpha_pru"], first_row["entropy_coef"]) == (cfg.alpha[1], cfg.entropy_coef)
    assert (last["alpha_tok"], last["alpha_pru"], last["entropy_coef"]) == (50.0, 400.0, 0.01)
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert all(g["lr"] == 5e-3 for g in ck["optimizer"]["param_groups"])
    with pytest.raises(UserError, match="ppo_epochs must be an integer >= 1"):
        dataclasses.replace(cfg, ppo_epochs=0)


def test_kl_reward_on_real_lm():
    lm = gated_tiny_llama(0)
    policy = RecurrentActorCriticPolicy(32, REAL.grid.num_actions, REAL.policy)
    ep = rollout(lm, policy, _real_blocks(2), torch.full((2, 3), 0.5), REAL.grid, T=REAL.T, K=3, reward="kl",
                 generator=torch.Generator().manual_seed(0))
    assert ep.reward.shape == (6, REAL.T) and torch.all(ep.reward <= 1e-6) and torch.all(ep.eff)
    first_dense = ep.actions[:, 0] == REAL.grid.dense_idx     # step 0 reads a dense cache: dense action => KL 0
    assert torch.all(ep.reward[first_dense, 0].abs() < 1e-5)


def test_bad_blocks_refused(tmp_path):
    with pytest.raises(UserError, match=r"\[N, 21\]"):
        train(FakeGatedLM(), torch.zeros(4, 20, dtype=torch.long), TINY, tmp_path, progress=False)
    with pytest.raises(UserError, match="fewer than B"):
        train(FakeGatedLM(), _blocks(TINY, 1), TINY, tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = dataclasses.replace(TINY, updates=2, checkpoint_every=2)   # the fake LM: spawning is the cost here
        res = train(FakeGatedLM(), _blocks(cfg), cfg, Path(out), progress=False)
        torch.save(res.policy.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", str(out)), nprocs=2, join=True)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 2
    r0, r1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY.seed)                           # train() builds the policy under this seed
        init = RecurrentActorCriticPolicy(16, TINY.grid.num_actions, TINY.policy).state_dict()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k                    # gradients were all-reduced: replicas agree
        assert torch.equal(ck["policy"][k], r0[k]), k
    assert any(not torch.equal(r0[k], init[k]) for k in r0)
    assert sum(h["step"] for h in ck["history"]) == 3          # one metrics row per update, averaged over ranks
