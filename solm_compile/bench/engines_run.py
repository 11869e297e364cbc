"""``solm bench MODEL --engines``: solm beside the engines a user would run instead, in one process run.

    solm bench smollm2 --engines --context 1024,2048 --threads 1,2 --out results/engines.json

The engines (bench/engines.py), all fed the same token ids:

- ``llama.cpp`` (llama-cpp-python) on the GGUF file MODEL comes from, its weights as shipped;
- ``onnxruntime-genai int4``: its model builder's int4 CPU model of the same fp32 weights (engines_build.py);
- ``onnxruntime (solm dense)``: stock onnxruntime on solm's ``dense`` artifact (the original model's graph);
- ``solm dense-budget`` and ``solm keep K``: the ``fixed`` artifact on SolmEP with κ = ρ = K (bits 16).

Following shared/benchmark_protocol.md, per thread count each engine is built with that many threads, then per
context every engine prefills the same ``context`` ids once and warms up (``warmup`` steps), and ``reps`` rounds
each time every engine once, in an order rotated per round: ``steps`` teacher-forced decode steps (the ids after
the context) from the prefilled cache (``reset`` restores it untimed). A row's tok/s is the median over rounds
(min–max beside it); ``ratio`` is the median over rounds of the per-round ratio ``reference time / row time``.
Each row carries the engine's perplexity on the protocol's texts (``ppl_texts``: Persuasion and the Jargon File,
neither trained on): per text one window of its first ``ppl_window`` ids, the last ``ppl_tokens`` scored, each from
every id before it (a prefill, then decode steps, the path the speed rows time); ``ppl`` pools every scored id,
``ppl_texts`` has each text's own
and, with ``memory``, the peak resident memory of a child process that loads the engine, prefills
``memory_context`` ids and decodes 8 steps (engines_rss.py; rows of one artifact share a child).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

from solm_compile.bench import tensor_bytes
from solm_compile.bench.engines import PEERS, EngineSpec, available, make_engine, perplexity, skip_line
from solm_compile.bench.measure import PPL_TEXTS, check_timing
from solm_compile.errors import UserError
from solm_compile.quant.weights import WEIGHTS, check_head_bits

ENGINE_NAMES = ("llama.cpp", "onnxruntime-genai", "onnxruntime", "solm")


def keep_pair(keep) -> tuple[float, float]:
    """(κ, ρ) of one ``--keeps`` entry: a number K is κ = ρ = K, a pair is (κ, ρ)."""
    if isinstance(keep, (tuple, list)):
        return float(keep[0]), float(keep[1])
    return float(keep), float(keep)


def keep_label(keep) -> str:
    """``0.5`` for κ = ρ = 0.5, ``0.25/0.4`` for κ 0.25 and ρ 0.4 (the row's name, the CLI's spelling)."""
    kappa, rho = keep_pair(keep)
    return f"{kappa:g}" if kappa == rho else f"{kappa:g}/{rho:g}"


@dataclass(frozen=True)
class EnginesConfig:
    contexts: tuple[int, ...] = (256, 1024, 2048, 4096)
    threads: tuple[int, ...] = (1, 2)
    reps: int = 5
    steps: int = 32
    warmup: int = 4
    keeps: tuple = (0.5, 0.3)               # solm rows at κ = ρ = K, or (κ, ρ) pairs (plus the dense budget)
    ppl_window: int = 2048
    ppl_tokens: int = 1024                  # scored ids see 1024-2047 ids before them: PPL at ctx 2048
    ppl_texts: tuple[str, ...] = tuple(PPL_TEXTS)
    memory: bool = True
    memory_context: int = 2048
    weights: str = "source"                 # solm's weights (issue 16's --weights), passed on where supported
    head_bits: int = 8                      # the embedding / LM head's bits under --weights int4 (--head-bits)
    kv: str = "fp16"                        # solm's KV cache buffer (--kv), for the SolmEP (fixed) artifact
    engines: tuple[str, ...] = ENGINE_NAMES
    reference: str = "llama.cpp"            # ratios are against this engine's row (the first row without it)
    spin: bool = True                       # solm's onnxruntime threads spin, as the peers' do by default (--spin)
    per_kv_head: bool = False               # also each sparse solm row with pages chosen once per KV head
    seed: int = 0

    def __post_init__(self):
        check_timing(self.contexts, self.threads, self.reps, self.steps, self.warmup)
        if any(not 0.05 <= k <= 1.0 for pair in map(keep_pair, self.keeps) for k in pair):
            raise UserError(f"--keeps must lie in [0.05, 1], got {', '.join(map(keep_label, self.keeps))}")
        if not 2 <= self.ppl_tokens < self.ppl_window:
            raise UserError(f"--ppl-tokens must be in [2, --ppl-window), got {self.ppl_tokens}/{self.ppl_window}")
        if not self.ppl_texts or any(t not in PPL_TEXTS for t in self.ppl_texts):
            raise UserError(f"--ppl-texts: choose one or more of {', '.join(PPL_TEXTS)}, got "
                            f"{', '.join(self.ppl_texts) or '(none)'}")
        if self.memory_context < 1:
            raise UserError(f"the memory context must be positive, got {self.memory_context}")
        if self.weights not in WEIGHTS:
            raise UserError(f"--weights {self.weights}: choose from {', '.join(WEIGHTS)}")
        check_head_bits(self.weights, self.head_bits)
        unknown = [e for e in self.engines if e not in ENGINE_NAMES]
        if unknown or not self.engines:
            raise UserError(f"--engine-list: unknown {', '.join(unknown) or '(none)'} (choose from "
                            f"{', '.join(ENGINE_NAMES)})")

    def tokens_needed(self) -> int:
        return max(max(self.contexts) + max(self.warmup, self.steps), self.ppl_window,
                   self.memory_context + 8 if self.memory else 0)


# ---------------------------------------------------------------------------------------------- solm's weights
def accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def weights_plan(weights: str, load_fn, head_bits: int = 8) -> tuple[dict, bool]:
    """(kwargs for ``load``, whether it takes ``weights``): issue 16's ``load(..., weights=)`` puts the weights in
    that format and the artifacts store them so; a solm without it has only today's fp32 (``source`` = fp32)."""
    if accepts(load_fn, "weights"):
        return {"weights": weights, **({"head_bits": head_bits} if head_bits != 8 else {})}, True
    if weights != "source":
        raise UserError(f"--weights {weights}: this solm compiles fp32 weights only (no weights option yet)")
    return {}, False


