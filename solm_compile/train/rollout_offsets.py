"""GRPO for the offset policy (issue 18, docs/policy.md): its rollouts, its factored log π / entropy, the floors.

The same protocol as ``train/rollout.py`` (dense prefill, K sampled schedules per sequence over T teacher-forced
steps, the same rewards), driven by ``OffsetStep``; per step each row runs per-layer controls [N, L] for κ and ρ
(the floor at its sequence's target plus the sampled group offsets). ``Episode.prev`` is [N, T, G·2] and
``Episode.actions`` [N, T, G, 2]; the realised usage is the mean over effective steps of the layer mean.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from solm_compile.eval import floor as fl
from solm_compile.eval.offsets import floor_keeps
from solm_compile.policy import offsets as off
from solm_compile.policy.offset_network import OffsetPolicy
from solm_compile.policy.offset_step import OffsetStep
from solm_compile.train.rollout import Episode, controlled_steps, gate_of, teacher_forced


def floors(targets: Tensor, num_layers: int, costs: Optional[fl.LayerCosts]) -> Tensor:
    """The floor's per-layer keeps at each sequence's target: targets [B, 3] -> [B, L, 2] (uniform without costs)."""
    return torch.stack([floor_keeps(t.tolist(), num_layers, costs) for t in targets])    # [B, L, 2]


def log_prob_entropy(raw: Tensor, actions: Tensor, grid: off.OffsetGrid) -> tuple[Tensor, Tensor]:
    """The update's log π(actions) and entropy from the policy's raw output [..., G·2·O] / tau (factored)."""
    logits = grid.logits(raw)                                                   # [..., G, 2, O]
    return off.log_prob(logits, actions), off.entropy(logits)                   # [...], [...]


@torch.no_grad()
def rollout_offsets(lm: Any, policy: OffsetPolicy, blocks: Tensor, targets: Tensor, floor: Tensor, *, T: int,
                    K: int, tau: float = 1.0, greedy: bool = False, reward: str = "ll",
                    generator: Optional[torch.Generator] = None, min_len: Optional[int] = None) -> Episode:
    """blocks [B, ctx+T+1], targets [B, 3], floor [B, L, 2] (``floors``) -> an Episode of N = B·K rows."""
    min_len = gate_of(lm).min_len if min_len is None else min_len
    hid, cache, dense_lp, E, labels, ids = teacher_forced(lm, blocks, T, K, reward)
    C = targets.float().repeat_interleave(K, 0)                                 # [N, 3]
    F_ = floor.float().repeat_interleave(K, 0)                                  # [N, L, 2]
    ps = OffsetStep(policy, T)
    sample = None if greedy else (generator or True)

    def decide(state, e, eff):
        d = ps.decide(state, e, eff, C, F_, tau, sample=sample)
        return d, d.choice, off.log_prob(d.logits, d.choice)                    # ..., [N, G, 2], [N]

    return controlled_steps(lm, ps, decide, hid, cache, dense_lp, E, labels, ids, C, min_len)
