"""The policy's per-step state machine, written once (shared/research/sol_method.md §4–§6).

Every consumer drives the policy through this one module: training rollouts, evaluation, the artifact's step
graph, the ``torch.compile`` backend and, through the artifact, the runtime session. Per decode step t of an
episode of ``episode_len`` steps, for each row::

    s      = [(t+1)/T, eff, C_tok, C_pru, C_q, mean_usage − C (0 before the first effective step)]   [B, 8]
    logits = policy(h_prev, e_tok, s, a_prev, t; the episode's own KV cache)                   [B, A]
    a      = argmax(logits) (or a sample, in training)
    a_eff  = a on an effective step with a budget below dense, else the dense action
    usage += usage(a_eff) on effective steps;  count += eff;  a_prev = a_eff;  h_prev = h;  t += 1
    when t reaches T (or the LM call was a prefill) the row starts a new episode from its current h.

The state is a ``StepState`` of fixed-shape tensors: the policy block's KV cache holds ``episode_len`` slots and a
row attends to slots ≤ t, so each row restarts its own episode inside the graph and the artifact needs no host
logic between steps. Episode length and policy sizes come from the checkpoint (``PolicyStep.from_loaded``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from solm_compile.errors import UserError
from solm_compile.policy.actions import ActionGrid
from solm_compile.policy.network import RecurrentActorCriticPolicy


EPISODE_LEN = 16   # SOL's T: the default episode length of training (TrainConfig.T) and so of every consumer


class StepState(NamedTuple):
    """One step's policy state per row; the artifact's ``policy_*`` inputs in this order (``STATE_NAMES``)."""

    key: Tensor      # [B, H, T_ep, hd] the policy block's KV cache (slot i holds in-episode step i)
    value: Tensor    # [B, H, T_ep, hd]
    prev: Tensor     # [B] int64 previous effective action (BOS = A at an episode start)
    usage: Tensor    # [B, 3] Σ usage (κ, ρ/ρ_max, b/16) over this episode's effective steps
    count: Tensor    # [B] float number of effective steps so far this episode
    step: Tensor     # [B] int64 in-episode step index t
    hidden: Tensor   # [B, D] the LM's last hidden state (after the final norm) at the previous position


STATE_NAMES = ("policy_key", "policy_value", "policy_prev_action", "policy_usage", "policy_count", "policy_step",
               "policy_hidden")


class Decision(NamedTuple):
    """What one step decided, before the LM runs: the effective action and its controls, and the policy's KV."""

    logits: Tensor   # [B, A] policy logits / tau
    scalars: Tensor  # [B, 8] the s the policy saw
    action: Tensor   # [B] int64 chosen action (before the effective/dense rule)
    effective: Tensor  # [B] int64 applied action: the chosen one when the row is controlled, else dense
    controls: Tensor   # [B, 3] (κ, ρ, bits) of the applied action
    key: Tensor      # [B, H, T_ep, hd] with this step's slot written
    value: Tensor


class EpisodeSteps(nn.Module):
    """What every policy's state machine shares: the scalars it reads, the usage/count/step bookkeeping of
    ``advance`` and the per-row episode restart. ``PolicyStep`` (one joint action) and ``policy/offset_step.py``'s
    ``OffsetStep`` (per-layer offsets) add their own ``start`` (the shape of ``prev``) and ``decide``."""

    episode_len: int
    usage_scale: Tensor

    def start(self, batch: int, hidden: Tensor) -> StepState:
        raise NotImplementedError

    def fresh_state(self, batch: int, hidden: Tensor, prev: Tensor) -> StepState:
        """An episode start: empty policy KV cache, no usage, step 0, ``prev`` the BOS choice(s) [B, ...]."""
        pol, dev = self.policy, hidden.device
        kv = torch.zeros(batch, pol.n_heads, self.episode_len, pol.head_dim, device=dev)      # [B, H, T, hd]
        return StepState(kv, kv.clone(), prev, torch.zeros(batch, 3, device=dev), torch.zeros(batch, device=dev),
                         torch.zeros(batch, dtype=torch.long, device=dev), hidden.float())

    def scalars(self, state: StepState, eff: Tensor, budget: Tensor) -> Tensor:
        """s [B, 8] = [(t+1)/T, eff, C (3), mean usage − C (3; zero before the first effective step)]."""
        mean = state.usage / state.count.clamp(min=1)[:, None]                                 # [B, 3]
        dev = torch.where(state.count[:, None] > 0, mean - budget, torch.zeros_like(budget))   # [B, 3]
        t_frac = (state.step.float() + 1) / self.episode_len                                   # [B]
        return torch.cat([t_frac[:, None], eff.float()[:, None], budget, dev], dim=-1)         # [B, 8]

    def step_state(self, state: StepState, key: Tensor, value: Tensor, prev: Tensor, controls: Tensor, eff: Tensor,
                   hidden: Tensor, fresh: Tensor | None, end_episode: bool) -> StepState:
        """The state after a step whose applied ``controls`` [B, 3] (κ, ρ, bits) counted on ``eff`` rows: usage
        and count grow, t + 1, ``prev`` the applied choice(s); finished episodes and ``fresh`` rows restart
        (``end_episode=False`` keeps a finished episode's usage to read)."""
        used = eff.float()[:, None] * (controls / self.usage_scale)                            # [B, 3]
        nxt = StepState(key, value, prev, state.usage + used, state.count + eff.float(), state.step + 1,
                        hidden.float())
        restart = nxt.step >= self.episode_len                                                 # [B]
        if not end_episode:
            restart = torch.zeros_like(restart)
        if fresh is not None:
            restart = restart | fresh
        return self.restart(nxt, restart)

    def restart(self, state: StepState, rows: Tensor) -> StepState:
        """Rows [B] bool start a new episode, keeping their hidden state; the other rows are unchanged."""
        zero = self.start(state.prev.shape[0], state.hidden)
        r1, r4 = rows[:, None], rows[:, None, None, None]
        rp = rows.view(-1, *[1] * (state.prev.dim() - 1))                                      # [B] or [B, 1]
        return StepState(torch.where(r4, zero.key, state.key), torch.where(r4, zero.value, state.value),
                         torch.where(rp, zero.prev, state.prev), torch.where(r1, zero.usage, state.usage),
                         torch.where(rows, zero.count, state.count), torch.where(rows, zero.step, state.step),
                         state.hidden)


