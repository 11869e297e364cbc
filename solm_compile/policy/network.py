"""SOL's ``RecurrentActorCriticPolicy``, scaled to CPU (shared/research/sol_method.md §4, §10).

Per decode step t the policy reads what it would see at deployment::

    h_prev [D]  the LM's last hidden state (after the final norm) at the previous position
    e      [D]  the LM's input-embedding row of the current token
    s      [8]  [t_frac=(t+1)/T, eff_flag, C_tok, C_pru, C_q, dev_tok, dev_pru, dev_q] -> Linear(8,64), GELU, LN
    a_prev      previous *effective* action id (BOS = A at t=0)     -> Embedding(A+1, 32)

    concat -> Linear -> d  + pos_emb(t) -> 1 pre-LN causal block (own KV cache) -> LN
           -> pi head Linear(d, A) (zero bias)  +  budget head MLP(3->32->GELU->A) on (C_tok, C_pru, C_q)
           -> / tau

``step`` decodes one step per row into a fixed-size KV cache (``PolicyStep`` drives it); ``forward_sequence`` runs a whole episode with a causal mask and
gives the same logits. There is no value head (SOL's has loss weight 0; an unused parameter would only
complicate DDP).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from solm_compile.errors import UserError

NUM_SCALARS = 8


@dataclass(frozen=True)
class PolicyConfig:
    """Policy dimensions (SOL: d_model 512, 4 heads, FFN 4x, scalars 64, action embedding 32, budget 32)."""

    d_model: int = 128
    n_heads: int = 4
    ffn_mult: int = 4
    scalar_dim: int = 64
    action_dim: int = 32
    budget_hidden: int = 32
    max_steps: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"policy config: {f.name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise UserError(f"policy config: d_model {self.d_model} must be divisible by n_heads {self.n_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"policy config: unknown field(s) {sorted(unknown)}")
        return cls(**d)


class RecurrentActorCriticPolicy(nn.Module):
    def __init__(self, hidden_size: int, num_actions: int, cfg: PolicyConfig = PolicyConfig()):
        super().__init__()
        d, A = cfg.d_model, num_actions
        self.cfg, self.hidden_size, self.num_actions = cfg, hidden_size, num_actions
        self.n_heads, self.head_dim = cfg.n_heads, d // cfg.n_heads
        self.scalar_mlp = nn.Sequential(nn.Linear(NUM_SCALARS, cfg.scalar_dim), nn.GELU(), nn.LayerNorm(cfg.scalar_dim))
        self.action_emb = nn.Embedding(A + 1, cfg.action_dim)               # id A = BOS
        self.in_proj = nn.Linear(2 * hidden_size + cfg.scalar_dim + cfg.action_dim, d)
        self.pos_emb = nn.Embedding(cfg.max_steps, d)
        self.ln1 = nn.LayerNorm(d)
        self.wqkv = nn.Linear(d, 3 * d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_mult * d), nn.GELU(), nn.Linear(cfg.ffn_mult * d, d))
        self.ln_f = nn.LayerNorm(d)
        self.pi_head = nn.Linear(d, A)
        self.budget_head = nn.Sequential(nn.Linear(3, cfg.budget_hidden), nn.GELU(), nn.Linear(cfg.budget_hidden, A))
        nn.init.zeros_(self.pi_head.bias)

    @property
    def bos(self) -> int:
        return self.num_actions

    def _embed(self, h: Tensor, e: Tensor, s: Tensor, a_prev: Tensor, pos: Tensor) -> Tensor:
        """Inputs [..., D], [..., D], [..., 8], [...] long, pos [...] long -> trunk input [..., d]."""
        z = torch.cat([h, e, self.scalar_mlp(s), self.action_emb(a_prev)], dim=-1)   # [..., 2D+64+32]
        return self.in_proj(z) + self.pos_emb(pos)                                    # [..., d]

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        N, T, d = x.shape
        q, k, v = self.wqkv(self.ln1(x)).split(d, dim=-1)                      # 3 x [N, T, d]
        heads = lambda y: y.view(N, T, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        return heads(q), heads(k), heads(v)                                    # 3 x [N, H, T, hd]

    def _tail(self, x: Tensor, y: Tensor, s: Tensor, tau: float) -> Tensor:
        N, T, d = x.shape
        x = x + self.wo(y.transpose(1, 2).reshape(N, T, d))                    # [N, T, d]
        x = x + self.ffn(self.ln2(x))                                          # [N, T, d]
        x = self.ln_f(x)                                                       # [N, T, d]
        logits = self.pi_head(x) + self.budget_head(s[..., 2:5])               # [N, T, A]
        return logits / tau                                                    # [N, T, A]

    def forward_sequence(self, h: Tensor, e: Tensor, s: Tensor, a_prev: Tensor, tau: float = 1.0) -> Tensor:
        """A whole episode: h, e [N,T,D], s [N,T,8], a_prev [N,T] long -> logits / tau [N,T,A]."""
        N, T, _ = h.shape
        pos = torch.arange(T, device=h.device).expand(N, T)                    # [N, T]
        x = self._embed(h, e, s, a_prev, pos)                                  # [N, T, d]
        q, k, v = self._qkv(x)                                                 # [N, H, T, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # [N, H, T, hd]
        return self._tail(x, y, s, tau)                                        # [N, T, A]

    forward = forward_sequence   # what DDP calls

    def step(self, h: Tensor, e: Tensor, s: Tensor, a_prev: Tensor, t: Tensor, key: Tensor, value: Tensor,
             tau: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
        """One step per row at its in-episode index t [N] long, into the fixed-size cache key/value [N,H,T,hd]
        (row n attends to slots 0..t[n]; later slots are ignored): h, e [N,D], s [N,8], a_prev [N] long ->
        (logits / tau [N,A], key, value with slot t written). Equals ``forward_sequence`` step by step."""
        N, H, T, hd = key.shape
        x = self._embed(h[:, None], e[:, None], s[:, None], a_prev[:, None], t[:, None])   # [N, 1, d]
        q, k, v = self._qkv(x)                                                 # [N, H, 1, hd]
        slot = t.clamp(max=T - 1).view(N, 1, 1, 1).expand(N, H, 1, hd)         # [N, H, 1, hd]
        key, value = key.scatter(2, slot, k), value.scatter(2, slot, v)        # [N, H, T, hd]
        seen = torch.arange(T, device=t.device)[None, :] <= t[:, None]         # [N, T]
        y = F.scaled_dot_product_attention(q, key, value, attn_mask=seen[:, None, None, :])   # [N, H, 1, hd]
        return self._tail(x, y, s[:, None], tau)[:, 0], key, value             # [N, A]


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
