"""Training the offset policy (issue 18, docs/policy.md items 1-3): its state machine against the floor written out by
hand, the factored log π of the update against torch.distributions, a 2-update run that resumes and refuses a kind
change, validation against the floor, and ``solm train`` / ``solm eval`` on the trained tiny checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from torch.distributions import Categorical

from solm_compile.errors import UserError
from solm_compile.eval import floor as fl
from solm_compile.eval.offsets import floor_keeps
from solm_compile.eval.select import offsets_validation_score
from solm_compile.policy import checkpoint
from solm_compile.policy import offsets as off
from solm_compile.policy.network import PolicyConfig
from solm_compile.policy.offset_network import OffsetPolicy
from solm_compile.policy.offset_step import OffsetStep
from solm_compile.train.config import TrainConfig
from solm_compile.train.kinds import kind_of
from solm_compile.train.loop import train
from solm_compile.train.rollout_offsets import floors, rollout_offsets
from test_cli_more import TRAIN, model_dir, one_line_error, run_cli  # noqa: F401 (fixture)
from test_train import REAL
from tiny_lm import gated_tiny_llama, random_blocks

pytestmark = pytest.mark.usefixtures("one_thread")        # tests/conftest.py
OFFSETS = dataclasses.replace(REAL, policy_kind="offsets")
PCFG = PolicyConfig(d_model=32, n_heads=2, max_steps=16)


def _policy(hidden: int, scale: float = 0.0, seed: int = 5, groups: int = 3) -> OffsetPolicy:
    torch.manual_seed(seed)
    p = OffsetPolicy(hidden, off.OffsetGrid(groups=groups), PCFG).eval()
    if scale:
        for w in p.parameters():
            w.data.normal_(0, scale)
    return p


# ---------------------------------------------------------------------------------------------- the state machine
def test_state_machine_with_a_zero_head_is_the_floor_and_counts_the_layer_mean():
    L, B, T, D = 6, 3, 4, 8
    ps = OffsetStep(_policy(D), T)
    floor = torch.rand(B, L, 2, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.4   # [B, L, 2] in [0.4, 0.9]
    budget = torch.tensor([[0.5, 0.6, 1.0], [0.7, 0.8, 1.0], [1.0, 1.0, 1.0]])           # row 2: dense budget
    eff_at = [False, True, True, True]                                                   # step 0 does not count
    g = torch.Generator().manual_seed(1)
    state = ps.start(B, torch.randn(B, D, generator=g))
    want_usage = torch.zeros(B, 3)
    for t in range(T):
        eff = torch.full((B,), eff_at[t])
        d = ps.decide(state, torch.randn(B, D, generator=g), eff, budget, floor)      # greedy
        assert torch.all(d.choice == 0)
        for b in range(B):
            if eff_at[t] and b < 2:                                  # counted, budget below dense: the floor
                want = torch.cat([floor[b], torch.full((L, 1), 16.0)], -1)
            else:                                                    # dense
                want = torch.tensor([[1.0, 1.0, 16.0]] * L)
            torch.testing.assert_close(d.controls[b], want, rtol=0, atol=0)
            if eff_at[t]:
                want_usage[b] += torch.tensor([float(want[:, 0].mean()), float(want[:, 1].mean()), 1.0])
        state = ps.advance(state, d, eff, torch.randn(B, D, generator=g), end_episode=t < T - 1)
        if t < T - 1:
            assert state.step.tolist() == [t + 1] * B
    assert state.count.tolist() == [3.0, 3.0, 3.0]
    torch.testing.assert_close(state.usage, want_usage)


def test_state_machine_greedy_usage_and_restart_after_T():
    L, B, T, D = 4, 2, 3, 8
    ps = OffsetStep(_policy(D), T)
    floor = torch.tensor([[0.25, 0.5], [0.5, 0.5], [0.75, 1.0], [0.5, 0.6]])             # layer means 0.5, 0.65
    budget = torch.tensor([[0.5, 0.65, 1.0]] * B)
    state = ps.start(B, torch.zeros(B, D))
    on = torch.ones(B, dtype=torch.bool)
    for t in range(T - 1):
        d = ps.decide(state, torch.zeros(B, D), on, budget, floor)
        state = ps.advance(state, d, on, torch.zeros(B, D))
    torch.testing.assert_close(state.usage, torch.tensor([[1.0, 1.3, 2.0]] * B))          # 2 steps of (0.5, 0.65, 1)
    assert state.prev.tolist() == [[0, 5, 10, 15, 20, 25]] * B                            # offset 0 of each factor
    d = ps.decide(state, torch.zeros(B, D), on, budget, floor)
    kept = ps.advance(state, d, on, torch.zeros(B, D), end_episode=False)
    assert kept.count.tolist() == [3.0, 3.0]
    state = ps.advance(state, d, on, torch.zeros(B, D))                                   # t reached T: a new episode
    assert state.step.tolist() == [0, 0] and state.count.tolist() == [0.0, 0.0]
    assert torch.all(state.prev == ps.policy.bos) and torch.all(state.key == 0) and torch.all(state.usage == 0)


class Spy:
    """The tiny gated LM, recording the controls of every controlled step."""

    def __init__(self, lm):
        self.lm, self.calls = lm, []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def step(self, ids, cache, kappa, rho, bits):
        if kappa.dim() == 2:
            self.calls.append((kappa.clone(), rho.clone(), bits.clone()))
        return self.lm.step(ids, cache, kappa, rho, bits)


def test_rollout_with_a_zero_head_runs_the_floor_at_counted_steps():
    spy = Spy(gated_tiny_llama(0))
    L, ctx, T, K = spy.info.num_layers, 24, 5, 2
    blocks = random_blocks(2, ctx + T + 1, seed=3)
    targets = torch.tensor([[0.5, 0.75, 1.0], [0.4, 0.6, 1.0]])
    kl = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.05, 0.0]], dtype=torch.float64)
    costs = fl.LayerCosts(((0.25, 0.5, 1.0), (0.5, 0.75, 1.0)), (kl, kl), 1, 1)
    fl_ = floors(targets, L, costs)                                                      # [2, L, 2]
    for b in range(2):
        torch.testing.assert_close(fl_[b], floor_keeps(targets[b].tolist(), L, costs))
    min_len = ctx + 3                                                                    # steps 0, 1 uncounted
    ep = rollout_offsets(spy, _policy(spy.info.hidden_size, groups=L), blocks, targets, fl_, T=T, K=K, greedy=True,
                         min_len=min_len)
    assert len(spy.calls) == T and ep.actions.shape == (4, T, L, 2) and ep.prev.shape == (4, T, 2 * L)
    per_row = fl_.repeat_interleave(K, 0)                                                # [N, L, 2]
    for t, (kappa, rho, bits) in enumerate(spy.calls):
        counted = ctx + t + 1 > min_len
        assert bool(ep.eff[0, t]) == counted
        want = per_row if counted else torch.ones_like(per_row)
        torch.testing.assert_close(kappa, want[..., 0])
        torch.testing.assert_close(rho, want[..., 1])
        assert torch.all(bits == 16)
    torch.testing.assert_close(ep.usage[:, :2], per_row.mean(1))                         # the layer mean
    assert torch.all(ep.actions == 0)


# ---------------------------------------------------------------------------------------------- the update
def test_update_log_prob_is_the_sum_of_the_factor_categoricals():
    """G·2 factors (6 on SmolLM2; the tiny Llama's 2 layers make 2 groups, so 4)."""
    lm = gated_tiny_llama(0)
    cfg = dataclasses.replace(OFFSETS, T=4, K=2)
    kind = kind_of(cfg, None, lm.info.num_layers)
    G = lm.info.num_layers                                                              # 2 layers: 2 groups
    policy = _policy(lm.info.hidden_size, scale=0.3, groups=G)
    assert kind.grid == policy.grid
    targets = torch.tensor([[0.5, 0.75, 1.0]])
    ep = rollout_offsets(lm, policy, random_blocks(1, cfg.ctx + cfg.T + 1, seed=4), targets,
                         floors(targets, lm.info.num_layers, None), T=cfg.T, K=cfg.K, tau=cfg.tau,
                         generator=torch.Generator().manual_seed(0), min_len=0)
    raw = policy(ep.h, ep.e, ep.scalars, ep.prev, cfg.tau)                               # [N, T, 30]
    logp, ent = kind.logp_entropy(raw, ep.actions)                                       # [N, T]
    want_lp, want_h = torch.zeros(logp.shape), torch.zeros(logp.shape)
    prior = torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0])
    for g in range(G):
        for a in range(2):
            j = (g * 2 + a) * 5
            dist = Categorical(logits=raw[..., j:j + 5] + prior)
            want_lp += dist.log_prob(ep.actions[..., g, a])
            want_h += dist.entropy()
    torch.testing.assert_close(logp, want_lp)
    torch.testing.assert_close(ent, want_h)
    torch.testing.assert_close(logp, ep.logp, rtol=1e-5, atol=1e-5)                     # the rollout's own log π
    assert bool((ep.actions != 0).any())                                                  # sampled, not the floor


