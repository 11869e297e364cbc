"""Per-layer-group deviations from the floor in the torch evaluation engine (issue 18; docs/policy.md).

``floor_keeps`` gives the floor's per-layer (κ_l, ρ_l) at a target: ``uniform`` (ū in every layer) or the
calibrated ``layers`` allocation (``eval.floor.allocate``). ``OffsetController`` is an engine controller
(``evaluate.run_traces``): at each step a head maps what the policy would see (the step index, the LM's last hidden
state, the current token's embedding, whether the step counts) to raw logits [n, G·2·O] (a stateful head, e.g.
``policy.offset_network.OffsetHead``, also gets ``start(n)`` and ``observe(choice, counted, applied)``); the factored choice (greedy, or sampled with a
generator) picks an offset per (group, axis), and the controls are [n, L, 3] = (floor + offsets, bits), dense on
the steps that do not count. With a head that outputs zeros it is the floor, exactly.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from solm_compile.eval import baselines as bl
from solm_compile.eval import floor as fl
from solm_compile.policy import offsets as off

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
    """Per-layer-group offsets over ``floor`` [L, 2] chosen by ``head`` (module docstring); ``bits`` for every layer."""

    def __init__(self, lm, head: Head, grid: off.OffsetGrid, floor: Tensor, bits: float = 16.0,
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
            self.head.start(n)
        return self

    def act(self, t: int, eff: bool) -> Tensor:
        counted = self.mask[:, t] & bool(eff)                                   # [n]
        logits = self.grid.logits(self.head(t, self.h, self.E[:, t], counted))  # [n, G, 2, O]
        c = off.greedy(logits) if self.generator is None else off.sample(logits, self.generator)   # [n, G, 2]
        self.choices[:, t] = c
        keep = self.grid.keeps(self.floor, c)                                   # [n, L, 2]
        n, L, _ = keep.shape
        ctl = torch.cat([keep, torch.full((n, L, 1), self.bits)], -1)           # [n, L, 3]
        dense = torch.tensor(bl.DENSE).expand(n, L, 3)
        ctl = torch.where(counted[:, None, None], ctl, dense)                   # [n, L, 3]
        if hasattr(self.head, "observe"):
            self.head.observe(c, counted, ctl.mean(1))                          # the layer mean is the usage
        return ctl

    def observe(self, t, logits, hid, applied) -> None:
        self.h = hid.float()                                                    # [n, D]

    def refresh(self, t, hid, logits) -> None:
        self.h = hid.float()
