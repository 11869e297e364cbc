"""What ``--mlp-skip h`` costs in perplexity on the real model (issue 17), through the artifacts SolmEP runs.

Compiles two ``--fixed`` artifacts of the same weights (``--mlp-skip x``: the source blocks; ``--mlp-skip h``: down
re-quantised transposed to 8 bits) and scores each with ``SolmSession.score`` on the window ``solm bench --engines``
uses (the first ``--window`` ids of the held-out novel, ``bench.measure.bench_tokens``; the last ``--scored`` ids,
each by a decode step after a dense prefill of the rest) at attention keep 1, bits 16 and MLP keep ρ for each
``--rho``. ρ = 1 on the h artifact vs the x artifact is the cost of re-quantising down; ρ < 1 is each skip's.
``--down-bits 8,4`` adds an h artifact per bits of its transposed down (``--mlp-down-bits``).
``python -m solm_compile.bench.hskip_ppl [--rho 1,0.75,0.5] [--activations int8|fp32] [--down-bits 8,4] [--dir D] [--out F.json]``;
prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path


def run(model: str, weights: str, rhos, window: int, scored: int, threads: int, workdir: Path,
        activations: str = "int8", say=print, down_bits=(8,)) -> dict:
    from solm_compile.api import SolmConfig, compile, load
    from solm_compile.config import GateConfig
    from solm_compile.bench.measure import bench_tokens

    arts = {}
    for skip, bits in [("x", 8)] + [("h", b) for b in down_bits]:
        t = time.perf_counter()
        tag = f"-down{bits}" if skip == "h" and bits != 8 else ""
        path = workdir / f"{skip}-{weights}-{activations}{tag}.solm.onnx"
        if not path.is_file():
            path = compile(model, SolmConfig(kind="fixed", weights=weights, gate=GateConfig(mlp_skip=skip),
                                             activations=activations, mlp_down_bits=bits), path)
        arts[(skip, bits)] = path
        say(f"compiled --mlp-skip {skip}" + (f" --mlp-down-bits {bits}" if skip == "h" else "")
            + f" ({time.perf_counter() - t:.0f} s)")
    rows, source = [], None
    for (skip, bits), path in arts.items():
        sess = load(path, threads=threads)
        if source is None:
            ids, source = bench_tokens(sess.tokenizer, window + 64, sess.meta.get("vocab_size", 1 << 30))
            ids = list(ids[:window])
        for rho in rhos:
            t = time.perf_counter()
            lp = sess.score(ids, window - scored, budget=(1.0, rho, 16))
            rows.append({"mlp_skip": skip, "down_bits": bits if skip == "h" else None, "rho": rho, "ppl": math.exp(-float(lp.mean())), "scored": len(lp),
                         "seconds": round(time.perf_counter() - t, 1)})
            say(f"  skip {skip}{f' down {bits}' if skip == 'h' else ''} ρ {rho}: PPL {rows[-1]['ppl']:.3f} ({rows[-1]['seconds']} s)")
        del sess
    base = next(r["ppl"] for r in rows if r["mlp_skip"] == "x" and r["rho"] >= 1)
    for r in rows:
        r["vs_x_dense"] = r["ppl"] / base - 1
    return {"model": model, "weights": weights, "activations": activations, "kind": "fixed (SolmEP; attn keep 1, bits 16)", "tokens": source,
            "window": window, "scored": scored, "threads": threads, "rows": rows}


def table(r: dict) -> str:
    lines = [f"{r['model']} --weights {r['weights']} --activations {r['activations']}, {r['kind']}, {r['tokens']}: ids [{r['window'] - r['scored']}, "
             f"{r['window']}) scored", "", "| --mlp-skip | downᵀ bits | ρ | PPL | vs skip x at ρ 1 |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['mlp_skip']} | {x.get('down_bits') or '—'} | {x['rho']} | {x['ppl']:.3f} | "
                     f"{x['vs_x_dense']:+.1%} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m solm_compile.bench.hskip_ppl", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--weights", default="source")
    ap.add_argument("--rho", default="1,0.75,0.5", help="comma-separated MLP keep fractions")
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--scored", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--activations", default="int8", choices=("int8", "fp32"))
    ap.add_argument("--down-bits", default="8", help="comma-separated bits of h's transposed down (8, 4)")
    ap.add_argument("--dir", help="keep the artifacts here (reused when present) instead of a temporary folder")
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args(argv)
    rhos = [float(x) for x in a.rho.split(",")]
    bits = tuple(int(x) for x in a.down_bits.split(","))
    if a.dir:
        Path(a.dir).mkdir(parents=True, exist_ok=True)
        r = run(a.model, a.weights, rhos, a.window, a.scored, a.threads, Path(a.dir), a.activations, down_bits=bits)
    else:
        with tempfile.TemporaryDirectory() as d:
            r = run(a.model, a.weights, rhos, a.window, a.scored, a.threads, Path(d), a.activations, down_bits=bits)
    print(table(r))
    if a.out:
        from solm_compile.io import atomic_write_text

        atomic_write_text(a.out, json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
