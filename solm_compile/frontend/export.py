"""The decode-step graph: one ExportedProgram for prefill and decode.

Signature (also what a user's ``.pt2`` must follow)::

    forward(input_ids [B,T] int64, position_ids [B,T] int64, past: tuple(k0, v0, k1, v1, ...))
        -> (logits [B,T,V], last_hidden [B,T,D], k0', v0', k1', v1', ...)

``past`` holds every layer's key and value cache as flat tensors [B, Hkv, P, d] (P may be 0 at prefill);
``last_hidden`` is the hidden state after the final norm (what the policy reads); the presents are the pasts
with the T new positions appended. B, T and P are dynamic.
"""

from __future__ import annotations

import logging

import torch
from torch.export import Dim

log = logging.getLogger(__name__)


class DecodeStep(torch.nn.Module):
    """Wraps a transformers causal LM into the flat decode-step signature above."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, position_ids, past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)]
        # no config: every layer a plain full-length layer, so a sliding-window layer (Gemma-3) is handed the whole
        # past and its mask hides the keys outside the window. With the config, transformers' sliding-window layers
        # build their masks for a cache of at most window−1 keys, and decode past the window read the wrong keys.
        cache = DynamicCache(ddp_cache_data=pairs)
        out = self.m.base_model(input_ids=input_ids, position_ids=position_ids, cache=cache,
                                use_cache=True)
        hidden = out.last_hidden_state                      # [B,T,D]
        logits = self.m.get_output_embeddings()(hidden)     # [B,T,V]
        softcap = getattr(self.m.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (logits, hidden, *presents)


def kv_shape(config) -> tuple[int, int]:
    """(kv heads, head dim) of a transformers config."""
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return kv, head_dim


def example_inputs(config, batch: int = 2, T: int = 3, past: int = 5):
    kv, hd = kv_shape(config)
    ids = torch.randint(0, config.vocab_size, (batch, T))
    pos = torch.arange(past, past + T).unsqueeze(0).expand(batch, T).contiguous()
    pasts = tuple(torch.randn(batch, kv, past, hd) for _ in range(2 * config.num_hidden_layers))
    return ids, pos, pasts


def export_decode_step(model: torch.nn.Module) -> torch.export.ExportedProgram:
    """torch.export the decode step of a transformers causal LM with dynamic batch, length and past."""
    model.eval()
    args = example_inputs(model.config)
    tok = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    kv = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC}
    shapes = (tok, tok, tuple(kv for _ in args[2]))
    with torch.no_grad():
        ep = torch.export.export(DecodeStep(model), args, dynamic_shapes=shapes, strict=False)
    log.info("exported decode step: %d nodes", len(ep.graph.nodes))
    return ep


def flat_module(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The unlifted graph as a GraphModule with flat positional inputs and a flat tuple output."""
    unlifted = ep.module()
    graph = unlifted.graph
    graph._codegen = torch.fx.graph.CodeGen()
    for node in list(graph.nodes):  # the pytree input guard has no meaning for flat inputs
        if node.op == "call_module" and not node.users and "guard" in str(node.target):
            graph.erase_node(node)
    gm = torch.fx.GraphModule(unlifted, graph)  # a fresh class: no pytree pre-hooks
    gm.recompile()
    return gm
