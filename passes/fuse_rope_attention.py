"""ONNX pass: the head layout and the rotary embedding around each QuestAttention move into one QuestAttentionRope.

After ``fuse_qkv`` (q, k and v as one projection, split by heads) and ``fuse_norm_rope`` (RotaryEmbedding nodes),
and with the KV cache in buffers (``kv_buffer``), a layer's attention in the ``solm`` and ``fixed`` artifacts is::

    qkv [B, T, (H + 2·Hkv)·d] → Reshape [B, T, H + 2·Hkv, d] → Transpose (0, 2, 1, 3) → Split [H, Hkv, Hkv] on heads
    → RotaryEmbedding(q, cos, sin), RotaryEmbedding(k, cos, sin)
    → QuestAttention(q, k, v, mask, kappa, page state, KV buffers) → Transpose (0, 2, 1, 3) → Reshape [B, T, H·d]

Eight nodes, each an onnxruntime dispatch (~10 µs on the 2-core Zen 4 VM) around a few hundred floats on a one-token
decode step. This pass turns the QuestAttention node into ``QuestAttentionRope(qkv, cos, sin, mask, kappa, ...)``
(``registry.QUEST_ATTENTION_ROPE``: the same other inputs, outputs and attributes, plus num_heads, kv_num_heads and
the rotary's interleaved), whose output is the trailing Reshape's [B, T, H·d]; the seven other nodes (and the shape
arithmetic only they read) go. cos/sin are the shared Cos/Sin the RotaryEmbedding nodes read, so SolmEP rotates
with the same values, and it rounds as onnxruntime's RotaryEmbedding does (one fused multiply-add per output):
the logits are bit-identical (``tests/test_fuse_rope_attention.py``).

A layer whose chain differs (no KV buffer, ``is_causal``, position ids or a partial rotary on the RotaryEmbedding,
q and k rotated with different tables, a part read by another node) is left as it is, and ``skipped`` says why.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from solm_compile.ops import registry
from solm_compile.passes.base import PassResult

_ROPE = registry.QUEST_ATTENTION_ROPE
_KEEP = {a.name for a in _ROPE.attributes}


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else np.asarray(value.const_value.numpy())


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)


def _private(value: ir.Value) -> bool:
    """``value`` has one reader and is no graph output (folding it away changes nothing else)."""
    return len(list(value.uses())) == 1 and not value.is_graph_output()


def _only_use(value: ir.Value, op_type: str) -> ir.Node | None:
    """The one node reading ``value`` (as its first input) if it is a default-domain ``op_type``."""
    uses = list(value.uses())
    node = uses[0].node if _private(value) and uses[0].idx == 0 else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _swaps_heads(node: ir.Node | None) -> bool:
    perm = node.attributes.get("perm") if node is not None else None
    return perm is not None and list(perm.value) == [0, 2, 1, 3]


def _rotary(value: ir.Value) -> tuple[ir.Node, ir.Value] | str:
    """(RotaryEmbedding node, its input) if ``value`` is a full-width rotary with no position ids, read only here."""
    rope = _producer(value, "RotaryEmbedding")
    if rope is None:
        return "q/k not from a RotaryEmbedding"
    if len(rope.inputs) > 3 and rope.inputs[3] is not None:
        return "RotaryEmbedding with position ids"
    if _int_attr(rope, "rotary_embedding_dim") or _int_attr(rope, "num_heads"):
        return "partial rotary or 3-D RotaryEmbedding"
    if not _private(value):
        return "a rotated q/k has another reader"
    return rope, rope.inputs[0]


def _head_dim(reshape: ir.Node, heads: int) -> int | None:
    """d if ``reshape`` makes [B, T, heads, d] (its output's static shape, or a constant target [0, 0, -1 | heads,
    d] where 0 copies the input's dimension: allowzero off)."""
    target, shape = _const(reshape.inputs[1]), reshape.outputs[0].shape
    if target is not None and target.shape == (4,) and list(target[:2]) == [0, 0] and target[2] in (-1, heads) \
            and not _int_attr(reshape, "allowzero"):
        d = int(target[3])
    elif shape is not None and len(shape) == 4 and shape[2] == heads:
        d = shape[3]
    else:
        return None
    return d if isinstance(d, int) and d > 0 and d % 2 == 0 else None


