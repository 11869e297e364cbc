"""``solm bench``'s command line: flags → ``BenchConfig``, the ONNX Runtime and/or torch rows, a table or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from solm_compile.errors import UserError

from solm_compile.bench.decode import VARIANT_KINDS, BenchConfig, format_table, prepare, run_all
from solm_compile.runtime.device import DEVICES


def _int_list(flag: str, cast=int, what: str = "integers"):
    def parse(s: str) -> tuple:
        try:
            vals = tuple(cast(x) for x in s.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {what}, got {s!r}") from None
        if not vals:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated {what}, got {s!r}")
        return vals
    return parse


def _keep_list(s: str) -> tuple:
    """``--keeps``: ``0.5,0.4,0.25/0.4`` -> (0.5, 0.4, (0.25, 0.4))."""
    try:
        vals = tuple(float(x) if "/" not in x else tuple(float(y) for y in x.split("/", 1))
                     for x in (x.strip() for x in s.split(",")) if x)
    except ValueError:
        vals = ()
    if not vals:
        raise argparse.ArgumentTypeError(f"--keeps takes comma-separated K or K/R numbers, got {s!r}")
    return vals


def add_bench_parser(sub, common) -> None:
    p = sub.add_parser("bench", help="decode tok/s of the dense, solm and portable artifacts (one process)")
    common(p)
    d = BenchConfig()
    p.add_argument("--context", type=_int_list("--context"), default=None,
                   help="KV lengths to decode from, comma-separated (default 256,1024,2048; with --engines "
                        "256,1024,2048,4096)")
    p.add_argument("--threads", type=_int_list("--threads"), default=d.threads,
                   help="intra-op thread counts, comma-separated (default 1,2)")
    p.add_argument("--attn-keep", type=float, default=d.attn_keep, help="attention keep κ̄ (default 0.5)")
    p.add_argument("--mlp-keep", type=float, default=d.mlp_keep, help="MLP keep ρ̄ (default 0.5)")
    p.add_argument("--bits", type=float, default=d.bits, help="bits b̄ (default 16)")
    p.add_argument("--reps", type=int, default=d.reps, help="timed repetitions per mode (default 5); medians")
    p.add_argument("--steps", type=int, default=d.steps, help="decode steps per repetition (default 32)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed decode steps per mode first (default 4)")
    p.add_argument("--policy", help="policy checkpoint for the solm/portable artifacts (default: the shipped one); "
                                    "'random' = a random-init policy (timing only)")
    p.add_argument("--variants", default=",".join(d.variants),
                   help=f"comma-separated subset of {','.join(VARIANT_KINDS)} (dense always runs; "
                        "solm+fixed adds the replay row that isolates the policy's cost)")
    p.add_argument("--per-kv-head", action="store_true",
                   help="also time the fixed artifact with SolmEP choosing pages once per KV head (a coarser "
                        "selection than the reference; diagnostic row fixed_kvhead; with --engines: a 'per-KV-head' "
                        "row beside each sparse solm row, with its own perplexity)")
    p.add_argument("--backend", choices=("onnxruntime", "torch", "both"), default="onnxruntime",
                   help="onnxruntime: the artifacts (default); torch: torch.compile(backend='solm') at the dense and "
                        "the given budget against torch.compile(backend='inductor'); both: all rows")
    p.add_argument("--profile-policy", action=argparse.BooleanOptionalAction, default=d.profile_policy,
                   help="one profiled pass of the solm artifact for the policy's share of node time (default on)")
    p.add_argument("--prefill", action="store_true",
                   help="also time a prefill of each context per artifact (rows with mode 'prefill'; ratio to the "
                        "dense artifact's prefill)")
    p.add_argument("--device", choices=DEVICES, default=d.device,
                   help="cpu (default) or cuda: the portable and dense artifacts on onnxruntime-gpu's CUDA EP "
                        "(SolmEP is CPU-only; docs/cli.md has the install swap)")
    add_engines_args(p)
    p.set_defaults(fn=cmd_bench)


def add_engines_args(p) -> None:
    from solm_compile.bench.engines_run import ENGINE_NAMES, EnginesConfig

    d = EnginesConfig()
    g = p.add_argument_group("--engines (solm beside the engines users run; pip install solm-compile[bench])")
    g.add_argument("--engines", action="store_true",
                   help="time llama.cpp on the model's GGUF, onnxruntime-genai int4, stock onnxruntime on solm's "
                        "dense artifact and solm on SolmEP (dense budget and --keeps) side by side, with each one's "
                        "perplexity and peak memory")
    g.add_argument("--keeps", type=_keep_list, default=d.keeps,
                   help="solm rows beside the dense budget, comma-separated: K for attention keep = MLP keep = K, "
                        "K/R for attention keep K and MLP keep R (default 0.5,0.3)")
    g.add_argument("--engine-list", default=",".join(d.engines),
                   help=f"comma-separated subset of {','.join(ENGINE_NAMES)} (default all)")
    g.add_argument("--head-bits", type=int, choices=(8, 4), default=d.head_bits,
                   help="with --weights int4: solm's embedding / LM head at 8 bits (default) or 4 (as "
                   "onnxruntime-genai's int4 model; docs/cli.md)")
    g.add_argument("--ppl-window", type=int, default=d.ppl_window, help="ids of held-out text in the PPL window "
                   "(default 2048)")
    g.add_argument("--ppl-tokens", type=int, default=d.ppl_tokens,
                   help=f"last ids of the window scored, each by decode steps (default {d.ppl_tokens}: PPL at ctx "
                        f"{d.ppl_window})")
    g.add_argument("--ppl-texts", default=",".join(d.ppl_texts),
                   help=f"comma-separated texts the PPL is measured on (default {','.join(d.ppl_texts)}: the "
                        "protocol's fiction and non-fiction texts, neither trained on)")
    g.add_argument("--spin", action=argparse.BooleanOptionalAction, default=d.spin,
                   help="solm's onnxruntime intra-op threads spin between runs, as llama.cpp's, onnxruntime-genai's "
                        "and plain onnxruntime's do by default (default on; --no-spin: solm's serving default)")
    g.add_argument("--memory", action=argparse.BooleanOptionalAction, default=d.memory,
                   help="peak resident memory of a child process decoding at ctx 2048, per engine (default on)")
    g.add_argument("--out", help="write the JSON here (atomically) and the plots beside it: .png (tok/s against context) and "
                   "-ppl.png (tok/s against perplexity)")


def config_from_args(args) -> BenchConfig:
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    return BenchConfig(contexts=tuple(args.context or BenchConfig().contexts), threads=tuple(args.threads), attn_keep=args.attn_keep,
                       mlp_keep=args.mlp_keep, bits=args.bits, reps=args.reps, steps=args.steps,
                       warmup=args.warmup, variants=variants, per_kv_head=args.per_kv_head,
                       profile_policy=args.profile_policy, prefill=args.prefill, device=args.device)


def engines_config_from_args(args):
    from solm_compile.bench.engines_run import EnginesConfig

    d = EnginesConfig()
    return EnginesConfig(contexts=tuple(args.context or d.contexts), threads=tuple(args.threads), reps=args.reps,
                         steps=args.steps, warmup=args.warmup, keeps=tuple(args.keeps), ppl_window=args.ppl_window,
                         ppl_tokens=args.ppl_tokens, memory=args.memory,
                         ppl_texts=tuple(t.strip() for t in args.ppl_texts.split(",") if t.strip()),
                         spin=args.spin, weights=args.weights, kv=args.kv,
                         head_bits=args.head_bits, per_kv_head=args.per_kv_head,
                         engines=tuple(e.strip() for e in args.engine_list.split(",") if e.strip()))


def cmd_engines(args, gate, say) -> int:
    from solm_compile.bench.engines_report import format_table as engines_table, write_outputs
    from solm_compile.bench.engines_run import run_engines

    doc = run_engines(args.model, engines_config_from_args(args), gate=gate, trust_pickle=args.trust_pickle, say=say)
    if args.out:
        paths = write_outputs(doc, args.out)
        say(f"wrote {', '.join(map(str, paths[:-1]))} and {paths[-1]}")
    print(json.dumps(doc, indent=1) if args.json else engines_table(doc))
    return 0


def cmd_bench(args) -> int:
    from solm_compile.cli.common import dataclass_from_args
    from solm_compile.config import GateConfig

    gate = dataclass_from_args(GateConfig, args)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if not args.json else (lambda s: None)
    if args.engines:
        if args.device != "cpu":
            raise UserError("--device cuda: --engines times the engines on the CPU only (leave out --device)")
        return cmd_engines(args, gate, say)
    cfg = config_from_args(args)
    rows = []
    if args.backend in ("onnxruntime", "both"):
        bench = prepare(args.model, cfg, args.policy, gate=gate, trust_pickle=args.trust_pickle, say=say,
                        weights=args.weights, kv=args.kv)
        rows += run_all(bench)
    if args.backend in ("torch", "both"):
        if args.device != "cpu":
            raise UserError(f"--device cuda: --backend {args.backend} times torch.compile on the CPU only "
                            "(use --backend onnxruntime)")
        from solm_compile.bench.torch_compile import run_torch

        rows += run_torch(args.model, cfg, args.policy, gate=gate, trust_pickle=args.trust_pickle, say=say)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows))
    return 0
