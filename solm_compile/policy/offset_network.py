"""The policy network for per-layer-group deviations from the floor (issue 18; docs/policy.md, item 1 of "left").

``OffsetPolicy`` is SOL's ``RecurrentActorCriticPolicy`` trunk (same inputs h_prev, e, 8 scalars; same causal block
and KV cache) with two changes::

    previous action   the G·2 previous choices, each a row of Embedding(G·2·O + 1, 32) (row (g·2+a)·O + o; the
                      last row is BOS), summed                                                     -> [..., 32]
    head              pi_head Linear(d, G·2·O), weight and bias zero at initialisation, no budget head (the floor
                      already meets the target): raw logits [..., G·2·O], read by OffsetGrid.logits (+ prior on 0)

so a fresh network, or one whose trunk says nothing useful about a state, is the floor under greedy decoding.
``policy.offset_step.OffsetStep`` drives it step by step (the state machine every consumer shares).
"""

from __future__ import annotations

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
