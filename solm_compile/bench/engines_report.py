"""What ``solm bench --engines`` prints and writes: the machine and engine versions, the table, the JSON and two plots
beside the JSON: ``.png``, tok/s against context (one line per engine per thread count), and ``-ppl.png``, tok/s
against perplexity at the largest context (solm's budgets as one curve per thread count, each peer a point)."""

from __future__ import annotations

import importlib
import json
import os
import platform
from pathlib import Path

from solm_compile.io import atomic_path, atomic_write_text

_VERSIONED = {"llama.cpp": "llama_cpp", "onnxruntime-genai": "onnxruntime_genai", "onnxruntime": "onnxruntime"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine(specs) -> dict:
    """CPU, cores and the version of every engine that ran (the protocol's point 6)."""
    from solm_compile import __version__

    versions = {"solm": __version__}
    for name, module in _VERSIONED.items():
        if name == "onnxruntime" or any(s.engine == name for s in specs):
            versions[name] = getattr(importlib.import_module(module), "__version__", "?")
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "versions": versions}


def format_table(doc: dict) -> str:
    """One line per (engine, threads, context): tok/s median (min–max), ratio to the reference, PPL (pooled over the
    protocol's texts, then each text's own), peak MB and the bytes columns."""
    texts = doc["ppl"].get("texts", [])
    cols = f"{'engine':<26}{'weights':<34}{'thr':>4}{'ctx':>6}{'tok/s (min-max)':>22}{'x ref (min-max)':>22}" \
           f"{'PPL':>9}" + "".join(f"{t[:10]:>11}" for t in texts) + \
           f"{'peak MB':>9}{'MB/tok':>8}{'GB/s':>6}{'ideal':>7}{'realised':>9}"
    lines = [cols]
    for r in doc["rows"]:
        mem = "" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb']:.0f}"
        by_text = r.get("ppl_texts") or {}
        lines.append(f"{r['engine']:<26}{r['weights'][:33]:<34}{r['threads']:>4}{r['context']:>6}"
                     f"{_spread(r['tok_s'], r['tok_s_min'], r['tok_s_max'], 1):>22}"
                     f"{_spread(r['ratio'], r['ratio_min'], r['ratio_max'], 2):>22}{_num(r.get('ppl'), 3):>9}"
                     + "".join(f"{_num(by_text.get(t), 3):>11}" for t in texts) +
                     f"{mem:>9}{_num(r.get('mb_token'), 1):>8}{_num(r.get('gb_s'), 1):>6}{_num(r.get('ideal'), 2):>7}"
                     f"{_pct(r.get('realised')):>9}")
    ref = doc["rows"][0]["ratio_to"] if doc["rows"] else "?"
    p = doc["ppl"]
    lines.append(f"x ref: median of per-round time ratios against {ref}; PPL over the last {p['scored']} of the first "
                 f"{p['window']} ids of each text ({', '.join(texts) or doc['tokens']}; PPL pools them); "
                 f"speed ids {doc['tokens']}; "
                 + (f"peak MB at ctx {doc['memory_context']}; " if doc.get("memory_context") else "")
                 + f"{doc['machine']['cpu']}, {doc['machine']['cores']} cores")
    if doc["machine"].get("stream_gb_s"):
        lines.append(f"MB/tok: bytes read per decode token, summed from the tensors (SolmEP rows: the rows its "
                     f"kernels read, from its counters); GB/s: MB/tok x tok/s (streaming read here, 1 thread: "
                     f"{doc['machine']['stream_gb_s']:.1f} GB/s); ideal: the dense budget's bytes over the row's; "
                     f"realised: its measured speedup over the dense budget / ideal")
    lines += doc["skipped"]
    return "\n".join(lines)


def _num(x, digits: int) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.0f}%"


