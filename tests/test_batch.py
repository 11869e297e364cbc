"""Continuous batching (step protocol 2, runtime/batch.py): rows of different prompt lengths, budgets and join times
in one run per step, one row leaving and a new one joining its slot mid-way, equal separate B = 1 generations
(``SolmSession.steps``, one row at a time: no batching) token for token at the dense budget, action for action (and
token for token) at sparse ones, for both SolmEP kinds. A NaN written into a left row's stale KV and page rows reaches
no other row. With SOLM_REQUIRE_EP=1 these fail, not skip, when SolmEP is missing."""

from __future__ import annotations

import numpy as np
import pytest

from require import need_ep
from solm_compile.errors import UserError
from solm_compile.runtime import ep
from solm_compile.runtime.batch import Batch, RowByRow
from solm_compile.runtime.session import SolmSession

RNG = np.random.default_rng(19)
# (prompt length, join step, tokens to generate, sparse budget): 5 requests on 4 rows; request 1 leaves after its 4
# tokens (step 4) and request 4 joins its freed slot at step 6; request 3's 4-token prompt keeps its first steps
# dense (L <= ts + tw + 1) while the others' are controlled
REQUESTS = [(33, 0, 14, (0.5, 0.75, 16)), (41, 0, 4, (0.3, 0.5, 8)), (47, 2, 11, (1.0, 0.5, 16)),
            (4, 3, 9, (0.6, 0.5, 16)), (45, 6, 8, (0.4, 0.6, 16))]
PROMPTS = [RNG.integers(1, 160, n).tolist() for n, _, _, _ in REQUESTS]
DENSE = (1.0, 1.0, 16.0)


@pytest.fixture(scope="module")
def sessions(step_artifacts):
    need_ep(ep.library_path() is not None)
    return {kind: SolmSession(step_artifacts[kind], threads=1, tokenizer=False) for kind in ("solm", "fixed")}


def within(sess, budget) -> tuple:
    """The budget clamped to the artifact's ranges (a random policy's grid may start above a level used here)."""
    return tuple(min(max(v, lo), hi) for v, (lo, hi) in zip(budget, sess.meta["budget_ranges"]))


def separate(sess, prompt, budget, n) -> tuple[list, list, list]:
    """One request alone (B = 1, greedy): (fed tokens, actions, logits) per decode step."""
    toks, acts, logits = [], [], []
    for step in list(sess.steps([prompt], budget, max_new_tokens=n))[1:]:
        toks.append(int(step["token"][0]))
        acts.append(None if step["action"] is None else int(step["action"][0]))
        logits.append(step["logits"][0])
    return toks, acts, logits


def batched(sess, budgets, poison: bool = False, interleave: bool = False) -> tuple[dict, dict]:
    """Every request through one ``Batch`` of 4 rows on the REQUESTS schedule: ({request: (tokens, actions,
    logits)}, {request: slot}). ``poison``: NaN into every buffer row of the slot request 1 leaves. ``interleave``:
    joins as a server makes them: ``begin``, then one ``advance`` (one prefill run) per step of the live rows."""
    b = sess.batch(4, capacity=80)
    assert isinstance(b, Batch)
    live, done, slots, filling, waiting = {}, {}, {}, {}, []
    for t in range(80):
        for i, (_, join, _, _) in enumerate(REQUESTS):
            if join == t and interleave:
                waiting.append(i)                     # joins once a slot is free (its rows fill more slowly)
            elif join == t:
                slot, logits = b.join(PROMPTS[i], budgets[i])
                live[slot], slots[i] = [i, logits, [], [], []], slot
        while waiting and b.free:
            i = waiting.pop(0)
            filling[b.begin(PROMPTS[i], budgets[i])] = i
        if filling:                                   # one run of the oldest joining prompt
            slot, i = next(iter(filling.items()))
            logits = b.advance(slot)
            if logits is not None:
                del filling[slot]
                live[slot], slots[i] = [i, logits, [], [], []], slot
        if not live and not filling and not waiting and t >= max(r[1] for r in REQUESTS):
            break
        if not live:
            continue
        tokens = {slot: int(np.argmax(row[1])) for slot, row in live.items()}
        out = b.step(tokens)
        for slot in list(live):
            row = live[slot]
            row[1] = out[slot]["logits"]
            row[2].append(tokens[slot])
            row[3].append(out[slot]["action"])
            row[4].append(out[slot]["logits"])
            if len(row[2]) == REQUESTS[row[0]][2]:
                done[row[0]] = tuple(row[2:])
                b.leave(slot)
                del live[slot]
                if poison and row[0] == 1:
                    for buf in b.buffers.values():
                        buf[slot] = np.nan
    return done, slots


