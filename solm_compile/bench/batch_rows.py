"""Per-row budgets in a batch: decode speed of B rows in one step against one row (issue 17's B = 1 and B = 4).

    python -m solm_compile.bench.batch_rows smollm2.fixed.onnx --context 1024 --rows 1,4 --keep 0.5 --threads 1

A ``fixed`` artifact (SolmEP, step protocol 2, ``runtime.batch.Batch``). Per cell (rows B, budget): a batch of B rows,
each prefilled with its own ``context`` ids of the held-out novel (different offsets), then teacher-forced decode
steps on the next ids. Budgets: ``dense`` (κ̄ = ρ̄ = 1) and κ̄ = ρ̄ = K for each ``--keep`` K (κ̄ K and ρ̄ R for K/R),
the same for every row. Cells are timed in ``--rounds`` rounds of ``--steps`` steps, in an order rotated per round
(shared/benchmark_protocol.md); a cell's step time is the median over rounds. Per cell it reports tok/s (B tokens a
step), the speed-up of each sparse budget over the dense budget at the same B, and what SolmEP's work counters say
each token read: K/V rows, gate/up input rows and down rows (either down layout) as fractions of dense. The counters
are per token: a unit kept by several rows is counted once per row but, within one step, streamed from memory about
once, so the MLP's memory traffic is the union of the rows' kept sets while K/V stay per row. (Under int8 with a 4-bit
down, two or more tokens at ρ < 1 run one GEMM on their masked h, counted per token as the blocks holding a kept unit:
kernels_mlp_blocks_op.cc.) The speed-up at B = 4 against B = 1 is what that union costs. Timings need a quiet machine
(the protocol's rule 2): say so when it was not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from solm_compile.errors import UserError


def windows(tokenizer, rows: int, n: int, seed: int) -> list[np.ndarray]:
    """``rows`` windows of ``n`` ids of the held-out novel at seeded, distinct offsets."""
    from solm_compile.data.corpora import heldout_text

    enc = tokenizer.encode(heldout_text(), add_special_tokens=False)
    ids = np.asarray(getattr(enc, "ids", enc), np.int64)                # tokenizers' Encoding or HF's list
    if len(ids) < rows * n:
        raise UserError(f"the held-out text has {len(ids)} tokens, fewer than {rows} windows of {n}")
    starts = np.random.default_rng(seed).permutation(len(ids) // n)[:rows] * n
    return [ids[s:s + n] for s in starts]


def model_tokenizer(sess):
    """The tokenizer of the artifact's model: beside the artifact, else the model's own (models.load by alias)."""
    try:
        return sess._tokenizer()
    except UserError:
        from solm_compile.frontend.models import load

        return load(sess.meta["model"]["name"]).tokenizer


class Cell:
    """One (rows, budget) batch, prefilled, that decodes its windows' next ids ``steps`` at a time."""

    def __init__(self, sess, texts: list[np.ndarray], context: int, budget: tuple, capacity: int):
        self.texts, self.pos, self.budget = texts, context, budget
        self.batch = sess.batch(rows=len(texts), capacity=capacity)
        for t in texts:
            self.batch.join(t[:context], budget)

    def run(self, steps: int) -> float:
        """``steps`` decode steps; returns the seconds they took."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.batch.step({slot: int(t[self.pos]) for slot, t in enumerate(self.texts)})
            self.pos += 1
        return time.perf_counter() - t0


def fractions(c: dict, dense: dict) -> dict:
    """Per-token read fractions from work-counter differences: K/V rows against the dense cell's (same rows, same
    positions: it reads every row), gate/up and down rows against the counters' own dense counts."""
    f = lambda a, b: a / b if b else None  # noqa: E731
    return {"kv_rows": f(c["attn_kv_rows_read"], dense["attn_kv_rows_read"]),
            "mlp_in": f(c["mlp_in_rows"], c["mlp_in_rows_dense"]),
            "mlp_down": f(c["mlp_down_rows"] + c.get("mlp_down_dense_rows", 0), c["mlp_down_rows_dense"])}


