"""Per-layer-group deviations from the floor in the torch evaluation engine (issue 18; docs/policy.md).

``floor_keeps`` gives the floor's per-layer (κ_l, ρ_l) at a target: ``uniform`` (ū in every layer) or the
calibrated ``layers`` allocation (``eval.floor.allocate``). ``OffsetController`` is an engine controller
(``evaluate.run_traces``). A trained policy's head (``policy.offset_step.OffsetHead``) runs the shared state machine
``OffsetStep``; a plain callable head maps what the policy would see (the step index, the LM's last hidden state,
the current token's embedding, whether the step counts) to raw logits [n, G·2·O]. Either way the factored choice
(greedy, or sampled with a generator) picks an offset per (group, axis) and the controls are [n, L, 3] = (floor +
offsets, bits), dense on the steps that do not count. With a head that outputs zeros it is the floor, exactly.
``policy_factory`` is what ``PPLEvaluator`` runs as "policy" for either kind of checkpoint.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from solm_compile.eval import floor as fl
from solm_compile.policy import offsets as off
from solm_compile.eval.sources import PolicyController
from solm_compile.policy.offset_network import OffsetPolicy
from solm_compile.policy.offset_step import OffsetHead, offset_controls

# head(t, h_prev [n, D], e_cur [n, D], counted [n] bool) -> raw logits [n, G·2·O]
Head = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def floor_keeps(usage: Sequence[float], num_layers: int, layer_costs: Optional[fl.LayerCosts] = None) -> Tensor:
    """[L, 2] per-layer (κ_l, ρ_l) of the floor at usage (κ̄, ρ̄, ...): ū everywhere (uniform) or, with a
    calibration, the ``layers`` allocation. Either has the plain layer mean ū."""
    if layer_costs is None:
        return torch.tensor([[float(usage[0]), float(usage[1])]]).repeat(num_layers, 1)      # [L, 2]
    if layer_costs.num_layers != num_layers:
        raise ValueError(f"the calibration has {layer_costs.num_layers} layers, the model {num_layers}")
    cols = [torch.tensor(fl.allocate(layer_costs.levels[a], layer_costs.kl[a], float(usage[a])),
                         dtype=torch.float32) for a in range(2)]                              # 2 x [L]
    return torch.stack(cols, -1)                                                            # [L, 2]


class OffsetController:
    """Per-layer-group offsets over ``floor`` [L, 2] chosen by ``head`` (module docstring); ``bits`` for every layer.

    A stateful head (``policy.offset_step.OffsetHead``) decides through the shared state machine (``decide`` /
    ``advance``); a plain callable head gives raw logits and the controls come from the same ``offset_controls``."""

    def __init__(self, lm, head, grid: off.OffsetGrid, floor: Tensor, bits: float = 16.0,
                 generator: Optional[torch.Generator] = None):
        self.lm, self.head, self.grid, self.floor, self.bits = lm, head, grid, floor.float(), float(bits)
        self.generator = generator

    def begin(self, x) -> "OffsetController":
        n = x.ids.shape[0]
        self.E = self.lm.embed(x.ids).float()                                   # [n, T, D]
        self.h = x.hid.float()                                                  # [n, D]
        self.mask = x.mask                                                      # [n, T]
        self.choices = torch.zeros(n, x.T, self.grid.groups, 2, dtype=torch.long)   # [n, T, G, 2]
        if hasattr(self.head, "start"):
            self.head.start(self.h)
        return self

    def act(self, t: int, eff: bool) -> Tensor:
        counted = self.mask[:, t] & bool(eff)                                   # [n]
        if hasattr(self.head, "decide"):
            d = self.head.decide(self.E[:, t], counted, self.floor, self.generator)
            self.choices[:, t] = d.effective
            return d.controls                                                   # [n, L, 3]
        logits = self.grid.logits(self.head(t, self.h, self.E[:, t], counted))  # [n, G, 2, O]
        c = off.greedy(logits) if self.generator is None else off.sample(logits, self.generator)   # [n, G, 2]
        self.choices[:, t] = c
        return offset_controls(self.grid, self.floor, c, counted, self.bits)    # [n, L, 3]

    def observe(self, t, logits, hid, applied) -> None:
        self.h = hid.float()                                                    # [n, D]
        if hasattr(self.head, "advance"):
            self.head.advance(self.h)

    def refresh(self, t, hid, logits) -> None:
        self.h = hid.float()
        if hasattr(self.head, "start"):
            self.head.start(self.h)


def checkpoint_floor(record: Optional[dict], num_layers: int, targets: Sequence[float]) -> Tensor:
    """[L, 2]: the floor an offsets checkpoint deviates from (its ``floor`` record), at ``targets``."""
    costs = fl.LayerCosts.from_dict(record["layer_costs"]) if record and record.get("layer_costs") else None
    return floor_keeps(targets, num_layers, costs)


def policy_factory(lm, policy, grid, targets: Sequence[float], T: int, floor: Optional[dict] = None):
    """The engine factory of a trained policy at ``targets``: ``PolicyController`` for a joint policy, for an
    ``OffsetPolicy`` an ``OffsetController`` driving it (``OffsetHead``) over its checkpoint's ``floor``."""
    if not isinstance(policy, OffsetPolicy):
        return PolicyController(lm, policy, grid, targets).begin
    keeps = checkpoint_floor(floor, int(lm.info.num_layers), targets)                      # [L, 2]
    return lambda x: OffsetController(lm, OffsetHead(policy, targets, T), policy.grid, keeps).begin(x)


def floor_factory(lm, grid: off.OffsetGrid, keeps: Tensor):
    """The floor itself through the same controller (a head that says nothing: offset 0 everywhere)."""
    zero = lambda t, h, e, counted: torch.zeros(h.shape[0], grid.num_logits)               # noqa: E731
    return lambda x: OffsetController(lm, zero, grid, keeps).begin(x)
