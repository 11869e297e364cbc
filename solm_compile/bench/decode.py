"""``solm bench``: decode-step throughput of a model's dense, solm and portable artifacts, in one process.

    solm bench smollm2 --context 1024,2048 --attn-keep 0.5 --mlp-keep 0.5 --bits 16 --threads 1,2 --json

What it does, per (context, threads):

1. the artifacts: ``dense`` (the original model, stock CPU provider), ``solm`` (``ai.solm`` ops on SolmEP, the
   policy inside), ``portable`` (the same semantics in standard ops, CPU provider) and ``fixed`` (the gated graph
   with the controls as inputs, no policy, on SolmEP) are compiled once and cached under
   ``<solm cache>/bench/<model>-<weights hash>/<kind>-<key>.onnx``; the key hashes the model identity, the gate
   config, the policy file (policy kinds), the solm version and the exporter's sources, so an edit recompiles;
2. one onnxruntime session per artifact with ``intra_op_num_threads = threads``, one inter-op thread and
   ``session.intra_op.allow_spinning = 0`` (spinning threads would steal the other variants' cores);
3. one dense prefill of ``context`` tokens (real text: the held-out Austen novel if it is in the cache, else
   random ids), run once; every timed run starts from a copy of that KV cache;
4. ``warmup`` steps per mode, then ``reps`` repetitions; each repetition runs ``steps`` teacher-forced decode
   steps (the same tokens for every mode) of every mode in turn, the order rotated per repetition. A mode's step
   time is the median over repetitions of (wall time of the repetition's steps / steps); ``tok_s`` is its
   inverse. Timed: the whole step as a runtime does it (IO binding, run, carrying the presents and the policy
   state, reading the controls) — not the token choice (teacher forcing) or the copy of the prefilled cache.

Rows (``variant``, ``mode``):

- ``dense``/``dense``: the baseline; ``ratio`` = tok/s over this row's tok/s at the same (context, threads);
- ``solm``/``policy``: the solm artifact at the budget (``--attn-keep``, ``--mlp-keep``, ``--bits``);
- ``solm``/``fixed``: the ``fixed`` artifact with the controls fed directly (κ, ρ, b constant): the kernels
  alone, the number to hold against the cost model;
- ``solm``/``replay``: the ``fixed`` artifact fed, step by step, the controls the policy chose in the same
  repetition: the same work as ``policy`` without the policy. ``policy_ms`` = median over repetitions of the
  paired per-step difference policy − replay, ``policy_pct`` = its share of the policy row's step time (a
  difference of two noisy timings: its noise is a few % of the step). The precise number comes from one extra
  pass of the solm artifact under onnxruntime's profiler (``--no-profile-policy`` skips it):
  ``policy_profile_ms`` = the kernel time of the policy's nodes per step (the nodes the exporter attributes to
  ``policy.py`` / ``ArtifactStep`` rather than the gated LM) and ``policy_profile_pct`` its share of all node
  time;
- ``solm``/``fixed_kvhead`` (``--per-kv-head``): ``fixed`` with SolmEP's ``select_per_kv_head=1``: pages chosen
  once per KV head for its whole GQA group (coarser than the reference's per-query-head choice, but each kept
  K/V row is read once per group, which is what the cost model counts). A diagnostic, not the reference;
- ``solm``/``dense_budget``: the solm artifact at the dense budget (1, 1, 16): policy runs, every step is dense;
- ``portable``/``policy``: the portable artifact at the budget;
- ``--prefill`` adds, per (context, threads), one row per artifact with ``mode`` ``prefill``: the time to prefill
  ``context`` tokens, ratio to the dense artifact's (bench_prefill.py).

``ideal_ratio`` is the cost model's bytes ratio (``cost.decode_cost`` over ``report.shapes_from_gated``) at the
*realised* controls: Σ_t dense bytes(L_t) / Σ_t bytes(L_t, κ_t, ρ_t, b_t) over the timed steps, L_t the KV
length with the current token. ``pct_of_ideal`` = 100 · ratio / ideal_ratio. ``model_gb_s`` = the cost model's
bytes per step of the row's realised controls / step time: the effective bandwidth the variant reaches against
what it must read (if dense itself is far from the machine's bandwidth, ratios above the ideal are possible).
``usage`` is the mean realised (κ, ρ, bits). ``rss_mb`` is the growth of the process's resident memory while the
row's session was first created and warmed up (sessions are created one after another, for the first thread
count; later thread counts reuse freed pages, so their growth would read low; it is indicative);
``process_rss_mb`` the whole process after the block.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from solm_compile.bench.artifacts import ensure_artifacts, policy_arg, random_policy  # noqa: F401 (random_policy: API)
from solm_compile.bench.measure import (CostTable, Prefilled, _Run, bench_tokens, check_timing,  # noqa: F401
                                        format_table, policy_nodes, profile_share, rss_mb)
from solm_compile.bench.sessions import variants_for, MODES, SESSIONS, prefill_feeds  # noqa: F401 (API)
from solm_compile.errors import UserError

log = logging.getLogger(__name__)

# --variants names -> the artifact kind each needs. "replay" runs whenever both "solm" and "fixed" are selected.
VARIANT_KINDS = {"dense": "dense", "solm": "solm", "portable": "portable", "fixed": "fixed", "dense-budget": "solm"}
DEFAULT_VARIANTS = ("dense", "solm", "fixed", "dense-budget", "portable")
ROW_KEYS = ("context", "threads", "variant", "mode", "kind", "provider", "tok_s", "step_ms", "ratio", "ideal_ratio",
            "pct_of_ideal", "model_gb_s", "usage", "policy_ms", "policy_pct", "policy_profile_ms",
            "policy_profile_pct", "rss_mb", "process_rss_mb", "reps", "steps",
            "step_ms_reps")


@dataclass(frozen=True)
class BenchConfig:
    contexts: tuple[int, ...] = (256, 1024, 2048)
    threads: tuple[int, ...] = (1, 2)
    attn_keep: float = 0.5
    mlp_keep: float = 0.5
    bits: float = 16.0
    reps: int = 5
    steps: int = 32
    warmup: int = 4
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    seed: int = 0
    per_kv_head: bool = False   # also time the fixed artifact with SolmEP's select_per_kv_head=1 (diagnostic)
    profile_policy: bool = True  # one onnxruntime-profiled pass of the solm artifact: the policy nodes' share
    prefill: bool = False       # also time a whole prefill of ``context`` tokens per session (bench_prefill.py)
    device: str = "cpu"         # cuda: the portable and dense artifacts on the CUDA EP (runtime/device.py)

    def __post_init__(self):
        from solm_compile.config import Budget

        object.__setattr__(self, "variants", variants_for(self.device, self.variants, DEFAULT_VARIANTS, VARIANT_KINDS))

        Budget(self.attn_keep, self.mlp_keep, self.bits)  # range checks, one-line errors
        check_timing(self.contexts, self.threads, self.reps, self.steps, self.warmup)
        unknown = [v for v in self.variants if v not in VARIANT_KINDS]
        if unknown:
            raise UserError(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANT_KINDS)})")

    @property
    def budget(self) -> tuple[float, float, float]:
        return (self.attn_keep, self.mlp_keep, self.bits)

    def modes(self) -> list[str]:
        v = set(self.variants) | {"dense"}
        out = ["dense"]
        if "solm" in v:
            out.append("policy")
            if "fixed" in v:
                out.append("replay")
        if "fixed" in v:
            out.append("fixed")
            if self.per_kv_head:
                out.append("fixed_kvhead")
        if "dense-budget" in v:
            out.append("dense_budget")
        if "portable" in v:
            out.append("portable")
        return out

    def sessions(self) -> list[str]:
        return [s for s in SESSIONS if s in {MODES[m][2] for m in self.modes()}]

    def kinds(self) -> list[str]:
        return sorted({SESSIONS[s][0] for s in self.sessions()})


class Bench:
    """Sessions, prefilled caches and timed runs for one model. Use ``run_block`` per (context, threads)."""

    def __init__(self, artifacts: dict, cfg: BenchConfig, cost: CostTable, token_ids: list[int],
                 say: Callable[[str], None] = lambda s: None):
        self.artifacts, self.cfg, self.cost, self.say = artifacts, cfg, cost, say
        self.token_ids = token_ids
        self._sessions: dict = {}       # threads -> {kind: SolmSession}
        self._rss: dict = {}            # session name -> MB grown while first creating + warming it
        self._prefilled: dict = {}      # context -> Prefilled
        self._policy_nodes: set | None = None

    # -------------------------------------------------------------------------------------- sessions
    def sessions(self, threads: int) -> dict:
        """The sessions for ``threads`` (created on first use; those of other thread counts are released)."""
        if threads in self._sessions:
            return self._sessions[threads]
        self._sessions.clear()
        import gc

        import onnxruntime as ort

        gc.collect()
        ort.set_default_logger_severity(3)   # no "nodes not assigned to the preferred EP" notes in the output
        from solm_compile.runtime.session import SolmSession

        out = {}
        for name in self.cfg.sessions():
            kind, ep_options = SESSIONS[name]
            before = rss_mb()
            s = SolmSession(self.artifacts[kind], threads=threads, tokenizer=False, ep_options=ep_options,
                            device=self.cfg.device)
            if kind in ("solm", "fixed") and not s.ep_active:
                raise UserError(f"SolmEP is not available, so the {kind} artifact would run on the CPU provider; "
                                "build it with `python -m solm_compile.runtime.ep_build`")
            self._warm_session(s)
            # weights do not depend on the thread count: keep the first (cleanest) measurement of each session
            self._rss.setdefault(name, rss_mb() - before)
            out[name] = s
        self._sessions[threads] = out
        return out

    def _warm_session(self, s) -> None:
        """One short prefill + step so lazy initialisation (weight re-layout, arenas) is out of the way."""
        ids = [self.token_ids[:16]]
        for _ in s.steps(ids, self._budget_for(s.kind, "dense_budget"), max_new_tokens=1):
            pass

    def _budget_for(self, kind: str, mode: str):
        if mode in ("dense", "dense_budget"):
            return (1.0, 1.0, 16.0)
        return self.cfg.budget

    # -------------------------------------------------------------------------------------- prefill
    def prefill(self, context: int, threads: int) -> Prefilled:
        """The KV cache of ``context`` tokens (one dense prefill, reused by every mode and thread count)."""
        if context in self._prefilled:
            return self._prefilled[context]
        sessions = self.sessions(threads)
        kind = next(k for k in ("portable", "solm", "fixed", "dense") if k in sessions)
        s = sessions[kind]
        need = context + self.cfg.warmup + self.cfg.steps
        ids = self.token_ids[:context]
        if len(self.token_ids) < need:
            raise UserError(f"bench needs {need} tokens, has {len(self.token_ids)}")
        t0 = time.perf_counter()
        feeds = prefill_feeds(s, ids)
        out = s._run(feeds)
        s._carry(out, feeds)
        kv = s.kv.snapshot(feeds)                    # layout-free: restored into each session's own (runtime/kv.py)
        hidden = (out["policy_hidden_out"].numpy().copy() if "policy_hidden_out" in out
                  else np.zeros((1, s.meta["hidden_size"]), np.float32))
        self.say(f"prefill {context} tokens ({kind}, {threads} threads): {time.perf_counter() - t0:.1f} s")
        p = Prefilled(context, kv, hidden, list(self.token_ids[context:need]))
        self._prefilled[context] = p
        return p

    # -------------------------------------------------------------------------------------- one run
    def _decode(self, s, mode: str, p: Prefilled, n: int, controls=None) -> _Run:
        """Decode the ``n`` tokens after the context (teacher-forced) from the prefilled cache; time the loop."""
        import onnxruntime as ort

        ov = ort.OrtValue.ortvalue_from_numpy
        tokens, first_pos = p.tokens[:n], p.context
        feeds = s.kv.restore(p.kv, capacity=p.context + n)
        ids = [ov(np.asarray([[t]], np.int64)) for t in tokens]
        pos = [ov(np.asarray([[first_pos + i]], np.int64)) for i in range(n)]
        kind = s.kind
        policy = kind in ("solm", "portable")
        ctl_feeds = None
        if policy:
            feeds.update({k: ov(v) for k, v in s._policy_start(1, p.hidden).items()})
            feeds["budget"] = ov(np.asarray([s.check_budget(self._budget_for(kind, mode))], np.float32))
        elif kind == "fixed":
            seq = controls if controls is not None else [self.cfg.budget] * n
            names = ("attn_keep", "mlp_keep", "bits")
            ctl_feeds = [{name: ov(np.asarray([v], np.float32)) for name, v in zip(names, c)} for c in seq]
        realised = []
        gate = s.meta.get("gate", {})
        min_len = gate.get("ts", 4) + gate.get("tw", 2) + 1
        t0 = time.perf_counter()
        for t in range(n):
            feeds["input_ids"], feeds["position_ids"] = ids[t], pos[t]
            if ctl_feeds is not None:
                feeds.update(ctl_feeds[t])
            out = s._run(feeds)
            s._carry(out, feeds)
            if policy:
                realised.append(out["controls"].numpy()[0])   # (the artifact restarts the policy's episodes)
        elapsed = time.perf_counter() - t0
        if policy:
            realised = [tuple(float(x) for x in c) for c in realised]
        elif kind == "fixed":
            seq = controls if controls is not None else [self.cfg.budget] * n
            realised = [tuple(float(x) for x in c) if first_pos + t + 1 > min_len else (1.0, 1.0, 16.0)
                        for t, c in enumerate(seq)]
        else:
            realised = [(1.0, 1.0, 16.0)] * n
        return _Run(elapsed, realised)

    def profile_policy(self, p: Prefilled, threads: int) -> tuple[float, float]:
        """(policy ms, all-node ms) per step of the solm artifact at the budget, from one profiled pass (warm-up
        steps excluded). Node times exclude the runtime's per-run overhead, so the share is of node time."""
        import os
        import tempfile

        from solm_compile.runtime.session import SolmSession

        with tempfile.TemporaryDirectory(prefix="solm-bench-prof-") as tmp:
            s = SolmSession(self.artifacts["solm"], threads=threads, tokenizer=False,
                            profile_prefix=os.path.join(tmp, "solm"))
            self._decode(s, "policy", p, self.cfg.warmup + self.cfg.steps)
            with open(s.sess.end_profiling()) as f:
                events = json.load(f)
            del s
        if self._policy_nodes is None:
            self._policy_nodes = policy_nodes(self.artifacts["solm"])
        return profile_share(events, self._policy_nodes, skip_runs=self.cfg.warmup)

    # -------------------------------------------------------------------------------------- a block
    def run_block(self, context: int, threads: int) -> list[dict]:
        """Time every mode at (context, threads); one row per mode."""
        cfg = self.cfg
        sessions = self.sessions(threads)
        p = self.prefill(context, threads)
        modes = cfg.modes()
        if cfg.warmup:
            for m in modes:
                self._decode(sessions[MODES[m][2]], m, p, cfg.warmup)
        # units rotate per repetition; replay stays right after policy (it replays that run's controls)
        units = [[m] for m in modes if m != "replay"]
        for u in units:
            if u == ["policy"] and "replay" in modes:
                u.append("replay")
        runs: dict[str, list[_Run]] = {m: [] for m in modes}
        for r in range(cfg.reps):
            k = r % len(units)
            for unit in units[k:] + units[:k]:
                for m in unit:
                    ctl = runs["policy"][-1].controls if m == "replay" else None
                    runs[m].append(self._decode(sessions[MODES[m][2]], m, p, cfg.steps, controls=ctl))
        prof = self.profile_policy(p, threads) if cfg.profile_policy and "policy" in modes else None
        Ls = [context + t + 1 for t in range(cfg.steps)]
        step_ms = {m: statistics.median(x.seconds for x in runs[m]) / cfg.steps * 1e3 for m in modes}
        proc_rss = rss_mb()
        rows = []
        for m in modes:
            variant, mode, sname = MODES[m]
            kind = SESSIONS[sname][0]
            ctl = [c for x in runs[m] for c in x.controls]
            # the policy's choices may differ between repetitions: the ideal is averaged over them
            ideal = (1.0 if m in ("dense", "dense_budget")
                     else statistics.fmean(self.cost.ideal_ratio(Ls, x.controls) for x in runs[m]))
            ratio = step_ms["dense"] / step_ms[m]
            s = sessions[sname]
            row = {
                "context": context, "threads": threads, "variant": variant, "mode": mode, "kind": kind,
                "provider": s.sess.get_providers()[0], "tok_s": 1e3 / step_ms[m], "step_ms": step_ms[m],
                "ratio": ratio, "ideal_ratio": ideal, "pct_of_ideal": 100.0 * ratio / ideal,
                # the cost model's bytes per step over the measured step time: how close to a bandwidth bound
                "model_gb_s": statistics.fmean(self.cost.mean_bytes(Ls, x.controls) for x in runs[m])
                / step_ms[m] / 1e6,
                "usage": {name: float(np.mean([c[i] for c in ctl]))
                          for i, name in enumerate(("attn_keep", "mlp_keep", "bits"))},
                "policy_ms": None, "policy_pct": None, "policy_profile_ms": None, "policy_profile_pct": None,
                "rss_mb": self._rss.get(sname), "process_rss_mb": proc_rss,
                "reps": cfg.reps, "steps": cfg.steps,
                "step_ms_reps": [x.seconds / cfg.steps * 1e3 for x in runs[m]],
            }
            if m == "policy" and "replay" in runs:
                diff = statistics.median(a.seconds - b.seconds for a, b in zip(runs["policy"], runs["replay"]))
                row["policy_ms"] = diff / cfg.steps * 1e3
                row["policy_pct"] = 100.0 * row["policy_ms"] / step_ms[m]
            if m == "policy" and prof is not None:
                row["policy_profile_ms"], row["policy_profile_pct"] = prof[0], 100.0 * prof[0] / prof[1]
            rows.append(row)
        return rows


