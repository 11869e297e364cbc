"""Teacher-forced GRPO rollouts: a dense prefill, then T controlled steps with K sampled action sequences each.

The policy is driven by ``PolicyStep`` (solm_compile/policy/step.py), the state machine every consumer shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from solm_compile.config import GateConfig
from solm_compile.policy.actions import ActionGrid
from solm_compile.policy.network import RecurrentActorCriticPolicy
from solm_compile.policy.step import PolicyStep
from solm_compile.train import grpo


@dataclass
class Episode:
    """T controlled steps for N = B·K rows (row = b·K + k); everything the update needs, nothing with grad."""

    h: Tensor          # [N, T, D] policy input: LM last hidden at the previous position
    e: Tensor          # [N, T, D] policy input: embedding of the current token
    scalars: Tensor    # [N, T, 8]
    prev: Tensor       # [N, T] previous effective action (BOS at t=0); offsets: [N, T, G·2] embedding rows
    actions: Tensor    # [N, T] chosen action (sampled or greedy); offsets: [N, T, G, 2] choices
    logp: Tensor       # [N, T] log pi(action) at tau when chosen
    eff: Tensor        # [N, T] bool: effective step (the action was applied and counts towards usage)
    reward: Tensor     # [N, T] per-step reward
    logp_true: Tensor  # [N, T] log p(true next token) under the controlled LM
    usage: Tensor      # [N, 3] realised usage (κ, ρ, b/16) over the effective steps
    targets: Tensor    # [N, 3]


def gate_of(lm: Any) -> GateConfig:
    gate = getattr(lm, "gate", None)
    return gate if isinstance(gate, GateConfig) else GateConfig()


def teacher_forced(lm: Any, blocks: Tensor, T: int, K: int, reward: str):
    """What every rollout shares: the dense prefill of blocks[:, :-T-1] tiled K times (rows b·K + k), the dense
    teacher-forced log-probs for the kl reward (None for ll), and the T steps' embeddings, labels and ids.
    -> hid [B, ctx, D], cache [N, ...], dense_lp [N, T, V] | None, E [N, T, D], labels [N, T], ids [N, T]."""
    B, n = blocks.shape
    ctx = n - T - 1
    _, hid, cache = lm.prefill(blocks[:, :ctx])                       # hid [B, ctx, D]
    tiled = cache.repeat_interleave(K)                                # [N, ...] rows b·K + k
    dense_lp = None
    if reward == "kl":                                                # dense teacher-forced reference
        ones, sixteen = torch.ones(B), torch.full((B,), 16.0)
        lps = []
        for t in range(T):
            lg, _, cache = lm.step(blocks[:, ctx + t, None], cache, ones, ones, sixteen)   # [B, 1, V]
            lps.append(F.log_softmax(lg[:, 0].float(), dim=-1))
        dense_lp = torch.stack(lps, 1).repeat_interleave(K, 0)       # [N, T, V]
    E = lm.embed(blocks[:, ctx:ctx + T]).float().repeat_interleave(K, 0)   # [N, T, D]
    labels = blocks[:, ctx + 1:ctx + T + 1].repeat_interleave(K, 0)        # [N, T]
    ids = blocks[:, ctx:ctx + T].repeat_interleave(K, 0)                   # [N, T]
    return hid, tiled, dense_lp, E, labels, ids


def step_reward(logits: Tensor, labels: Tensor, dense_lp: Optional[Tensor], t: int) -> tuple[Tensor, Tensor]:
    """(log p(true), reward) of one step: logits [N, V], labels [N]; reward −KL(dense‖sparse) with dense_lp, else
    log p(true)."""
    lp_true = grpo.ll_reward(logits, labels)                          # [N]
    if dense_lp is None:
        return lp_true, lp_true
    lp_s = F.log_softmax(logits.float(), dim=-1)                      # [N, V]
    return lp_true, -(dense_lp[:, t].exp() * (dense_lp[:, t] - lp_s)).sum(-1)   # [N], [N]


@torch.no_grad()
def rollout(lm: Any, policy: RecurrentActorCriticPolicy, blocks: Tensor, targets: Tensor, grid: ActionGrid, *,
            T: int, K: int, tau: float = 1.0, greedy: bool = False, reward: str = "ll",
            generator: Optional[torch.Generator] = None, min_len: Optional[int] = None) -> Episode:
    """Dense prefill of blocks[:, :-T-1], then T teacher-forced steps under policy control, K rollouts each.

    blocks [B, ctx+T+1]: step t feeds token ctx+t and scores token ctx+t+1. targets [B, 3].
    """
    min_len = gate_of(lm).min_len if min_len is None else min_len
    hid, cache, dense_lp, E, labels, ids = teacher_forced(lm, blocks, T, K, reward)
    C = targets.float().repeat_interleave(K, 0)                            # [N, 3]
    ps = PolicyStep(policy, grid, T)
    sample = None if greedy else (generator or True)

    def decide(state, e, eff):
        d = ps.decide(state, e, eff, C, tau, sample=sample)
        logp = F.log_softmax(d.logits, dim=-1).gather(-1, d.action[:, None])[:, 0]   # [N]
        return d, d.action, logp

    return controlled_steps(lm, ps, decide, hid, cache, dense_lp, E, labels, ids, C, min_len)


def controlled_steps(lm: Any, ps: Any, decide: Callable, hid: Tensor, cache: Any, dense_lp: Optional[Tensor],
                     E: Tensor, labels: Tensor, ids: Tensor, C: Tensor, min_len: int) -> Episode:
    """The T teacher-forced controlled steps every rollout shares (``teacher_forced``'s outputs in). ``ps`` is the
    policy's state machine; ``decide(state, e [N, D], eff [N]) -> (decision, chosen action(s), log π [N])``, whose
    ``decision.controls`` ([N, 3], or per layer [N, L, 3]) the LM runs."""
    N, T = E.shape[0], E.shape[1]
    state = ps.start(N, hid[:, -1].float().repeat_interleave(N // hid.shape[0], 0))   # h [N, D]
    out = {k: [] for k in ("h", "s", "prev", "a", "logp", "eff", "r", "lp")}
    for t in range(T):
        eff = torch.full((N,), cache.length + 1 > min_len)                 # [N] bool
        d, chosen, logp = decide(state, E[:, t], eff)
        kappa, rho, bits = d.controls.unbind(-1)                           # 3 x [N] or [N, L]
        lg, h, cache = lm.step(ids[:, t, None], cache, kappa.contiguous(), rho.contiguous(),
                               bits.contiguous())                          # [N, 1, V], [N, 1, D]
        lp_true, r = step_reward(lg[:, 0], labels[:, t], dense_lp, t)     # [N], [N]
        for k, v in (("h", state.hidden), ("s", d.scalars), ("prev", state.prev), ("a", chosen), ("logp", logp),
                     ("eff", eff), ("r", r), ("lp", lp_true)):
            out[k].append(v)
        state = ps.advance(state, d, eff, h[:, 0], end_episode=t < T - 1)   # keep the last step's usage
    st = {k: torch.stack(v, 1) for k, v in out.items()}
    return Episode(st["h"], E, st["s"], st["prev"], st["a"], st["logp"], st["eff"], st["r"], st["lp"],
                   grpo.realised_usage(state.usage, state.count), C)