def solm_weights_label(weights: str, taken: bool, source_type: str | None) -> str:
    if not taken:
        return f"fp32 (dequantized {source_type} GGUF)" if source_type else "fp32"
    if weights == "source" and source_type:
        return f"source ({source_type} GGUF blocks)"
    return weights


# ---------------------------------------------------------------------------------------------- engine list
def engine_specs(model: str, lm, cfg: EnginesConfig, taken: bool,
                 say: Callable[[str], None]) -> tuple[list[EngineSpec], list[str]]:
    """The specs to run and the lines saying what was skipped (one for all missing peers)."""
    from solm_compile.bench import engines_build as build
    from solm_compile.bench.artifacts import bench_dir, ensure_artifacts

    specs, notes = [], []
    missing = [e for e in PEERS if e in cfg.engines and not available(e)]
    if missing:
        notes.append(skip_line(missing))
    gguf = build.gguf_for(model)
    src_type = build.gguf_type(gguf) if gguf is not None else None
    if "llama.cpp" in cfg.engines and "llama.cpp" not in missing:
        if gguf is None:
            notes.append(f"skipped llama.cpp: {model} is not a GGUF file or a GGUF alias")
        else:
            specs.append(EngineSpec("llama.cpp", "llama.cpp", str(gguf), build.GGUF_WEIGHTS.format(src_type)))
    if "onnxruntime-genai" in cfg.engines and "onnxruntime-genai" not in missing:
        hf = build.hf_dir_for(model)
        if hf is None:
            notes.append(f"skipped onnxruntime-genai: no Hugging Face directory for {model}")
        else:
            path = build.genai_model(hf, bench_dir(lm.info), say)
            specs.append(EngineSpec("onnxruntime-genai", "onnxruntime-genai int4", str(path), build.GENAI_WEIGHTS))
    kinds = (["dense"] if "onnxruntime" in cfg.engines else []) + (["fixed"] if "solm" in cfg.engines else [])
    if "fixed" in kinds and not _ep_available():
        notes.append("skipped solm: SolmEP is not built here (python -m solm_compile.runtime.ep_build)")
        kinds.remove("fixed")
    if kinds:
        lm.kv = cfg.kv                                                   # the fixed artifact's KV cache (--kv)
    arts = ensure_artifacts(lm, kinds, None, say) if kinds else {}      # in lm.weights' format (load_lm)
    label = solm_weights_label(cfg.weights, taken, src_type) + (", 4-bit head" if cfg.head_bits == 4 else "")
    if "dense" in arts:
        specs.append(EngineSpec("onnxruntime", "onnxruntime (solm dense)", str(arts["dense"]), label))
    if "fixed" in arts:
        for k in (1.0, *cfg.keeps):
            kappa, rho = keep_pair(k)
            name = "solm dense-budget" if (kappa, rho) == (1.0, 1.0) else f"solm keep {keep_label(k)}"
            specs.append(EngineSpec("solm", name, str(arts["fixed"]), label, (kappa, rho, 16.0)))
            if cfg.per_kv_head and kappa < 1.0:       # the same artifact, SolmEP's select_per_kv_head option
                specs.append(EngineSpec("solm", f"{name} per-KV-head", str(arts["fixed"]), label, (kappa, rho, 16.0),
                                        per_kv_head=True))
    return specs, notes