@pytest.mark.parametrize("kind", ["solm", "fixed"])
@pytest.mark.parametrize("budget", ["dense", "sparse"])
def test_a_mixed_batch_equals_separate_runs(sessions, kind, budget):
    sess = sessions[kind]
    budgets = [DENSE if budget == "dense" else within(sess, r[3]) for r in REQUESTS]
    got, slots = batched(sess, budgets)
    assert slots[4] == slots[1]                       # the late request reused the slot request 1 left
    for i, (n, _, steps, _) in enumerate(REQUESTS):
        toks, acts, logits = separate(sess, PROMPTS[i], budgets[i], steps)
        assert got[i][0] == toks, f"request {i} (prompt {n}): tokens"
        assert got[i][1] == acts, f"request {i}: actions"
        np.testing.assert_allclose(np.stack(got[i][2]), np.stack(logits), rtol=1e-4, atol=1e-4,
                                   err_msg=f"request {i}: logits")
    if budget == "sparse" and kind == "solm":         # the policy acted: not every step at the dense action
        assert any(a != sess.meta["dense_action"] for i in got for a in got[i][1])


@pytest.mark.parametrize("kind", ["solm", "fixed"])
def test_nan_in_a_left_rows_stale_cache_reaches_no_other_row(sessions, kind):
    sess = sessions[kind]
    budgets = [within(sess, r[3]) for r in REQUESTS]
    clean, _ = batched(sess, budgets)
    poisoned, _ = batched(sess, budgets, poison=True)
    for i in clean:                                  # request 4 reuses the poisoned slot: its stale rows unread
        assert poisoned[i][0] == clean[i][0] and poisoned[i][1] == clean[i][1], f"request {i}"
        assert np.isfinite(np.stack(poisoned[i][2])).all(), f"request {i}: NaN reached its logits"
        np.testing.assert_array_equal(np.stack(poisoned[i][2]), np.stack(clean[i][2]))


@pytest.mark.parametrize("kind", ["solm", "fixed"])
def test_prompts_prefilled_a_run_at_a_time_between_steps_equal_separate_runs(step_artifacts, kind):
    """Runs of 16 tokens (2 pages of 8): every prompt but the 4-token one takes 3 runs, each between two steps of
    the live rows, whose run writes the joining slot's next position with a placeholder (batch.py's doc); the rows
    still equal their separate runs (the same 16-token prefill runs), tokens, actions and logits."""
    need_ep(ep.library_path() is not None)
    sess = SolmSession(step_artifacts[kind], threads=1, tokenizer=False, prefill_chunk=16)
    budgets = [within(sess, r[3]) for r in REQUESTS]
    got, _ = batched(sess, budgets, interleave=True)
    assert sorted(got) == list(range(len(REQUESTS)))
    for i, (n, _, steps, _) in enumerate(REQUESTS):
        toks, acts, logits = separate(sess, PROMPTS[i], budgets[i], steps)
        assert got[i][0] == toks and got[i][1] == acts, f"request {i} (prompt {n})"
        np.testing.assert_allclose(np.stack(got[i][2]), np.stack(logits), rtol=1e-4, atol=1e-4,
                                   err_msg=f"request {i}: logits")


def test_a_batch_refuses_what_does_not_fit_in_one_line(sessions, step_artifacts):
    b = sessions["solm"].batch(1, capacity=16)
    with pytest.raises(UserError, match="leaves no room"):
        b.join(list(range(1, 17)), DENSE)
    b.join([1, 2, 3], DENSE)
    with pytest.raises(UserError, match=r"the batch is full \(1 rows\)"):
        b.join([1, 2, 3], DENSE)
    portable = SolmSession(step_artifacts["portable"], threads=1, tokenizer=False)
    assert isinstance(portable.batch(2, 64), RowByRow)          # protocol 1: stepped row by row
    with pytest.raises(UserError, match="needs step protocol 2"):
        Batch(portable, 2, 64)
