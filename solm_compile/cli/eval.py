"""``solm eval``: the policy against budget-matched baselines (perplexity, a budget sweep, or multiple choice).

See ``evaluate.py`` for the protocol and ``baselines.py`` for what each baseline does.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from solm_compile.cli.eval_data import DATA_HELP, FIT_HELP, check_data, check_fit_data, fit_texts, texts
from solm_compile.cli.eval_floor import FLOOR_HELP, floor_data
from solm_compile.cli.eval_report import (ORDER, choices_markdown, format_choices, format_ppl, plot_sweep,
                                          sweep_markdown)

log = logging.getLogger(__name__)



def add_eval_parser(sub, common) -> None:
    from solm_compile.data.corpora import MC_TASKS
    from solm_compile.eval.evaluate import METHODS

    p = sub.add_parser("eval", help="perplexity or accuracy of the policy against budget-matched baselines",
                       description="MODEL may also be a compiled artifact (.onnx): then its own policy is measured "
                       "at the given budget against the same artifact at the dense budget (perplexity only)")
    common(p)
    p.add_argument("--policy", help="policy checkpoint (default: the shipped solm_compile/policy/shipped/<model>.pt); "
                   "'static': no policy, the floor alone at the given budget (the strongest static allocation)")
    p.add_argument("--floor", metavar="FILE", help=FLOOR_HELP)
    p.add_argument("--data", default="persuasion", help=DATA_HELP)
    p.add_argument("--fit-data", nargs="+", default=["austen"], help=FIT_HELP)
    p.add_argument("--attn-keep", type=float, help="policy target: mean attention keep κ̄ (0.05..1)")
    p.add_argument("--mlp-keep", type=float, help="policy target: mean MLP-input keep ρ̄ (0.1..1)")
    p.add_argument("--bits", type=float, help="policy target: mean MLP-output bits b̄ (2..16; default 16). Policies "
                   "trained since issue 18 have no bits axis (16 only: fake-quantising the MLP output saves nothing on "
                   "a CPU); older ones (27 actions) and --policy static still take lower bits")
    for name, default, help_ in (
            ("blocks", 32, "held-out blocks of ctx+T+1 tokens"), ("ctx", 256, "dense prefill tokens per block"),
            ("T", 16, "controlled, scored steps per block"),
            ("random_seeds", 10, "random-schedule seeds (median and best of N are reported)"),
            ("fit_blocks", 8, "training-text blocks to fit the step-schedule baseline on"),
            ("batch_rows", 32, "rows per batched decode step"), ("seed", 0, "block selection and random seeds"),
            ("items", 100, "multiple-choice items (with --task)"),
            ("calib_blocks", 8, "the floor's calibration: 2N validation blocks drawn evenly per training genre, "
             "alternate ones fit the layers and choose the floor"),
            ("calib_steps", 4, "steps per block of the per-layer calibration")):
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=default,
                       help=f"{help_} (default {default})")
    p.add_argument("--sweep", action="store_true", help="run every method at 8 budget points from net keep "
                   "≈0.4 to ≈0.93; writes PREFIX.png (Pareto plot), .md, .json and .html (needs --out)")
    p.add_argument("--out", help="output prefix: perplexity writes PREFIX.json and PREFIX.html (held-out passages "
                   "shaded by the policy's per-token compute), --sweep also PREFIX.png/.md, --task PREFIX.json/.md")
    p.add_argument("--task", choices=tuple(MC_TASKS), help="multiple-choice accuracy instead of perplexity")
    p.add_argument("--methods", help="comma-separated subset of the perplexity methods to run (the policy always "
                   f"runs; default all: {','.join(METHODS)})")
    p.set_defaults(fn=cmd_eval)


# ---------------------------------------------------------------------------------------------- checks
def _model_name(spec: str) -> str:
    from solm_compile.frontend.models import ALIASES

    if spec in ALIASES:
        return spec
    p = Path(spec)
    return p.name if p.is_dir() else p.stem


def shipped_policy(name: str) -> Path:
    from solm_compile.policy.checkpoint import POLICY_DIR

    return POLICY_DIR / f"{name}.pt"


def _check_args(args):
    """Every check that needs no model; returns (targets (κ, ρ, b/16) or None for a sweep, policy path)."""
    from solm_compile.policy import checkpoint
    from solm_compile.policy.actions import ActionGrid
    from solm_compile.config import Budget
    from solm_compile.errors import UserError
    from solm_compile.policy.network import PolicyConfig

    for name, lo in (("blocks", 1), ("ctx", 1), ("T", 1), ("random_seeds", 0), ("fit_blocks", 1),
                     ("batch_rows", 1), ("items", 1), ("calib_blocks", 1), ("calib_steps", 1)):
        if getattr(args, name) < lo:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be >= {lo}, got {getattr(args, name)}")
    given = [v is not None for v in (args.attn_keep, args.mlp_keep)]
    if args.methods is not None:
        if args.task:
            raise UserError("--methods selects perplexity methods; drop it with --task")
        args.methods = _methods(args.methods)
    if args.sweep:
        if args.task:
            raise UserError("--sweep runs perplexity only; drop --task (or --sweep)")
        if not args.out:
            raise UserError("--sweep needs --out PREFIX (writes PREFIX.png, PREFIX.md, PREFIX.json)")
        if any(given) or args.bits is not None:
            raise UserError("--sweep picks its own budgets; drop --attn-keep/--mlp-keep/--bits")
    else:
        if not all(given):
            raise UserError("give the policy's budget with --attn-keep and --mlp-keep (--bits: default 16), or use "
                            "--sweep")
    if args.out and not Path(args.out).parent.is_dir():
        raise UserError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    targets = None
    if not args.sweep:
        b = Budget(attn_keep=args.attn_keep, mlp_keep=args.mlp_keep, bits=16.0 if args.bits is None else args.bits)
        targets = (b.attn_keep, b.mlp_keep, b.bits / 16.0)
    if not args.task:
        check_data(args.data)
    check_fit_data(args.fit_data)
    if args.policy == "static":
        if args.task:
            raise UserError("--policy static evaluates perplexity only; drop --task")
        return targets, None
    if args.policy:
        path = Path(args.policy)
    else:
        path = shipped_policy(_model_name(args.model))
        if not path.is_file():
            raise UserError(f"no --policy given and no shipped policy {path.name} for {args.model}; train one with "
                            f"'solm train {args.model} --out policy.pt' and pass --policy policy.pt")
    ck = checkpoint.read(path)
    try:
        grid = ActionGrid.from_dict(ck["grid"])
        max_steps = PolicyConfig.from_dict(dict(ck["train_config"]["policy"])).max_steps
    except (UserError, KeyError, TypeError) as e:
        raise UserError(f"{path}: policy checkpoint does not match its own config ({e})") from e
    if targets is not None:
        lows = (grid.kappa_levels[0], grid.rho_levels[0], grid.bit_levels[0] / 16.0)
        for flag, t, lo, scale in zip(("--attn-keep", "--mlp-keep", "--bits"), targets, lows, (1, 1, 16)):
            if t < lo - 1e-9:
                raise UserError(f"{flag} {t * scale:g} is below the policy's lowest level {lo * scale:g} "
                                f"(its grid: {grid.to_dict()})")
    if not args.task and args.T > max_steps:
        raise UserError(f"--T {args.T} exceeds the policy's position table ({max_steps} steps)")
    return targets, path


def _methods(spec: str) -> tuple[str, ...]:
    from solm_compile.errors import UserError
    from solm_compile.eval.evaluate import FLOOR_METHODS, METHODS

    names = [n.strip() for n in spec.split(",") if n.strip()]
    every = METHODS + FLOOR_METHODS
    unknown = [n for n in names if n not in every]
    if unknown or not names:
        raise UserError(f"--methods {spec}: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {','.join(every)}")
    return tuple(m for m in every if m in names or m == "policy")


# ---------------------------------------------------------------------------------------------- data
def _mc_items(tokenizer, task: str, n: int, seed: int) -> list[dict]:
    """Tokenised items: the continuation is what the context + choice adds to the context's tokens."""
    from solm_compile.data import corpora as d

    items, lead = [], d.leading_special_ids(tokenizer)
    for it in d.multiple_choice(task, n, seed):
        ctx = lead + list(tokenizer.encode(it["context"], add_special_tokens=False))
        conts = []
        for ch in it["choices"]:
            whole = lead + list(tokenizer.encode(it["context"] + ch, add_special_tokens=False))
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else []
            conts.append(cont or list(tokenizer.encode(ch, add_special_tokens=False)))
        items.append({"ctx": ctx, "conts": conts, "label": int(it["label"]), "chars": [len(c) for c in it["choices"]]})
    return items


