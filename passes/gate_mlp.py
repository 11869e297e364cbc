"""Pass: rewrite each MLP into ``solm.sparse_mlp``.

Matches ``down(act(gate(x)) * up(x))`` (Llama, Qwen2, Gemma) and ``proj(act(fc(x)))`` (GPT-2), where each
projection is a linear layer in any exported form (``aten.linear`` or GPT-2's view/addmm/view) and ``act`` is a
private elementwise chain. The chain is identified by evaluating it on a probe and comparing with the known
activations, so an activation written out by hand (GPT-2's ``gelu_new``) is recognised like ``aten.gelu``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from solm_compile.ops.reference import ACTIVATIONS

from solm_compile.passes.base import PassContext, PassResult
from solm_compile.passes.match import (ELEMENTWISE, Linear, as_linear, elementwise_chain, erase_unused, layer_label, run_chain,
                    skip_transparent)

aten = torch.ops.aten
PROBE = torch.linspace(-8.0, 8.0, 2001)


def chain_source(end: fx.Node) -> fx.Node | None:
    """The single non-elementwise tensor feeding an elementwise DAG ending at ``end``."""
    leaves, stack, seen = set(), [end], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and n.target in ELEMENTWISE:
            stack += [a for a in n.args if isinstance(a, fx.Node)]
        else:
            leaves.add(n)
    return leaves.pop() if len(leaves) == 1 and end not in leaves else None


def classify(chain: list[fx.Node], source: fx.Node) -> str | None:
    with torch.no_grad():
        y = run_chain(chain, source, PROBE)
        for name, fn in ACTIVATIONS.items():
            if torch.allclose(y, fn(PROBE), atol=1e-5, rtol=1e-5):
                return name
    return None


def _activation(end: fx.Node) -> tuple[Linear, str] | str:
    """(the linear feeding the activation, activation name) or the reason it does not match."""
    src = chain_source(end)
    lin = as_linear(src) if src is not None else None
    if lin is None:
        return "activation input is not a linear layer"
    chain = elementwise_chain(end, src)
    if not chain:
        return "activation is not a private elementwise chain"
    act = classify(chain, src)
    return (lin, act) if act else "unknown activation function"


def _match(down: Linear):
    """(gate Linear | None, up Linear, act) for the MLP ending in ``down``, or a reason string."""
    h = skip_transparent(down.x)
    if isinstance(h, fx.Node) and h.target is aten.mul.Tensor and all(isinstance(a, fx.Node) for a in h.args):
        for a, b in (h.args, h.args[::-1]):
            up = as_linear(b)
            hit = _activation(a) if up is not None else None
            if isinstance(hit, tuple) and hit[0].x is up.x:
                return hit[0], up, hit[1]
    hit = _activation(h)
    if isinstance(hit, str):
        return hit
    return None, hit[0], hit[1]


def _weight(gm: fx.GraphModule, lin: Linear | None, before: fx.Node):
    if lin is None:
        return None, None
    w = lin.weight
    if lin.transposed:
        with gm.graph.inserting_before(before):
            w = gm.graph.call_function(aten.t.default, (w,))
    return w, lin.bias


def gate_mlp(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("gate_mlp")
    controls = ctx.controls(gm.graph)
    if controls is None:
        result.skipped.append("no controls: run add_controls first")
        return result
    _, rho, bits = controls
    for node in list(gm.graph.nodes):
        down = as_linear(node)
        if down is None or node.graph is not gm.graph:
            continue
        hit = _match(down)
        if isinstance(hit, str):
            h = skip_transparent(down.x)
            if isinstance(h, fx.Node) and h.target in ELEMENTWISE:
                result.skipped.append(f"{node.name}: {hit}")
            continue
        gate, up, act = hit
        out = down.out
        wg, bg = _weight(gm, gate, out)
        wu, bu = _weight(gm, up, out)
        wd, bd = _weight(gm, down, out)
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.ops.solm.sparse_mlp.default,
                                         (up.x, wg, bg, wu, bu, wd, bd, rho, bits, act, ctx.gate.mlp_skip))
        out.replace_all_uses_with(new)
        if "val" in out.meta:
            new.meta["val"] = out.meta["val"]
        erase_unused(out)
        result.counts["sparse_mlp"] += 1
        result.gated.append(("mlp", layer_label(down.weight)))
    if result.counts:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        result.modified = True
    return result
