"""`solm serve` on a step-protocol-2 artifact (issue 19): concurrent requests with different prompts, budgets and
lengths are batched into one run per token and each answer equals ``SolmSession.generate`` alone (the independent
reference: no batching); the KV-memory budget caps the rows (hand-derived bytes), and requests beyond them wait and
still complete. With SOLM_REQUIRE_EP=1 these fail, not skip, when SolmEP is missing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from require import need_ep
from serve_helpers import TIMEOUT_S, post
from solm_compile.errors import UserError
from solm_compile.runtime import ep

REQS = [(12, 9, (0.5, 0.75, 16)), (31, 5, (1.0, 1.0, 16)), (20, 12, (0.3, 0.5, 8)), (44, 7, (0.6, 1.0, 16))]


@pytest.fixture(scope="module")
def solm_session(step_artifacts):
    pytest.importorskip("fastapi", reason="solm serve needs the serve extra")
    need_ep(ep.library_path() is not None)
    from solm_compile.runtime.session import SolmSession

    return SolmSession(step_artifacts["solm"], threads=1)


def _prompt(n: int, seed: int) -> str:
    return " ".join(f"w{i}" for i in np.random.default_rng(seed).integers(1, 160, n))


def _clamp(sess, budget):
    return tuple(min(max(v, lo), hi) for v, (lo, hi) in zip(budget, sess.meta["budget_ranges"]))


def _serve_all(sess, config) -> list:
    """Every REQS request at once (one thread each): the completions' (status, body)."""
    from solm_compile.serve import background, create_app

    got = [None] * len(REQS)
    with background(create_app(sess, config)) as url:
        def one(i):
            n, max_tokens, budget = REQS[i]
            b = dict(zip(("attn_keep", "mlp_keep", "bits"), _clamp(sess, budget)))
            got[i] = post(url + "/v1/completions", {"prompt": _prompt(n, i), "max_tokens": max_tokens,
                                                    "temperature": 0, **b})
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(REQS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT_S)
    return got


def test_concurrent_requests_in_one_batch_equal_generate_alone(solm_session):
    from solm_compile.runtime.batch import Batch
    from solm_compile.serve import ServeConfig

    got = _serve_all(solm_session, ServeConfig(context=128, max_active=4, timeout_s=60.0))
    assert isinstance(solm_session.batch(1, 16), Batch)       # this artifact is served batched
    for i, (n, max_tokens, budget) in enumerate(REQS):
        want = solm_session.generate(_prompt(n, i), max_tokens, _clamp(solm_session, budget), greedy=True, chat=False)
        status, body = got[i]
        assert status == 200, body
        assert body["choices"][0]["text"] == want.text, f"request {i}"
        assert [p["action"] for p in body["solm"]["per_token"]] == want.actions, f"request {i}"


