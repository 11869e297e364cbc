"""The step the artifact runs: the policy decides, the gated graph obeys — one module, one ``run`` per step.

Inputs (B rows, each may carry its own budget and policy state)::

    input_ids [B,T] int64, position_ids [B,T] int64, past k/v per layer [B,Hkv,P,d]
    policy_key, policy_value [B,heads,t,hd]   the policy block's own KV cache (t = steps so far this episode)
    policy_prev_action [B] int64              previous effective action (BOS = A at the episode start)
    policy_usage [B,3]                        Σ usage (κ, ρ, b/16) over this episode's effective steps
    policy_count [B]                          number of effective steps so far this episode
    policy_step [B] int64                     in-episode step index t
    policy_hidden [B,D]                       the LM's last hidden state (after the final norm) at the previous position
    budget [B,3]                              targets (attn_keep, mlp_keep, bits/16)

Outputs: logits [B,T,V], the presents, the policy state advanced by one step (same order as the inputs, without
the budget), the chosen effective action [B] and its controls [B,3] (κ, ρ, bits).

Exactly ``train.rollout``'s greedy step: scalars [(t+1)/T_ep, eff, C, dev], a = argmax, dense on non-effective
steps, usage counted on effective steps. A dense budget (every target at its maximum) always runs the dense
action, so it reproduces the original model whatever the policy learned. A step is effective when T == 1 and L > ts + tw + 1. A multi-token run
(prefill) is dense whatever the policy says; the runtime then starts the policy's episode afresh.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import ops  # noqa: F401  (registers torch.ops.solm)

from .actions import ActionGrid
from .policy import RecurrentActorCriticPolicy


class ArtifactStep(nn.Module):
    def __init__(self, gated_gm: torch.fx.GraphModule, policy: RecurrentActorCriticPolicy, grid: ActionGrid,
                 embedding: Tensor, min_len: int, episode_len: int):
        super().__init__()
        self.lm = gated_gm
        self.policy = policy
        self.register_buffer("grid", grid.table(), persistent=False)             # [A, 3]
        self.register_buffer("usage_scale", torch.tensor([1.0, grid.rho_levels[-1], 16.0]), persistent=False)
        self.embedding = embedding                                                # [V, D] (shared with the LM)
        self.dense_idx, self.min_len, self.episode_len = grid.dense_idx, min_len, episode_len

    def forward(self, input_ids, position_ids, past, policy_key, policy_value, policy_prev_action, policy_usage,
                policy_count, policy_step, policy_hidden, budget):
        zero = torch.zeros_like(budget[:, 0])                                             # [B]
        eff = torch.ops.solm.gate_controls(input_ids, past[0], zero, zero, zero, self.min_len)[0] == 0  # [B]
        e = self.embedding[input_ids[:, -1]]                                              # [B, D]
        mean = policy_usage / policy_count.clamp(min=1)[:, None]                          # [B, 3]
        dev = torch.where(policy_count[:, None] > 0, mean - budget, torch.zeros_like(budget))  # [B, 3]
        t_frac = (policy_step.float() + 1) / self.episode_len                             # [B]
        s = torch.cat([t_frac[:, None], eff.float()[:, None], budget, dev], dim=-1)       # [B, 8]
        pos = policy_step.clamp(max=self.policy.cfg.max_steps - 1)[:, None]               # [B, 1]
        x = self.policy._embed(policy_hidden[:, None], e[:, None], s[:, None], policy_prev_action[:, None], pos)
        q, k, v = self.policy._qkv(x)                                                     # [B, H, 1, hd]
        k = torch.cat([policy_key, k], dim=2)                                             # [B, H, t+1, hd]
        v = torch.cat([policy_value, v], dim=2)                                           # [B, H, t+1, hd]
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)                     # [B, H, 1, hd]
        logits_pi = self.policy._tail(x, y, s[:, None], 1.0)[:, 0]                        # [B, A]
        act = eff & (budget < 1).any(-1)                                                  # [B] a dense budget is dense
        a = torch.where(act, logits_pi.argmax(-1), torch.full_like(policy_prev_action, self.dense_idx))  # [B]
        ctl = self.grid[a]                                                                # [B, 3]
        out = self.lm(input_ids, position_ids, *past, ctl[:, 0], ctl[:, 1], ctl[:, 2])
        logits, hidden, presents = out[0], out[1], out[2:]
        used = eff.float()[:, None] * (ctl / self.usage_scale)                            # [B, 3]
        return (logits, *presents, k, v, a, policy_usage + used, policy_count + eff.float(), policy_step + 1,
                hidden[:, -1], ctl)


def initial_policy_state(policy: RecurrentActorCriticPolicy, batch: int, hidden: Tensor) -> tuple:
    """Episode start: empty policy KV, prev = BOS, zero usage, t = 0, h = the given last hidden state [B, D]."""
    H, hd = policy.n_heads, policy.head_dim
    empty = torch.zeros(batch, H, 0, hd)
    return (empty, empty.clone(), torch.full((batch,), policy.bos, dtype=torch.long), torch.zeros(batch, 3),
            torch.zeros(batch), torch.zeros(batch, dtype=torch.long), hidden)


@torch.no_grad()
def decode_torch(lm, loaded_policy, prompt_ids: list[int], budget, n: int, episode_len: int = 16):
    """Greedy decode with the torch gated graph and the policy, exactly as the runtime drives the artifact
    (dense prefill, one policy step per token, the policy state restarting every ``episode_len`` steps).

    Returns [(fed token, effective action, logits [V])] per step — the reference the artifact is tested against.
    """
    pol = loaded_policy.policy
    step = ArtifactStep(lm.model.gm, pol, loaded_policy.grid, lm._embedding, lm.gate.min_len, episode_len).eval()
    ids = torch.tensor([prompt_ids])                                                       # [1, T]
    target = torch.tensor([[budget[0], budget[1], budget[2] / 16]], dtype=torch.float32)   # [1, 3]
    logits, hid, cache = lm.prefill(ids)
    logits, past = logits[:, -1], cache.tensors
    state, out = initial_policy_state(pol, 1, hid[:, -1]), []
    for t in range(n):
        tok = logits.argmax(-1, keepdim=True)                                              # [1, 1]
        o = step(tok, torch.full((1, 1), ids.shape[1] + t), tuple(past), *state, target)
        k = len(past)
        past, logits = list(o[1:1 + k]), o[0][:, -1]
        state = tuple(o[1 + k:8 + k])
        out.append((int(tok), int(o[3 + k]), logits[0].numpy()))
        if (t + 1) % episode_len == 0:
            state = initial_policy_state(pol, 1, state[6])
    return out