# ---------------------------------------------------------------------------------------------- top level


def prepare(model: str, cfg: BenchConfig, policy: str | None = None, gate=None, trust_pickle: bool = False,
            say: Callable[[str], None] = lambda s: None, weights: str = "source", kv: str = "fp16") -> Bench:
    """Load MODEL with ``weights`` (``--weights``), compile (or reuse) its artifacts (the SolmEP kinds' KV cache in
    ``kv``, ``--kv``) and set up a ``Bench``."""
    from solm_compile.frontend.gated import GatedLM, _kv_shape_from_graph, compile_gated
    from solm_compile.frontend.models import load

    t0 = time.perf_counter()
    loaded = load(model, trust_pickle=trust_pickle, weights=weights)
    gated = compile_gated(loaded, gate)
    lm = GatedLM(gated, _kv_shape_from_graph(loaded))
    lm.weights = loaded.weights                 # the artifacts store what the table knows as low-bit blocks
    lm.kv = kv                                  # and the SolmEP kinds' KV cache precision
    say(f"loaded {loaded.info.name} ({time.perf_counter() - t0:.0f} s; weights {weights})")
    return prepare_lm(lm, cfg, policy, tokenizer=loaded.tokenizer, say=say)


def prepare_lm(lm, cfg: BenchConfig, policy: str | Path | None = None, tokenizer=None,
               say: Callable[[str], None] = lambda s: None) -> Bench:
    from solm_compile.analysis.inspect import shapes_from_gated

    kinds = cfg.kinds()
    policy_path = None
    if any(k in ("solm", "portable") for k in kinds):
        policy_path = policy_arg(lm, policy, cfg.seed)
        if policy_path is None:
            from solm_compile.policy.checkpoint import shipped_policy

            policy_path = shipped_policy(lm.info)
    arts = ensure_artifacts(lm, kinds, policy_path, say)
    need = max(cfg.contexts) + cfg.warmup + cfg.steps
    ids, source = bench_tokens(tokenizer, need, lm.info.vocab_size, cfg.seed)
    say(f"tokens: {source}")
    bench = Bench(arts, cfg, CostTable(shapes_from_gated(lm.model), lm.gate), ids, say)
    bench.token_source = source
    bench.policy_path = policy_path
    return bench


def run_all(bench: Bench, around_block: Callable | None = None) -> list[dict]:
    """Every (context, threads) block; ``around_block(fn)`` may wrap each timed block (e.g. pause other work)."""
    rows = []
    for threads in bench.cfg.threads:
        for context in bench.cfg.contexts:
            bench.sessions(threads)
            bench.prefill(context, threads)
            fn = lambda: bench.run_block(context, threads)  # noqa: E731
            rows += around_block(fn) if around_block else fn()
            if bench.cfg.prefill:
                from solm_compile.bench.prefill import prefill_rows

                fn = lambda: prefill_rows(bench, context, threads)  # noqa: E731
                rows += around_block(fn) if around_block else fn()
            bench.say(format_table([r for r in rows if r["context"] == context and r["threads"] == threads],
                                   header=False))
    return rows
