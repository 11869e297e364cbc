"""ONNX pass: low-bit projections that read the same input become one ``MatMulNBits`` and a ``Split``.

After ``pack_weights`` a decoder layer's q, k and v projections are three ``MatMulNBits`` over the same normed
input, each (GGUF Q4_1: a non-integer block offset) followed by ``MatMul(blocksum(x), offset)`` and an ``Add``::

    y_j = Add(MatMulNBits(x, codes_j, scale_j, zero_j), MatMul(s, offset_j))     j = q, k, v;  s = blocksum(x)

This pass stacks the three weights along N (codes, scales and zero points are stored one output row after another,
offsets one output column after another) and writes::

    y = Add(MatMulNBits(x, codes, scale, zero), MatMul(s, offset));  y_q, y_k, y_v = Split(y, [N_q, N_k, N_v])

Nine nodes become four per layer. Where each part then goes to heads by its own Reshape [B,T,H_j,d] and Transpose
(0,2,1,3) (as QuestAttention wants them), the fused projection is reshaped and transposed once and split on the head
axis instead (six nodes and a Split become three). SmolLM2: 270 fewer of the decode step's ~1,020 nodes, each
paying onnxruntime's per-node dispatch on a one-token step; and the one projection of N = 960 columns splits over the
intra-op threads where three of 576, 192 and 192 each ran alone. Each output column is computed as before (the same
input, the same per-block int8 quantisation of it under accuracy_level 4, the same K loop): the logits are unchanged
(``tests/test_fuse_qkv.py`` runs the graph before and after; the SmolLM2 decode logits are bit-identical, 1 and 2
threads, docs/measurements.md "Session 14").

A group fuses only when its members agree on K, bits, block size and accuracy level, have no g_idx or bias, and
either all add an offset over the same block sum or none does; ``skipped`` says why a group did not.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from onnxscript import ir

from solm_compile.passes.base import PassResult

MS = "com.microsoft"
_ATTRS = ("K", "bits", "block_size", "accuracy_level")


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else np.asarray(value.const_value.numpy())


def _offset_of(node: ir.Node) -> tuple[ir.Node, ir.Node, ir.Value, np.ndarray] | None:
    """(add, matmul, blocksum, offset [nb, N]) if ``node``'s only use is Add(node, MatMul(blocksum, offset))."""
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add" or uses[0].node.domain != "":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    mm = other.producer() if other is not None else None
    if mm is None or mm.op_type != "MatMul" or mm.domain != "" or len(list(other.uses())) != 1:
        return None
    offset = _const(mm.inputs[1])
    return None if offset is None or offset.ndim != 2 else (add, mm, mm.inputs[0], offset)


def _member(node: ir.Node) -> tuple | str:
    """(attribute key, weights, offset part or None) of a fusable MatMulNBits, else why not."""
    if len(node.inputs) != 4 or node.inputs[3] is None:
        return "g_idx/bias or no zero point"
    weights = [_const(v) for v in node.inputs[1:4]]
    if any(w is None for w in weights):
        return "weights not constant"
    key = tuple(_attr(node, a, 0) for a in _ATTRS)
    return key, weights, _offset_of(node)


def _groups(graph: ir.Graph) -> dict:
    """{(input value, attribute key): [MatMulNBits nodes]} in graph order, two or more per group."""
    found = defaultdict(list)
    for node in graph:
        if node.op_type == "MatMulNBits" and node.domain == MS and node.inputs[0] is not None:
            found[id(node.inputs[0])].append(node)
    return {k: v for k, v in found.items() if len(v) > 1}


def _fuse(graph: ir.Graph, nodes: list[ir.Node], members: list[tuple], tag: str, order: dict) -> ir.Node:
    x, first = nodes[0].inputs[0], nodes[0]
    ns = [int(_attr(n, "N")) for n in nodes]
    N = sum(ns)
    stacked = [np.concatenate([m[1][i] for m in members], axis=0) for i in range(3)]  # codes, scale, zero by rows
    consts = []
    for suffix, arr in zip(("q", "scale", "zero_point"), stacked):
        v = ir.Value(name=f"{tag}.{suffix}", const_value=ir.tensor(arr, name=f"{tag}.{suffix}"))
        graph.register_initializer(v)
        consts.append(v)
    attrs = [ir.AttrInt64(a, int(_attr(first, a, 0))) for a in _ATTRS if first.attributes.get(a) is not None]
    mm = ir.Node(MS, "MatMulNBits", [x, *consts], [*attrs, ir.AttrInt64("N", N)])
    tape, y = [mm], mm.outputs[0]
    offsets = [m[2] for m in members]
    if offsets[0] is not None:
        off = ir.Value(name=f"{tag}.offset", const_value=ir.tensor(
            np.concatenate([o[3] for o in offsets], axis=1), name=f"{tag}.offset"))              # [nb, N]
        graph.register_initializer(off)
        tape.append(ir.Node("", "MatMul", [offsets[0][2], off]))
        tape.append(ir.Node("", "Add", [y, tape[-1].outputs[0]]))
        y = tape[-1].outputs[0]
    sizes = ir.Value(name=f"{tag}.sizes", const_value=ir.tensor(np.array(ns, np.int64), name=f"{tag}.sizes"))
    graph.register_initializer(sizes)
    split = ir.Node("", "Split", [y, sizes], [ir.AttrInt64("axis", -1)], num_outputs=len(nodes))
    tape.append(split)
    at = first if offsets[0] is None else min((o[0] for o in offsets), key=order.__getitem__)
    graph.insert_before(at, tape)     # after every input (x, the block sum), before every use of a projection
    for node, member, out in zip(nodes, members, split.outputs):
        old = member[2][0].outputs[0] if member[2] is not None else node.outputs[0]
        out.shape, out.type = old.shape, old.type
        ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
        dead = [member[2][0], member[2][1], node] if member[2] is not None else [node]
        weights = [v for d in dead for v in d.inputs if v is not None and v.const_value is not None]
        graph.remove(dead, safe=True)
        for v in weights:                                   # the unfused weights: no reader is left
            if not list(v.uses()) and graph.initializers.get(v.name) is v:
                del graph.initializers[v.name]
    return split


