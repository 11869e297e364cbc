"""ONNX pass: each layer's KV cache as a pre-allocated buffer that QuestAttention appends to in place (issue 16).

Runs on the exported ``ir.Model`` of an ``ai.solm`` artifact after ``carry_page_state``. The export's concat form::

    present_key_i = Concat(past_key_i, k)        past_key_i [B, Hkv, T_past, d] float32 (likewise values)
    out = QuestAttention(q, present_key_i, present_value_i, mask, kappa, page state...)

becomes the buffer form (registry.QUEST_ATTENTION, reference.quest_attention_cache_ref)::

    out, ..., present_key_i, present_value_i = QuestAttention(q, k, v, mask, kappa, page state...,
                                                              past_key_i, past_value_i, past_length)

    graph inputs   past_key_i, past_value_i    [B, Hkv, kv_capacity, d]  float16 (or float32: the exact reference)
                   past_length                 [B] int64: each row's valid rows already in the buffers
    graph outputs  present_key_i, present_value_i  [B, Hkv, kv_capacity, d], the same buffers when the caller binds
                   them as the past's OrtValues (runtime/session.py does): then only the T new rows are written.

The Concats go. The export's other readers of the caches (``Shape`` for the mask and positions, ``GateControls``)
read only dims 0-2, the batch, heads and *valid length*, so they get a zero-element "ghost" [B, Hkv, max(past_length),
0] (ConstantOfShape: no data) instead of the buffer; the pass refuses a reader that could see dim 3. Running it twice
changes nothing the second time.

Step protocol 2 (docs/protocol.md: rows of different lengths in one run) also takes here:

- every ``GateControls`` gets ``past_length`` as its optional last input, so each row is gated by its own length;
- the page state ``carry_page_state`` added becomes buffers like the KV: ``past_page_min_i`` / ``past_page_max_i``
  [B, Hkv, kv_pages, d] (kv_pages = kv_capacity / S) of the cache's dtype (step protocol 3: the min/max of float16
  keys are float16 values, so half the bytes lose nothing), required inputs (no default), and ``present_page_*``
  the same shape and type, meant to be bound to the same OrtValues; SolmEP folds each row's new keys into its own
  pages.

The ghost's length is the rows' maximum: a single-token run is a prefill (the policy restarts its episode) only when
every row is empty, which a host never runs (a joining row is prefilled in a run of its own).
"""

from __future__ import annotations

import re

import numpy as np
from onnxscript import ir

from solm_compile.ops import registry
from solm_compile.passes.base import PassResult

DOMAIN = registry.DOMAIN
_QUEST = registry.QUEST_ATTENTION
_IN = [p.name for p in _QUEST.inputs]
_OUT = [p.name for p in _QUEST.outputs]
_PAST = re.compile(r"past_(key|value)_(\d+)")
_PAGE = re.compile(r"past_page_(min|max)_(\d+)")
DTYPES = {"float16": ir.DataType.FLOAT16, "float32": ir.DataType.FLOAT}
LAYOUT = "buffer"


def _reads_dims_0_2(use: ir.Usage) -> bool:
    """A reader of a cache that sees at most its dims 0-2: Shape(end <= 3), or GateControls' past_key."""
    node = use.node
    if node.op_type == "Shape" and node.domain == "":
        end = node.attributes.get("end")
        return end is not None and 0 < end.as_int() <= 3
    return node.domain == DOMAIN and node.op_type == registry.GATE_CONTROLS.onnx_name and use.idx == 1


def _ghost(graph: ir.Graph, like: ir.Value, past_length: ir.Value) -> ir.Value:
    """[B, Hkv, max(past_length), 0] float32 zeros: no memory, the shape the concat form's readers saw."""
    zero = ir.Value(name="kv.ghost_d", const_value=ir.tensor(np.array([0], np.int64), name="kv.ghost_d"))
    graph.register_initializer(zero)
    nodes = [ir.Node("", "Shape", [like], [ir.AttrInt64("start", 0), ir.AttrInt64("end", 2)], name="kv.ghost_bh"),
             ir.Node("", "ReduceMax", [past_length], [ir.AttrInt64("keepdims", 1)], name="kv.ghost_len")]
    shape = ir.Node("", "Concat", [nodes[0].outputs[0], nodes[1].outputs[0], zero], [ir.AttrInt64("axis", 0)],
                    name="kv.ghost_shape")                                           # [4] int64
    ghost = ir.Node("", "ConstantOfShape", [shape.outputs[0]],
                    [ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float32), name="kv.ghost_value"))],
                    name="kv.ghost")                                                 # [B, Hkv, past_length, 0]
    graph.insert_before(next(iter(graph)), [*nodes, shape, ghost])
    out = ghost.outputs[0]
    out.name = "kv.ghost"
    return out


