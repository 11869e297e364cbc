"""The offset policy's per-step state machine, written once (issue 18; docs/policy.md, item 1 of "left").

``policy/step.py``'s ``PolicyStep`` for ``OffsetPolicy``: the same ``StepState`` (``prev`` is [B, G·2], the
embedding rows of the previous effective choices), the same scalars and effective-step rule, but the decision is
per layer. Per decode step t of an episode of ``episode_len`` steps, for each row::

    s        = [(t+1)/T, eff, C (3), mean usage − C (0 before the first effective step)]          [B, 8]
    logits   = grid.logits(policy(h_prev, e_tok, s, prev, t; the episode's KV cache))          [B, G, 2, O]
    choice   = argmax per (group, axis) (or a sample, in training)                              [B, G, 2]
    effective= choice on an effective step with a budget below dense, else 0 (the floor)         [B, G, 2]
    controls = (clamp(floor + offsets[effective]), bits 16) per layer, dense (1, 1, 16) otherwise  [B, L, 3]
    usage   += the layer mean of controls on effective steps; count += eff; prev = rows(effective); t += 1
    when t reaches T (or the LM call was a prefill) the row starts a new episode from its current h.

Every consumer calls this one: training rollouts (``train/rollout_offsets.py``), validation and ``solm eval``
(``eval/offsets.py``: ``OffsetHead`` drives it inside ``OffsetController``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from solm_compile.errors import UserError
from solm_compile.policy import offsets as off
from solm_compile.policy.offset_network import OffsetPolicy
from solm_compile.policy.step import EpisodeSteps, StepState

DENSE = (1.0, 1.0, 16.0)
USAGE_SCALE = (1.0, 1.0, 16.0)      # usage = (κ, ρ, b/16): ρ's dense level is 1 on either mlp_skip


class OffsetDecision(NamedTuple):
    logits: Tensor      # [B, G, 2, O] factored logits / tau (prior on offset 0)
    scalars: Tensor     # [B, 8] the s the policy saw
    choice: Tensor      # [B, G, 2] long, chosen (before the effective rule)
    effective: Tensor   # [B, G, 2] long, applied: the choice on a controlled step, else 0
    controls: Tensor    # [B, L, 3] (κ_l, ρ_l, bits) the LM runs
    key: Tensor         # [B, H, T_ep, hd] with this step's slot written
    value: Tensor


def offset_controls(grid: off.OffsetGrid, floor: Tensor, choice: Tensor, controlled: Tensor,
                    bits: float = 16.0) -> Tensor:
    """floor [L, 2] or [B, L, 2], choice [B, G, 2], controlled [B] bool -> controls [B, L, 3], dense off-control."""
    keep = grid.keeps(floor, choice)                                                        # [B, L, 2]
    B, L, _ = keep.shape
    ctl = torch.cat([keep, torch.full((B, L, 1), float(bits), device=keep.device)], -1)    # [B, L, 3]
    dense = torch.tensor(DENSE, device=keep.device).expand(B, L, 3)
    return torch.where(controlled[:, None, None], ctl, dense)                               # [B, L, 3]


class OffsetStep(EpisodeSteps):
    """The offset policy's state machine over an explicit ``StepState`` (see the module docstring)."""

    def __init__(self, policy: OffsetPolicy, episode_len: int):
        super().__init__()
        if not 1 <= episode_len <= policy.cfg.max_steps:
            raise UserError(f"policy: episode length {episode_len} must be in 1..{policy.cfg.max_steps} "
                            "(the policy's max_steps)")
        self.policy, self.grid, self.episode_len = policy, policy.grid, int(episode_len)
        self.register_buffer("usage_scale", torch.tensor(USAGE_SCALE), persistent=False)

    def start(self, batch: int, hidden: Tensor) -> StepState:
        """An episode start for ``batch`` rows whose previous hidden state is ``hidden`` [B, D]."""
        prev = torch.full((batch, self.grid.groups * 2), self.policy.bos, dtype=torch.long,
                          device=hidden.device)                                                # [B, G·2]
        return self.fresh_state(batch, hidden, prev)

    def decide(self, state: StepState, token_emb: Tensor, eff: Tensor, budget: Tensor, floor: Tensor,
               tau: float = 1.0, sample: torch.Generator | bool | None = None) -> OffsetDecision:
        """e [B, D], eff [B] bool (the step counts), budget [B, 3] targets, floor [L, 2] or [B, L, 2] the floor's
        keeps at the target. Greedy unless ``sample`` (True or a generator)."""
        s = self.scalars(state, eff, budget)                                                   # [B, 8]
        raw, key, value = self.policy.step(state.hidden, token_emb.float(), s, state.prev, state.step,
                                           state.key, state.value, tau)                        # [B, G·2·O]
        logits = self.grid.logits(raw)                                                         # [B, G, 2, O]
        if sample is None or sample is False:
            c = off.greedy(logits)                                                             # [B, G, 2]
        else:
            c = off.sample(logits, sample if isinstance(sample, torch.Generator) else None)    # [B, G, 2]
        controlled = eff & (budget < 1).any(-1)                                                # a dense budget is dense
        c_eff = torch.where(controlled[:, None, None], c, torch.zeros_like(c))                 # [B, G, 2]
        return OffsetDecision(logits, s, c, c_eff, offset_controls(self.grid, floor, c_eff, controlled),
                              key, value)

    def advance(self, state: StepState, d: OffsetDecision, eff: Tensor, hidden: Tensor,
                fresh: Tensor | None = None, end_episode: bool = True) -> StepState:
        """The state after the LM ran ``d.controls`` and produced ``hidden`` [B, D]; usage is their layer mean.
        Finished episodes (and ``fresh`` rows) restart; ``end_episode=False`` keeps a finished one's usage."""
        return self.step_state(state, d.key, d.value, self.policy.prev_ids(d.effective), d.controls.mean(1), eff,
                               hidden, fresh, end_episode)


class OffsetHead:
    """``OffsetStep`` as an ``eval.offsets.OffsetController`` head: greedy (or sampled) decisions at fixed targets."""

    def __init__(self, policy: OffsetPolicy, targets, episode_len: int):
        self.step = OffsetStep(policy.eval(), episode_len)
        self.C = torch.tensor([float(x) for x in targets])                                     # [3]

    def start(self, hidden: Tensor) -> None:
        self.state = self.step.start(hidden.shape[0], hidden)

    @torch.no_grad()
    def decide(self, e: Tensor, counted: Tensor, floor: Tensor, generator=None) -> OffsetDecision:
        self.eff = counted
        self.d = self.step.decide(self.state, e, counted, self.C.expand(e.shape[0], 3), floor, sample=generator)
        return self.d

    def advance(self, hidden: Tensor) -> None:
        self.state = self.step.advance(self.state, self.d, self.eff, hidden)