def _to_heads(value: ir.Value) -> tuple[ir.Node, ir.Node, int, int] | None:
    """(reshape, transpose, heads, d) if ``value`` [B, T, H·d] is only Reshape'd to [B, T, H, d] (H, d static) and
    that only Transpose'd by (0, 2, 1, 3) to [B, H, T, d]."""
    uses = list(value.uses())
    r = uses[0].node if len(uses) == 1 else None
    if r is None or r.op_type != "Reshape" or r.domain != "" or uses[0].idx != 0:
        return None
    shape = r.outputs[0].shape
    ruses = list(r.outputs[0].uses())
    t = ruses[0].node if len(ruses) == 1 else None
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]) or t is None or \
            t.op_type != "Transpose" or list(_attr(t, "perm", [])) != [0, 2, 1, 3]:
        return None
    return r, t, int(shape[2]), int(shape[3])


def _split_heads(graph: ir.Graph, split: ir.Node, tag: str, order: dict) -> bool:
    """Where each part of ``split`` goes to heads by its own Reshape and Transpose, reshape and transpose the
    fused projection once and split it by heads instead: Reshape [B,T,ΣH,d] → Transpose [B,ΣH,T,d] → Split on
    axis 1 (pure data movement, the same values). Returns whether it did."""
    parts = [_to_heads(v) for v in split.outputs]
    if any(p is None for p in parts) or len({p[3] for p in parts}) != 1:
        return False
    d = parts[0][3]
    shape = ir.Value(name=f"{tag}.heads", const_value=ir.tensor(np.array([0, 0, -1, d], np.int64), name=f"{tag}.heads"))
    heads = ir.Value(name=f"{tag}.head_sizes", const_value=ir.tensor(np.array([p[2] for p in parts], np.int64),
                                                                     name=f"{tag}.head_sizes"))
    graph.register_initializer(shape)
    graph.register_initializer(heads)
    r = ir.Node("", "Reshape", [split.inputs[0], shape])                           # [B, T, ΣH, d]
    t = ir.Node("", "Transpose", [r.outputs[0]], [ir.AttrInt64s("perm", [0, 2, 1, 3])])   # [B, ΣH, T, d]
    s = ir.Node("", "Split", [t.outputs[0], heads], [ir.AttrInt64("axis", 1)], num_outputs=len(parts))
    graph.insert_before(min((p[0] for p in parts), key=order.__getitem__), [r, t, s])
    for (old_r, old_t, _, _), out in zip(parts, s.outputs):
        out.shape, out.type = old_t.outputs[0].shape, old_t.outputs[0].type
        ir.convenience.replace_all_uses_with(old_t.outputs[0], out, replace_graph_outputs=True)
    sizes = split.inputs[1]
    graph.remove([split, *[n for p in parts for n in p[:2]]], safe=True)
    if not list(sizes.uses()) and graph.initializers.get(sizes.name) is sizes:
        del graph.initializers[sizes.name]
    return True


def fuse_qkv(model: ir.Model) -> PassResult:
    """Fuse each group of MatMulNBits over one input (see the module doc); ``counts``: ``fused`` groups, their
    ``projections``, and ``split_by_heads`` (groups split after one Reshape/Transpose to heads)."""
    res = PassResult("fuse_qkv")
    graph = model.graph
    order = {node: i for i, node in enumerate(graph)}
    for i, nodes in enumerate(_groups(graph).values()):
        members = [_member(n) for n in nodes]
        why = next((m for m in members if isinstance(m, str)), None)
        if why is None and len({m[0] for m in members}) != 1:
            why = "K/bits/block_size/accuracy_level differ"
        if why is None and len({m[2] is None for m in members}) != 1:
            why = "some have a block offset and some do not"
        if why is None and members[0][2] is not None and len({id(m[2][2]) for m in members}) != 1:
            why = "offsets over different block sums"
        if why is not None:
            res.skipped.append((nodes[0].name, why))
            continue
        split = _fuse(graph, nodes, members, f"fused_proj_{i}", order)
        res.counts["split_by_heads"] += _split_heads(graph, split, f"fused_proj_{i}", order)
        res.counts["fused"] += 1
        res.counts["projections"] += len(nodes)
        res.modified = True
    return res
