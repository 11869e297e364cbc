"""An independent reference of SOL's per-step policy semantics, written from shared/research/sol_method.md §4–§6.

It shares nothing with solm's state machine (``solm_compile.policy.step``) or with the network's incremental
``step``: each decision re-runs ``policy.forward_sequence`` over the episode's whole history (no policy KV cache),
the 8 scalars are computed here from their definition, and the episode restart is written out. Tests compare every
consumer of the policy (artifact, runtime session, torch.compile, training rollouts, evaluation) with it.

Semantics (per decode step t of an episode of T steps, teacher-forced over given tokens):
- the step is *effective* when it feeds one token and the KV length after it exceeds ts + tw + 1;
- s = [(t+1)/T, eff, C_tok, C_pru, C_q, dev_tok, dev_pru, dev_q]; dev = mean usage over the previous effective
  steps of this episode minus the target, 0 before the first; usage = (κ, ρ/ρ_max, b/16);
- a = argmax of the policy's logits given (h_prev, e(x_t), s, a_prev) for t' = 0..t; a_prev(0) = BOS = A;
- the applied action is a on an effective step with a budget below dense, else the dense action (the last one);
- after T steps a new episode starts: "carry" (the runtime) keeps the KV cache and takes h from the last step;
  "replay" (SOL's lm-eval runner) rebuilds the cache by a dense prefill of every token so far and takes h from it.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def reference_actions(lm, policy, grid, T: int, tokens: list[int], prompt_len: int, budget, boundary: str = "carry"):
    """Teacher-forced: dense prefill of tokens[:prompt_len], then one controlled step per token
    tokens[prompt_len:]. Returns (applied action ids, next-token logits [n, V])."""
    A = len(grid.kappa_levels) * len(grid.rho_levels) * len(grid.bit_levels)
    dense = A - 1                                               # κ-major, b-minor: (κ_max, ρ_max, b_max) is last
    C = torch.tensor([budget[0], budget[1], budget[2] / 16.0])
    controlled_budget = bool((C < 1).any())
    min_len = lm.gate.ts + lm.gate.tw + 1
    _, hid, cache = lm.prefill(torch.tensor([tokens[:prompt_len]]))
    h = hid[0, -1].float()
    actions, logits_out = [], []
    H = E = S = P = None
    for i, tok in enumerate(tokens[prompt_len:]):
        t = i % T
        if t == 0:                                              # a new episode
            if i > 0 and boundary == "replay":
                _, hid, cache = lm.prefill(torch.tensor([tokens[:prompt_len + i]]))
                h = hid[0, -1].float()
            H, E, S, P, used, count = [], [], [], [], torch.zeros(3), 0
            prev = A
        eff = cache.length + 1 > min_len
        dev = used / count - C if count else torch.zeros(3)
        s = torch.cat([torch.tensor([(t + 1) / T, float(eff)]), C, dev])
        H.append(h), E.append(lm.embed(torch.tensor([[tok]]))[0, 0].float()), S.append(s), P.append(prev)
        seq = policy.forward_sequence(torch.stack(H)[None], torch.stack(E)[None], torch.stack(S)[None],
                                      torch.tensor([P]))[0, -1]
        a = int(seq.argmax()) if eff and controlled_budget else dense
        ik, rest = divmod(a, len(grid.rho_levels) * len(grid.bit_levels))
        ir, ib = divmod(rest, len(grid.bit_levels))
        k, r, b = grid.kappa_levels[ik], grid.rho_levels[ir], float(grid.bit_levels[ib])
        lg, hid, cache = lm.step(torch.tensor([[tok]]), cache, torch.tensor([k]), torch.tensor([r]),
                                 torch.tensor([b]))
        if eff:
            used, count = used + torch.tensor([k, r / grid.rho_levels[-1], b / 16.0]), count + 1
        actions.append(a)
        logits_out.append(lg[0, -1])
        prev, h = a, hid[0, -1].float()
    return actions, torch.stack(logits_out)