# ---------------------------------------------------------------------------------------------- command
def cmd_eval(args: argparse.Namespace) -> int:
    from solm_compile.data import corpora as d
    from solm_compile.policy.checkpoint import check_mlp_skip, load_policy
    from solm_compile.cli.common import load_gated
    from solm_compile.data.assets import atomic_target, atomic_write_text
    from solm_compile.cli.common import kv_shape
    from solm_compile.errors import UserError
    from solm_compile.eval.evaluate import (FLOOR_METHODS, METHODS, CostModel, PPLEvaluator, evaluate_choices,
                                            sweep_points)
    from solm_compile.policy.actions import ActionGrid
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.analysis.inspect import shapes_from_gated
    from solm_compile.eval.report_html import write_report

    if str(args.model).endswith(".onnx"):
        return _eval_artifact(args)
    t_start = time.perf_counter()
    targets, policy_path = _check_args(args)
    loaded, gated = load_gated(args)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.info.name}: evaluation needs the model's tokenizer (none found)")
    lp = load_policy(policy_path, loaded.info) if policy_path else None
    if lp is not None:
        check_mlp_skip(lp, gated.gate)
    if lp is not None and lp.gate != gated.gate:
        log.warning("%s was trained with gate %s; evaluating with %s", policy_path, lp.gate.to_dict(),
                    gated.gate.to_dict())
    grid = lp.grid if lp else ActionGrid()
    lm = GatedLM(gated, kv_shape(loaded))
    cost = CostModel(shapes_from_gated(gated), gated.gate)
    head = {"model": loaded.info.name, "weights": args.weights, "policy": str(policy_path or "static"),
            "policy_step": lp.step if lp else None, "grid": grid.to_dict(), "gate": gated.gate.to_dict()}
    if lp is not None and lp.kind != "joint":
        head.update(policy_kind=lp.kind, policy_floor=(lp.floor or {}).get("id"))
        if args.task:
            raise UserError(f"--task: {policy_path} is an offsets policy; multiple choice runs joint policies only")
    if args.task:
        items = _mc_items(loaded.tokenizer, args.task, args.items, args.seed)
        try:
            r = evaluate_choices(lm, lp.policy, lp.grid, items, targets, cost=cost, batch_rows=args.batch_rows,
                                 random_seeds=args.random_seeds, seed=args.seed, episode=int(lp.train_config["T"]))
        except ValueError as e:
            raise UserError(f"--task {args.task}: {e}") from e
        result = {**head, "task": args.task, "items": len(items), "seed": args.seed,
                  "random_seeds": args.random_seeds, **r, "wall_s": time.perf_counter() - t_start}
        if args.out:
            atomic_write_text(Path(f"{args.out}.json"), json.dumps(result, indent=2) + "\n")
            atomic_write_text(Path(f"{args.out}.md"), choices_markdown([result]))
        print(json.dumps(result, indent=2) if args.json else format_choices(result))
        return 0

    block_len = args.ctx + args.T + 1
    blocks = d.token_blocks(loaded.tokenizer, texts(args.data), block_len, args.blocks, seed=args.seed)
    fit = d.token_blocks(loaded.tokenizer, fit_texts(args.fit_data), block_len, args.fit_blocks, seed=args.seed + 1)
    methods = args.methods or (("dense", "floor") if lp is None else
                               METHODS + (FLOOR_METHODS if args.floor else ()))
    costs = choose = floor_info = None
    if any(m in FLOOR_METHODS for m in methods):
        costs, choose, floor_info = floor_data(lm, loaded, grid, args)
    ev = PPLEvaluator(lm, lp.policy if lp else None, grid, blocks, ctx=args.ctx, T=args.T, cost=cost, fit_blocks=fit,
                      random_seeds=args.random_seeds, seed=args.seed, batch_rows=args.batch_rows,
                      methods=methods, layer_costs=costs, calib_blocks=choose,
                      policy_floor=lp.floor if lp else None)
    common = {**head, "data": args.data, "blocks": args.blocks, "ctx": args.ctx, "T": args.T,
              "random_seeds": args.random_seeds, "fit_data": args.fit_data, "fit_blocks": args.fit_blocks,
              "floor": floor_info}
    if not args.sweep:
        r = ev.run(targets)
        result = {**common, **r, "schedule_fit": ev.step_costs.to_dict() if ev.step_costs else None,
                  "wall_s": time.perf_counter() - t_start}
        if args.out:
            atomic_write_text(Path(f"{args.out}.json"), json.dumps(result, indent=2) + "\n")
            if lp is not None:                                  # the report shades the policy's passages
                write_report(args.out, result, ev.passages, loaded.tokenizer, grid, ORDER)
        print(json.dumps(result, indent=2) if args.json else format_ppl(result))
        return 0
    points = []
    for p in sweep_points(grid):
        points.append(ev.run((p[0], p[1], p[2] / 16.0)))
        log.info("sweep point %s done", p)
    result = {**common, "points": points, "schedule_fit": ev.step_costs.to_dict() if ev.step_costs else None,
              "wall_s": time.perf_counter() - t_start}
    out = Path(args.out)
    atomic_write_text(Path(f"{out}.json"), json.dumps(result, indent=2) + "\n")
    atomic_write_text(Path(f"{out}.md"), sweep_markdown(result))
    with atomic_target(Path(f"{out}.png")) as tmp:
        plot_sweep(result, tmp)
    if lp is not None:
        write_report(out, result, ev.passages, loaded.tokenizer, grid, ORDER)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(sweep_markdown(result))
        print(f"wrote {out}.png, {out}.md, {out}.json, {out}.html")
    return 0