def kv_buffer(model: ir.Model, dtype: str = "float16") -> PassResult:
    graph = model.graph
    result = PassResult("kv_buffer")
    if dtype not in DTYPES:
        raise ValueError(f"kv_buffer: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    inputs = {v.name: v for v in graph.inputs}
    if "past_length" in inputs:
        return result                                                # already the buffer form
    quests = [n for n in graph if n.domain == DOMAIN and n.op_type == _QUEST.onnx_name]
    plan = []   # (node, layer, key concat, value concat)
    for node in quests:
        k, v = node.inputs[1], node.inputs[2]
        ck, cv = k.producer() if k is not None else None, v.producer() if v is not None else None
        if ck is None or cv is None or ck.op_type != "Concat" or cv.op_type != "Concat":
            result.skipped.append(f"{node.name}: k/v are not Concat(past_i, new)")
            continue
        mk, mv = _PAST.fullmatch(ck.inputs[0].name or ""), _PAST.fullmatch(cv.inputs[0].name or "")
        if not (mk and mv and mk.group(1) == "key" and mv.group(1) == "value" and mk.group(2) == mv.group(2)):
            result.skipped.append(f"{node.name}: k/v are not Concat(past_key_i / past_value_i, new)")
            continue
        other = [u.node.name for c in (ck, cv) for u in c.outputs[0].uses() if u.node is not node]
        if other:
            result.skipped.append(f"{node.name}: the concatenated cache has other readers: {other}")
            continue
        plan.append((node, int(mk.group(2)), ck, cv))
    if not plan:
        return result
    like = inputs[f"past_key_{plan[0][1]}"]
    batch, hkv = like.shape[0], like.shape[1]
    past_length = ir.Value(name="past_length", shape=ir.Shape([batch]), type=ir.TensorType(ir.DataType.INT64))
    at_in = max(i for i, v in enumerate(graph.inputs) if (v.name or "").startswith(("past_key_", "past_value_")))
    graph.inputs.insert(at_in + 1, past_length)
    ghost = _ghost(graph, like, past_length)
    elem = DTYPES[dtype]
    for node, layer, ck, cv in plan:
        caches = []
        for concat in (ck, cv):
            past = concat.inputs[0]
            for use in list(past.uses()):
                if use.node is concat or use.node is ghost.producer() or use.node.name == "kv.ghost_bh":
                    continue
                if not _reads_dims_0_2(use):
                    raise ValueError(f"kv_buffer: {past.name} is read by {use.node.op_type} {use.node.name}, which "
                                     f"may see its dim 3 (only Shape(end<=3) and GateControls are rewritten)")
                use.node.replace_input_with(use.idx, ghost)
            past.type = ir.TensorType(elem)
            past.shape = ir.Shape([batch, hkv, "kv_capacity", past.shape[3]])
            caches.append(past)
        node.resize_inputs(len(_IN))
        node.resize_outputs(len(_OUT))
        node.replace_input_with(1, ck.inputs[1])                     # k: the new rows only
        node.replace_input_with(2, cv.inputs[1])
        node.replace_input_with(_IN.index("past_key"), caches[0])
        node.replace_input_with(_IN.index("past_value"), caches[1])
        node.replace_input_with(_IN.index("past_length"), past_length)
        for concat, name in ((ck, "present_key"), (cv, "present_value")):
            old, new = concat.outputs[0], node.outputs[_OUT.index(name)]
            at = next(i for i, o in enumerate(graph.outputs) if o is old)
            old.name = f"{old.name}.concat"
            new.name = f"{name}_{layer}"
            new.type, new.shape = past.type, ir.Shape([batch, hkv, "kv_capacity", old.shape[3]])
            graph.outputs[at] = new
            graph.remove(concat, safe=True)
        result.counts["kv_buffer"] += 1
        result.gated.append(("attention", f"layer {layer}"))
    for node in graph:                                                # each row gated by its own length
        if node.domain == DOMAIN and node.op_type == registry.GATE_CONTROLS.onnx_name:
            node.resize_inputs(len(registry.GATE_CONTROLS.inputs))
            node.replace_input_with(len(registry.GATE_CONTROLS.inputs) - 1, past_length)
            result.counts["gate_lengths"] += 1
    _page_buffers(graph, batch, hkv, elem)
    result.modified = True
    return result


def _page_buffers(graph: ir.Graph, batch, hkv, elem: ir.DataType) -> None:
    """The carried page state as in-place buffers [B, Hkv, kv_pages, d] of the cache's type ``elem`` (required
    inputs, outputs of that shape and type)."""
    for value in list(graph.inputs):
        m = _PAGE.fullmatch(value.name or "")
        if m is None:
            continue
        if value.name in graph.initializers:                          # the empty default goes: the buffer is fed
            graph.initializers.pop(value.name)
        value.const_value = None
        d = value.shape[3]
        value.shape = ir.Shape([batch, hkv, "kv_pages", d])
        value.type = ir.TensorType(elem)
        out = next(o for o in graph.outputs if o.name == f"present_page_{m.group(1)}_{m.group(2)}")
        out.shape = ir.Shape([batch, hkv, "kv_pages", d])
        out.type = ir.TensorType(elem)
