"""What every pass shares: its result record and the context it reads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch.fx as fx

import solm_compile.ops.torch_ops  # noqa: F401  (registers torch.ops.solm.*)
from solm_compile.config import GateConfig


@dataclass
class PassResult:
    """What a pass changed. ``modified`` is True iff the graph changed; ``counts`` per rewritten op kind;
    ``gated`` lists (op kind, layer label) pairs; ``skipped`` says why candidate nodes did not match."""

    name: str
    modified: bool = False
    counts: Counter = field(default_factory=Counter)
    gated: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


@dataclass
class PassContext:
    """Read-only inputs of the passes plus the control nodes that ``add_controls`` creates."""

    gate: GateConfig = field(default_factory=GateConfig)
    model_name: str = "model"
    # Where ``add_controls`` finds the step's token ids [B,T] and a key tensor [B,Hkv,P,d] whose dim 2 is the past
    # length P: node names, or None for the decode-step signature's positions (placeholders 0 and 2). Graphs
    # captured elsewhere (Dynamo) order their inputs differently and may have no past input at all.
    input_ids: str | None = None
    past_key: str | None = None

    def controls(self, graph: fx.Graph) -> tuple[fx.Node, fx.Node, fx.Node] | None:
        """The effective (κ, ρ, b) nodes: the outputs of the graph's ``solm.gate_controls`` node."""
        import operator

        import torch

        for node in graph.nodes:
            if node.target is torch.ops.solm.gate_controls.default:
                items = {u.args[1]: u for u in node.users if u.target is operator.getitem}
                for i in range(3):  # dead-code elimination may have dropped an unused one
                    if i not in items:
                        with graph.inserting_after(node):
                            items[i] = graph.call_function(operator.getitem, (node, i))
                return items[0], items[1], items[2]
        return None
