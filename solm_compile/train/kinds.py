"""What differs between the policy kinds ``solm train --policy-kind`` trains (``TrainConfig.policy_kind``): the
network, the rollout and the update's log π / entropy; the GRPO loop (``train/loop.py``) is the same for both.

``joint``: SOL's one joint action per step (``RecurrentActorCriticPolicy``, ``train/rollout.py``). ``offsets``: per
layer-group offsets over the floor (``OffsetPolicy``, ``train/rollout_offsets.py``, docs/policy.md); its floor is
uniform or the ``layers`` calibration ``floor_costs`` (``TrainConfig.floor`` names which), recorded in the
checkpoint (``record``) so evaluation runs the same floor.
"""

from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from solm_compile.errors import UserError
from solm_compile.eval import floor as fl
from solm_compile.policy.network import RecurrentActorCriticPolicy
from solm_compile.policy.offset_network import OffsetPolicy
from solm_compile.policy.offsets import OffsetGrid
from solm_compile.train import grpo
from solm_compile.train.config import TrainConfig
from solm_compile.train.rollout import Episode, rollout
from solm_compile.train.rollout_offsets import floors, log_prob_entropy, rollout_offsets


class JointKind:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def make(self, hidden_size: int) -> nn.Module:
        return RecurrentActorCriticPolicy(hidden_size, self.cfg.grid.num_actions, self.cfg.policy)

    def rollout(self, lm: Any, policy, blocks: Tensor, targets: Tensor, gen, min_len: int) -> Episode:
        c = self.cfg
        return rollout(lm, policy, blocks, targets, c.grid, T=c.T, K=c.K, tau=c.tau, reward=c.reward, generator=gen,
                       min_len=min_len)

    def logp_entropy(self, logits: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """logits / tau [m, T, A], actions [m, T] -> log π [m, T], entropy [m, T]."""
        return F.log_softmax(logits, -1).gather(-1, actions[..., None])[..., 0], grpo.entropy(logits)

    def record(self) -> dict:
        return {}


class OffsetKind(JointKind):
    def __init__(self, cfg: TrainConfig, floor_costs: Optional[fl.LayerCosts], num_layers: int):
        super().__init__(cfg)
        if (floor_costs is None) != (cfg.floor == "uniform"):
            raise UserError(f"train: floor {cfg.floor!r} needs the layers calibration exactly when it is not uniform")
        if floor_costs is not None and floor_costs.num_layers != num_layers:
            raise UserError(f"train: the floor's calibration has {floor_costs.num_layers} layers, the model "
                            f"{num_layers}")
        # early / middle / late thirds (docs/policy.md); a model of fewer layers gets one group per layer
        self.costs, self.L, self.grid = floor_costs, int(num_layers), OffsetGrid(groups=min(3, int(num_layers)))

    def make(self, hidden_size: int) -> nn.Module:
        return OffsetPolicy(hidden_size, self.grid, self.cfg.policy)

    def rollout(self, lm: Any, policy, blocks: Tensor, targets: Tensor, gen, min_len: int) -> Episode:
        c = self.cfg
        return rollout_offsets(lm, policy, blocks, targets, floors(targets, self.L, self.costs), T=c.T, K=c.K,
                               tau=c.tau, reward=c.reward, generator=gen, min_len=min_len)

    def logp_entropy(self, logits: Tensor, actions: Tensor) -> tuple[Tensor, Tensor]:
        """raw / tau [m, T, G·2·O], actions [m, T, G, 2] -> factored log π [m, T], entropy [m, T]."""
        return log_prob_entropy(logits, actions, self.grid)

    def record(self) -> dict:
        """What a checkpoint keeps so evaluation rebuilds the policy and its floor."""
        g = self.grid
        return {"offset_grid": {"offsets": list(g.offsets), "groups": g.groups, "prior": g.prior,
                                "lowest": list(g.lowest)},
                "floor": {"id": self.cfg.floor, "layer_costs": None if self.costs is None else self.costs.to_dict()}}


def kind_of(cfg: TrainConfig, floor_costs: Optional[fl.LayerCosts] = None, num_layers: int = 0) -> JointKind:
    if cfg.policy_kind == "joint":
        if floor_costs is not None:
            raise UserError("train: a floor calibration is for --policy-kind offsets")
        return JointKind(cfg)
    return OffsetKind(cfg, floor_costs, num_layers)
