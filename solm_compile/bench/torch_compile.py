"""``solm bench --backend torch``: ``torch.compile(backend="solm")`` against ``torch.compile(backend="inductor")``.

Three copies of the transformers model in one process — inductor (dense, the baseline), solm at the dense budget,
solm at the benchmark budget — each prefilled densely to the context (untimed), then decoded teacher-forced on the
same tokens with transformers' own KV cache. Repetitions alternate between the variants (rotating the order) and
continue the same sequences, so every variant decodes at the same lengths; medians per step; ratios to inductor.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Callable

import torch

from solm_compile.errors import UserError

VARIANTS = (("inductor", "dense"), ("torch-solm", "dense_budget"), ("torch-solm", "budget"))


class _Decoder:
    """One compiled model copy and its cache, decoding the shared token stream."""

    def __init__(self, model, ids: list[int]):
        self.model, self.ids = model, ids
        self.cache, self.pos = None, 0

    @torch.no_grad()
    def prefill(self, context: int) -> None:
        from transformers import DynamicCache

        x = torch.tensor([self.ids[:context]])                                  # [1, context]
        self.cache = DynamicCache()
        self.model(input_ids=x, past_key_values=self.cache, use_cache=True)
        self.pos = context

    @torch.no_grad()
    def decode(self, n: int) -> float:
        """n teacher-forced single-token steps; seconds."""
        t0 = time.perf_counter()
        for _ in range(n):
            x = torch.tensor([[self.ids[self.pos]]])                            # [1, 1]
            self.model(input_ids=x, past_key_values=self.cache, use_cache=True,
                       position_ids=torch.tensor([[self.pos]]))
            self.pos += 1
        return time.perf_counter() - t0


def _compiled(hf, variant: str, mode: str, budget, policy) -> torch.nn.Module:
    m = copy.deepcopy(hf).eval()
    if variant == "inductor":
        m.compile(backend="inductor")
        return m
    opts = {} if mode == "dense_budget" else {"attn_keep": budget[0], "mlp_keep": budget[1], "bits": budget[2]}
    if policy is not None:
        opts["policy"] = str(policy)
    m.compile(backend="solm", options=opts)
    return m


def torch_rows(loaded, cfg, cost, ids: list[int], policy=None, say: Callable[[str], None] = lambda s: None
               ) -> list[dict]:
    """Rows in ``bench.ROW_KEYS`` form for every (threads, context) of ``cfg``; ``ratio`` is to inductor dense."""
    if getattr(loaded, "hf", None) is None:
        raise UserError(f"{loaded.info.name}: --backend torch needs a transformers model (an alias, a Hugging Face "
                        f"directory or a .gguf), not an exported program")
    need = max(cfg.contexts) + (cfg.warmup + cfg.reps * cfg.steps)
    if len(ids) < need:
        raise UserError(f"the benchmark text has {len(ids)} tokens; --context/--reps/--steps need {need}")
    torch._dynamo.reset()
    # three copies share LlamaForCausalLM.forward's code: Dynamo's default of 8 graphs per code object would send
    # the later variants back to eager mid-benchmark
    with torch._dynamo.config.patch(recompile_limit=64):
        rows = _timed(loaded, cfg, cost, ids, policy, say)
    torch._dynamo.reset()
    return rows


def _timed(loaded, cfg, cost, ids, policy, say) -> list[dict]:
    from solm_compile.backend import dynamo
    from solm_compile.bench.measure import rss_mb

    models = {v: _compiled(loaded.hf, *v, cfg.budget, policy) for v in VARIANTS}
    rows = []
    for threads in cfg.threads:
        torch.set_num_threads(threads)
        for context in cfg.contexts:
            dec = {v: _Decoder(m, ids) for v, m in models.items()}
            for v, d in dec.items():
                t0 = time.perf_counter()
                d.prefill(context)
                d.decode(max(cfg.warmup, 1))            # compiles the decode graph on the first pass
                say(f"torch {v[0]}/{v[1]}: prefill {context} + warm-up in {time.perf_counter() - t0:.0f} s")
            for m in models.values():   # the controllers' step records, from here on: the timed steps' controls
                if (ctl := dynamo.controller(m)) is not None:
                    ctl.history.clear()
            L0 = dec[VARIANTS[0]].pos
            secs: dict = {v: [] for v in VARIANTS}
            for r in range(cfg.reps):
                order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
                for v in order:
                    secs[v].append(dec[v].decode(cfg.steps))
            Ls = [L0 + i + 1 for i in range(cfg.reps * cfg.steps)]
            step_ms = {v: statistics.median(secs[v]) / cfg.steps * 1e3 for v in VARIANTS}
            base = step_ms[VARIANTS[0]]
            for v in VARIANTS:
                ctl = dynamo.controller(models[v])
                controls = ([tuple(float(x) for x in h["controls"][0]) for h in ctl.history]
                            if ctl is not None else [(1.0, 1.0, 16.0)] * len(Ls))
                if len(controls) != len(Ls):   # the record keeps the last HISTORY steps
                    raise UserError(f"--reps × --steps = {len(Ls)} exceeds the {len(controls)} steps the solm "
                                    f"backend records; use fewer")
                ideal = cost.ideal_ratio(Ls, controls) if v[1] == "budget" else 1.0
                ratio = base / step_ms[v]
                rows.append({
                    "context": context, "threads": threads, "variant": v[0], "mode": v[1], "kind": "torch",
                    "provider": "torch.compile(" + ("inductor" if v[0] == "inductor" else "solm") + ")",
                    "tok_s": 1e3 / step_ms[v], "step_ms": step_ms[v], "ratio": ratio, "ideal_ratio": ideal,
                    "pct_of_ideal": 100.0 * ratio / ideal, "model_gb_s": cost.mean_bytes(Ls, controls) / step_ms[v] / 1e6,
                    "usage": {n: statistics.fmean(c[i] for c in controls)
                              for i, n in enumerate(("attn_keep", "mlp_keep", "bits"))},
                    "policy_ms": None, "policy_pct": None, "policy_profile_ms": None, "policy_profile_pct": None,
                    "rss_mb": None, "process_rss_mb": rss_mb(), "reps": cfg.reps, "steps": cfg.steps,
                    "step_ms_reps": [s / cfg.steps * 1e3 for s in secs[v]]})
    return rows


def run_torch(model: str, cfg, policy: str | None = None, gate=None, trust_pickle: bool = False,
              say: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Load MODEL and time the torch rows (``solm bench --backend torch``)."""

    from solm_compile.bench.measure import CostTable, bench_tokens
    from solm_compile.bench.artifacts import policy_arg
    from solm_compile.frontend.gated import GatedLM, _kv_shape_from_graph, compile_gated
    from solm_compile.frontend.models import load
    from solm_compile.analysis.inspect import shapes_from_gated

    loaded = load(model, trust_pickle=trust_pickle)
    gated = compile_gated(loaded, gate)
    lm = GatedLM(gated, _kv_shape_from_graph(loaded))
    policy_path = policy_arg(lm, policy, cfg.seed)   # None: the backend finds the shipped one by identity
    need = max(cfg.contexts) + cfg.warmup + cfg.reps * cfg.steps + 1
    ids, source = bench_tokens(loaded.tokenizer, need, lm.info.vocab_size, cfg.seed)
    say(f"tokens: {source}")
    return torch_rows(loaded, cfg, CostTable(shapes_from_gated(lm.model), lm.gate), ids, policy_path, say)
