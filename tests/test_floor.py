"""The static floor (issue 18): per-layer allocation by hand, the calibration against a plain loop, the static
policy file, and the floor chosen on calibration text only."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from solm_compile.errors import UserError
from solm_compile.eval import floor as fl
from solm_compile.policy.actions import GRID27
from test_genres import fake_sources  # noqa: F401 (fixture)
from tiny_lm import gated_tiny_llama, random_blocks

LEVELS = (0.25, 0.5, 1.0)
# KL of layer l at keep 0.25 / 0.5 / 1: layers 0 and 1 convex, layer 2 not (0.5 is above its hull)
KL = torch.tensor([[4.0, 1.0, 0.0], [2.0, 0.5, 0.0], [8.0, 6.0, 0.0]], dtype=torch.float64)


def test_allocation_by_hand():
    # target mean 0.5: 1.5 keep for 3 layers, 0.75 above the all-0.25 start. KL saved per unit keep:
    #   layer 0: 0.25→0.5 (4−1)/0.25 = 12, then 0.5→1 (1−0)/0.5 = 2
    #   layer 1: 0.25→0.5 6, then 1
    #   layer 2: 0.5 is off its hull (8→6 saves 8/unit, 6→0 saves 12/unit): 0.25→1 directly, 8/0.75 = 10.67
    # buy layer 0 to 0.5 (12; 0.5 left), then layer 2's 10.67 with the 0.5 left: layer 2 at 0.75
    assert fl.allocate(LEVELS, KL, 0.5) == pytest.approx([0.5, 0.25, 0.75])
    # target 0.75: 2.25 keep, 1.5 above the start: layer 0 → 0.5 (12; 1.25 left), layer 2 → 1 (10.67; 0.5 left),
    # layer 1 → 0.5 (6; 0.25 left), then layer 0's 2 beats layer 1's 1: layer 0 at 0.5 + 0.25
    assert fl.allocate(LEVELS, KL, 0.75) == pytest.approx([0.75, 0.5, 1.0])
    assert fl.allocate(LEVELS, KL, 0.2) == [0.25] * 3 and fl.allocate(LEVELS, KL, 1.0) == [1.0] * 3


def test_allocation_is_no_worse_than_brute_force():
    # independent reference: every allocation on a 1/16 grid whose mean is the target, KL by np.interp
    grid = np.arange(4, 17) / 16
    for target in (0.375, 0.5, 0.625, 0.8125):
        best = min(sum(np.interp(k, LEVELS, KL[i].numpy()) for i, k in enumerate(ks))
                   for ks in itertools.product(grid, repeat=3) if abs(sum(ks) - 3 * target) < 1e-9)
        got = fl.allocate(LEVELS, KL, target)
        assert sum(got) == pytest.approx(3 * target)
        assert sum(np.interp(k, LEVELS, KL[i].numpy()) for i, k in enumerate(got)) <= best + 1e-9, target


def test_layer_controls_match_the_target_mean_and_leave_dense_steps_dense():
    costs = fl.LayerCosts((LEVELS, (0.5, 0.75, 1.0)), (KL, torch.tensor([[1.0, 0.2, 0], [0.5, 0.1, 0],
                                                                          [3.0, 2.0, 0]], dtype=torch.float64)), 2, 3)
    mask = torch.tensor([[False, True, True, True]] * 2)
    ctl = fl.layer_controls(costs, (0.5, 0.75, 0.5), mask)                       # [2, 4, 3, 3]
    assert ctl.shape == (2, 4, 3, 3)
    assert torch.equal(ctl[:, 0], torch.tensor([1.0, 1.0, 16.0]).repeat(2, 3, 1))
    assert ctl[:, 1:, :, 0].tolist() == [[[0.5, 0.25, 0.75]] * 3] * 2
    assert ctl[:, 1:, :, 1].mean(-1).allclose(torch.tensor(0.75))
    assert (ctl[:, 1:, :, 2] == 8.0).all()                                     # bits 0.5 · 16, every layer


def test_calibration_equals_a_plain_loop():
    lm, grid = gated_tiny_llama(0), GRID27
    ctx, steps = 20, 2
    blocks = random_blocks(2, ctx + steps + 1, seed=4)
    costs = fl.fit_layer_costs(lm, blocks, grid, ctx, steps, batch_rows=3)
    L = lm.info.num_layers
    for a, lvs in enumerate((grid.kappa_levels, grid.rho_levels)):
        for li, lv in enumerate(lvs[:-1]):
            for layer in range(L):
                total = 0.0
                for b in range(2):                                         # the reference: one variant at a time
                    _, _, cache = lm.prefill(blocks[b:b + 1, :ctx])
                    for t in range(steps):
                        ids = blocks[b:b + 1, ctx + t, None]
                        c = torch.tensor([[1.0, 1.0, 16.0]] * L)
                        c[layer, a] = lv
                        sp, _, _ = lm.step(ids, cache, c[None, :, 0], c[None, :, 1], c[None, :, 2])
                        de, _, cache = lm.step(ids, cache, torch.ones(1), torch.ones(1), torch.full((1,), 16.0))
                        p, q = torch.log_softmax(de[0, 0].double(), -1), torch.log_softmax(sp[0, 0].double(), -1)
                        total += float((p.exp() * (p - q)).sum())
                assert costs.kl[a][layer, li] == pytest.approx(total / 4, rel=1e-4, abs=1e-9)
        assert (costs.kl[a][:, -1] == 0).all()
    assert costs.kl[0][:, 0].sum() > 0                                           # sparsifying does cost something


def test_static_file_round_trip_and_refusals(tmp_path):
    costs = fl.LayerCosts((LEVELS, LEVELS), (KL, KL * 2), 8, 4)
    ident = {"architecture": "X", "hidden_size": 8, "num_layers": 3, "vocab_size": 9, "weights_hash": "ab"}
    path = tmp_path / "floor.json"
    fl.save_static(path, costs, ident, "tiny", {"data": "mixture validation", "mixture": {"salt": "s"}})
    back, d = fl.load_static(path, ident)
    assert back.levels == costs.levels and all(torch.allclose(x, y) for x, y in zip(back.kl, costs.kl))
    assert d["calibration"]["mixture"] == {"salt": "s"} and d["model_name"] == "tiny"
    with pytest.raises(UserError, match="floor.json: calibrated for tiny"):
        fl.load_static(path, {**ident, "weights_hash": "cd"})
    with pytest.raises(UserError, match="floor.json: calibrated with ρ on x .*not on h"):     # no gate recorded: x
        fl.load_static(path, ident, "h")
    h_path = tmp_path / "floor-h.json"
    fl.save_static(h_path, costs, ident, "tiny", {"gate": {"mlp_skip": "h"}})
    assert fl.load_static(h_path, ident, "h")[1]["calibration"]["gate"] == {"mlp_skip": "h"}
    with pytest.raises(UserError, match="floor-h.json: calibrated with ρ on h"):
        fl.load_static(h_path, ident)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="bad.json: not a readable static policy"):
        fl.load_static(tmp_path / "bad.json", ident)


def test_floor_is_the_best_on_calibration():
    assert fl.choose_floor({"uniform": 12.0, "schedule": 11.5, "layers": 11.9}) == "schedule"
    assert fl.choose_floor({"uniform": 11.0, "schedule": 11.0, "layers": 11.0}) == "uniform"   # ties: simpler
    assert fl.choose_floor({"uniform": 11.0, "layers": 10.0, "policy": 1.0}) == "layers"      # only static ones


# ---------------------------------------------------------------------------------------------- solm eval
def _eval(capsys, *argv):
    from solm_compile.cli import app as cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_cli_floor_and_policy_static(capsys, tmp_path, fake_sources):  # noqa: F811
    from test_evaluate import CTX, T, _tiny_model_and_policy

    model_dir = _tiny_model_and_policy(tmp_path)
    texts = []
    for i, words in enumerate(("it is a truth universally acknowledged, that a single man must want a wife.\n",
                               "the quick brown fox jumps over the lazy dog; pack my box with jugs.\n")):
        texts.append(tmp_path / f"text{i}.txt")
        texts[-1].write_text(words * 12)
    static = tmp_path / "floor.json"
    flags = ("--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "8", "--blocks", "3", "--ctx", CTX, "--T", T,
             "--fit-blocks", "2", "--calib-blocks", "3", "--calib-steps", "2", "--json")
    runs = []
    for text in texts:
        runs.append(_eval(capsys, "eval", model_dir, "--policy", tmp_path / "p.pt", "--data", text, "--fit-data",
                          texts[0], "--floor", static, "--methods", "dense,uniform,schedule,layers,floor", *flags))
        if len(runs) == 1:
            written = static.read_text()
    r = runs[0]["methods"]
    assert set(r) == {"dense", "policy", "uniform", "schedule", "layers", "floor"}
    floor = r["floor"]
    cal = floor["calibration_ppl"]
    assert floor["floor_of"] == min(("uniform", "schedule", "layers"), key=lambda m: cal[m])
    assert floor["ppl"] == r[floor["floor_of"]]["ppl"] and floor["calibration_blocks"] == 3
    d = json.loads(written)
    assert d["format"] == "solm-static-policy" and d["model_name"] == "tiny"
    assert d["calibration"]["mixture"]["train_genres"] == ["fiction", "qa", "encyclopedic"]
    assert static.read_text() == written                                # the second run loaded it, unchanged
    assert runs[1]["methods"]["floor"]["calibration_blocks"] == 3
    # --policy static: the floor alone, matched to the targets themselves
    stat = [_eval(capsys, "eval", model_dir, "--policy", "static", "--data", text, "--fit-data", texts[0],
                  "--floor", static, *flags) for text in texts]
    s = stat[0]
    assert set(s["methods"]) == {"dense", "floor"} and s["policy"] == "static"
    assert s["matched_usage"] == {"attn_keep": 0.5, "mlp_keep": 0.75, "bits": 8.0}
    assert s["methods"]["floor"]["floor_of"] in ("uniform", "schedule", "layers")
    u = s["methods"]["floor"]["usage"]
    assert (u["attn_keep"], u["mlp_keep"], u["bits"]) == pytest.approx((0.5, 0.75, 8.0))
    # chosen on calibration text only: another evaluated text, the same choice and calibration numbers
    assert stat[1]["methods"]["floor"]["calibration_ppl"] == s["methods"]["floor"]["calibration_ppl"]
    assert stat[1]["methods"]["floor"]["floor_of"] == s["methods"]["floor"]["floor_of"]
    assert stat[1]["methods"]["floor"]["ppl"] != s["methods"]["floor"]["ppl"]
