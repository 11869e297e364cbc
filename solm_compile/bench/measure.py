"""What ``solm bench`` measures with: resident memory, the benchmark's tokens, the cost model's bytes per step,
the policy's share from an onnxruntime profile, and the printed table (the runner is ``bench.Bench``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("solm_compile.bench.decode")


def check_timing(contexts, threads, reps: int, steps: int, warmup: int) -> None:
    """The timing flags every bench shares (``solm bench``, ``--engines``): a one-line UserError if one is off."""
    from solm_compile.errors import UserError

    if not contexts or any(c < 1 for c in contexts):
        raise UserError(f"--context must be positive token counts, got {list(contexts)}")
    if not threads or any(t < 1 for t in threads):
        raise UserError(f"--threads must be positive, got {list(threads)}")
    if reps < 1 or steps < 1 or warmup < 0:
        raise UserError(f"--reps and --steps must be >= 1 and --warmup >= 0, got {reps}/{steps}/{warmup}")


def rss_mb() -> float:
    """Resident memory of this process in MB (Linux /proc; else the peak from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _encode(tokenizer, text: str, n: int) -> list[int]:
    ids = tokenizer.encode(text[: 8 * n + 10_000], add_special_tokens=False)
    return list(ids.ids if hasattr(ids, "ids") else ids)[:n]


def bench_tokens(tokenizer, n: int, vocab: int, seed: int = 0) -> tuple[list[int], str]:
    """n token ids: the held-out Austen novel if it is already in the solm cache (nothing is downloaded), else
    random ids. Returns (ids, source)."""
    if tokenizer is not None:
        try:
            from solm_compile.data import corpora as data

            path = data._austen_txt_dir() / f"{data.HELDOUT_NOVEL}.txt"
            if path.is_file():
                ids = _encode(tokenizer, path.read_text(encoding="utf-8"), n)
                if len(ids) >= n:
                    return ids, f"text:{data.HELDOUT_NOVEL}"
        except Exception as e:  # noqa: BLE001 - text is a nicety; random ids are a valid benchmark input
            log.debug("no bench text: %s", e)
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=n).tolist(), "random"


# The protocol's quality texts (shared/benchmark_protocol.md, point 4): no policy was trained or tuned on either.
PPL_TEXTS = {
    "persuasion": "Austen's Persuasion (fiction; held out of every training mixture)",
    "jargon": "the Jargon File 4.4.7 (non-fiction; the technical genre, held out of training)",
}


def _ppl_text(name: str) -> str:
    from solm_compile.data import corpora, genres

    if name == "persuasion":
        return corpora.heldout_text()
    return "\n\n".join(genres.source(name)[1].documents())


def ppl_texts(tokenizer, names, n: int, vocab: int, seed: int = 0) -> tuple[dict[str, list[int]], list[str]]:
    """The first n ids of each named text (``PPL_TEXTS``; its registry asset is fetched into the cache if
    missing) and a note line per text left out. With no tokenizer, or no text readable: n random ids under
    the name ``random`` (their perplexity means nothing)."""
    from solm_compile.errors import UserError

    texts: dict[str, list[int]] = {}
    notes: list[str] = []
    for name in names if tokenizer is not None else ():
        try:
            ids = _encode(tokenizer, _ppl_text(name), n)
        except UserError as e:
            notes.append(f"PPL text {name} left out: {e}")
            continue
        if len(ids) < n:
            notes.append(f"PPL text {name} left out: {len(ids)} ids, the window needs {n}")
            continue
        texts[name] = ids
    if not texts:
        texts["random"] = np.random.default_rng(seed).integers(0, vocab, size=n).tolist()
    return texts, notes


class CostTable:
    """Memoised cost-model bytes per decode token."""

    def __init__(self, shapes, gate):
        from solm_compile.analysis.cost import decode_cost

        self.cost = decode_cost(shapes, gate)
        self._memo: dict = {}

    def bytes(self, L: int, kappa: float = 1.0, rho: float = 1.0, bits: float = 16.0) -> float:
        key = (int(L), round(float(kappa), 6), round(float(rho), 6), round(float(bits), 6))
        if key not in self._memo:
            self._memo[key] = float(self.cost.at(key[0], key[1], key[2], key[3])["bytes"])
        return self._memo[key]

    def mean_bytes(self, Ls, controls) -> float:
        return sum(self.bytes(L, *c) for L, c in zip(Ls, controls)) / len(Ls)

    def ideal_ratio(self, Ls, controls) -> float:
        dense = sum(self.bytes(L) for L in Ls)
        got = sum(self.bytes(L, *c) for L, c in zip(Ls, controls))
        return dense / got


@dataclass
class Prefilled:
    context: int
    kv: dict                 # past_* name -> numpy [1, Hkv, context, d]
    hidden: np.ndarray       # [1, D] last hidden state after the prefill (policy start)
    tokens: list[int]        # the warmup + steps tokens after the context (fed teacher-forced by every run)


@dataclass
class _Run:
    seconds: float
    controls: list           # realised (κ, ρ, bits) per step


def policy_nodes(path) -> set[str]:
    """Names of the nodes of a solm artifact that compute the policy (everything ArtifactStep does besides the
    gated LM call), told apart by the source line the exporter recorded in each node's metadata."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = set()
    for n in model.graph.node:
        trace = next((p.value for p in n.metadata_props if p.key == "pkg.torch.onnx.stack_trace"), "")
        if "solm_compile/policy/" in trace or ("artifact/step.py" in trace and "self.lm(" not in trace):
            out.add(n.name)
    return out


def profile_share(events: list, nodes: set[str], skip_runs: int = 0) -> tuple[float, float]:
    """(ms per run in ``nodes``, ms per run in all nodes) from an onnxruntime profile, after ``skip_runs`` runs."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")[skip_runs:]
    if not runs:
        return 0.0, 0.0
    start = runs[0][0]
    part = total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e.get("ts", -1) < start:
            continue
        total += e["dur"]
        if e["name"][: -len("_kernel_time")] in nodes:
            part += e["dur"]
    return part / len(runs) / 1e3, total / len(runs) / 1e3




def format_table(rows: list[dict], header: bool = True) -> str:
    cols = ("context", "threads", "variant", "mode", "tok/s", "ms/step", "ratio", "ideal", "%ideal", "GB/s",
            "usage κ/ρ/b", "policy%", "rss MB")  # policy%: the profiled share if measured, else the difference
    lines = []
    if header:
        lines.append(" ".join(f"{c:>11}" if i > 3 else f"{c:<12}" for i, c in enumerate(cols)))
    for r in rows:
        u = r["usage"]
        cells = [str(r["context"]), str(r["threads"]), r["variant"], r["mode"], f"{r['tok_s']:.2f}",
                 f"{r['step_ms']:.2f}", f"{r['ratio']:.3f}", f"{r['ideal_ratio']:.3f}", f"{r['pct_of_ideal']:.1f}",
                 "" if r.get("model_gb_s") is None else f"{r['model_gb_s']:.2f}",
                 f"{u['attn_keep']:.2f}/{u['mlp_keep']:.2f}/{u['bits']:.0f}",
                 (f"{r['policy_profile_pct']:.1f}" if r.get("policy_profile_pct") is not None
                  else "" if r["policy_pct"] is None else f"{r['policy_pct']:.1f}"),
                 "" if r["rss_mb"] is None else f"{r['rss_mb']:.0f}"]
        lines.append(" ".join(f"{c:>11}" if i > 3 else f"{c:<12}" for i, c in enumerate(cells)))
    return "\n".join(lines)
