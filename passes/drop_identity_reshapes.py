"""ONNX pass: a Reshape whose output has its input's shape, dimension by dimension, is dropped.

torch.onnx writes ``view`` calls that do not change a shape as Reshape nodes over a shape the graph computes at run
time (``Concat`` of ``Shape`` pieces). After QuestAttention SmolLM2's graph has one per layer: the op's output
[B, H, T, d] viewed as [B, H, T, d] before the heads are transposed back. onnxruntime still dispatches each (a node
on the one-token decode step, ~30 of them). Where the exporter's own shapes say input and output are the same — the
same integers, the same symbolic dimensions (the exporter's symbols are equal only where it proved them equal) — the
output's readers read the input instead, and the nodes that computed only its shape go too. Pure data movement
removed: the values are the same.
"""

from __future__ import annotations

from onnxscript import ir

from solm_compile.passes.base import PassResult


def _same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, int) != isinstance(y, int):
            return False
        if isinstance(x, int) and x != y:
            return False
        if not isinstance(x, int) and (x.value is None or x.value != y.value):   # unnamed symbols prove nothing
            return False
    return True


def _drop_unused(graph: ir.Graph, value: ir.Value | None, outputs: set) -> int:
    """Remove ``value``'s producer if nothing reads any of its outputs, then its inputs' producers likewise (the
    shape a dropped Reshape computed); returns how many nodes went."""
    node = value.producer() if value is not None else None
    if node is None or any(list(o.uses()) or id(o) in outputs for o in node.outputs):
        return 0
    inputs = list(node.inputs)
    graph.remove(node, safe=True)
    return 1 + sum(_drop_unused(graph, v, outputs) for v in inputs)


def drop_identity_reshapes(model: ir.Model) -> PassResult:
    """Drop every Reshape whose input and output shapes are the same; ``counts['reshape']`` = dropped."""
    res = PassResult("drop_identity_reshapes")
    graph = model.graph
    outputs = set(map(id, graph.outputs))
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain != "" or id(node.outputs[0]) in outputs:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or not _same_shape(x.shape, y.shape):
            continue
        shape = node.inputs[1]
        ir.convenience.replace_all_uses_with(y, x)
        graph.remove(node, safe=True)
        res.counts["shape_nodes"] += _drop_unused(graph, shape, outputs)
        res.counts["reshape"] += 1
        res.modified = True
    return res
