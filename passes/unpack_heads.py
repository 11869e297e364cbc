"""ONNX pass (dense artifact): GroupQueryAttention reads the projections as they come, without the head transposes.

After ``fuse_attention`` (and ``fuse_norm_rope``) each layer's q, k and v reach GroupQueryAttention as the export
spelled them plus the packing ``fuse_attention`` added::

    x [B, T, H·d] -> Reshape [B, T, H, d] -> Transpose(0,2,1,3) -> (RotaryEmbedding) -> Transpose(0,2,1,3)
      -> Reshape [B, T, H·d] -> GroupQueryAttention

Two transposes that cancel and two reshapes that undo each other: on a one-token decode step six of these copy-free
but dispatched nodes per projection (~300 of a SmolLM2 step's ~890 nodes). This pass feeds GroupQueryAttention ``x``
itself, or ``RotaryEmbedding(x, cos, sin, num_heads=H)`` (opset 23's 3-D form: the same rotation of each head's
d values), and the dead chain goes. It computes what the graph computed (the same elements, the same rotation);
``tests/test_fuse_attention.py`` checks the artifact against HF eager. A chain that differs is left as it is.
"""

from __future__ import annotations

from onnxscript import ir

from solm_compile.passes.base import PassResult


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _swap_01(value: ir.Value | None) -> ir.Node | None:
    """The Transpose(perm=[0, 2, 1, 3]) producing ``value``, or None."""
    node = _producer(value, "Transpose")
    perm = node.attributes.get("perm") if node is not None else None
    return node if perm is not None and list(perm.as_ints()) == [0, 2, 1, 3] else None


def _split_heads(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """(x, H) if ``value`` = Transpose(0,2,1,3)(Reshape(x [B, T, H·d] -> [B, T, H, d])), else None."""
    t = _swap_01(value)
    r = _producer(t.inputs[0], "Reshape") if t is not None else None
    if r is None:
        return None
    x, heads = r.inputs[0], r.outputs[0].shape
    if x.shape is None or heads is None or len(x.shape) != 3 or len(heads) != 4:
        return None
    h, d, hd = heads[2], heads[3], x.shape[2]
    if not all(isinstance(v, int) for v in (h, d, hd)) or h * d != hd:
        return None
    return x, h


def _unpacked(graph: ir.Graph, gqa: ir.Node, value: ir.Value) -> ir.Value | None:
    """What GroupQueryAttention can read instead of ``value`` = Reshape(Transpose(0,2,1,3)(w)), or None."""
    r = _producer(value, "Reshape")
    t = _swap_01(r.inputs[0]) if r is not None else None
    if t is None:
        return None
    rope = _producer(t.inputs[0], "RotaryEmbedding")
    split = _split_heads(rope.inputs[0] if rope is not None else t.inputs[0])
    if split is None:
        return None
    x, heads = split
    if rope is None:
        return x
    if len(rope.inputs) != 3 or "num_heads" in rope.attributes or "rotary_embedding_dim" in rope.attributes:
        return None
    interleaved = rope.attributes.get("interleaved", ir.AttrInt64("interleaved", 0)).as_int()
    node = ir.Node("", "RotaryEmbedding", [x, rope.inputs[1], rope.inputs[2]],
                   [ir.AttrInt64("interleaved", interleaved), ir.AttrInt64("num_heads", heads)])
    graph.insert_before(gqa, node)
    node.outputs[0].shape, node.outputs[0].type = x.shape, x.type
    return node.outputs[0]


def unpack_heads(model: ir.Model) -> PassResult:
    graph, result = model.graph, PassResult("unpack_heads")
    for gqa in [n for n in graph if n.op_type == "GroupQueryAttention"]:
        for idx in (0, 1, 2):
            new = _unpacked(graph, gqa, gqa.inputs[idx])
            if new is None:
                result.skipped.append(f"{gqa.name} input {idx}: not Reshape(Transpose(...)) of a split projection")
                continue
            gqa.replace_input_with(idx, new)
            result.counts["unpacked"] += 1
    if result.counts:
        ir.passes.common.RemoveUnusedNodesPass()(model)
        result.modified = True
    return result
