"""The ``solm eval`` baselines on inputs small enough to work out by hand (issue 21).

``test_evaluate.py`` checks that every baseline spends the policy's usage; here each baseline's exact choice per
row and step is derived in the comments from its definition (``baselines.py``'s docstring,
shared/research/sol_method.md §7) and asserted. The grid is the default 3-level one:
κ ∈ {0.25, 0.5, 1}, ρ ∈ {0.5, 0.75, 1}, bits ∈ {5, 8, 16} (b/16 ∈ {0.3125, 0.5, 1}).
"""

from __future__ import annotations

import pytest
import torch

from tiny_lm import FakeGatedLM
from solm_compile.eval import baselines as bl
from solm_compile.eval.evaluate import PPLEvaluator
from solm_compile.eval.sources import StepInputs
from solm_compile.policy.actions import GRID27
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy

GRID = GRID27
H, L = 1.0, 0.5          # (readability in the tables below)


def test_two_nearest_by_hand():
    lv = GRID.kappa_levels                                   # 0.25, 0.5, 1
    assert bl.two_nearest(lv, 0.65) == pytest.approx((0.5, 1.0, 0.3))   # 0.5 + 0.3·(1 − 0.5) = 0.65
    assert bl.two_nearest(lv, 0.5) == (0.5, 0.5, 0.0)        # on a level: that level alone
    assert bl.two_nearest(lv, 0.1) == (0.25, 0.25, 0.0)      # below the grid: the lowest level
    assert bl.two_nearest(lv, 1.2) == (1.0, 1.0, 1.0)        # above: the highest


# ---------------------------------------------------------------------------------------------- open loop
# 4 rows × 4 steps; step 0 does not count (L ≤ ts+tw+1: with ctx 6 and min_len 7, L = 7 at t = 0, then 8, 9, 10).
# Matched usage (κ̄, ρ̄, b̄/16) = (0.65, 0.8, 0.59375 = 9.5 bits). n = 4: the axes' round-robin offsets are
# 0, n//3 = 1 and 2n//3 = 2. Uncounted entries are dense (1, 1, 16).
USAGE = (0.65, 0.8, 0.59375)
CTX, T = 6, 4

# fixed, κ: levels 0.5 | 1, p_hi = 0.3. The high count up to step t is round(p·entries so far) = ⌊p·m + ½⌋:
#   t1: ⌊0.3·4 + ½⌋ = 1 → 1 high, rows from pointer 0: row 0; pointer → 1
#   t2: ⌊0.3·8 + ½⌋ = 2 → 1 more: row 1; pointer → 2
#   t3: ⌊0.3·12 + ½⌋ = 4 → 2 more: rows 2, 3; pointer → 0      (mean (4·1 + 8·0.5)/12 = 0.667)
FIXED_K = [[1, H, L, L], [1, L, H, L], [1, L, L, H], [1, L, L, H]]
# fixed, ρ: levels 0.75 | 1, p_hi = 0.05/0.25 = 0.2, pointer starts at 1:
#   t1: ⌊0.8 + ½⌋ = 1 → row 1;  t2: ⌊1.6 + ½⌋ = 2 → row 2;  t3: ⌊2.4 + ½⌋ = 2 → none   (mean 9.5/12 = 0.792)
FIXED_R = [[1, .75, .75, .75], [1, 1, .75, .75], [1, .75, 1, .75], [1, .75, .75, .75]]
# fixed, bits: 9.5 between levels 8 | 16, p_hi = 1.5/8 = 0.1875, pointer starts at 2:
#   t1: ⌊0.75 + ½⌋ = 1 → row 2;  t2: ⌊1.5 + ½⌋ = 2 → row 3;  t3: ⌊2.25 + ½⌋ = 2 → none   (mean 112/12 = 9.33)
FIXED_B = [[16, 8, 8, 8], [16, 8, 8, 8], [16, 16, 8, 8], [16, 8, 16, 8]]
# uniform: κ = 0.65 and ρ = 0.8 on every counted step; bits: 9.5 between the integers 9 | 10, p_hi = ½, from row 2:
#   t1: ⌊2 + ½⌋ = 2 → rows 2, 3;  t2: ⌊4 + ½⌋ = 4 → 2 more: rows 0, 1;  t3: ⌊6 + ½⌋ = 6 → rows 2, 3   (mean 9.5)
UNI_K = [[1, .65, .65, .65]] * 4
UNI_R = [[1, .8, .8, .8]] * 4
UNI_B = [[16, 9, 10, 9], [16, 9, 10, 9], [16, 10, 9, 10], [16, 10, 9, 10]]
ONE, BITS16 = [[1, 1, 1, 1]] * 4, [[16, 16, 16, 16]] * 4
WANT = {"fixed": (FIXED_K, FIXED_R, FIXED_B), "uniform": (UNI_K, UNI_R, UNI_B),
        "static_attn": (UNI_K, ONE, BITS16),                 # one axis at the uniform setting, the others dense
        "static_mlp": (ONE, UNI_R, BITS16),
        "static_bits": (ONE, ONE, UNI_B)}


