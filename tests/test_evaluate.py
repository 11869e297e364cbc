"""``solm eval``: matched baselines, the evaluation engine and the CLI, on a tiny random Llama."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tiny_lm import gated_tiny_llama, random_blocks
from solm_compile.eval import baselines as bl
from solm_compile.policy import checkpoint
from solm_compile.cli import app as cli
from solm_compile.policy.actions import GRID27
from solm_compile.eval.evaluate import (METHODS, CostModel, DenseController, PPLEvaluator, ScheduleController,
                                   BlockSource, evaluate_choices, run_traces, summarize)
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from solm_compile.analysis.inspect import shapes_from_gated
from solm_compile.train.config import TrainConfig
from solm_compile.train.rollout import rollout

CTX, T = 24, 8
GRID = GRID27
PCFG = PolicyConfig(d_model=32, n_heads=2, max_steps=16)
TARGETS = (0.5, 0.75, 0.5)


pytestmark = pytest.mark.usefixtures("one_thread")        # tests/conftest.py


def _policy(seed: int = 0, hidden: int = 32) -> RecurrentActorCriticPolicy:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RecurrentActorCriticPolicy(hidden, GRID.num_actions, PCFG).eval()


@pytest.fixture(scope="module")
def result():
    lm = gated_tiny_llama(0)
    ev = PPLEvaluator(lm, _policy(), GRID, random_blocks(12, CTX + T + 1, seed=1), ctx=CTX, T=T,
                      cost=CostModel(shapes_from_gated(lm.model), lm.gate),
                      fit_blocks=random_blocks(3, CTX + T + 1, seed=2), random_seeds=3)
    return ev, ev.run(TARGETS)


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("levels,target", [(GRID.kappa_levels, 0.61), (GRID.rho_levels, 0.83), (GRID.bit_levels, 7.3),
                                           (GRID.bit_levels, 12.9), (bl.INT_BITS, 9.37), (GRID.kappa_levels, 0.25)])
def test_mixture_schedule_matches_target(levels, target):
    mask = torch.ones(16, 16, dtype=torch.bool)
    mask[:, :3] = False                                               # non-effective steps stay dense
    v = bl.mixture_schedule(levels, target, mask, dense=99.0)
    assert abs(float(v[mask].mean()) - target) <= 0.01 * target
    assert torch.all(v[~mask] == 99.0)
    lo, hi, _ = bl.two_nearest(levels, target)
    assert set(v[mask].tolist()) <= {lo, hi}
    per_row_hi = (v[mask].view(16, 13) == hi).sum(1)
    assert int(per_row_hi.max() - per_row_hi.min()) <= 1           # round-robin spreads the high level evenly


def test_fixed_and_random_schedules():
    mask = torch.ones(10, 12, dtype=torch.bool)
    mask[:, :2] = False
    usage = (0.4, 0.9, 0.45)
    fixed = bl.fixed_controls(GRID, usage, mask)
    got = fixed[mask].mean(0) / torch.tensor([1.0, 1.0, 16.0])
    for g, u in zip(got.tolist(), usage):
        assert abs(g - u) <= 0.01 * u
    for seed in range(3):
        rnd = bl.random_controls(fixed, mask, torch.Generator().manual_seed(seed))
        assert torch.equal(rnd[~mask], fixed[~mask])
        for i in range(10):
            for a in range(3):                                        # same counts per sequence and axis
                assert torch.equal(rnd[i, mask[i], a].sort().values, fixed[i, mask[i], a].sort().values)
        assert not torch.equal(rnd, fixed)


def test_uniform_and_step_schedule_match_usage():
    mask = torch.ones(7, 16, dtype=torch.bool)
    usage = (0.437, 0.81, 9.4 / 16)
    uni = bl.uniform_controls(usage, mask)
    assert torch.allclose(uni[..., 0], torch.tensor(0.437)) and torch.allclose(uni[..., 1], torch.tensor(0.81))
    assert set(uni[..., 2].unique().tolist()) == {9.0, 10.0}              # nearest-integer bit mixture
    assert abs(float(uni[..., 2].mean()) - 9.4) < 0.01 * 9.4
    kl = tuple(torch.rand(len(lv), 16, generator=torch.Generator().manual_seed(a)) * torch.tensor(
        [1.0] * (len(lv) - 1) + [0.0])[:, None] for a, lv in enumerate([GRID.kappa_levels, GRID.rho_levels,
                                                                         GRID.bit_levels]))
    costs = bl.StepCosts((GRID.kappa_levels, GRID.rho_levels, tuple(float(b) for b in GRID.bit_levels)), kl,
                         torch.ones(16, dtype=torch.bool), 4)
    sch = bl.step_schedule_controls(costs, usage, mask)
    got = sch.mean((0, 1)) / torch.tensor([1.0, 1.0, 16.0])
    for g, u in zip(got.tolist(), usage):
        assert abs(g - u) <= 0.01 * u
    # all but at most one step are the same for every row: the action depends on t only
    assert int((sch != sch[:1]).any(-1).any(0).sum()) <= 3


def test_step_schedule_by_hand():
    """4 steps, 2 rows, κ only. KL(κ=0.25) = [.9 .15 .5 .2], KL(κ=0.5) = [.3 .05 .1 .15]: the extra KL of 0.25 over
    0.5 is [.6 .1 .4 .05], so the cheapest steps for the low level are t=3, then t=1, then t=2, then t=0."""
    kl_k = torch.tensor([[0.9, 0.15, 0.5, 0.2], [0.3, 0.05, 0.1, 0.15], [0.0] * 4])
    zero = (torch.zeros(3, 4), torch.zeros(3, 4))
    costs = bl.StepCosts((GRID.kappa_levels, GRID.rho_levels, tuple(float(b) for b in GRID.bit_levels)),
                         (kl_k,) + zero, torch.ones(4, dtype=torch.bool), 1)
    mask = torch.ones(2, 4, dtype=torch.bool)
    # κ̄ = 0.375: halfway between 0.25 and 0.5, so 2 of the 4 steps go low: t=3 and t=1
    sch = bl.step_schedule_controls(costs, (0.375, 1.0, 1.0), mask)
    assert sch[..., 0].tolist() == [[0.5, 0.25, 0.5, 0.25]] * 2
    assert sch[..., 1].tolist() == [[1.0] * 4] * 2 and sch[..., 2].tolist() == [[16.0] * 4] * 2
    # κ̄ = 0.3125: 3 low steps (t=3, 1, 2), t=0 stays 0.5
    sch = bl.step_schedule_controls(costs, (0.3125, 1.0, 1.0), mask)
    assert sch[..., 0].tolist() == [[0.5, 0.25, 0.25, 0.25]] * 2
    # κ̄ = 0.34375: 2.5 low steps: t=3 and t=1 for both rows, t=2 for one row of the two (the boundary step)
    sch = bl.step_schedule_controls(costs, (0.34375, 1.0, 1.0), mask)
    assert sorted(sch[..., 0].tolist()) == [[0.5, 0.25, 0.25, 0.25], [0.5, 0.25, 0.5, 0.25]]
    # κ̄ = 0.75: between 0.5 and 1, 2 steps at 0.5, chosen by KL(0.5) − KL(1) = [.3 .05 .1 .15]: t=1 and t=2
    sch = bl.step_schedule_controls(costs, (0.75, 1.0, 1.0), mask)
    assert sch[..., 0].tolist() == [[1.0, 0.5, 0.5, 1.0]] * 2


# ---------------------------------------------------------------------------------------------- engine
def test_dense_equals_plain_hf_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = gated_tiny_llama(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = LlamaForCausalLM(cfg).eval()                              # the same weights as gated_tiny_llama(0)
    blocks = random_blocks(5, CTX + T + 1, seed=4)
    tr = run_traces(lm, BlockSource(lm, blocks, CTX, T), {"dense": lambda x: DenseController().begin(x)})["dense"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(blocks).logits.float(), -1)             # [n, len, V]
    ref = -logp[:, CTX:CTX + T].gather(-1, blocks[:, CTX + 1:CTX + T + 1, None])[..., 0]
    torch.testing.assert_close(tr.nll, ref, atol=1e-4, rtol=1e-4)
    s = summarize(tr)
    assert s["ppl"] == pytest.approx(math.exp(float(ref.mean())), rel=1e-4)
    rows = ref.double().mean(1)
    assert s["ppl_se"] == pytest.approx(s["ppl"] * float(rows.std()) / math.sqrt(5), rel=1e-3)


def test_uniform_at_full_usage_equals_dense():
    lm = gated_tiny_llama(0)
    src = BlockSource(lm, random_blocks(4, CTX + T + 1, seed=5), CTX, T)
    uni = bl.uniform_controls((1.0, 1.0, 1.0), src.mask())
    tr = run_traces(lm, src, {"dense": lambda x: DenseController().begin(x),
                              "uniform": ScheduleController(uni).begin,
                              "half": ScheduleController(bl.uniform_controls((0.3, 0.5, 0.3), src.mask())).begin})
    torch.testing.assert_close(tr["uniform"].nll, tr["dense"].nll, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tr["half"].nll, tr["dense"].nll)


def test_policy_equals_training_rollout(result):
    ev, r = result
    lm = gated_tiny_llama(0)
    blocks = ev.source.blocks
    ep = rollout(lm, _policy(), blocks, torch.tensor([TARGETS]).expand(len(blocks), 3), GRID, T=T, K=1, greedy=True)
    src = BlockSource(lm, blocks, CTX, T)
    from solm_compile.eval.evaluate import PolicyController

    tr = run_traces(lm, src, {"policy": PolicyController(lm, _policy(), GRID, TARGETS).begin})["policy"]
    torch.testing.assert_close(tr.nll, -ep.logp_true, atol=1e-5, rtol=1e-5)
    assert torch.equal(tr.actions, ep.actions)
    torch.testing.assert_close(torch.tensor(tr.usage(), dtype=torch.float64), ep.usage.double().mean(0),
                               atol=1e-6, rtol=0)
    assert r["methods"]["policy"]["ppl"] == pytest.approx(math.exp(float(-ep.logp_true.double().mean())), rel=1e-5)


def test_evaluator_methods_and_matching(result):
    _, r = result
    names = {"dense", "policy", "fixed", "random_median", "random_best", "emc", "dac", "uniform", "schedule",
             "static_attn", "static_mlp", "static_bits"}
    assert set(r["methods"]) == names and len(METHODS) == len(names) - 1
    for m in r["methods"].values():
        assert {"ppl", "ppl_se", "usage", "net_keep", "flops_fraction", "bytes_fraction"} <= set(m)
        assert {"attn_keep", "mlp_keep", "bits"} <= set(m["usage"])
        assert m["ppl"] > 1 and m["ppl_se"] > 0 and 0 < m["flops_fraction"] <= 1.1
    pol = r["methods"]["policy"]["usage"]
    assert r["matched_usage"] == {k: pol[k] for k in ("attn_keep", "mlp_keep", "bits")}
    for name in ("fixed", "random_median", "random_best", "uniform", "schedule"):
        u = r["methods"][name]["usage"]
        for k in ("attn_keep", "mlp_keep", "bits"):
            assert abs(u[k] - pol[k]) <= 0.01 * pol[k], (name, k, u[k], pol[k])
    assert r["methods"]["dense"]["net_keep"] == 1.0 and r["methods"]["dense"]["flops_fraction"] == 1.0
    assert r["methods"]["static_attn"]["usage"]["mlp_keep"] == 1.0
    assert r["methods"]["static_bits"]["usage"]["attn_keep"] == 1.0
    assert len(r["methods"]["random_best"]["seeds_ppl"]) == 3
    assert r["methods"]["random_best"]["ppl"] == min(r["methods"]["random_best"]["seeds_ppl"])
    assert sum(r["methods"]["policy"]["actions"].values()) == 12 * T


def test_multiple_choice_scoring():
    lm = gated_tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    items = [{"ctx": torch.randint(0, 64, (20,), generator=g).tolist(),
              "conts": [torch.randint(0, 64, (n,), generator=g).tolist() for n in (3, 5, 2)],
              "label": i % 3, "chars": [3, 5, 2]} for i in range(4)]
    r = evaluate_choices(lm, _policy(), GRID, items, TARGETS, random_seeds=3)
    assert set(r["methods"]) == {"dense", "policy", "fixed", "random_median", "random_best", "uniform", "emc", "dac"}
    for m in r["methods"].values():
        assert 0 <= m["acc"] <= 1 and 0 <= m["acc_norm"] <= 1 and m["items"] == 4
    pol, fixed = r["methods"]["policy"]["usage"], r["methods"]["fixed"]["usage"]
    assert r["methods"]["policy"]["counted_steps"] == 4 * (3 + 5 + 2)
    assert abs(fixed["attn_keep"] - pol["attn_keep"]) <= 0.01 * pol["attn_keep"]
    rnd = r["methods"]["random_best"]
    assert rnd["acc"] == max(rnd["seeds_acc"]) and len(rnd["seeds_acc"]) == 3
    assert sorted(rnd["seeds_acc"])[1] == r["methods"]["random_median"]["acc"]
    assert rnd["usage"]["mlp_keep"] == pytest.approx(fixed["mlp_keep"], abs=1e-6)       # a permutation of fixed
    for name, m in r["methods"].items():
        if name != "policy":                                  # paired: equals the difference of the two accuracies
            assert m["delta_acc_vs_policy"] == pytest.approx(r["methods"]["policy"]["acc"] - m["acc"], abs=1e-9)


def _mc_item(ctx, cont):
    return {"ctx": list(ctx), "conts": [list(cont)], "label": 0, "chars": [len(cont)]}


def test_episode_refresh_is_a_fresh_start_on_the_longer_context():
    """SOL's lm-eval episodes: after the dense replay at step E, the policy acts exactly as on a new item whose
    context holds the first E continuation tokens (same actions, same NLL)."""
    from solm_compile.eval.sources import ChoiceSource, PolicyController

    lm, E = gated_tiny_llama(0), 4
    g = torch.Generator().manual_seed(3)
    ctx, cont = torch.randint(0, 64, (20,), generator=g).tolist(), torch.randint(0, 64, (7,), generator=g).tolist()
    pol = _policy(1)

    def trace(items):
        make = PolicyController(lm, pol, GRID, (0.4, 0.6, 0.5), episode=E).begin
        return run_traces(lm, ChoiceSource(lm, items), {"policy": make}, episode=E)["policy"]

    whole = trace([_mc_item(ctx, cont)])
    second = trace([_mc_item(ctx + cont[:E], cont[E:])])
    assert torch.equal(whole.actions[0, E:7], second.actions[0, :3])
    torch.testing.assert_close(whole.nll[0, E:7], second.nll[0, :3], rtol=1e-5, atol=1e-5)
    assert not torch.equal(whole.controls[0, :E], torch.tensor(bl.DENSE).repeat(E, 1))   # it did compress


@pytest.mark.parametrize("episode,want_frac,want_pos", [(16, [1 / 16, 2 / 16, 3 / 16], [0, 1, 2]),
                                                        (2, [1 / 2, 2 / 2, 1 / 2], [0, 1, 0]),
                                                        (None, [1 / 3, 2 / 3, 3 / 3], [0, 1, 2])])
def test_policy_progress_and_position_follow_the_episode(episode, want_frac, want_pos):
    from solm_compile.eval.sources import ChoiceSource, PolicyController

    lm, pol, seen = gated_tiny_llama(0), _policy(1), []
    step = pol.step

    def spy(h, e, s, prev, t, key, value, tau=1.0):
        seen.append((round(float(s[0, 0]), 6), int(t[0]), bool((key == 0).all())))
        return step(h, e, s, prev, t, key, value, tau)

    pol.step = spy
    make = PolicyController(lm, pol, GRID, TARGETS, episode=episode).begin
    run_traces(lm, ChoiceSource(lm, [_mc_item(range(20), [5, 6, 7])]), {"policy": make}, episode=episode)
    assert [x[0] for x in seen] == [round(f, 6) for f in want_frac]
    assert [x[1] for x in seen] == want_pos
    assert [x[2] for x in seen] == [p == 0 for p in want_pos]          # a new episode starts with no policy cache


def test_episode_refresh_replaces_compressed_kv_with_dense():
    """A schedule sparse for the first E steps and dense after: with episodes its NLL from step E on equals the
    dense method's (the replay rebuilt the compressed entries); without, it does not."""
    from solm_compile.eval.sources import ChoiceSource

    lm, E = gated_tiny_llama(0), 4
    g = torch.Generator().manual_seed(5)
    item = _mc_item(torch.randint(0, 64, (24,), generator=g).tolist(), torch.randint(0, 64, (8,), generator=g).tolist())
    ctl = torch.tensor(bl.DENSE).repeat(1, 8, 1)
    ctl[0, :E] = torch.tensor([0.25, 0.5, 5.0])
    methods = {"dense": lambda x: DenseController().begin(x), "early": ScheduleController(ctl).begin}
    with_ep = run_traces(lm, ChoiceSource(lm, [item]), methods, episode=E)
    without = run_traces(lm, ChoiceSource(lm, [item]), methods)
    torch.testing.assert_close(with_ep["early"].nll[0, E:], with_ep["dense"].nll[0, E:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_ep["dense"].nll, without["dense"].nll, rtol=1e-5, atol=1e-5)
    assert (without["early"].nll[0, E:] - without["dense"].nll[0, E:]).abs().max() > 1e-4


def test_choice_hits_by_hand():
    from solm_compile.eval.evaluate import choice_hits

    # item 0: choices of 2 and 1 tokens; NLL sums 1.0 and 0.8, per character (chars 10, 2) 0.1 and 0.4
    # item 1: three one-token choices with NLL 2.0, 0.5, 0.7
    nll = torch.tensor([[0.4, 0.6], [0.8, 0.0], [2.0, 0.0], [0.5, 0.0], [0.7, 0.0]])
    items = [{"label": 0, "chars": [10, 2]}, {"label": 2, "chars": [1, 1, 1]}]
    hit, hit_norm = choice_hits(nll, [0, 2, 5], items)
    assert hit.tolist() == [0.0, 0.0]          # raw: choice 1 (0.8 < 1.0) and choice 1 (0.5) win
    assert hit_norm.tolist() == [1.0, 0.0]     # per character choice 0 wins item 0


def test_cost_model_matches_sympy():
    from solm_compile.analysis.cost import fraction

    lm = gated_tiny_llama(0)
    shapes = shapes_from_gated(lm.model)
    cm = CostModel(shapes, lm.gate)
    for L, k, r in ((30, 0.25, 0.5), (33, 0.437, 0.81), (8, 0.5, 0.5), (100, 1.0, 0.75)):
        want = fraction(shapes, lm.gate, L, k, r)
        assert cm.fraction(L, k, r) == pytest.approx((want["flops"], want["bytes"]), rel=1e-12)


# ---------------------------------------------------------------------------------------------- CLI
def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("flags,needle", [
    (["--attn-keep", "2", "--mlp-keep", "0.75", "--bits", "8"], "--attn-keep must be in [0.05, 1], got 2.0"),
    (["--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "40"], "--bits must be in [2, 16]"),
    (["--attn-keep", "0.5", "--bits", "8"], "--attn-keep and --mlp-keep (--bits: default 16)"),
    (["--sweep"], "--sweep needs --out"),
    (["--sweep", "--out", "x", "--methods", "policy,unifrom"], "--methods policy,unifrom: unknown method(s) unifrom"),
])
def test_cli_bad_budget(capsys, tmp_path, flags, needle):
    code, _, err = run_cli(capsys, "eval", "smollm2", "--policy", tmp_path / "p.pt", *flags)
    _one_line_error(code, err, needle)


def test_cli_policy_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", tmp_path / "m.gguf", "--attn-keep", "0.5", "--mlp-keep", "0.75",
                           "--bits", "8")
    _one_line_error(code, err, "no --policy given", "solm train")
    code, _, err = run_cli(capsys, "eval", "smollm2", "--policy", tmp_path / "p.pt", "--attn-keep", "0.5",
                           "--mlp-keep", "0.75", "--bits", "8")
    _one_line_error(code, err, "p.pt", "no such policy checkpoint")


def _tiny_model_dir(tmp_path):
    """A tiny Llama with a character-level tokenizer, saved as a Hugging Face directory."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = "?abcdefghijklmnopqrstuvwxyz .,;'\n"
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="?").save_pretrained(path)
    return path


def _tiny_model_and_policy(tmp_path):
    from solm_compile.frontend.models import load

    model_dir = _tiny_model_dir(tmp_path)
    info = load(str(model_dir)).info
    cfg = TrainConfig(ctx=CTX, T=T, policy=PCFG)
    ck = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "model": checkpoint.model_identity(info),
          "train_config": cfg.to_dict(), "grid": GRID.to_dict(), "gate": {}, "policy": _policy().state_dict(),
          "step": 0}
    checkpoint.save(tmp_path / "p.pt", ck)
    return model_dir


def test_cli_task_writes_json_and_markdown(capsys, tmp_path, monkeypatch):
    from solm_compile.data import corpora as data

    def items(task, n, seed):
        assert task == "piqa"
        return [{"context": f"the {w} is", "choices": [" red.", " in the garden.", " a cat"], "label": i % 3}
                for i, w in enumerate(("rose", "hat", "sea", "fox", "bird")[:n])]

    monkeypatch.setattr(data, "multiple_choice", items)
    model_dir = _tiny_model_and_policy(tmp_path)
    code, out, err = run_cli(capsys, "eval", model_dir, "--policy", tmp_path / "p.pt", "--task", "piqa",
                             "--items", "4", "--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "8",
                             "--random-seeds", "2", "--out", tmp_path / "mc")
    assert code == 0, err
    r = json.loads((tmp_path / "mc.json").read_text())
    assert r["task"] == "piqa" and r["items"] == 4 and r["random_seeds"] == 2
    assert set(r["methods"]) == {"dense", "policy", "fixed", "random_median", "random_best", "uniform", "emc", "dac"}
    md = (tmp_path / "mc.md").read_text()
    assert md.count("| piqa (4) |") == len(r["methods"])
    assert "Δacc" in out and "random_best" in out
    assert not list(tmp_path.glob(".mc*"))                   # no scratch left behind


def test_cli_json(capsys, tmp_path):
    model_dir = _tiny_model_and_policy(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text("it is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.\n" * 8)
    code, out, err = run_cli(capsys, "eval", model_dir, "--policy", tmp_path / "p.pt", "--data", text,
                             "--fit-data", text, "--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "8",
                             "--blocks", "4", "--ctx", CTX, "--T", T, "--random-seeds", "2", "--fit-blocks", "2",
                             "--json")
    assert code == 0, err
    r = json.loads(out)
    assert {"methods", "data", "blocks", "targets", "matched_usage", "wall_s"} <= set(r)
    assert r["blocks"] == 4 and r["targets"] == {"attn_keep": 0.5, "mlp_keep": 0.75, "bits": 8.0}
    for m in r["methods"].values():
        assert {"ppl", "ppl_se", "usage", "net_keep", "flops_fraction", "bytes_fraction"} <= set(m)
    code, out, err = run_cli(capsys, "eval", model_dir, "--policy", tmp_path / "p.pt", "--data", text,
                             "--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "8", "--blocks", "4", "--ctx", CTX,
                             "--T", T, "--methods", "uniform,dense", "--json")
    assert code == 0, err
    subset = json.loads(out)["methods"]
    assert set(subset) == {"dense", "policy", "uniform"}
    assert subset["policy"]["ppl"] == pytest.approx(r["methods"]["policy"]["ppl"])   # same blocks, same greedy policy
    code, out, err = run_cli(capsys, "eval", model_dir, "--policy", tmp_path / "p.pt", "--data", text,
                             "--fit-data", text, "--attn-keep", "0.2", "--mlp-keep", "0.75", "--bits", "8")
    _one_line_error(code, err, "--attn-keep 0.2 is below the policy's lowest level 0.25")
    code, out, err = run_cli(capsys, "eval", model_dir, "--policy", tmp_path / "p.pt", "--data", text,
                             "--fit-data", text, "--sweep", "--out", tmp_path / "sweep", "--blocks", "2", "--ctx", CTX,
                             "--T", "4", "--random-seeds", "1", "--fit-blocks", "1")
    assert code == 0, err
    r = json.loads((tmp_path / "sweep.json").read_text())
    assert len(r["points"]) >= 8 and all("policy" in p["methods"] and "fixed" in p["methods"] for p in r["points"])
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "sweep.md").read_text().count("| policy |") == len(r["points"])