def test_the_kv_budget_caps_the_rows_and_the_rest_wait(solm_session):
    from solm_compile.serve import ServeConfig
    from solm_compile.serve.scheduler import MIB, batch_rows

    meta = solm_session.meta
    S, layers, hkv, d = meta["gate"]["page_size"], meta["num_layers"], meta["kv_heads"], meta["head_dim"]
    # one row of 128 positions: keys and values in float16 (2 bytes) per layer and head, and the page min and max
    # of its 128/S pages (float16 too: step protocol 3)
    per_row = 128 * layers * hkv * d * 2 * 2 + (128 // S) * layers * hkv * d * 2 * 2
    assert solm_session.kv.row_bytes(128) == per_row
    assert batch_rows(solm_session, 4, 128, 2.5 * per_row / MIB) == 2
    assert batch_rows(solm_session, 4, 128, None) == 4
    with pytest.raises(UserError, match=r"--kv-budget .* holds no request: one row of --context 128 needs"):
        batch_rows(solm_session, 4, 128, 0.5 * per_row / MIB)
    with pytest.raises(UserError, match="--kv-budget must be > 0 MiB, got 0"):
        ServeConfig(kv_budget_mb=0)
    got = _serve_all(solm_session, ServeConfig(context=128, max_active=4, max_queue=8, timeout_s=60.0,
                                               kv_budget_mb=2.5 * per_row / MIB))
    assert [status for status, _ in got] == [200] * len(REQS)                  # two waited for a row, none refused


def test_a_long_prompt_is_prefilled_between_the_running_requests_steps(step_artifacts):
    """The scheduler prefills a joining prompt one run at a time (16 tokens here) and steps the running request
    between its runs, instead of stalling it for the whole prefill; both answers still equal generate alone."""
    import asyncio
    import time

    need_ep(ep.library_path() is not None)
    from solm_compile.runtime.batch import Batch
    from solm_compile.runtime.session import SolmSession
    from solm_compile.serve.protocol import GenRequest
    from solm_compile.serve.scheduler import Scheduler

    sess = SolmSession(step_artifacts["solm"], threads=1, prefill_chunk=16)
    rng = np.random.default_rng(7)
    short, long_ = rng.integers(1, 160, 5).tolist(), rng.integers(1, 160, 70).tolist()   # 1 and 5 prefill runs
    req = lambda ids, n: GenRequest(tuple(ids), n, 0.0, (), None, (1.0, 1.0, 16.0), False, False)  # noqa: E731
    loop = asyncio.new_event_loop()
    sched = Scheduler(sess, max_active=2, max_queue=2, timeout_s=60, context=128)
    events, jobs = [], {}
    step, advance = sched.batch.step, sched.batch.advance
    assert isinstance(sched.batch, Batch)

    def spy_step(tokens):
        events.append(("step", tuple(sorted(tokens))))
        if "long" not in jobs:                       # the long request arrives while the short one runs
            jobs["long"] = sched.submit(req(long_, 6), loop)
        return step(tokens)

    def spy_advance(slot):
        events.append(("advance", slot))
        return advance(slot)

    sched.batch.step, sched.batch.advance = spy_step, spy_advance
    jobs["short"] = sched.submit(req(short, 30), loop)
    sched.start()
    deadline = time.monotonic() + 60
    time.sleep(0.2)
    while time.monotonic() < deadline and (len(jobs) < 2 or sched.counts() != (0, 0)):
        time.sleep(0.05)
    sched.close()
    loop.run_until_complete(asyncio.sleep(0))        # deliver the events the worker queued
    got = {}
    for name, job in jobs.items():
        evs = []
        while not job.events.empty():
            evs.append(job.events.get_nowait())
        got[name] = [e[1]["token"] for e in evs if e[0] == "token"]
        assert evs[-1][0] == "done", (name, evs[-1])
    loop.close()
    long_slot = next(s for kind, s in events if kind == "advance" and s != 0)
    runs = [i for i, (kind, s) in enumerate(events) if kind == "advance" and s == long_slot]
    assert len(runs) == 5, events
    between = [e for e in events[runs[0]:runs[-1]] if e[0] == "step"]
    assert len(between) >= 3 and all(0 in rows for _, rows in between), events   # the short one kept stepping
    for name, ids, n in (("short", short, 30), ("long", long_, 6)):
        want = [int(st["token"][0]) for st in list(sess.steps([ids], (1.0, 1.0, 16.0), max_new_tokens=n))[1:]]
        k = min(len(want), len(got[name]))                                     # (an EOS may end it early)
        assert k >= 3 and got[name][:k] == want[:k], (name, got[name], want)


def test_the_servers_prefill_chunk_reaches_its_session_and_must_fit_the_pages(step_artifacts):
    """``ServeConfig.prefill_chunk`` (``solm serve --prefill-chunk``) is the chunk the session prefills a joining
    prompt in; a chunk of 1 is refused at construction, and one that is not a multiple of the artifact's page size
    (the batch would prefill every prompt in one run) is refused when the scheduler is built."""
    need_ep(ep.library_path() is not None)
    from solm_compile.runtime.session import SolmSession
    from solm_compile.serve import ServeConfig
    from solm_compile.serve.scheduler import Scheduler

    with pytest.raises(UserError, match="--prefill-chunk"):
        ServeConfig(prefill_chunk=1)
    sess = SolmSession(step_artifacts["solm"], **ServeConfig(threads=1, prefill_chunk=32).session_options)
    assert sess.prefill_chunk == 32 and sess.prefill_runs(70) == [(0, 32), (32, 64), (64, 70)]
    Scheduler(sess, max_active=2, max_queue=2, timeout_s=60, context=128)        # 32: a multiple of the pages
    page = int(sess.meta["gate"]["page_size"])
    assert page > 1                                                              # the fixture's pages hold several
    odd = SolmSession(step_artifacts["solm"], **ServeConfig(threads=1, prefill_chunk=page + 1).session_options)
    with pytest.raises(UserError, match=f"not a multiple of .* page size {page}"):
        Scheduler(odd, max_active=2, max_queue=2, timeout_s=60, context=128)


def test_solm_serve_spin_reaches_the_onnxruntime_session(step_artifacts):
    """``solm serve --spin`` (``ServeConfig.spin``) is the session's ``session.intra_op.allow_spinning``; off by
    default (an idle spinning thread keeps a core busy on a shared machine)."""
    from solm_compile.cli.app import build_parser
    from solm_compile.runtime.session import SolmSession
    from solm_compile.serve import ServeConfig

    key = "session.intra_op.allow_spinning"
    parse = build_parser().parse_args
    assert parse(["serve", "a.onnx"]).spin is False and parse(["serve", "a.onnx", "--spin"]).spin is True
    for spin, entry in ((False, "0"), (True, "1")):
        sess = SolmSession(step_artifacts["solm"], **ServeConfig(threads=1, spin=spin).session_options)
        assert sess.sess.get_session_options().get_session_config_entry(key) == entry