def _controls(k, r, b) -> torch.Tensor:
    return torch.stack([torch.tensor(k, dtype=torch.float), torch.tensor(r, dtype=torch.float),
                        torch.tensor(b, dtype=torch.float)], -1)                       # [n, T, 3]


@pytest.fixture(scope="module")
def evaluator():
    lm = FakeGatedLM()                                       # min_len = ts + tw + 1 = 7
    policy = RecurrentActorCriticPolicy(lm.info.hidden_size, GRID.num_actions, PolicyConfig(d_model=16, n_heads=2))
    blocks = torch.zeros(4, CTX + T + 1, dtype=torch.long)
    return PPLEvaluator(lm, policy, GRID, blocks, ctx=CTX, T=T, random_seeds=2,
                        methods=("dense", "policy", "fixed", "random", "uniform", "static_attn", "static_mlp",
                                 "static_bits"))


def test_the_first_step_does_not_count(evaluator):
    assert evaluator.source.mask().tolist() == [[False, True, True, True]] * 4


@pytest.mark.parametrize("name", sorted(WANT))
def test_open_loop_baselines_by_hand(evaluator, name):
    """What ``PPLEvaluator.baselines`` hands each open-loop method (so the name → axes wiring is covered too)."""
    got = evaluator.baselines(USAGE)[name].__self__.values
    torch.testing.assert_close(got, _controls(*WANT[name]), rtol=0, atol=1e-6)


def test_random_is_a_per_row_permutation_of_fixed_by_hand(evaluator):
    fixed = _controls(*WANT["fixed"])
    mask = evaluator.source.mask()
    for k in range(2):
        got = evaluator.baselines(USAGE)[f"random_{k}"].__self__.values
        assert torch.equal(got[:, 0], fixed[:, 0])           # the uncounted step stays dense
        for i in range(4):                                   # row i keeps its own counts per axis
            for a in range(3):
                assert got[i, mask[i], a].sort().values.tolist() == fixed[i, mask[i], a].sort().values.tolist()


# ---------------------------------------------------------------------------------------------- EMC / DAC
# 3 rows × 3 counted steps, targets (κ̄, ρ̄, q̄) = (0.75, 0.625, 0.625), γ = 0.35. Per row and axis, with R the
# counted steps left (this one included) and `spent` the sum of the values taken so far:
#   c_req = (ū·(done + R) − spent)/R; lo < c_req ≤ hi its neighbouring levels; p = (c_req − lo)/(hi − lo);
#   hi iff p + γ(s − ½) ≥ ½; then clamped into [first level ≥ c_min, last level ≤ c_max] (swapped if crossed),
#   c_min = ū·(done + R) − spent − max·(R − 1), c_max = … − min·(R − 1).
# The signal s per row and step (EMC: the normalised entropy of the previous step's logits, uniform → 1 and
# peaked → 0; DAC: the cosine drift ½(1 − cos) of the last two hidden states, equal → 0 and opposite → 1):
#   row 0: 1, 0, 1     row 1: 0, 1, 1     row 2: 0, 0, 0      (shift γ(s − ½) = +0.175 for s = 1, −0.175 for 0)
# κ (levels .25 .5 1, ū .75, total 2.25):
#   row 0: t0 c .75, p .5 → .675 hi = 1;   t1 c (2.25−1)/2 = .625, p .25 → .075 lo = .5;   t2 c .75, p .5 → .675 → 1
#   row 1: t0 p .5 → .325 lo = .5;   t1 c (2.25−.5)/2 = .875, p .75 → .925 → 1 (c_min 2.25−.5−1 = .75: only 1 fits);
#          t2 c .75 → .675 → 1
#   row 2: t0 .5;   t1 c .875, p .75 → .575 → 1;   t2 c .75, p .5 → .325 → .5   (c_min = c_max = .75: .5 | 1 allowed)
# ρ (levels .5 .75 1, ū .625, total 1.875):
#   row 0: t0 c .625, p .5 → .675 → .75;   t1 c (1.875−.75)/2 = .5625, p .25 → .075 → .5 (c_max .625: only .5 fits);
#          t2 c .625, p .5 → .675 → .75
#   row 1: t0 → .325 → .5;   t1 c .6875, p .75 → .925 → .75;   t2 c .625 → .675 → .75
#   row 2: t0 .5;   t1 c .6875, p .75 → .575 → .75;   t2 c .625, p .5 → .325 → .5
# bits (b/16 levels .3125 .5 1, ū .625 = 10 bits, total 1.875):
#   row 0: t0 c .625, p .25 → .425 → .5 (8);   t1 c .6875, p .375 → .2 → .5 (8);   t2 c .875, p .75 → .925 → 1 (16)
#   row 1: t0 → .075 → 8;   t1 c .6875, p .375 → .55 → 16;   t2 c .375 (levels .3125 | .5), p ⅓ → .508 → .5 (8)
#   row 2: t0 → .075 → 8;   t1 c .6875 → .2 → 8;   t2 c .875, p .75 → .575 → 16
HEUR_TARGETS = (0.75, 0.625, 0.625)
HEUR_WANT = [[(1, .75, 8), (L, .5, 8), (1, .75, 16)],
             [(L, .5, 8), (1, .75, 16), (1, .75, 8)],
             [(L, .5, 8), (1, .75, 8), (L, .5, 16)]]
