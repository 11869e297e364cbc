"""Session 10's measurement (issue 18): the static floor against the shipped policy on a held-out genre.

``solm eval`` at several budgets in ONE process, so the model is compiled once and the dense prefills, the dense
trace and the step-schedule fit are shared by every budget (``PPLEvaluator`` caches them); the JSON is rewritten
(atomically) after every budget, so a run cut short keeps what it finished. Same flags as ``solm eval`` plus
``--budgets``; the per-layer calibration is loaded from (or written to) ``--floor``; ``--methods`` picks a subset of
``METHODS`` (the policy always runs; ``floor`` needs no other row: it runs the static allocation it chose).

    python -m solm_compile.bench.floor smollm2 --data technical --fit-data fiction qa encyclopedic \\
        --floor results/floor-smollm2.json --blocks 16 --budgets 0.5/0.75/8 0.3/0.6/8 0.7/0.9/8 \\
        --out results/floor-technical-smollm2.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

METHODS = ("dense", "uniform", "schedule", "layers", "floor")


def main(argv: list[str] | None = None) -> int:
    from solm_compile.analysis.inspect import shapes_from_gated
    from solm_compile.cli.app import build_parser
    from solm_compile.cli.eval import _methods
    from solm_compile.cli.common import kv_shape, load_gated
    from solm_compile.cli.eval_data import fit_texts, texts
    from solm_compile.cli.eval_floor import floor_data
    from solm_compile.data import corpora as d
    from solm_compile.errors import UserError
    from solm_compile.eval.evaluate import CostModel, PPLEvaluator
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.io import atomic_write_text
    from solm_compile.policy.checkpoint import load_policy, shipped_policy

    argv = list(sys.argv[1:] if argv is None else argv)
    budgets, out = [], None
    if "--budgets" in argv:
        i = argv.index("--budgets")
        j = next((k for k in range(i + 1, len(argv)) if argv[k].startswith("--")), len(argv))
        budgets, argv = argv[i + 1:j], argv[:i] + argv[j:]
    if "--out" in argv:
        i = argv.index("--out")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    if not budgets or out is None:
        raise UserError("give --budgets K/R/B ... and --out FILE.json")
    targets = []
    for b in budgets:
        try:
            k, r, bits = (float(x) for x in b.split("/"))
        except ValueError as e:
            raise UserError(f"--budgets {b}: want attn/mlp/bits, e.g. 0.5/0.75/8") from e
        targets.append((k, r, bits / 16.0))
    args = build_parser().parse_args(["eval", *argv, "--attn-keep", "1", "--mlp-keep", "1", "--bits", "16"])
    t0 = time.perf_counter()
    loaded, gated = load_gated(args)
    lm = GatedLM(gated, kv_shape(loaded))
    path = Path(args.policy) if args.policy else shipped_policy(loaded.info)
    lp = load_policy(path, loaded.info)
    methods = _methods(args.methods) if args.methods else ("policy",) + METHODS
    block_len = args.ctx + args.T + 1
    blocks = d.token_blocks(loaded.tokenizer, texts(args.data), block_len, args.blocks, seed=args.seed)
    fit = d.token_blocks(loaded.tokenizer, fit_texts(args.fit_data), block_len, args.fit_blocks, seed=args.seed + 1)
    costs, choose, floor_info = floor_data(lm, loaded, lp.grid, args)
    ev = PPLEvaluator(lm, lp.policy, lp.grid, blocks, ctx=args.ctx, T=args.T,
                      cost=CostModel(shapes_from_gated(gated), gated.gate), fit_blocks=fit, seed=args.seed,
                      batch_rows=args.batch_rows, methods=methods, layer_costs=costs,
                      calib_blocks=choose, keep_passages=0)
    result = {"model": loaded.info.name, "policy": str(path), "policy_step": lp.step, "data": args.data,
              "blocks": args.blocks, "ctx": args.ctx, "T": args.T, "fit_data": args.fit_data,
              "fit_blocks": args.fit_blocks, "floor": floor_info, "command": "python -m solm_compile.bench.floor "
              + " ".join(sys.argv[1:] if len(sys.argv) > 1 else []), "points": []}
    for t in targets:
        result["points"].append(ev.run(t))
        result["wall_s"] = time.perf_counter() - t0
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")
        m = result["points"][-1]["methods"]
        print(f"{t}: " + ", ".join(f"{k} {v['ppl']:.3f}" for k, v in m.items())
              + f" (floor = {m.get('floor', {}).get('floor_of')})", flush=True)
    return 0


if __name__ == "__main__":
    from solm_compile.errors import UserError

    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