def bench(path: str, args) -> dict:
    from solm_compile.runtime import ep
    from solm_compile.runtime.session import SolmSession

    sess = SolmSession(path, threads=args.threads, tokenizer=False)         # a bench artifact has none beside it
    if sess.kind != "fixed":
        raise UserError(f"{path}: a fixed artifact is needed (solm-compile MODEL --fixed), this one is {sess.kind}")
    need = args.context + args.warmup + args.rounds * args.steps
    texts = windows(model_tokenizer(sess), max(args.rows), need + 1, args.seed)
    budgets = {"dense": (1.0, 1.0, 16)} | {f"keep {k:g}" + (f"/{r:g}" if r != k else ""): (k, r, 16)
                                           for k, r in args.keep}
    cells = {(b, name): Cell(sess, texts[:b], args.context, budget, need + 1)
             for b in args.rows for name, budget in budgets.items()}
    for cell in cells.values():
        cell.run(args.warmup)
    times: dict = {key: [] for key in cells}
    reads: dict = {key: None for key in cells}
    order = list(cells)
    for r in range(args.rounds):
        for key in order[r % len(order):] + order[:r % len(order)]:
            c0 = ep.work_counters()
            times[key].append(cells[key].run(args.steps) / args.steps)
            c1 = ep.work_counters()
            d = {k: c1[k] - c0[k] for k in c0}
            reads[key] = d if reads[key] is None else {k: reads[key][k] + d[k] for k in d}
            print(f"round {r + 1}/{args.rounds}: {key[0]} rows, {key[1]}: {times[key][-1] * 1e3:.1f} ms/step",
                  file=sys.stderr, flush=True)
    rows = []
    for (b, name), ts in times.items():
        step = statistics.median(ts)
        dense = statistics.median(times[(b, "dense")])
        rows.append({"rows": b, "budget": name, "step_ms": step * 1e3, "tok_s": b / step,
                     "speedup_over_dense": dense / step, "step_ms_rounds": [t * 1e3 for t in ts],
                     **fractions(reads[(b, name)], reads[(b, "dense")])})
    return {"artifact": str(path), "context": args.context, "threads": args.threads, "steps": args.steps,
            "rounds": args.rounds, "rows": rows}


def table(doc: dict) -> str:
    lines = ["| rows | budget | ms/step | tok/s | × dense (same rows) | K/V rows read | gate/up rows | down rows |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda x: "—" if x is None else f"{100 * x:.0f} %"  # noqa: E731
    for r in doc["rows"]:
        lines.append(f"| {r['rows']} | {r['budget']} | {r['step_ms']:.1f} | {r['tok_s']:.1f} | "
                     f"{r['speedup_over_dense']:.2f} | {pct(r['kv_rows'])} | {pct(r['mlp_in'])} | {pct(r['mlp_down'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m solm_compile.bench.batch_rows", description=__doc__.split("\n")[0])
    ap.add_argument("artifact", help="a fixed artifact (solm-compile MODEL --fixed)")
    ap.add_argument("--context", type=int, default=1024, help="ids prefilled per row before the timed steps")
    ap.add_argument("--rows", default="1,4", help="batch sizes (default 1,4)")
    ap.add_argument("--keep", default="0.5", help="sparse budgets, comma-separated: K for κ̄ = ρ̄ = K, K/R for κ̄ K "
                    "and ρ̄ R (default 0.5)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps per cell per round (default 16)")
    ap.add_argument("--rounds", type=int, default=5, help="rotated rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=4, help="untimed steps per cell first (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    try:
        args.rows = sorted({int(x) for x in args.rows.split(",")})
        args.keep = [(float(x.split("/")[0]), float(x.split("/")[-1])) for x in args.keep.split(",")]
    except ValueError as e:
        print(f"--rows/--keep: comma-separated numbers (K or K/R for --keep) expected ({e})", file=sys.stderr)
        return 2
    try:
        if not Path(args.artifact).is_file():
            raise UserError(f"{args.artifact}: no such file")
        in_range = all(0 < v <= 1 for kr in args.keep for v in kr)
        if min(args.rows) < 1 or not in_range or min(args.steps, args.rounds) < 1:
            raise UserError("--rows must be >= 1, --keep in (0, 1], --steps and --rounds >= 1")
        doc = bench(args.artifact, args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(doc))
    if args.out:
        from solm_compile.io import atomic_write_text

        atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