UNIFORM, PEAKED = torch.zeros(4), torch.tensor([30.0, 0.0, 0.0, 0.0])
E_PLUS, E_MINUS = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])


class _Embed:
    """The only part of the LM that DAC reads: token 0 ↦ (1, 0), token 1 ↦ (−1, 0)."""

    def embed(self, ids):
        return torch.stack([E_PLUS, E_MINUS])[ids]


def _drive(kind: str, gamma: float = bl.GAMMA) -> torch.Tensor:
    """The controller over 3 rows × 3 counted steps with the signals of the table: [3 rows, 3 steps, 3]."""
    n, steps = 3, 3
    signals = [[1, 0, 1], [0, 1, 1], [0, 0, 0]]                            # [row][t]
    # EMC: the logits at step t's start (the prefill's, then those observed after step t−1)
    logits = [torch.stack([UNIFORM if signals[i][t] else PEAKED for i in range(n)]) for t in range(steps)]
    # DAC: s0 = drift(embed(last prefill token), embed(first fed token)); then drift(h_{t−1}, h_{t−2}), with
    # h_{−1} the prefill's last hidden state (+ for every row). The hidden states below give the table's signals.
    last_ids, first_ids = torch.tensor([0, 0, 0]), torch.tensor([1, 0, 0])
    hid = [torch.stack([E_PLUS, E_MINUS, E_PLUS]),                         # h_0: drift to h_−1 → 0, 1, 0
           torch.stack([E_MINUS, E_PLUS, E_PLUS])]                         # h_1: drift to h_0 → 1, 1, 0
    mask = torch.ones(n, steps, dtype=torch.bool)
    x = StepInputs(torch.arange(n), E_PLUS.repeat(n, 1), logits[0], last_ids,
                   torch.stack([first_ids, first_ids, first_ids], 1), mask, mask, steps)
    ctl = bl.HeuristicController(kind, _Embed(), GRID, HEUR_TARGETS, gamma=gamma).begin(x)
    out = []
    for t in range(steps):
        a = ctl.act(t, True)
        out.append(a)
        ctl.observe(t, logits[t + 1] if t + 1 < steps else UNIFORM.repeat(n, 1), hid[min(t, 1)], a)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["emc", "dac"])
def test_heuristic_controllers_by_hand(kind):
    got = _drive(kind)
    torch.testing.assert_close(got, torch.tensor(HEUR_WANT, dtype=torch.float), rtol=0, atol=1e-6)


def test_the_feasibility_clamp_by_hand():
    """γ = 1: the signal alone decides (s = 0 → lo, s = 1 → hi whenever p < 1). Row 2, κ: t0 lo = .5; at t1
    c_req = .875, p .75 → .75 − .5 = .25 → lo = .5, but c_min = 2.25 − .5 − 1·1 = .75 leaves only 1: the clamp
    takes 1; t2 c .75, p .5 → 0 → .5. Row 0, κ: t0 s 1 → 1; t1 c .625, s 0 → .5; t2 c .75, s 1 → 1."""
    got = _drive("emc", gamma=1.0)
    assert got[2, :, 0].tolist() == [0.5, 1.0, 0.5]
    assert got[0, :, 0].tolist() == [1.0, 0.5, 1.0]


def test_uncounted_steps_are_dense():
    x = StepInputs(torch.arange(2), torch.zeros(2, 2), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long),
                   torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool),
                   torch.tensor([[False, True], [False, False]]), 2)
    ctl = bl.HeuristicController("emc", _Embed(), GRID, HEUR_TARGETS).begin(x)
    assert ctl.act(0, True).tolist() == [list(bl.DENSE)] * 2               # no row counts at t0
    a = ctl.act(1, True)                                                   # row 0: its only counted step (R = 1)
    assert a[1].tolist() == list(bl.DENSE)
    # row 0, R = 1: c_req is the target itself; κ .75 → .5 | 1, p .5, s = 1 (uniform logits) → 1; ρ .625 → .75;
    # bits .625 → .5 | 1, p .25 → .425 → .5 (8)
    assert a[0].tolist() == [1.0, 0.75, 8.0]
