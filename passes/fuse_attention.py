"""ONNX pass (dense artifact): each layer's exported attention becomes one ``GroupQueryAttention`` node.

The exported dense step computes attention as the model's eager code does: append the new keys/values to the
cache (``Concat``), repeat the KV heads to the query heads (Unsqueeze/Expand/Reshape: the cache copied ×H/Hkv),
then MatMul / mask / Softmax / MatMul. onnxruntime-genai and the ORT optimizer emit ``com.microsoft``'s fused
``GroupQueryAttention`` instead, which reads each KV head once. So the dense baseline ``solm bench`` compares
against is the best dense export of the same model on the same runtime, this pass rewrites, per layer i::

    present_key_i = Concat(past_key_i, k)   ...   y = Reshape(Transpose(MatMul(P, repeat(present_value_i))))
      ->  y, present_key_i, present_value_i = GroupQueryAttention(q', k', v', past_key_i, past_value_i,
                                                                  seqlens_k, total_sequence_length)

with q', k', v' the post-RoPE [B, T, H·d] packings (``do_rotary=0``), causal masking from the lengths (the dense
step has no padding input) and the scale read from the exported graph. A layer whose pattern differs is left as
it is (``skipped`` says why); ``write_artifact`` also runs the fused and the unfused graph on a probe input and
keeps the unfused one if they disagree (e.g. a sliding-window layer), so the pass never changes what the
artifact computes.

``buffer=True`` (issue 16, what the dense artifact ships) also drops the concat form's copy: in it every step the
kernel zeroes a fresh ``present`` of P+T rows and copies the whole cache into it (≈ 190 MB a token at SmolLM2's ctx
2048). Instead, as onnxruntime-genai's models do, the caches become buffers the host allocates once::

    past_key_i, past_value_i      [B, Hkv, kv_capacity, d] float32   (rows ≥ past_length unused)
    past_length                   [B] int64: valid rows per row      -> seqlens_k = past_length + T − 1,
                                                                        total_sequence_length = max(past_length + T)
    present_key_i, present_value_i  [B, Hkv, kv_capacity, d]

and a host that binds each ``present`` to its ``past``'s OrtValue gets GroupQueryAttention's shared-buffer path:
only the T new rows are written (runtime/kv.py, layout "buffer").
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from solm_compile.passes.base import PassResult

MS = "com.microsoft"
_SHAPE_OPS = ("Unsqueeze", "Expand", "Reshape")
SHAPE3 = "gqa.shape3"


def _const_scalar(value: ir.Value) -> float | None:
    c = value.const_value if value is not None else None
    if c is None and value is not None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        c = attr.value if attr is not None else None
    if c is None or c.numpy().size != 1:
        return None
    return float(c.numpy().reshape(()))


def _follow(value: ir.Value, through: tuple[str, ...], scale: list[float]) -> ir.Node | None:
    """The MatMul that reads ``value`` as its 2nd input through data-input 0 of ``through`` ops (and scalar Muls,
    whose factors go to ``scale``); None if the path forks into anything else."""
    for use in value.uses():
        node, index = use.node, use.idx
        if node.op_type == "MatMul" and index == 1:
            return node
        if node.op_type in through and node.op_type != "Mul" and index == 0:
            found = _follow(node.outputs[0], through, scale)
            if found is not None:
                return found
        if node.op_type == "Mul" and "Mul" in through:
            factor = _const_scalar(node.inputs[1 - index])
            if factor is not None:
                scale.append(factor)
                found = _follow(node.outputs[0], through, scale)
                if found is not None:
                    return found
                scale.pop()
    return None


def _cache_concat(past: ir.Value) -> ir.Node | None:
    for use in past.uses():
        if use.node.op_type == "Concat" and use.idx == 0 and len(use.node.inputs) == 2:
            return use.node
    return None


def _only_user(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and uses[0].node.op_type == op_type else None


class _Lengths:
    """seqlens_k [B] int32 (= total − 1) and total_sequence_length [] int32, built once from the inputs: from the
    cache's shape (concat form) or, in the buffer form, from ``past_length`` [B] int64 (each row's valid rows)."""

    def __init__(self, graph: ir.Graph, past_key: ir.Value, input_ids: ir.Value, past_length: ir.Value | None = None):
        first = next(iter(graph))
        tape = []

        def op(op_type, inputs, **attrs):
            attributes = [ir.AttrInt64(k, v) for k, v in attrs.items()]
            node = ir.Node("", op_type, inputs, attributes)
            tape.append(node)
            return node.outputs[0]

        int32 = ir.DataType.INT32.value
        new = op("Shape", [input_ids], start=1, end=2)                         # [1] int64
        if past_length is not None:
            one = ir.Value(name="gqa.one64", const_value=ir.tensor(np.array([1], np.int64), name="gqa.one64"))
            graph.register_initializer(one)
            ends = op("Add", [past_length, new])                               # [B] int64: P_b + T
            self.seqlens = op("Cast", [op("Sub", [ends, one])], to=int32)      # [B] int32
            self.total = op("Cast", [op("ReduceMax", [ends], keepdims=0)], to=int32)   # [] int32
        else:
            one = ir.Value(name="gqa.one", const_value=ir.tensor(np.array([1], np.int32), name="gqa.one"))
            graph.register_initializer(one)
            past = op("Shape", [past_key], start=2, end=3)                     # [1] int64
            batch = op("Shape", [input_ids], start=0, end=1)                   # [1]
            total = op("Cast", [op("Add", [past, new])], to=int32)             # [1] int32
            self.total = op("Squeeze", [total])                                # [] int32
            self.seqlens = op("Expand", [op("Sub", [total, one]), batch])      # [B] int32
        graph.insert_before(first, tape)


def _packed(graph: ir.Graph, at: ir.Node, x: ir.Value, shape3: ir.Value) -> ir.Value:
    """[B, heads, T, d] -> [B, T, heads·d]."""
    t = ir.Node("", "Transpose", [x], [ir.AttrInt64s("perm", [0, 2, 1, 3])])
    r = ir.Node("", "Reshape", [t.outputs[0], shape3])
    graph.insert_before(at, [t, r])
    return r.outputs[0]


def fuse_attention(model: ir.Model, buffer: bool = False) -> PassResult:
    """``buffer``: also turn the caches into buffers written in place (module docstring); only when every layer
    fuses (a layer left unfused concatenates its cache), else the concat form, with a line in ``skipped``."""
    graph = model.graph
    result = PassResult("fuse_attention")
    inputs = {v.name: v for v in graph.inputs}
    if "input_ids" not in inputs or "past_key_0" not in inputs:
        result.skipped.append("not a decode step (no input_ids / past_key_0)")
        return result
    rewrites, i = [], 0
    while f"past_key_{i}" in inputs:
        why = _fuse_layer(graph, i, inputs)
        if isinstance(why, str):
            result.skipped.append(f"layer {i}: {why}")
        else:
            rewrites.append(why)
        i += 1
    if not rewrites:
        return result
    if buffer and result.skipped:
        result.skipped.append("KV cache left in the concat form: not every layer fuses")
        buffer = False
    past_length = _add_past_length(graph, inputs["past_key_0"]) if buffer else None
    lengths = _Lengths(graph, inputs["past_key_0"], inputs["input_ids"], past_length)
    shape3 = ir.Value(name=SHAPE3, const_value=ir.tensor(np.array([0, 0, -1], np.int64), name=SHAPE3))
    graph.register_initializer(shape3)
    for rewrite in rewrites:
        rewrite(lengths, shape3)
        result.counts["group_query_attention"] += 1
    model.opset_imports.setdefault(MS, 1)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    if buffer:
        _as_buffers(graph, inputs)
        result.counts["kv_buffer"] = 1
    result.modified = True
    return result


def _add_past_length(graph: ir.Graph, past_key: ir.Value) -> ir.Value:
    """The graph input ``past_length`` [B] int64, right after the last cache input (step protocol)."""
    past_length = ir.Value(name="past_length", shape=ir.Shape([past_key.shape[0]]),
                           type=ir.TensorType(ir.DataType.INT64))
    at = max(i for i, v in enumerate(graph.inputs) if (v.name or "").startswith(("past_key_", "past_value_")))
    graph.inputs.insert(at + 1, past_length)
    return past_length


def _reads_dims_0_1(node: ir.Node) -> bool:
    """Shape(end <= 2): the batch and heads, which the buffer form keeps."""
    end = node.attributes.get("end")
    return node.op_type == "Shape" and node.domain == "" and end is not None and 0 < end.as_int() <= 2


def _as_buffers(graph: ir.Graph, inputs: dict) -> None:
    """Caches [B, Hkv, kv_capacity, d] in and out; refuses (ValueError) if anything but GroupQueryAttention (or a
    Shape of the batch and heads) reads one, since it would see the capacity where the concat form had the valid
    length."""
    presents = {o.name: o for o in graph.outputs}
    for name, past in inputs.items():
        if not name.startswith(("past_key_", "past_value_")):
            continue
        readers = [u.node.op_type for u in past.uses() if u.node.op_type != "GroupQueryAttention"
                   and not _reads_dims_0_1(u.node)]
        if readers:
            raise ValueError(f"fuse_attention: {name} is also read by {readers[0]}: no buffer form")
        shape = ir.Shape([past.shape[0], past.shape[1], "kv_capacity", past.shape[3]])
        past.shape = shape
        presents[name.replace("past_", "present_", 1)].shape = shape


def _fuse_layer(graph: ir.Graph, i: int, inputs: dict):
    """A closure that rewrites layer i given the lengths and the packing shape, or a string saying why it does not
    match."""
    pk, pv = inputs[f"past_key_{i}"], inputs.get(f"past_value_{i}")
    ck, cv = _cache_concat(pk), _cache_concat(pv) if pv is not None else None
    if ck is None or cv is None:
        return "the cache is not Concat(past, new)"
    k_scale: list[float] = []
    qk = _follow(ck.outputs[0], _SHAPE_OPS + ("Transpose", "Mul"), k_scale)
    av = _follow(cv.outputs[0], _SHAPE_OPS, [])
    if qk is None or av is None:
        return "no MatMul reads the repeated cache"
    q, q_scale = qk.inputs[0], 1.0
    if q.producer() is not None and q.producer().op_type == "Mul":
        factors = [_const_scalar(v) for v in q.producer().inputs]
        if factors[1] is not None:
            q, q_scale = q.producer().inputs[0], factors[1]
    tr = _only_user(av.outputs[0], "Transpose")
    out = _only_user(tr.outputs[0], "Reshape") if tr is not None else None
    if out is None or q.shape is None or len(q.shape) != 4 or not isinstance(q.shape[1], int):
        return "the attention output is not Reshape(Transpose(MatMul)) of a [B, H, T, d] query"
    heads, kv_heads = q.shape[1], pk.shape[1]
    scale = q_scale * float(np.prod(k_scale)) if k_scale else q_scale

    def rewrite(lengths: _Lengths, shape3: ir.Value) -> None:
        args = [_packed(graph, qk, v, shape3) for v in (q, ck.inputs[1], cv.inputs[1])]
        gqa = ir.Node(MS, "GroupQueryAttention", [*args, pk, pv, lengths.seqlens, lengths.total],
                      [ir.AttrInt64("num_heads", heads), ir.AttrInt64("kv_num_heads", kv_heads),
                       ir.AttrFloat32("scale", scale)], num_outputs=3)
        graph.insert_before(qk, gqa)
        y, present_k, present_v = gqa.outputs
        y.type, y.shape = out.outputs[0].type, out.outputs[0].shape
        for new, old in ((present_k, ck.outputs[0]), (present_v, cv.outputs[0])):
            new.type, new.shape = old.type, old.shape
        for new, old in ((y, out.outputs[0]), (present_k, ck.outputs[0]), (present_v, cv.outputs[0])):
            name, was_output = old.name, old.is_graph_output()
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            if was_output:
                old.name = f"{name}.unfused"
                new.name = name

    return rewrite
