"""Small pattern helpers over ATen FX graphs: linear layers in their exported forms, elementwise chains."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten

ELEMENTWISE = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar,
    aten.tanh.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.sigmoid.default,
    aten.neg.default, aten.erf.default, aten.exp.default, aten.rsub.Scalar, aten.mul.Scalar, aten.add.Scalar,
}
TRANSPARENT = {aten.dropout.default, aten.to.dtype, aten.clone.default, aten.contiguous.default}


@dataclass
class Linear:
    """A linear layer found in the graph: y = x @ Wᵀ + b, with W in nn.Linear layout [out, in]."""

    x: fx.Node          # input [..., in]
    out: fx.Node        # output [..., out]
    weight: fx.Node     # [out, in], or [in, out] when ``transposed`` (GPT-2 Conv1D / addmm)
    bias: fx.Node | None
    transposed: bool


def skip_transparent(node):
    while isinstance(node, fx.Node) and node.target in TRANSPARENT and not _is_train_dropout(node):
        node = node.args[0]
    return node


def _is_train_dropout(node: fx.Node) -> bool:
    return node.target is aten.dropout.default and len(node.args) > 2 and bool(node.args[2])


def as_linear(node) -> Linear | None:
    """Recognise ``aten.linear(x, W, b)`` and GPT-2's ``view(addmm(b, view(x, [-1, in]), W), [..., out])``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return Linear(node.args[0], node, node.args[1], bias, False)
    if node.target in (aten.view.default, aten.reshape.default):
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.target is aten.addmm.default and len(inner.users) == 1:
            bias, x2d, w = inner.args[:3]
            if isinstance(x2d, fx.Node) and x2d.target in (aten.view.default, aten.reshape.default):
                return Linear(x2d.args[0], node, w, bias, True)
    return None


def elementwise_chain(end: fx.Node, source: fx.Node) -> list[fx.Node] | None:
    """Nodes of a private elementwise DAG from ``source`` to ``end`` (topological order), or None.

    Every node on the way must be elementwise, use ``source`` or chain nodes as its only tensor inputs, and
    have all its users inside the chain (except ``end``).
    """
    chain, stack = {}, [end]
    while stack:
        n = stack.pop()
        if n is source or n in chain:
            continue
        if not isinstance(n, fx.Node) or n.op != "call_function" or n.target not in ELEMENTWISE:
            return None
        chain[n] = True
        stack += [a for a in n.args if isinstance(a, fx.Node)]
    for n in chain:
        if n is not end and any(u not in chain for u in n.users):
            return None
    return [n for n in end.graph.nodes if n in chain]


def run_chain(chain: list[fx.Node], source: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """Evaluate an elementwise chain on a probe tensor standing in for ``source``."""
    env = {source: x}
    for n in chain:
        args = [env[a] if isinstance(a, fx.Node) else a for a in n.args]
        env[n] = n.target(*args, **n.kwargs)
    return env[chain[-1]]


def layer_label(*nodes: fx.Node) -> str:
    """A human label for the block owning these weights, e.g. ``layers.3`` from ``m.model.layers.3.mlp...``."""
    for n in nodes:
        if isinstance(n, fx.Node) and n.op == "get_attr":
            hit = re.search(r"(layers|h|blocks|layer)\.(\d+)", str(n.target))
            if hit:
                return f"{hit.group(1)}.{hit.group(2)}"
    return "?"


def getitem_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target is operator.getitem]


def erase_unused(node: fx.Node) -> int:
    """Erase ``node`` and, transitively, the call_function inputs it leaves unused. Returns the count.

    Unlike ``Graph.eliminate_dead_code`` this also removes ops FX deems impure (sdpa with dropout_p, dropout),
    which is right here: the rewrite replaced them, so they are dead by construction.
    """
    erased, stack = 0, [node]
    while stack:
        n = stack.pop()
        if n.users or n.op != "call_function" or n.graph is None:
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        erased += 1
        stack += inputs
    return erased
