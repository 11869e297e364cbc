"""The ``solm`` and ``solm-compile`` commands. Flags come from the frozen config dataclasses.

Every user mistake is one line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from solm_compile.cli.artifact import add_artifact_parsers
from solm_compile.cli.bench import add_bench_parser
from solm_compile.cli.common import Parser, add_model_args
from solm_compile.cli.eval import add_eval_parser
from solm_compile.cli.model import add_model_parsers
from solm_compile.cli.serve import add_serve_parser
from solm_compile.cli.train import add_train_parser
from solm_compile.errors import UserError

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="solm", description="Compile language models that spend compute where it counts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    for add in (add_model_parsers, add_artifact_parsers, add_train_parser, add_eval_parser, add_bench_parser,
                add_serve_parser):
        add(sub, add_model_args)
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