class PolicyStep(EpisodeSteps):
    """SOL's per-step policy state machine over an explicit ``StepState`` (see the module docstring)."""

    def __init__(self, policy: RecurrentActorCriticPolicy, grid: ActionGrid, episode_len: int):
        super().__init__()
        if not 1 <= episode_len <= policy.cfg.max_steps:
            raise UserError(f"policy: episode length {episode_len} must be in 1..{policy.cfg.max_steps} "
                            "(the policy's max_steps)")
        if grid.num_actions != policy.num_actions:
            raise UserError(f"policy: the action grid has {grid.num_actions} actions, the policy {policy.num_actions}")
        self.policy, self.grid, self.episode_len = policy, grid, int(episode_len)
        self.dense_idx = grid.dense_idx
        self.register_buffer("table", grid.table(), persistent=False)                          # [A, 3]
        self.register_buffer("usage_scale", torch.tensor([1.0, grid.rho_levels[-1], 16.0]), persistent=False)

    @classmethod
    def from_loaded(cls, loaded) -> "PolicyStep":
        """From a ``LoadedPolicy``: the episode length is the one the policy was trained with."""
        return cls(loaded.policy, loaded.grid, episode_length(loaded.train_config))

    # ------------------------------------------------------------------------------------------ state
    def start(self, batch: int, hidden: Tensor) -> StepState:
        """An episode start for ``batch`` rows whose previous hidden state is ``hidden`` [B, D]."""
        bos = torch.full((batch,), self.policy.bos, dtype=torch.long, device=hidden.device)    # [B]
        return self.fresh_state(batch, hidden, bos)

    # ------------------------------------------------------------------------------------------ one step
    def decide(self, state: StepState, token_emb: Tensor, eff: Tensor, budget: Tensor, tau: float = 1.0,
               sample: torch.Generator | bool | None = None) -> Decision:
        """The policy's decision for this step: e [B, D] the current token's embedding, eff [B] bool (the LM call
        is controlled: a single-token step past the warm-up), budget [B, 3] targets (κ̄, ρ̄, b̄/16).
        Greedy unless ``sample`` (True or a generator): then a ~ softmax(logits)."""
        s = self.scalars(state, eff, budget)                                                   # [B, 8]
        logits, key, value = self.policy.step(state.hidden, token_emb.float(), s, state.prev, state.step,
                                              state.key, state.value, tau)                     # [B, A]
        if sample is None or sample is False:
            a = logits.argmax(-1)                                                              # [B]
        else:
            gen = sample if isinstance(sample, torch.Generator) else None
            a = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0]           # [B]
        controlled = eff & (budget < 1).any(-1)                                                # a dense budget is dense
        a_eff = torch.where(controlled, a, torch.full_like(a, self.dense_idx))                 # [B]
        return Decision(logits, s, a, a_eff, self.table[a_eff], key, value)

    def advance(self, state: StepState, d: Decision, eff: Tensor, hidden: Tensor,
                fresh: Tensor | None = None, end_episode: bool = True) -> StepState:
        """The state after the LM ran this step's controls and produced ``hidden`` [B, D]. Rows whose episode is
        over, or marked ``fresh`` [B] bool (the LM call was a prefill), start a new episode from ``hidden``;
        ``end_episode=False`` keeps a finished episode's state (to read its usage)."""
        return self.step_state(state, d.key, d.value, d.effective, d.controls, eff, hidden, fresh, end_episode)


def episode_length(train_config: dict | None) -> int:
    """The episode length a policy was trained with (its ``TrainConfig.T``)."""
    return int((train_config or {}).get("T", EPISODE_LEN))
