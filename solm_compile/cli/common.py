"""What every command shares: the one-line-error parser, flags built from the config dataclasses, model loading."""

from __future__ import annotations

import argparse
import dataclasses

from solm_compile.config import GateConfig
from solm_compile.quant.weights import WEIGHTS

KV = ("fp16", "fp32")       # --kv: artifact/write.py KV_DTYPES

GATE_HELP = {
    "page_size": "Quest page size S in tokens",
    "sinks": "first tokens always attended (attn-select solm)",
    "window": "most recent tokens always attended (attn-select solm)",
    "attn_select": "solm: Quest + sinks + local window; sol: the SOL reference exactly",
    "ts": "controls start once L > ts + tw + 1",
    "tw": "controls start once L > ts + tw + 1",
    "mlp_skip": "what the MLP's keep ρ keeps: x, SOL's input channels (the shipped policies were trained on it) or h, "
                "the units of the down projection's input (any artifact kind and --weights; low-bit SolmEP "
                "artifacts store down transposed at 8 bits; docs/cli.md, docs/measurements.md session 10)",
}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, helps: dict) -> None:
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        group.add_argument(flag, type=type(f.default), default=f.default,
                           help=f"{helps.get(f.name, '')} (default {f.default})".replace("%", "%%"))


def dataclass_from_args(cls, args):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_model_args(p: argparse.ArgumentParser, gate: bool = True) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="smollm2 | gemma3-270m | HF model dir | file.gguf | file.pt2 (ExportedProgram)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled model (unpickling runs arbitrary code)")
    p.add_argument("--weights", choices=WEIGHTS, default="source",
                   help="how the weights are stored and computed with (default source: a GGUF keeps its own "
                   "Q4_0/Q4_1/Q5_0/Q8_0 blocks losslessly; fp32: the exactness reference; int8/int4: "
                   "round-to-nearest, block 32)")
    p.add_argument("--kv", choices=KV, default="fp16",
                   help="the SolmEP artifacts' KV cache: a pre-allocated buffer written in place, in fp16 (default; "
                   "half the bytes per decode step) or fp32 (the exactness reference)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    if gate:
        add_dataclass_args(p, GateConfig, GATE_HELP)


def load_gated(args):
    from solm_compile.frontend.gated import compile_gated
    from solm_compile.frontend.models import load

    gate = dataclass_from_args(GateConfig, args)  # bad flags fail before the model loads
    loaded = load(args.model, trust_pickle=args.trust_pickle, weights=args.weights)
    return loaded, compile_gated(loaded, gate)


def kv_shape(loaded):
    """The decode step's KV layout, read from the loaded model's graph."""
    from solm_compile.frontend.gated import _kv_shape_from_graph

    return _kv_shape_from_graph(loaded)
