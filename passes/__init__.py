"""Graph passes of solm, in the order they run. ``PIPELINE`` is the table of contents.

Each pass is ``fn(gm: fx.GraphModule, ctx: PassContext) -> PassResult``; running the pipeline twice changes
nothing the second time.
"""

from __future__ import annotations

import torch.fx as fx

from solm_compile.passes.gate_attention import gate_attention
from solm_compile.passes.base import PassContext, PassResult
from solm_compile.passes.add_controls import CONTROL_INPUTS, add_controls
from solm_compile.passes.gate_mlp import gate_mlp


def strip_asserts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Drop export-time ``_assert_tensor_metadata`` checks: they pin dtypes only and hide real users."""
    import torch

    nodes = [n for n in gm.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
    for n in nodes:
        gm.graph.erase_node(n)
    if nodes:
        gm.recompile()
    return PassResult("strip_asserts", modified=bool(nodes), counts={"asserts": len(nodes)} if nodes else {})


def eliminate_dead_code(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    removed = before - len(gm.graph.nodes)
    return PassResult("eliminate_dead_code", modified=removed > 0, counts={"removed": removed} if removed else {})


PIPELINE = (
    strip_asserts,        # export's dtype asserts would look like extra users of every tensor
    add_controls,         # inputs attn_keep / mlp_keep / bits [B] → one solm.gate_controls node
    gate_attention,       # sdpa | softmax(QKᵀ)V  → solm.quest_attention
    gate_mlp,             # down(act(gate(x))·up(x)) | proj(act(fc(x)))  → solm.sparse_mlp
    eliminate_dead_code,  # drop what the rewrites orphaned
)


def run_pipeline(gm: fx.GraphModule, ctx: PassContext) -> list[PassResult]:
    return [p(gm, ctx) for p in PIPELINE]


__all__ = ["PIPELINE", "PassContext", "PassResult", "CONTROL_INPUTS", "run_pipeline"]
