"""The policy network for per-layer-group deviations from the floor (issue 18; docs/policy.md, item 1 of "left").

``OffsetPolicy`` is SOL's ``RecurrentActorCriticPolicy`` trunk (same inputs h_prev, e, 8 scalars; same causal block
and KV cache) with two changes::

    previous action   the G·2 previous choices, each a row of Embedding(G·2·O + 1, 32) (row (g·2+a)·O + o; the
                      last row is BOS), summed                                                     -> [..., 32]
    head              pi_head Linear(d, G·2·O), weight and bias zero at initialisation, no budget head (the floor
                      already meets the target): raw logits [..., G·2·O], read by OffsetGrid.logits (+ prior on 0)

so a fresh network, or one whose trunk says nothing useful about a state, is the floor under greedy decoding.
``OffsetHead`` drives it step by step for ``eval.offsets.OffsetController`` (its own KV cache, previous choices and
running usage per row, the scalars as ``PolicyStep.scalars`` builds them).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from solm_compile.policy.offsets import OffsetGrid


class OffsetPolicy(RecurrentActorCriticPolicy):
    def __init__(self, hidden_size: int, grid: OffsetGrid, cfg: PolicyConfig = PolicyConfig()):
        super().__init__(hidden_size, grid.num_logits, cfg)
        self.grid = grid
        self.action_emb = nn.Embedding(grid.num_logits + 1, cfg.action_dim)    # rows (g·2+a)·O + o, BOS last
        del self.budget_head
        nn.init.zeros_(self.pi_head.weight)
        nn.init.zeros_(self.pi_head.bias)

    @property
    def bos(self) -> int:
        return self.grid.num_logits

    def prev_ids(self, choice: Tensor) -> Tensor:
        """Choices [..., G, 2] -> embedding rows [..., G·2]."""
        O = self.grid.num_choices
        factor = torch.arange(self.grid.groups * 2, device=choice.device)                 # [G·2]
        return factor * O + choice.flatten(-2)                                             # [..., G·2]

    def _embed(self, h: Tensor, e: Tensor, s: Tensor, a_prev: Tensor, pos: Tensor) -> Tensor:
        """a_prev [..., G·2] rows (or BOS) -> trunk input [..., d]."""
        prev = self.action_emb(a_prev).sum(-2)                                             # [..., action_dim]
        z = torch.cat([h, e, self.scalar_mlp(s), prev], dim=-1)                            # [..., 2D+64+32]
        return self.in_proj(z) + self.pos_emb(pos)                                         # [..., d]

    def _tail(self, x: Tensor, y: Tensor, s: Tensor, tau: float) -> Tensor:
        N, T, d = x.shape
        x = x + self.wo(y.transpose(1, 2).reshape(N, T, d))                                # [N, T, d]
        x = x + self.ffn(self.ln2(x))                                                      # [N, T, d]
        return self.pi_head(self.ln_f(x)) / tau                                            # [N, T, G·2·O]


class OffsetHead:
    """``OffsetPolicy`` as an ``OffsetController`` head: per row its KV cache, previous choices and usage."""

    def __init__(self, policy: OffsetPolicy, targets: Sequence[float], episode_len: int):
        self.policy, self.T = policy.eval(), int(episode_len)
        self.C = torch.tensor([float(x) for x in targets])                                # [3]

    def start(self, n: int) -> None:
        p = self.policy
        self.key = torch.zeros(n, p.n_heads, self.T, p.head_dim)                          # [n, H, T, hd]
        self.value = torch.zeros_like(self.key)
        self.prev = torch.full((n, p.grid.groups * 2), p.bos, dtype=torch.long)           # [n, G·2]
        self.usage, self.count = torch.zeros(n, 3), torch.zeros(n)                        # Σ (κ̄_l, ρ̄_l, b/16)
        self.step = torch.zeros(n, dtype=torch.long)

    def scalars(self, eff: Tensor) -> Tensor:
        """s [n, 8] = [(t+1)/T, eff, C (3), running mean usage − C (0 before the first counted step)]."""
        n = eff.shape[0]
        C = self.C.expand(n, 3)
        mean = self.usage / self.count.clamp(min=1)[:, None]                               # [n, 3]
        dev = torch.where(self.count[:, None] > 0, mean - C, torch.zeros_like(C))          # [n, 3]
        t_frac = (self.step.float() + 1) / self.T                                          # [n]
        return torch.cat([t_frac[:, None], eff.float()[:, None], C, dev], -1)              # [n, 8]

    @torch.no_grad()
    def __call__(self, t: int, h: Tensor, e: Tensor, eff: Tensor) -> Tensor:
        """Raw logits [n, G·2·O] for this step (h, e [n, D]; eff [n] bool: the step counts)."""
        s = self.scalars(eff)                                                              # [n, 8]
        logits, self.key, self.value = self.policy.step(h.float(), e.float(), s, self.prev, self.step,
                                                        self.key, self.value)              # [n, G·2·O]
        return logits

    def observe(self, choice: Tensor, eff: Tensor, applied: Tensor) -> None:
        """After the step: choice [n, G, 2], eff [n] bool, applied [n, 3] the layer-mean (κ, ρ, bits)."""
        used = eff.float()[:, None] * applied / torch.tensor([1.0, 1.0, 16.0])            # [n, 3]
        self.usage, self.count = self.usage + used, self.count + eff.float()
        self.prev = self.policy.prev_ids(choice)                                           # [n, G·2]
        self.step = self.step + 1