def _ep_available() -> bool:
    import onnxruntime as ort

    from solm_compile.runtime import ep

    return bool(ep.register(ort))


# ---------------------------------------------------------------------------------------------- timing
def time_block(engines: dict, ids: list[int], context: int, cfg: EnginesConfig,
               counters: dict | None = None) -> dict[str, list[float]]:
    """label -> seconds per round of ``steps`` decode steps from a prefill of ``context`` ids (rounds rotated).
    ``counters``: label -> the SolmEP work counters its timed steps added (summed over rounds; SolmEP rows only)."""
    warm, timed = ids[context:context + cfg.warmup], ids[context:context + cfg.steps]
    for e in engines.values():
        e.prefill(ids[:context])
        e.reset()
        for tok in warm:
            e.step(tok)
    labels = list(engines)
    secs: dict[str, list[float]] = {lb: [] for lb in labels}
    for r in range(cfg.reps):
        k = r % len(labels)
        for lb in labels[k:] + labels[:k]:
            e = engines[lb]
            e.reset()
            before = _counters(e)
            t0 = time.perf_counter()
            for tok in timed:
                e.step(tok)
            secs[lb].append(time.perf_counter() - t0)
            if before is not None and counters is not None:
                after = _counters(e)
                prev = counters.setdefault(lb, dict.fromkeys(after, 0))
                for k in after:
                    prev[k] += after[k] - before[k]
    return secs


def _counters(engine) -> dict | None:
    """SolmEP's work counters when ``engine`` runs on it (read outside the timed window), else None."""
    if getattr(engine, "spec", None) is None or engine.spec.engine != "solm":
        return None
    from solm_compile.runtime import ep

    return ep.work_counters()


def block_rows(secs: dict[str, list[float]], specs: dict, context: int, threads: int, cfg: EnginesConfig) -> list:
    """One row per engine of one (context, threads) block; ratios are medians of per-round ratios."""
    ref = cfg.reference if cfg.reference in secs else next(iter(secs))
    rows = []
    for lb, s in secs.items():
        tok_s = [cfg.steps / x for x in s]
        ratios = [a / b for a, b in zip(secs[ref], s)]
        rows.append({"engine": lb, "kind": specs[lb].engine, "weights": specs[lb].weights, "context": context,
                     "threads": threads, "tok_s": statistics.median(tok_s), "tok_s_min": min(tok_s),
                     "tok_s_max": max(tok_s), "step_ms": statistics.median(s) / cfg.steps * 1e3,
                     "ratio_to": ref, "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "reps": cfg.reps, "steps": cfg.steps,
                     "step_ms_reps": [x / cfg.steps * 1e3 for x in s]})
    return rows


def ppl_all(engines: dict, texts: dict[str, list[int]], cfg: EnginesConfig,
            say: Callable[[str], None]) -> dict[str, dict]:
    """engine label -> {"pooled": PPL over every text's scored ids together, "texts": {text: its own PPL}}."""
    start = cfg.ppl_window - cfg.ppl_tokens
    out = {}
    for lb, e in engines.items():
        t0 = time.perf_counter()
        nll = {name: e.nll(ids[:cfg.ppl_window], start) for name, ids in texts.items()}
        out[lb] = {"pooled": perplexity([x for v in nll.values() for x in v]),
                   "texts": {name: perplexity(v) for name, v in nll.items()}}
        say(f"  PPL {lb}: {out[lb]['pooled']:.3f} ("
            + ", ".join(f"{n} {v:.3f}" for n, v in out[lb]["texts"].items())
            + f"; {time.perf_counter() - t0:.0f} s)")
    return out


# ---------------------------------------------------------------------------------------------- top level
def load_lm(model: str, load_kw: dict, gate=None, trust_pickle: bool = False):
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.frontend.models import load

    loaded = load(model, trust_pickle=trust_pickle, **load_kw)
    lm = GatedLM.from_loaded(loaded, gate)
    if getattr(loaded, "weights", None) is not None:
        lm.weights = loaded.weights          # ensure_artifacts stores what the table knows as low-bit blocks
    return lm, loaded.tokenizer


