"""A one-node QuestAttention model in its KV-buffer form (past_key/past_value written in place, past_length), on a
SolmEP session: the graph the KV-cache and chunked-decode tests drive."""

from __future__ import annotations

from onnx import TensorProto, helper

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def quest_buffer_session(ort, kv_type: int, page_size: int, threads: int | None = None):
    """``QuestAttention(q, k, v, kappa, past_key, past_value, past_length)`` with sinks 2, window 4, on SolmEP."""
    names = ["q", "k", "v", "", "kappa", "", "", "past_key", "past_value", "past_length"]
    node = helper.make_node("QuestAttention", names, ["out", "", "", "present_key", "present_value"],
                            domain="ai.solm", page_size=page_size, sinks=2, window=4)
    types = {"q": F, "k": F, "v": F, "kappa": F, "past_key": kv_type, "past_value": kv_type, "past_length": I64}
    outs = {"out": F, "present_key": kv_type, "present_value": kv_type}
    return one_node_session(ort, node, types, outs, threads)


def one_node_session(ort, node, inputs: dict, outputs: dict, threads: int | None = None):
    """A model of the one ``ai.solm`` ``node`` (inputs/outputs: name -> TensorProto type) on a SolmEP session."""
    from solm_compile.runtime import ep

    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs.items()],
                              [helper.make_tensor_value_info(n, t, None) for n, t in outputs.items()])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("ai.solm", 1)])
    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), ep.session_options_with_ep(so, ort=ort))
    assert sess.get_providers()[0] == "SolmEP"
    return sess
