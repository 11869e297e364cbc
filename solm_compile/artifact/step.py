"""The step the artifact runs: the policy decides, the gated graph obeys — one module, one ``run`` per step.

Inputs (B rows, each may carry its own budget and policy state)::

    input_ids [B,T] int64, position_ids [B,T] int64, past k/v per layer [B,Hkv,P,d]
    policy_key, policy_value [B,heads,T_ep,hd]  the policy block's own KV cache (slot i = in-episode step i)
    policy_prev_action [B] int64              previous effective action (BOS = A at the episode start)
    policy_usage [B,3]                        Σ usage (κ, ρ, b/16) over this episode's effective steps
    policy_count [B]                          number of effective steps so far this episode
    policy_step [B] int64                     in-episode step index t
    policy_hidden [B,D]                       the LM's last hidden state (after the final norm) at the previous position
    budget [B,3]                              targets (attn_keep, mlp_keep, bits/16)

Outputs: logits [B,T,V], the presents, the policy state after this step (``policy_*_out``, the inputs' order), the
applied action [B] and its controls [B,3] (κ, ρ, bits).

The policy part is ``PolicyStep`` (solm_compile/policy/step.py), the one state machine every consumer calls. A step
is effective when T == 1 and L > ts + tw + 1; a dense budget (every target at its maximum) always runs the dense
action, so it reproduces the original model whatever the policy learned. A multi-token run (prefill) is dense
whatever the policy says, and every row whose episode ends (or that was just prefilled) starts a new one inside the
graph, so a host only feeds each step's outputs back as the next step's inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from solm_compile.ops import torch_ops as ops  # noqa: F401  (registers torch.ops.solm)

from solm_compile.policy.step import PolicyStep, StepState


class ArtifactStep(nn.Module):
    def __init__(self, gated_gm: torch.fx.GraphModule, step: PolicyStep, embedding: Tensor, min_len: int):
        super().__init__()
        self.lm = gated_gm
        self.step = step
        self.embedding = embedding                                                # [V, D] (shared with the LM)
        self.min_len = min_len

    def forward(self, input_ids, position_ids, past, policy_key, policy_value, policy_prev_action, policy_usage,
                policy_count, policy_step, policy_hidden, budget):
        state = StepState(policy_key, policy_value, policy_prev_action, policy_usage, policy_count, policy_step,
                          policy_hidden)
        zero = torch.zeros_like(budget[:, 0])                                             # [B]
        eff = torch.ops.solm.gate_controls(input_ids, past[0], zero, zero, zero, self.min_len)[0] == 0  # [B]
        d = self.step.decide(state, self.embedding[input_ids[:, -1]], eff, budget)
        ctl = d.controls                                                                  # [B, 3]
        out = self.lm(input_ids, position_ids, *past, ctl[:, 0], ctl[:, 1], ctl[:, 2])
        logits, hidden, presents = out[0], out[1], out[2:]
        n_new = torch.full_like(policy_step, input_ids.shape[1])                           # [B]
        n_past = torch.full_like(policy_step, past[0].shape[2])                           # [B]
        fresh = (n_new > 1) | (n_past == 0)                                               # [B] a prefill
        new = self.step.advance(state, d, eff, hidden[:, -1], fresh)
        return (logits, *presents, *new, d.effective, ctl)


def initial_policy_state(step: PolicyStep, batch: int, hidden: Tensor) -> tuple:
    """Episode start: empty policy KV slots, prev = BOS, zero usage, t = 0, h = the given last hidden state [B, D]."""
    return tuple(step.start(batch, hidden))


@torch.no_grad()
def decode_torch(lm, loaded_policy, prompt_ids: list[int], budget, n: int):
    """Greedy decode with the torch gated graph and the policy, exactly as the runtime drives the artifact
    (dense prefill, one policy step per token; episodes restart inside the step).

    Returns [(fed token, effective action, logits [V])] per step — what the artifact is tested against.
    """
    step = ArtifactStep(lm.model.gm, PolicyStep.from_loaded(loaded_policy), lm._embedding, lm.gate.min_len).eval()
    ids = torch.tensor([prompt_ids])                                                       # [1, T]
    target = torch.tensor([[budget[0], budget[1], budget[2] / 16]], dtype=torch.float32)   # [1, 3]
    logits, hid, cache = lm.prefill(ids)
    logits, past = logits[:, -1], cache.tensors
    state, out = initial_policy_state(step.step, 1, hid[:, -1]), []
    for t in range(n):
        tok = logits.argmax(-1, keepdim=True)                                              # [1, 1]
        o = step(tok, torch.full((1, 1), ids.shape[1] + t), tuple(past), *state, target)
        k = len(past)
        past, logits = list(o[1:1 + k]), o[0][:, -1]
        state = tuple(o[1 + k:8 + k])
        out.append((int(tok), int(o[8 + k]), logits[0].numpy()))
    return out
