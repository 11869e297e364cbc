"""Load test of ``solm serve``: concurrent streamed clients on loopback, per budget; prints a table and JSON.

    python -m solm_compile.bench.serve_load smollm2.solm.onnx [smollm2.portable.onnx] --threads 2 --out r.json

For each artifact, one server in this process (``serve.background``: loopback, ephemeral port, continuous batching
with ``--max-active`` = the largest client count; ``--replicas N``: N Ray Serve replicas of it on a local Ray,
``serve.ray_serve``, each answer naming its replica; ``--url``: the server already running there), then for each (budget, clients) cell: ``clients`` threads each
send ``--requests`` streamed completions one after another (prompts of 128–512 token ids cut from *Persuasion*,
``corpora.heldout_text``, lengths and offsets from ``--seed``; ``max_tokens`` 64, greedy). Per cell: throughput
(completion tokens / wall time), p50/p99 time to first token and inter-token latency (gaps between streamed token
chunks), and every request's outcome: completed, or its HTTP status and error (nothing is dropped silently). Cells run
in ``--rounds`` rounds, each in a rotated order (../shared/benchmark_protocol.md); a cell's numbers are the medians
over rounds. Bounded: at most clients × requests × cells × rounds requests, and no request starts after
``--max-wall`` seconds (those are reported as not run). Budgets: ``dense`` (1, 1, 16) and κ̄ = ρ̄ = r for each r in
``--keep`` (bits 16). Timings need a quiet machine (the protocol's rule 2): say so when it was not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from solm_compile.errors import UserError
from solm_compile.serve.config import ServeConfig

TIMEOUT_S = 300


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def prompts(sess, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    """``n`` prompts of lo..hi token ids, windows of the held-out novel (seeded lengths and offsets)."""
    from solm_compile.data.corpora import heldout_text

    ids = sess.tokenizer.encode(heldout_text()[:400_000], add_special_tokens=False).ids
    if len(ids) < hi + 1:
        raise UserError(f"the held-out text has {len(ids)} tokens, fewer than a prompt of {hi}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        at = int(rng.integers(0, len(ids) - length))
        out.append(ids[at:at + length])
    return out


def one_request(url: str, model: str, prompt: list[int], budget: tuple, max_tokens: int) -> dict:
    """One streamed completion: {ok, status, error, tokens, ttft_s, gaps_s}."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "attn_keep": budget[0], "mlp_keep": budget[1], "bits": budget[2]}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    arrivals, error, replica = [], None, None
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            replica = r.headers.get("x-solm-replica")             # set by solm serve --replicas (ray_serve.py)
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message", "error")
                    break
                if (chunk.get("solm") or {}).get("token") is not None:      # one chunk per generated token
                    arrivals.append(time.perf_counter())
        status = 200
    except urllib.error.HTTPError as e:
        status, error = e.code, json.loads(e.read() or b"{}").get("error", {}).get("message", str(e))
    except (urllib.error.URLError, OSError) as e:
        status, error = 0, f"{type(e).__name__}: {e}"
    return {"ok": error is None and status == 200, "status": status, "error": error, "replica": replica,
            "tokens": len(arrivals),
            "ttft_s": arrivals[0] - t0 if arrivals else None,
            "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:])]}


def run_cell(url, model, budget, clients, per_client, pool, max_tokens, stop_at) -> dict:
    """``clients`` threads × ``per_client`` requests; returns the cell's numbers and every request's outcome."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int):
        for k in range(per_client):
            if time.monotonic() > stop_at:
                with lock:
                    results.append({"ok": False, "status": None, "error": "not run (--max-wall reached)",
                                    "replica": None, "tokens": 0, "ttft_s": None, "gaps_s": []})
                continue
            r = one_request(url, model, pool[(c * per_client + k) % len(pool)], budget, max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps_s"]]
    ttft = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    return {"tok_s": tokens / wall if wall > 0 else None, "wall_s": wall, "tokens": tokens,
            "ttft_p50_ms": _ms(percentile(ttft, 50)), "ttft_p99_ms": _ms(percentile(ttft, 99)),
            "itl_p50_ms": _ms(percentile(gaps, 50)), "itl_p99_ms": _ms(percentile(gaps, 99)),
            "completed": sum(r["ok"] for r in results), "requests": len(results),
            "replicas_seen": len({r["replica"] for r in results if r["replica"] is not None}),
            "errors": sorted({f"{r['status']}: {r['error']}" for r in results if not r["ok"]})}


def _ms(s):
    return None if s is None else s * 1e3


def bench_artifact(path: str, args, budgets: dict, stop_at: float) -> list[dict]:
    from solm_compile.runtime.session import SolmSession

    config = ServeConfig(context=args.prompt_max + args.max_tokens + 8, max_active=max(args.clients),
                         max_queue=4 * max(args.clients), timeout_s=TIMEOUT_S, threads=args.threads,
                         replicas=args.replicas, port=args.port if args.replicas else 0,
                         prefill_chunk=args.prefill_chunk, spin=args.spin)
    sess = SolmSession(path, **config.session_options)
    pool = prompts(sess, max(args.clients) * args.requests, args.prompt_min, args.prompt_max, args.seed)
    if sess.kind == "dense":
        budgets = {"dense": budgets["dense"]}
    cells = [(b, c) for b in budgets for c in args.clients]
    runs: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    model = Path(path).name.removesuffix(".onnx")
    with serving(sess, config, args.url) as url:
        one_request(url, model, pool[0][:16], budgets["dense"], 2)                  # untimed warm-up
        for r in range(args.rounds):
            k = r % len(cells)
            for cell in cells[k:] + cells[:k]:
                runs[cell].append(run_cell(url, model, budgets[cell[0]], cell[1], args.requests, pool,
                                           args.max_tokens, stop_at))
                done = runs[cell][-1]
                print(f"{model}, round {r + 1}/{args.rounds}, {cell[0]}, {cell[1]} clients: "
                      f"{done['completed']}/{done['requests']} done, {done['tok_s'] or 0:.1f} tok/s, "
                      f"{done['wall_s']:.0f} s", file=sys.stderr, flush=True)
    rows = []
    for (budget, clients), cell_runs in runs.items():
        med = {key: _median([c[key] for c in cell_runs]) for key in
               ("tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")}
        rows.append({"artifact": Path(path).name, "kind": sess.kind, "budget": budget, "clients": clients,
                     "replicas": None if args.url else args.replicas or 1, **med,
                     "completed": sum(c["completed"] for c in cell_runs),
                     "requests": sum(c["requests"] for c in cell_runs),
                     "replicas_seen": max(c["replicas_seen"] for c in cell_runs),
                     "errors": sorted({e for c in cell_runs for e in c["errors"]}), "rounds": cell_runs})
    return rows


def serving(sess, config, url: str | None = None):
    """The server under test: the one already at ``url``; else on loopback in this process (``serve.background``),
    or with ``config.replicas`` as that many Ray Serve replicas on a local Ray (``serve.ray_serve``)."""
    if url is not None:
        return contextlib.nullcontext(url.rstrip("/"))
    if config.replicas is None:
        from solm_compile.serve import background, create_app

        return background(create_app(sess, config))
    try:
        from solm_compile.serve.ray_serve import ray_serving
    except ImportError as e:
        raise UserError(f"--replicas needs Ray Serve ({e.name} is missing): pip install 'solm-compile[ray]'") from e
    return ray_serving(sess.path, config)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def table(rows: list[dict]) -> str:
    head = ("artifact", "replicas", "budget", "clients", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
            "done")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda x, nd=1: "—" if x is None else f"{x:.{nd}f}"  # noqa: E731
    for r in rows:
        replicas = r["replicas"] if r["replicas"] == 1 else f"{r['replicas'] or '?'} ({r['replicas_seen']} answered)"
        lines.append(f"| {r['artifact']} | {replicas} | {r['budget']} | {r['clients']} | {f(r['tok_s'])} | "
                     f"{f(r['ttft_p50_ms'], 0)} ms | {f(r['ttft_p99_ms'], 0)} ms | {f(r['itl_p50_ms'])} ms | "
                     f"{f(r['itl_p99_ms'])} ms | {r['completed']}/{r['requests']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m solm_compile.bench.serve_load", description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    ap.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16)")
    ap.add_argument("--requests", type=int, default=4, help="requests per client per cell (default 4)")
    ap.add_argument("--keep", default="0.5", help="sparse budgets: κ̄ = ρ̄ = each value (default 0.5)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-min", type=int, default=128)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1, help="rounds over the cells, rotated (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--max-wall", type=float, default=1800.0, help="no request starts after this many seconds")
    ap.add_argument("--replicas", type=int, default=None,
                    help="serve through N Ray Serve replicas (solm serve --replicas; the ray extra) instead of one "
                         "server in this process; each replica has --max-active = the largest client count")
    ap.add_argument("--url", default=None, help="bench the server already at this base URL (e.g. solm serve "
                    "--replicas 2: http://127.0.0.1:8000) instead of starting one; ARTIFACT gives the prompts' "
                    "tokenizer and the model id")
    ap.add_argument("--port", type=int, default=8000, help="the Ray proxy's loopback port with --replicas (default 8000)")
    ap.add_argument("--prefill-chunk", type=int, default=ServeConfig.prefill_chunk,
                    help="the server's tokens per prefill run of a joining prompt (solm serve --prefill-chunk)")
    ap.add_argument("--spin", action="store_true",
                    help="the server's onnxruntime threads spin between parallel regions (solm serve --spin)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",")]
        keeps = [float(k) for k in args.keep.split(",") if k]
        if min(args.clients) < 1 or args.requests < 1 or args.rounds < 1 or args.max_tokens < 1:
            raise ValueError("--clients, --requests, --rounds and --max-tokens must be >= 1")
        if args.url and args.replicas is not None:
            raise ValueError("--url benches a server already running; --replicas starts one: pass one of them")
        if not 1 <= args.prompt_min <= args.prompt_max:
            raise ValueError("--prompt-min must be in [1, --prompt-max]")
    except ValueError as e:
        print(f"serve_load: error: {e}", file=sys.stderr)
        return 2
    budgets = {"dense": (1.0, 1.0, 16.0), **{f"keep {k:g}": (k, k, 16.0) for k in keeps}}
    stop_at = time.monotonic() + args.max_wall
    try:
        rows = [row for path in args.artifacts for row in bench_artifact(path, args, budgets, stop_at)]
    except UserError as e:
        print(f"serve_load: error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    doc = {"command": "python -m solm_compile.bench.serve_load " + " ".join(argv or sys.argv[1:]),
           "max_tokens": args.max_tokens, "prompt_tokens": [args.prompt_min, args.prompt_max], "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"} |
                     {"rows": [{k: v for k, v in r.items() if k != "rounds"} for r in rows]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
