"""ONNX pass (the ai.solm kinds): each low-bit projection as one SolmEP ``LinearBlocks`` node.

After ``pack_weights`` and ``fuse_qkv`` a projection is a ``MatMulNBits`` and, for GGUF Q4_1 (w = d·q + m, a
non-integer block offset), the block sums of its input times the offsets, added::

    s = ReduceSum(Reshape(x, [.., K/32, 32]), -1)                          [B, T, K/32]
    y = Add(MatMulNBits(x, codes, scale, zero), MatMul(s, offset))         [B, T, N]

five nodes, each paying onnxruntime's per-node dispatch on a one-token step. This pass writes::

    y = LinearBlocks(x, codes, scale, offset')     offset' = offset − scale·zero   (w = scale·code + offset')

(``registry.LINEAR_BLOCKS``) over the same codes (MatMulNBits' packing is the op's), computed by SolmEP with the
MLP's gate/up row kernels: int8 activations per block where the MatMulNBits had accuracy_level 4 (the trade
MatMulNBits made there; the artifact's ``activations``), fp32 otherwise. A plain MatMulNBits (an integer zero point:
int4, Q8_0, Q4_0) becomes one node too. The block sum nodes go when nothing else reads them.

Left alone: the LM head (its output is the graph's ``logits``: one MatMulNBits over the vocabulary, which stock
onnxruntime's kernel already runs well), and any MatMulNBits with g_idx or bias, a block size other than 32, bits
other than 4 or 8, non-float32 or non-constant weights, or an offset over something that is not the block sums of
its own input; ``skipped`` says which and why. Only the solm and fixed kinds run it (``artifact.write.trim_nodes``):
the portable and dense kinds must run on stock onnxruntime.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from solm_compile.ops import registry
from solm_compile.passes.base import PassResult
from solm_compile.passes.fuse_qkv import _attr, _const, _offset_of

MS = "com.microsoft"
BLOCK = 32


def _zero_points(zp: np.ndarray | None, n: int, nb: int, bits: int) -> np.ndarray:
    """MatMulNBits' packed zero points -> [N, nb] float32 (absent: 2^(bits−1), the op's default)."""
    if zp is None:
        return np.full((n, nb), 2.0 ** (bits - 1), np.float32)
    zp = zp.reshape(n, -1)
    if bits == 4:
        zp = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)
    return zp[:, :nb].astype(np.float32)


def _is_block_sum(s: ir.Value, x: ir.Value, nb: int) -> bool:
    """``s`` is ReduceSum(Reshape(x, [.., nb, 32]), axes [-1], keepdims 0): pack_weights' block sums of ``x``."""
    red = s.producer()
    if red is None or red.op_type != "ReduceSum" or red.domain != "" or _attr(red, "keepdims", 1) != 0:
        return False
    axes, r = _const(red.inputs[1]), red.inputs[0].producer()
    if axes is None or axes.tolist() != [-1] or r is None or r.op_type != "Reshape" or r.inputs[0] is not x:
        return False
    shape = _const(r.inputs[1])
    return shape is not None and shape.tolist()[-2:] == [nb, BLOCK]


def _operands(node: ir.Node) -> tuple | str:
    """(codes value, scale [N, nb], offset [N, nb], (add, matmul) or None) of a convertible MatMulNBits, else why."""
    if len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        return "g_idx or bias"
    k, n, bits, block = (int(_attr(node, a, 0)) for a in ("K", "N", "bits", "block_size"))
    if block != BLOCK or bits not in (4, 8) or k % BLOCK:
        return f"block_size {block}, bits {bits}, K {k}: LinearBlocks takes blocks of 32 at 4 or 8 bits"
    codes, scale = node.inputs[1], _const(node.inputs[2])
    zp = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    nb = k // BLOCK
    if _const(codes) is None or scale is None or scale.dtype != np.float32 or (
            len(node.inputs) > 3 and node.inputs[3] is not None and zp is None):
        return "weights not constant float32"
    if zp is not None and zp.dtype != np.uint8:
        return "zero points not packed uint8"
    if _const(codes).shape != (n, nb, BLOCK * bits // 8):
        return f"codes of shape {_const(codes).shape}"
    scale = scale.reshape(n, nb)
    offset = -(scale * _zero_points(zp, n, nb, bits))                           # w = scale·(q − z)
    chain = _offset_of(node)
    if chain is not None:
        add, mm, s, m = chain
        if m.shape != (nb, n) or not _is_block_sum(s, node.inputs[0], nb):
            return "an offset MatMul that is not over this input's block sums"
        offset = offset + m.T.astype(np.float32)                                # Q4_1: w = d·q + m
        chain = (add, mm)
    return codes, scale, offset, chain


def fuse_linear_blocks(model: ir.Model) -> PassResult:
    """Replace each convertible MatMulNBits (and its offset chain) by LinearBlocks; ``counts``: ``linear_blocks``
    nodes made, ``nodes_removed`` (block sums included)."""
    res, graph = PassResult("fuse_linear_blocks"), model.graph
    for i, node in enumerate([n for n in graph if n.op_type == "MatMulNBits" and n.domain == MS]):
        if node.outputs[0].is_graph_output():
            res.skipped.append((node.name, "the LM head (a graph output)"))
            continue
        got = _operands(node)
        if isinstance(got, str):
            res.skipped.append((node.name, got))
            continue
        codes, scale, offset, chain = got
        tag = f"linear_blocks_{i}"
        consts = []
        for suffix, arr in (("scale", scale), ("offset", offset)):
            v = ir.Value(name=f"{tag}.{suffix}", const_value=ir.tensor(np.ascontiguousarray(arr, np.float32),
                                                                      name=f"{tag}.{suffix}"))
            graph.register_initializer(v)
            consts.append(v)
        acts = "int8" if int(_attr(node, "accuracy_level", 0)) >= 4 else "fp32"
        new = ir.Node(registry.DOMAIN, registry.LINEAR_BLOCKS.onnx_name, [node.inputs[0], codes, *consts],
                      [ir.AttrInt64("bits", int(_attr(node, "bits"))), ir.AttrInt64("block_size", BLOCK),
                       ir.AttrString("activations", acts)], name=tag)
        old = chain[0].outputs[0] if chain is not None else node.outputs[0]
        new.outputs[0].shape, new.outputs[0].type = old.shape, old.type
        graph.insert_before(node, new)     # after x, before the Add and so before every reader of y
        ir.convenience.replace_all_uses_with(old, new.outputs[0], replace_graph_outputs=True)
        dead = [chain[0], chain[1], node] if chain is not None else [node]
        block_sum = chain[1].inputs[0] if chain is not None else None
        graph.remove(dead, safe=True)
        res.counts["nodes_removed"] += len(dead) - 1
        res.counts["nodes_removed"] += _drop_unread(graph, block_sum)
        res.counts["linear_blocks"] += 1
    if res.counts:
        for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
            graph.initializers.pop(name)
        model.opset_imports.setdefault(registry.DOMAIN, registry.VERSION)
        res.modified = True
    return res


def _drop_unread(graph: ir.Graph, value: ir.Value | None) -> int:
    """Remove the block sums' ReduceSum and Reshape once nothing reads them; returns how many nodes went."""
    dropped = 0
    while value is not None and not list(value.uses()) and not value.is_graph_output():
        producer = value.producer()
        if producer is None or producer.op_type not in ("ReduceSum", "Reshape"):
            break
        nxt = producer.inputs[0] if producer.op_type == "ReduceSum" else None
        graph.remove(producer, safe=True)
        dropped += 1
        value = nxt
    return dropped
