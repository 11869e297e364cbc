"""The headroom measurement's choosers (solm_compile/bench/oracle.py) on hand-made NLL tables: the oracle keeps
its usage at or under uniform's and never loses to it, finds the obvious trade, and the causal rules are matched."""

from __future__ import annotations

import itertools

import numpy as np

from solm_compile.bench.oracle import SHIFTS, entropy_rule, lagged, oracle_choice, surprisal_rule

U = SHIFTS.index(0.0)


def test_the_oracle_makes_the_obvious_trade():
    # step 0 gains 1 nat from +0.25 and loses nothing at −0.25; step 1 the same; step 2 is indifferent to its shift
    # but −0.25 there pays for one +0.25 elsewhere: the best usage-neutral plan is {+0.25, 0 or −0.25, −0.25}-like
    nll = np.array([[2.0, 2.0, 2.0, 1.5, 1.0],
                    [2.0, 2.0, 2.0, 2.0, 2.0],
                    [2.0, 2.0, 2.0, 2.0, 2.0]])
    pick = oracle_choice(nll)
    shifts = np.asarray(SHIFTS)[pick]
    assert shifts.mean() <= 1e-12 and shifts[0] == 0.25, shifts
    assert nll[np.arange(3), pick].sum() == 5.0


def test_the_oracle_is_within_the_budget_and_never_worse_than_uniform_by_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        nll = rng.gamma(2.0, 1.0, size=(4, len(SHIFTS)))
        pick = oracle_choice(nll)
        got = nll[np.arange(4), pick].sum()
        assert np.asarray(SHIFTS)[pick].mean() <= 1e-12
        assert got <= nll[:, U].sum() + 1e-12
        best = min(sum(nll[i, c] for i, c in enumerate(cs)) for cs in itertools.product(range(len(SHIFTS)), repeat=4)
                   if np.mean([SHIFTS[c] for c in cs]) <= 1e-12)
        assert got >= best - 1e-12          # brute force is the true optimum; the Lagrangian can only match or trail


def test_causal_rules_are_matched_and_look_only_backwards():
    rng = np.random.default_rng(1)
    ent, nll_u = rng.random((6, 9)), rng.random((6, 9))
    for rule in (entropy_rule(ent), surprisal_rule(nll_u)):
        assert (rule[:, 0] == U).all()
        assert abs(np.asarray(SHIFTS)[rule[:, 1:]].mean()) < 1e-12       # half up, half down
    changed = ent.copy()
    changed[:, -1] += 100.0                                              # the last step's entropy: nobody reads it
    assert (entropy_rule(changed) == entropy_rule(ent)).all()
    choice = rng.integers(0, len(SHIFTS), (2, 5))
    assert (lagged(choice)[:, 1:] == choice[:, :-1]).all() and (lagged(choice)[:, 0] == U).all()