def _eval_artifact(args: argparse.Namespace) -> int:
    from solm_compile.config import Budget
    from solm_compile.errors import UserError
    from solm_compile.eval.artifact import evaluate_artifact, format_artifact_eval

    for flag, bad in (("--sweep", args.sweep), ("--task", args.task), ("--policy", args.policy)):
        if bad:
            raise UserError(f"{flag} does not apply to an artifact ({args.model}): its policy is compiled in and "
                            f"it is evaluated for perplexity at one budget; evaluate the model for that")
    for name, lo in (("blocks", 1), ("ctx", 1), ("T", 1), ("batch_rows", 1)):
        if getattr(args, name) < lo:
            raise UserError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    given = [v is not None for v in (args.attn_keep, args.mlp_keep, args.bits)]
    if any(given) and not all(given):
        raise UserError("give all of --attn-keep, --mlp-keep and --bits (or none: the dense budget)")
    budget = (1.0, 1.0, 16.0)
    if all(given):
        b = Budget(attn_keep=args.attn_keep, mlp_keep=args.mlp_keep, bits=args.bits)
        budget = (b.attn_keep, b.mlp_keep, b.bits)
    check_data(args.data)
    r = evaluate_artifact(Path(args.model), texts(args.data), budget, ctx=args.ctx, T=args.T, blocks=args.blocks,
                          seed=args.seed, batch_rows=args.batch_rows)
    print(json.dumps({"data": args.data, **r}, indent=2) if args.json else format_artifact_eval(r))
    return 0
