"""ONNX pass: carry each QuestAttention's page min/max as KV state, so SolmEP selects pages from O(P·d) state.

Runs on the exported ``ir.Model`` of an ``ai.solm`` artifact (``artifact.write_artifact``), not on the torch graph:
the torch op ``solm::quest_attention`` keeps its schema (training and torch.compile use it). For each layer i whose
``QuestAttention`` reads that layer's key cache (its ``k`` is ``present_key_i`` = Concat(``past_key_i``, new keys))::

    QuestAttention(q, k, v, attn_mask?, kappa, past_page_min_i, past_page_max_i)
        -> (out, present_page_min_i, present_page_max_i)

    graph inputs   past_page_min_i, past_page_max_i        [batch, Hkv, past_pages_i, d]
                   with the default (initializer) an empty [1, Hkv, 0, d]: a caller that does not feed them gets
                   the pages computed from all of K, as without the state
    graph outputs  present_page_min_i, present_page_max_i  [batch, Hkv, pages_i, d], pages = ceil((past + T) / S)

placed right after the KV cache's inputs (``past_value_{n-1}``) and outputs (``present_value_{n-1}``), layer by layer.

Unlike the torch passes this is ``fn(model: ir.Model) -> PassResult``; running it twice changes nothing the second
time. ``select_per_kv_head`` sets SolmEP's coarser per-KV-head page selection on every QuestAttention node.
"""

from __future__ import annotations

import re

import numpy as np
from onnxscript import ir

from solm_compile.ops import registry
from solm_compile.passes.base import PassResult

DOMAIN = registry.DOMAIN
_QUEST = registry.QUEST_ATTENTION      # the artifact form (registry.py): the page state's positions below
_PAGE_IN = [p.name for p in _QUEST.inputs].index("past_page_min")        # 5
_PAGE_OUT = [p.name for p in _QUEST.outputs].index("present_page_min")   # 1
_PRESENT_KEY = re.compile(r"present_key_(\d+)")
_PAST_KEY = re.compile(r"past_key_(\d+)")


def _quest_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.domain == DOMAIN and n.op_type == _QUEST.onnx_name]


def _layer_of(node: ir.Node) -> int | None:
    """The layer whose key cache the node's ``k`` is: ``present_key_i``, or a Concat whose first input is
    ``past_key_i``; None otherwise."""
    k = node.inputs[1]
    if k is None:
        return None
    m = _PRESENT_KEY.fullmatch(k.name or "")
    if m is None and k.producer() is not None and k.producer().op_type == "Concat":
        first = k.producer().inputs[0]
        m = _PAST_KEY.fullmatch(first.name or "") if first is not None else None
    return int(m.group(1)) if m else None


def _state_input(name: str, like: ir.Value, pages: str) -> ir.Value:
    """A graph input [batch, Hkv, pages, d] shaped like ``like`` (the layer's past_key), default empty."""
    batch, hkv, _, d = like.shape
    value = ir.Value(name=name, shape=ir.Shape([batch, hkv, pages, d]), type=ir.TensorType(ir.DataType.FLOAT))
    value.const_value = ir.tensor(np.zeros((1, hkv, 0, d), np.float32), name=name)
    return value


def _after_cache(values, prefixes: tuple) -> int:
    """The position just after the last value whose name starts with one of ``prefixes`` (the cache block)."""
    hits = [i for i, v in enumerate(values) if (v.name or "").startswith(prefixes)]
    return hits[-1] + 1 if hits else len(values)


def carry_page_state(model: ir.Model) -> PassResult:
    graph = model.graph
    result = PassResult("carry_page_state")
    inputs = {v.name: v for v in graph.inputs}
    at_in = _after_cache(graph.inputs, ("past_key_", "past_value_", "past_page_"))
    at_out = _after_cache(graph.outputs, ("present_key_", "present_value_", "present_page_"))
    for node in _quest_nodes(graph):
        if len(node.inputs) > _PAGE_IN and node.inputs[_PAGE_IN] is not None:
            continue                                           # already carries its page state
        layer = _layer_of(node)
        past = inputs.get(f"past_key_{layer}")
        if layer is None or past is None or past.shape is None or len(past.shape) != 4:
            result.skipped.append(f"{node.name}: k is not a layer's key cache (present_key_i = Concat(past_key_i, ·))")
            continue
        state_in = [_state_input(f"past_page_{m}_{layer}", past, f"past_pages_{layer}") for m in ("min", "max")]
        node.resize_inputs(max(len(node.inputs), _PAGE_IN + 2))        # up to the page state (kv_buffer adds more)
        node.resize_outputs(max(len(node.outputs), _PAGE_OUT + 2))
        for j, value in enumerate(state_in):
            graph.inputs.insert(at_in, value)
            at_in += 1
            graph.register_initializer(value)
            node.replace_input_with(_PAGE_IN + j, value)
            out = node.outputs[_PAGE_OUT + j]
            out.name = f"present_page_{('min', 'max')[j]}_{layer}"
            out.type = ir.TensorType(ir.DataType.FLOAT)
            out.shape = ir.Shape([past.shape[0], past.shape[1], f"pages_{layer}", past.shape[3]])
            graph.outputs.insert(at_out, out)
            at_out += 1
        result.counts["page_state"] += 1
        result.gated.append(("attention", f"layer {layer}"))
    result.modified = bool(result.counts)
    return result


def select_per_kv_head(model: ir.Model) -> PassResult:
    """``select_per_kv_head=1`` on every QuestAttention: pages chosen once per KV head from the scores summed over
    its query heads (SolmEP's coarser policy; the same as per query head without GQA)."""
    result = PassResult("select_per_kv_head")
    for node in _quest_nodes(model.graph):
        attr = node.attributes.get("select_per_kv_head")
        if attr is not None and attr.as_int() == 1:
            continue
        node.attributes["select_per_kv_head"] = ir.AttrInt64("select_per_kv_head", 1)
        result.counts["quest_attention"] += 1
    result.modified = bool(result.counts)
    return result
