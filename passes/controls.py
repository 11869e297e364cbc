"""Pass: add the per-row budget controls as graph inputs and gate them once for the whole graph."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from solm_compile.errors import UserError

from .base import PassContext, PassResult

CONTROL_INPUTS = ("attn_keep", "mlp_keep", "bits")


def add_controls(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Append placeholders ``attn_keep, mlp_keep, bits`` [B] and one ``solm.gate_controls`` node.

    Every gated op reads the gated controls, so "dense outside single-token steps with L > ts+tw+1" is decided
    in exactly one place.
    """
    result = PassResult("add_controls")
    graph = gm.graph
    if ctx.controls(graph) is not None:
        result.skipped.append("controls already present")
        return result
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) < 3:
        raise UserError(f"{ctx.model_name}: the decode-step graph needs inputs (input_ids, position_ids, past...), "
                        f"found {len(inputs)} input(s)")
    input_ids, past_key = inputs[0], inputs[2]
    with graph.inserting_after(inputs[-1]):
        knobs = [graph.placeholder(name) for name in reversed(CONTROL_INPUTS)][::-1]
    with graph.inserting_after(knobs[-1]):
        gate = graph.call_function(torch.ops.solm.gate_controls.default,
                                   (input_ids, past_key, *knobs, ctx.gate.min_len))
    with graph.inserting_after(gate):
        for i in reversed(range(3)):
            graph.call_function(operator.getitem, (gate, i))
    gm.recompile()
    result.modified = True
    result.counts["controls"] = 3
    return result
