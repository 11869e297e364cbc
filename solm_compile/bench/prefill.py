"""``solm bench --prefill``: the time to prefill ``context`` tokens with each artifact, side by side.

Multi-token calls are dense by the ops' semantics (solm_compile/reference.py), whatever the budget fed, so the goal
is parity: the solm and fixed artifacts on SolmEP (fed the bench's budget, as ``SolmSession.steps`` does) no slower
than the dense artifact on the stock CPU provider. Per (context, threads):
one untimed prefill per session, then ``reps`` repetitions, each running every session's prefill once in a rotated
order; a row's time is the median. Rows have ``mode`` "prefill", ``tok_s`` = context / time, ``ratio`` = the dense
prefill's time / the row's, ``ideal_ratio`` 1.
"""

from __future__ import annotations

import statistics
import time

from solm_compile.bench.sessions import MODES, SESSIONS, prefill_feeds
from solm_compile.bench.measure import rss_mb

# session name -> row variant: the sessions a decode block already opened, in a fixed order
_VARIANTS = {"dense": "dense", "solm": "solm", "fixed": "solm-fixed", "portable": "portable"}


def prefill_rows(bench, context: int, threads: int) -> list[dict]:
    """One row per session that prefills (dense, solm, fixed, portable) at (context, threads)."""
    cfg = bench.cfg
    sessions = bench.sessions(threads)
    names = [n for n in _VARIANTS if n in sessions and n in {MODES[m][2] for m in cfg.modes()}]
    ids = bench.token_ids[:context]
    feeds = {n: prefill_feeds(sessions[n], ids, cfg.budget) for n in names}
    for n in names:                                   # untimed: first-use allocations at this length
        sessions[n]._run(feeds[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(cfg.reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            sessions[n]._run(feeds[n])
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    proc_rss = rss_mb()
    return [{"context": context, "threads": threads, "variant": _VARIANTS[n], "mode": "prefill",
             "kind": SESSIONS[n][0], "provider": sessions[n].sess.get_providers()[0],
             "tok_s": context / med[n], "step_ms": med[n] * 1e3, "ratio": med["dense"] / med[n], "ideal_ratio": 1.0,
             "pct_of_ideal": 100.0 * med["dense"] / med[n], "model_gb_s": None,
             "usage": {"attn_keep": 1.0, "mlp_keep": 1.0, "bits": 16.0},
             "policy_ms": None, "policy_pct": None, "policy_profile_ms": None, "policy_profile_pct": None,
             "rss_mb": None, "process_rss_mb": proc_rss, "reps": cfg.reps, "steps": 1,
             "step_ms_reps": [t * 1e3 for t in times[n]]} for n in names]