def run_engines(model: str, cfg: EnginesConfig, gate=None, trust_pickle: bool = False,
                say: Callable[[str], None] = lambda s: None) -> dict:
    """Every engine at every (threads, context), their PPL and peak memory: the JSON document ``--out`` writes."""
    from solm_compile.bench.engines_report import machine
    from solm_compile.bench.measure import bench_tokens, ppl_texts
    from solm_compile.frontend.models import load

    load_kw, taken = weights_plan(cfg.weights, load, cfg.head_bits)
    t0 = time.perf_counter()
    lm, tokenizer = load_lm(model, load_kw, gate, trust_pickle)
    say(f"loaded {lm.info.name} ({time.perf_counter() - t0:.0f} s)")
    specs, notes = engine_specs(model, lm, cfg, taken, say)
    for n in notes:
        say(n)
    if not specs:
        raise UserError("no engine to run (see the lines above)")
    ids, source = bench_tokens(tokenizer, cfg.tokens_needed(), lm.info.vocab_size, cfg.seed)
    say(f"tokens: {source}" + (" (random ids)" if source == "random" else ""))
    texts, text_notes = ppl_texts(tokenizer, cfg.ppl_texts, cfg.ppl_window, lm.info.vocab_size, cfg.seed)
    notes += text_notes
    for n in text_notes:
        say(n)
    if "random" in texts:
        say("PPL on random ids: the PPL column means nothing")
    by_label = {s.label: s for s in specs}
    tbs = {s.label: tensor_bytes.for_spec(s) for s in specs}            # bytes from tensors (protocol point 5)
    stream = tensor_bytes.stream_gb_s()
    say(f"streaming read, 1 thread: {stream:.1f} GB/s")
    n_ctx = cfg.tokens_needed() + 16
    rows, ppl = [], {}
    for threads in cfg.threads:
        sessions: dict = {}
        engines = {s.label: make_engine(s, threads, n_ctx, sessions, spin=cfg.spin) for s in specs}
        if not ppl:
            say(f"perplexity over ids [{cfg.ppl_window - cfg.ppl_tokens}, {cfg.ppl_window}) of "
                f"{', '.join(texts)} ({threads} threads)")
            ppl = ppl_all(engines, texts, cfg, say)
        for context in cfg.contexts:
            counters: dict = {}
            block = block_rows(time_block(engines, ids, context, cfg, counters), by_label, context, threads, cfg)
            tensor_bytes.add_columns(block, tbs, counters, stream)
            for r in block:
                r["ppl"], r["ppl_texts"] = ppl[r["engine"]]["pooled"], ppl[r["engine"]]["texts"]
            rows += block
            say(_block_line(block))
        for e in engines.values():
            e.close()
        del engines, sessions
    memory = peak_memory(specs, ids, cfg, say) if cfg.memory else {}
    for r in rows:
        r["memory"] = memory.get(r["engine"])
        r["peak_rss_mb"] = r["memory"]["peak_mb"] if r["memory"] else None
    return {"model": model, "config": asdict(cfg), "tokens": source, "skipped": notes,
            "machine": {**machine(specs), "stream_gb_s": stream},
            "ppl": {"window": cfg.ppl_window, "scored": cfg.ppl_tokens, "texts": list(texts),
                    "values": {lb: v["pooled"] for lb, v in ppl.items()},
                    "by_text": {lb: v["texts"] for lb, v in ppl.items()}},
            "memory_context": cfg.memory_context if cfg.memory else None, "rows": rows}


def _block_line(block: list[dict]) -> str:
    r0 = block[0]
    cells = ", ".join(f"{r['engine']} {r['tok_s']:.1f}" for r in block)
    return f"ctx {r0['context']}, {r0['threads']} thr: {cells} tok/s"


def peak_memory(specs: list[EngineSpec], ids: list[int], cfg: EnginesConfig, say: Callable[[str], None]) -> dict:
    """label -> {peak_mb, rss_mb, after_imports_mb} of a child decoding with that engine (one child per distinct
    engine and file; None where it failed)."""
    from solm_compile.bench.engines_rss import measure_child

    out, done = {}, {}
    for s in specs:
        key = (s.engine, s.path)
        if key not in done:
            done[key] = measure_child(s, ids, cfg.memory_context, min(cfg.threads))
            m = done[key]
            say(f"  memory {s.label}: " + (f"peak {m['peak_mb']:.0f} MB, {m['rss_mb']:.0f} MB after decoding, "
                                          f"{m['after_imports_mb']:.0f} MB after imports" if m else "failed"))
        out[s.label] = done[key]
    return out
