"""ONNX pass (dense artifact on stock onnxruntime): low-bit matmuls that read the same input as one MatMulNBits.

After ``pack_weights`` a layer's q, k and v (and gate and up) are each ``MatMulNBits(x, codes, scale, zero_point)``
on the same ``x``. Their weights are rows [N, ...] of one matrix each, so the rows concatenated are one weight
[Nq + Nk + Nv, K] and::

    MatMulNBits(x, W_q), MatMulNBits(x, W_k), MatMulNBits(x, W_v)
        ->  Split(MatMulNBits(x, [W_q; W_k; W_v]), [Nq, Nk, Nv], axis -1)

computes the same elements (each output column is still its own row's dot product over the same blocks, with the
same int8-quantized ``x`` under accuracy_level 4): onnxruntime-genai's packed QKV (N = 960 on SmolLM2). One bigger
matmul splits better over threads than three small ones and reads ``x`` once. Only nodes with the same K, bits,
block size and accuracy level, each with its own zero points, and no Q4_1 offset, are packed.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from solm_compile.passes.base import PassResult

MS = "com.microsoft"
ATTRS = ("K", "bits", "block_size", "accuracy_level")


def _packable(node: ir.Node) -> bool:
    return (node.op_type == "MatMulNBits" and node.domain == MS and len(node.inputs) == 4
            and all(v is not None and v.const_value is not None for v in node.inputs[1:4]))


def _key(node: ir.Node) -> tuple:
    return (id(node.inputs[0]),) + tuple(node.attributes[a].value for a in ATTRS if a in node.attributes)


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _pack(graph: ir.Graph, group: list[ir.Node]) -> None:
    first = group[0]
    name = first.inputs[1].name.rsplit(".", 1)[0] + ".packed"
    parts = [[n.inputs[i].const_value.numpy() for n in group] for i in (1, 2, 3)]     # codes, scale, zero point
    ins = [first.inputs[0]] + [_const(graph, f"{name}.{i}", np.concatenate(p, axis=0)) for i, p in enumerate(parts)]
    sizes = [n.attributes["N"].value for n in group]
    attrs = [ir.AttrInt64(k, sum(sizes) if k == "N" else v.value) for k, v in first.attributes.items()]
    mm = ir.Node(MS, "MatMulNBits", ins, attrs)
    mm.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    split = ir.Node("", "Split", [mm.outputs[0], _const(graph, f"{name}.split", np.array(sizes, np.int64))],
                    [ir.AttrInt64("axis", -1)], num_outputs=len(group))
    graph.insert_before(first, [mm, split])
    for node, out in zip(group, split.outputs):
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), node.outputs[0].shape
        ir.convenience.replace_all_uses_with(node.outputs[0], out, replace_graph_outputs=True)
    graph.remove(group, safe=True)


def pack_matmuls(model: ir.Model) -> PassResult:
    graph, result = model.graph, PassResult("pack_matmuls")
    groups: dict[tuple, list[ir.Node]] = {}
    for node in graph:
        if _packable(node):
            groups.setdefault(_key(node), []).append(node)
    for group in groups.values():
        if len(group) < 2:
            continue
        if any(n.outputs[0].is_graph_output() for n in group):
            result.skipped.append(f"{group[0].name}: an output of the graph")
            continue
        _pack(graph, group)
        result.counts[f"packed_{len(group)}"] += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
        graph.initializers.pop(name)
    result.modified = bool(result.counts)
    return result
