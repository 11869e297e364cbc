"""Pass: add the per-row budget controls as graph inputs and gate them once for the whole graph."""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from solm_compile.errors import UserError

from solm_compile.passes.base import PassContext, PassResult

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
    named = {n.name: n for n in graph.nodes}
    for field_name in ("input_ids", "past_key"):
        name = getattr(ctx, field_name)
        if name is not None and name not in named:
            raise UserError(f"{ctx.model_name}: no node named {name!r} for {field_name} in the graph")
    if (ctx.input_ids is None or ctx.past_key is None) and len(inputs) < 3:
        raise UserError(f"{ctx.model_name}: the decode-step graph needs inputs (input_ids, position_ids, past...), "
                        f"found {len(inputs)} input(s)")
    input_ids = named[ctx.input_ids] if ctx.input_ids is not None else inputs[0]
    past_key = named[ctx.past_key] if ctx.past_key is not None else inputs[2]
    with graph.inserting_after(inputs[-1]):
        knobs = [graph.placeholder(name) for name in reversed(CONTROL_INPUTS)][::-1]
    order = {n: i for i, n in enumerate(graph.nodes)}
    anchor = max((knobs[-1], input_ids, past_key), key=order.__getitem__)  # a named node may be computed
    with graph.inserting_after(anchor):
        gate = graph.call_function(torch.ops.solm.gate_controls.default,
                                   (input_ids, past_key, *knobs, ctx.gate.min_len))
    with graph.inserting_after(gate):
        for i in reversed(range(3)):
            graph.call_function(operator.getitem, (gate, i))
    gm.recompile()
    result.modified = True
    result.counts["controls"] = 3
    return result