# ---------------------------------------------------------------------------------------------- training
def test_offsets_training_resumes_and_refuses_a_kind_change(tmp_path):
    lm = gated_tiny_llama(0)
    blocks = random_blocks(8, OFFSETS.ctx + OFFSETS.T + 1, seed=0)
    r = train(lm, blocks, OFFSETS, tmp_path, progress=False)
    assert [h["step"] for h in r.history] == [1, 2] and isinstance(r.policy, OffsetPolicy)
    ck = checkpoint.read(tmp_path / "checkpoint.pt")
    assert ck["train_config"]["policy_kind"] == "offsets" and ck["floor"] == {"id": "uniform", "layer_costs": None}
    loaded = checkpoint.load_policy(tmp_path / "checkpoint.pt", lm.info)
    assert isinstance(loaded.policy, OffsetPolicy) and loaded.kind == "offsets"
    r3 = train(lm, blocks, dataclasses.replace(OFFSETS, updates=3), tmp_path, resume=True, progress=False)
    assert [h["step"] for h in r3.history] == [1, 2, 3]
    with pytest.raises(UserError, match="cannot resume .* trained with --policy-kind offsets") as e:
        train(lm, blocks, dataclasses.replace(REAL, updates=4), tmp_path, resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_floor_needs_offsets_and_its_calibration():
    with pytest.raises(UserError, match="policy_kind 'offsets'"):
        dataclasses.replace(REAL, floor="layers:abc")
    with pytest.raises(UserError, match="policy_kind must be"):
        dataclasses.replace(REAL, policy_kind="perlayer")
    with pytest.raises(UserError, match="layers calibration"):
        kind_of(dataclasses.replace(OFFSETS, floor="layers:abc"), None, 2)


def test_validation_against_the_floor_is_zero_for_a_fresh_policy():
    lm = gated_tiny_llama(0)
    kl = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.05, 0.0]], dtype=torch.float64)
    costs = fl.LayerCosts(((0.125, 0.5, 1.0), (0.3, 0.75, 1.0)), (kl, kl), 1, 1)
    floor = {"id": "layers:x", "layer_costs": costs.to_dict()}
    val = random_blocks(3, 24 + 4 + 1, seed=11)
    v = offsets_validation_score(lm, _policy(lm.info.hidden_size, groups=2), OFFSETS.grid, floor, val, 24, 4)
    assert v["score"] == 0.0 and v["nll"] == v["floor_nll"]
    moved = offsets_validation_score(lm, _policy(lm.info.hidden_size, scale=1.0, groups=2), OFFSETS.grid, floor,
                                     val, 24, 4)
    assert moved["score"] != 0.0


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_trains_offsets_on_a_floor_file_and_evaluates_it(capsys, tmp_path, model_dir):  # noqa: F811
    from solm_compile.frontend.models import load

    info = load(str(model_dir)).info
    kl = torch.tensor([[0.5, 0.2, 0.1, 0.0], [0.1, 0.05, 0.02, 0.0]], dtype=torch.float64)
    costs = fl.LayerCosts(((0.125, 0.25, 0.5, 1.0), (0.3, 0.5, 0.75, 1.0)), (kl, kl), 1, 1)
    floor_file = tmp_path / "floor.json"
    fl.save_static(floor_file, costs, checkpoint.model_identity(info), "tiny", {"gate": {"mlp_skip": "x"}})
    text = tmp_path / "text.txt"
    text.write_text("it is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n" * 8)
    out = tmp_path / "offsets.pt"
    code, stdout, err = run_cli(capsys, "train", model_dir, "--data", text, "--out", out, "--updates", "2",
                                "--policy-kind", "offsets", "--floor", floor_file, *TRAIN)
    assert code == 0, err
    ck = checkpoint.read(out)
    sha = hashlib.sha256(floor_file.read_bytes()).hexdigest()
    assert ck["train_config"]["floor"] == "layers:" + sha[:16] and ck["floor_file"]["sha256"] == sha
    assert fl.LayerCosts.from_dict(ck["floor"]["layer_costs"]).to_dict() == costs.to_dict()
    one_line_error(capsys, ["train", model_dir, "--data", text, "--out", out, "--updates", "3", "--resume",
                            *TRAIN], "cannot resume", "--policy-kind offsets")
    one_line_error(capsys, ["train", model_dir, "--data", text, "--out", tmp_path / "j.pt", "--floor", floor_file,
                            *TRAIN], "--floor", "--policy-kind offsets")
    code, stdout, err = run_cli(capsys, "eval", model_dir, "--policy", out, "--data", text, "--attn-keep", "0.5",
                                "--mlp-keep", "0.75", "--blocks", "3", "--ctx", "12", "--T", "4",
                                "--methods", "uniform,dense", "--page-size", "4", "--attn-select", "sol", "--json")
    assert code == 0, err
    r = json.loads(stdout)
    assert set(r["methods"]) == {"dense", "policy", "uniform"} and r["policy_kind"] == "offsets"
    assert r["policy_floor"] == "layers:" + sha[:16]
    one_line_error(capsys, ["compile", model_dir, "--policy", out, "--out", tmp_path / "m.onnx"],
                   "runs joint policies only")