def _spread(mid: float, lo: float, hi: float, digits: int) -> str:
    return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def write_outputs(doc: dict, out: str | Path) -> tuple[Path, ...]:
    """The JSON at ``out`` and the plots beside it (``.png``; ``-ppl.png`` when rows have a perplexity), atomically."""
    out = Path(out)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    png = out.with_suffix(".png")
    with atomic_path(png) as tmp:
        plot(doc, tmp)
    pts = speed_quality_points(doc)
    if not pts:
        return out, png
    ppl_png = out.with_name(out.stem + "-ppl.png")
    with atomic_path(ppl_png) as tmp:
        plot_speed_quality(doc, pts, tmp)
    return out, png, ppl_png


def speed_quality_points(doc: dict) -> dict[tuple[str, int], tuple[float, float]]:
    """(engine, threads) -> (perplexity, tok/s) at the largest context timed, for rows with a perplexity."""
    if not doc["rows"]:
        return {}
    ctx = max(r["context"] for r in doc["rows"])
    return {(r["engine"], r["threads"]): (r["ppl"], r["tok_s"]) for r in doc["rows"]
            if r["context"] == ctx and r.get("ppl") is not None and r.get("tok_s") is not None}


def _is_solm(name: str) -> bool:
    return name.startswith("solm ")


def _keep(name: str) -> float:
    """The budget of a solm row from its name (``solm keep 0.5``, ``solm keep 0.25/0.4`` → the mean of κ and ρ;
    the dense budget is 1), for ordering the sweep."""
    try:
        parts = [float(x) for x in name.rsplit(" ", 1)[-1].split("/")]
    except ValueError:
        return 1.0
    return sum(parts) / len(parts)


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {t: s for t, s in zip(sorted({r["threads"] for r in doc["rows"]}), ("-", "--", ":", "-."))}
    engines = list(dict.fromkeys(r["engine"] for r in doc["rows"]))
    colors = plt.get_cmap("tab10")
    for i, name in enumerate(engines):
        for t, style in styles.items():
            pts = sorted((r["context"], r["tok_s"]) for r in doc["rows"] if r["engine"] == name and r["threads"] == t)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", color=colors(i % 10), label=f"{name}, {t} thr")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (KV length when the timed steps start)")
    ax.set_ylabel("decode tok/s (median over rounds)")
    _finish(fig, ax, f"{doc['model']}: decode speed by engine ({doc['machine']['cpu']})", path)


def plot_speed_quality(doc: dict, pts: dict, path: Path) -> None:
    """tok/s against perplexity: solm's budget sweep a line per thread count (dense budget to sparsest), peers points;
    up and left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    threads = sorted({t for _, t in pts})
    markers = dict(zip(threads, ("o", "s", "^", "D")))
    colors = plt.get_cmap("tab10")
    peers = list(dict.fromkeys(e for e, _ in pts if not _is_solm(e)))
    for t in threads:
        curve = [p for (e, tt), p in sorted(pts.items(), key=lambda kv: -_keep(kv[0][0])) if tt == t and _is_solm(e)]
        if curve:
            ax.plot(*zip(*curve), "-", marker=markers[t], color="black", label=f"solm budgets, {t} thr")
        for (e, tt), (ppl, tok) in pts.items():
            if tt == t and _is_solm(e):
                ax.annotate(e.removeprefix("solm "), (ppl, tok), textcoords="offset points", xytext=(4, 4), fontsize=6)
        for i, e in enumerate(peers):
            if (e, t) in pts:
                ax.plot(*pts[(e, t)], marker=markers[t], linestyle="none", color=colors(i % 10), label=f"{e}, {t} thr")
    ctx = max(r["context"] for r in doc["rows"])
    p = doc["ppl"]
    texts = f" of {' + '.join(p['texts'])}" if p.get("texts") else ""
    ax.set_xlabel(f"perplexity ({p['scored']} held-out ids{texts}, each after {p['window'] - p['scored']}+ ids of "
                  "context; lower is better)")
    ax.set_ylabel(f"decode tok/s at ctx {ctx} (median over rounds)")
    _finish(fig, ax, f"{doc['model']}: speed against quality ({doc['machine']['cpu']})", path)


def _finish(fig, ax, title: str, path: Path) -> None:
    """Title, grid and legend, then the PNG at ``path``."""
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
