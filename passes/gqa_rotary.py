"""ONNX pass (dense artifact on stock onnxruntime): RoPE inside GroupQueryAttention, on the packed q/k/v.

After ``unpack_heads`` and ``pack_matmuls`` a layer's attention reads::

    qkv = MatMulNBits(x)  [B, T, (H + 2·Hkv)·d]  ->  Split [H·d, Hkv·d, Hkv·d]  ->  q, k, v
    f = Mul(Cast(Unsqueeze(position_ids)), inv_freq)   [B, T, d/2]   (shared by every layer)
    GroupQueryAttention(RotaryEmbedding(q, Cos f, Sin f), RotaryEmbedding(k, Cos f, Sin f), v, ...)

GroupQueryAttention rotates q and k itself (``do_rotary=1``) from caches cos/sin [P, d/2] indexed by the
``position_ids`` input, and takes q/k/v packed in its query input (key and value left empty): onnxruntime-genai's
int4 graph. The caches are cos(p·inv_freq) and sin(p·inv_freq) for p < ``positions``, the float32 product the graph
computed, so the rotation is the same (to the last bit of cos and sin); positions at or past ``positions`` are out
of the table (``dense_ops.rotary_positions`` in the metadata). A layer whose chain differs, or whose head size is not a
multiple of 16 (onnxruntime's rotary kernel refuses it), keeps its nodes; an unpacked q/k/v keeps its three inputs.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from solm_compile.passes.base import PassResult

MS = "com.microsoft"
POSITIONS = 8192          # the caches' rows: SmolLM2's max_position_embeddings


def _op(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == domain else None


def _angles(cos: ir.Value, sin: ir.Value) -> tuple[np.ndarray, ir.Value] | None:
    """(inv_freq [d/2], position_ids) if cos = Cos(f), sin = Sin(f), f = Mul(Cast(Unsqueeze(position_ids)), c)."""
    c, s = _op(cos, "Cos"), _op(sin, "Sin")
    if c is None or s is None or c.inputs[0] is not s.inputs[0]:
        return None
    mul = _op(c.inputs[0], "Mul")
    cast = _op(mul.inputs[0], "Cast") if mul is not None else None
    unsq = _op(cast.inputs[0], "Unsqueeze") if cast is not None else None
    freq = mul.inputs[1].const_value if mul is not None else None
    if unsq is None or freq is None or not unsq.inputs[0].is_graph_input():
        return None
    inv = freq.numpy().astype(np.float32).reshape(-1)                 # [d/2]
    return inv, unsq.inputs[0]


def _caches(graph: ir.Graph, inv: np.ndarray, positions: int, made: dict) -> tuple[ir.Value, ir.Value]:
    key = inv.tobytes()
    if key not in made:
        f = np.arange(positions, dtype=np.float32)[:, None] * inv[None, :]             # [P, d/2] float32 product
        made[key] = []
        for name, a in (("cos", np.cos(f)), ("sin", np.sin(f))):
            v = ir.Value(name=f"gqa.{name}_cache{len(made) - 1}", const_value=ir.tensor(a.astype(np.float32)))
            graph.register_initializer(v)
            made[key].append(v)
    return made[key][0], made[key][1]


def _packed(q: ir.Value, k: ir.Value, v: ir.Value) -> ir.Node | None:
    """The Split whose outputs are exactly (q, k, v), each read once (by the rotation or the attention)."""
    split = _op(q, "Split")
    if split is None or list(split.outputs) != [q, k, v] or any(len(x.uses()) != 1 for x in (q, k, v)):
        return None
    return split


def gqa_rotary(model: ir.Model, positions: int = POSITIONS) -> PassResult:
    graph, result, made = model.graph, PassResult("gqa_rotary"), {}
    for gqa in [n for n in graph if n.op_type == "GroupQueryAttention" and n.domain == MS]:
        if len(gqa.inputs) != 7 or "do_rotary" in gqa.attributes:
            result.skipped.append(f"{gqa.name}: inputs past total_sequence_length, or a rotary already")
            continue
        rq, rk = _op(gqa.inputs[0], "RotaryEmbedding"), _op(gqa.inputs[1], "RotaryEmbedding")
        if rq is None or rk is None or len(rq.inputs) != 3 or rq.inputs[1:] != rk.inputs[1:]:
            result.skipped.append(f"{gqa.name}: q and k not rotated by one RotaryEmbedding (cos, sin) each")
            continue
        if any(r.attributes.get("interleaved") is not None and r.attributes["interleaved"].value for r in (rq, rk)):
            result.skipped.append(f"{gqa.name}: interleaved rotation")
            continue
        found = _angles(rq.inputs[1], rq.inputs[2])
        if found is None:
            result.skipped.append(f"{gqa.name}: cos/sin not cos(position_ids · inv_freq)")
            continue
        if found[0].size * 2 % 16:                         # onnxruntime's rotary kernel: d a multiple of 16
            result.skipped.append(f"{gqa.name}: head size {found[0].size * 2} not a multiple of 16")
            continue
        cos, sin = _caches(graph, found[0], positions, made)
        q, k, v = rq.inputs[0], rk.inputs[0], gqa.inputs[2]
        split = _packed(q, k, v)
        qkv = [split.inputs[0], None, None] if split is not None else [q, k, v]
        attrs = [a for a in gqa.attributes.values()] + [ir.AttrInt64("do_rotary", 1),
                                                        ir.AttrInt64("rotary_interleaved", 0)]
        new = ir.Node(MS, "GroupQueryAttention", qkv + list(gqa.inputs[3:7]) + [cos, sin, found[1]], attrs,
                      num_outputs=len(gqa.outputs))
        graph.insert_before(gqa, new)
        for old, out in zip(gqa.outputs, new.outputs):
            out.type, out.shape = old.type, old.shape
            name, was_output = old.name, old.is_graph_output()
            ir.convenience.replace_all_uses_with(old, out, replace_graph_outputs=True)
            if was_output:                                 # keep the graph's output names (present_key_i, ...)
                old.name = f"{name}.unfused"
                out.name = name
        graph.remove([gqa, rq, rk] + ([split] if split is not None else []), safe=True)
        result.counts["gqa_rotary"] += 1
        result.counts["gqa_packed_qkv"] += split is not None
    for node in [n for n in reversed(list(graph)) if n.op_type in ("Cos", "Sin", "Mul", "Cast", "Unsqueeze")]:
        if not any(o.uses() or o.is_graph_output() for o in node.outputs):
            graph.remove(node, safe=True)                  # the angle chain, now unread
    result.modified = bool(result.counts)
    return result