def _merges_heads(reshape: ir.Node, width: int) -> bool:
    """Whether ``reshape`` makes [B, T, width] of [B, T, H, d] (its static output shape, or a constant target
    [0, 0, width | -1] where 0 copies the input's dimension: allowzero off)."""
    shape, target = reshape.outputs[0].shape, _const(reshape.inputs[1])
    if shape is not None and len(shape) == 3 and shape[2] == width:
        return True
    return target is not None and target.shape == (3,) and list(target[:2]) == [0, 0] and target[2] in (-1, width) \
        and not _int_attr(reshape, "allowzero")


def _match(qa: ir.Node) -> tuple | str:
    """What folds into ``qa`` (see the module doc), or why nothing does."""
    if len(qa.inputs) < 10 or qa.inputs[7] is None:
        return "no KV cache buffer"
    if _int_attr(qa, "is_causal"):
        return "is_causal"
    rq, rk = _rotary(qa.inputs[0]), _rotary(qa.inputs[1])
    if isinstance(rq, str) or isinstance(rk, str):
        return rq if isinstance(rq, str) else rk
    (rope_q, q), (rope_k, k) = rq, rk
    if rope_q.inputs[1:3] != rope_k.inputs[1:3] or _int_attr(rope_q, "interleaved") != _int_attr(rope_k, "interleaved"):
        return "q and k rotated differently"
    split = q.producer()
    if split is None or split.op_type != "Split" or split.domain != "" or list(split.outputs) != [q, k, qa.inputs[2]] \
            or _int_attr(split, "axis") != 1 or not all(map(_private, split.outputs)):
        return "q, k, v not the three parts of one Split on the head axis"
    sizes = _const(split.inputs[1]) if len(split.inputs) > 1 else None
    t_in = _producer(split.inputs[0], "Transpose")
    r_in = _producer(t_in.inputs[0], "Reshape") if _swaps_heads(t_in) else None
    gqa = sizes is not None and len(sizes) == 3 and sizes[1] == sizes[2] >= 1 and sizes[0] % sizes[1] == 0
    if not gqa or r_in is None or not _private(t_in.outputs[0]) or not _private(r_in.outputs[0]):
        return "the Split's input is not the packed projection reshaped and transposed to heads"
    d = _head_dim(r_in, int(sizes.sum()))
    if d is None:
        return "the head reshape is not [B, T, heads, d] with d static and even"
    t_out = _only_use(qa.outputs[0], "Transpose")
    r_out = _only_use(t_out.outputs[0], "Reshape") if _swaps_heads(t_out) else None
    if r_out is None or not _merges_heads(r_out, int(sizes[0]) * d):
        return "the output is not transposed and reshaped back to [B, T, H·d]"
    return r_in.inputs[0], rope_q, int(sizes[0]), int(sizes[1]), r_out


def fuse_rope_attention(model: ir.Model) -> PassResult:
    """Fold each QuestAttention's head layout and rotary into a QuestAttentionRope (module doc); ``counts``:
    ``fused`` nodes, ``nodes_removed`` from the graph."""
    res, graph = PassResult("fuse_rope_attention"), model.graph
    before = sum(1 for _ in graph)
    for qa in list(graph):
        if qa.op_type != "QuestAttention" or qa.domain != registry.DOMAIN:
            continue
        found = _match(qa)
        if isinstance(found, str):
            res.skipped.append((qa.name, found))
            continue
        qkv, rope_q, H, Hkv, r_out = found
        qa.op_type = _ROPE.onnx_name                        # in place: the outputs (graph outputs too) stay
        for i, v in enumerate((qkv, rope_q.inputs[1], rope_q.inputs[2])):
            qa.replace_input_with(i, v)
        for name in [a for a in qa.attributes if a not in _KEEP]:
            del qa.attributes[name]
        for a in (ir.AttrInt64("num_heads", H), ir.AttrInt64("kv_num_heads", Hkv),
                  ir.AttrInt64("interleaved", _int_attr(rope_q, "interleaved"))):
            qa.attributes[a.name] = a
        out, merged = qa.outputs[0], r_out.outputs[0]
        out.shape, out.type = merged.shape, merged.type                                 # [B, T, H·d]
        name, merged.name = merged.name, None       # out takes the merged tensor's name (a graph output keeps its)
        ir.convenience.replace_all_uses_with(merged, out, replace_graph_outputs=True)
        out.name = name
        res.counts["fused"] += 1
    if res.counts["fused"]:
        ir.passes.common.RemoveUnusedNodesPass()(model)     # the layout, rotary nodes and their shape arithmetic
        res.counts["nodes_removed"] = before - sum(1 for _ in graph)
        res.modified = True
    return res
