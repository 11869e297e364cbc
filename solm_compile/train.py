"""GRPO training of the allocation policy on teacher-forced episodes (shared/research/sol_method.md §5).

One update::

    repeat until the buffer holds >= buffer_decisions decisions (per rank: buffer_decisions / world):
        B blocks [ctx + T + 1] -> targets C ~ U[grid minima, 1] per sequence
        dense prefill of ctx tokens -> tile K -> T teacher-forced controlled steps, actions ~ pi(.)/tau
        rewards r_t (log p(true) or -KL(dense || sparse)) -> G_t (gamma) - budget penalty -> process advantages
    ppo_epochs passes over the buffer in minibatches (SOL: one): re-run forward_sequence at tau, clipped-ratio
    loss - c_H entropy, gradients accumulated over ``grad_accum`` minibatches (0 = the whole buffer: one AdamW
    step per pass)

Under ``torchrun`` (``torch.distributed`` initialised) the policy is wrapped in DDP, blocks are sharded by
rank and rank 0 writes the checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint, grpo
from .actions import AXES, ActionGrid
from .config import GateConfig
from .errors import UserError
from .policy import PolicyConfig, RecurrentActorCriticPolicy

REWARDS = ("ll", "kl")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# fields that may change between a run and its resume: its length, the optimisation schedule and the weights of
# the objective's terms (a curriculum: budget penalty, entropy bonus); the rollout distribution, reward kind and
# model stay fixed
_RESUMABLE = ("updates", "checkpoint_every", "lr", "grad_accum", "minibatch_decisions", "ppo_epochs", "alpha",
              "entropy_coef")


@dataclass(frozen=True)
class TrainConfig:
    """GRPO training settings (SOL defaults, CPU-sized: ctx 256, T 16, K 8, B 2)."""

    ctx: int = 256
    T: int = 16
    K: int = 8
    B: int = 2
    reward: str = "ll"
    seed: int = 1234
    updates: int = 100
    checkpoint_every: int = 10
    buffer_decisions: int = 2048
    minibatch_decisions: int = 512
    grad_accum: int = 0                 # minibatches per optimiser step; 0 = the whole buffer
    ppo_epochs: int = 1                 # passes over each buffer (SOL: 1; more reuse costly CPU rollouts)
    tau: float = 1.3
    gamma: float = grpo.GAMMA
    dead_zone: float = grpo.DEAD_ZONE
    alpha: tuple[float, float, float] = grpo.ALPHA
    clip: float = 0.2
    entropy_coef: float = 0.05
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    grid: ActionGrid = field(default_factory=ActionGrid)
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(f"train config: {msg}")

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("ctx", "T", "B", "updates", "checkpoint_every", "buffer_decisions", "minibatch_decisions",
                     "ppo_epochs"):
            v = getattr(self, name)
            check(whole(v) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        check(whole(self.K) and self.K >= 2, f"K must be >= 2 (the group baseline needs 2 rollouts), got {self.K!r}")
        check(whole(self.grad_accum) and self.grad_accum >= 0, f"grad_accum must be >= 0, got {self.grad_accum!r}")
        check(self.reward in REWARDS, f"reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        check(self.minibatch_decisions >= self.T,
              f"minibatch_decisions ({self.minibatch_decisions}) must hold one episode (T={self.T})")
        check(self.tau > 0, f"tau must be > 0, got {self.tau}")
        check(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        check(self.dead_zone >= 0, f"dead_zone must be >= 0, got {self.dead_zone}")
        check(len(self.alpha) == 3 and all(a >= 0 for a in self.alpha),
              f"alpha must be 3 numbers >= 0, got {self.alpha}")
        check(0 < self.clip < 1, f"clip must be in (0, 1), got {self.clip}")
        check(self.entropy_coef >= 0, f"entropy_coef must be >= 0, got {self.entropy_coef}")
        check(self.lr > 0 and self.grad_clip > 0, f"lr and grad_clip must be > 0, got {self.lr}, {self.grad_clip}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(isinstance(self.grid, ActionGrid), f"grid must be an ActionGrid, got {type(self.grid).__name__}")
        check(isinstance(self.policy, PolicyConfig), f"policy must be a PolicyConfig, got {type(self.policy).__name__}")
        check(self.T <= self.policy.max_steps,
              f"T ({self.T}) exceeds the policy's position table (max_steps {self.policy.max_steps})")
        object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["alpha"] = list(self.alpha)
        d["grid"], d["policy"] = self.grid.to_dict(), self.policy.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise UserError(f"train config: unknown field(s) {sorted(unknown)}")
        d = dict(d)
        if "grid" in d:
            d["grid"] = ActionGrid.from_dict(dict(d["grid"]))
        if "policy" in d:
            d["policy"] = PolicyConfig.from_dict(dict(d["policy"]))
        if "alpha" in d:
            d["alpha"] = tuple(d["alpha"])
        return cls(**d)


# ---------------------------------------------------------------------------------------------- rollouts
@dataclass
class Episode:
    """T controlled steps for N = B·K rows (row = b·K + k); everything the update needs, nothing with grad."""

    h: Tensor          # [N, T, D] policy input: LM last hidden at the previous position
    e: Tensor          # [N, T, D] policy input: embedding of the current token
    scalars: Tensor    # [N, T, 8]
    prev: Tensor       # [N, T] previous effective action (BOS at t=0)
    actions: Tensor    # [N, T] chosen action (sampled or greedy)
    logp: Tensor       # [N, T] log pi(action) at tau when chosen
    eff: Tensor        # [N, T] bool: effective step (the action was applied and counts towards usage)
    reward: Tensor     # [N, T] per-step reward
    logp_true: Tensor  # [N, T] log p(true next token) under the controlled LM
    usage: Tensor      # [N, 3] realised usage (κ, ρ, b/16) over the effective steps
    targets: Tensor    # [N, 3]


def gate_of(lm: Any) -> GateConfig:
    gate = getattr(lm, "gate", None)
    return gate if isinstance(gate, GateConfig) else GateConfig()


def step_scalars(t: int, T: int, eff: bool, targets: Tensor, usage_sum: Tensor, count: Tensor) -> Tensor:
    """[t_frac, eff_flag, C_tok, C_pru, C_q, dev_tok, dev_pru, dev_q] per row: targets/usage_sum [N,3], count [N]."""
    N = targets.shape[0]
    mean = usage_sum / count.clamp(min=1)[:, None]                                   # [N, 3]
    dev = torch.where(count[:, None] > 0, mean - targets, torch.zeros_like(targets))  # [N, 3]
    head = torch.tensor([(t + 1) / T, float(eff)], device=targets.device).expand(N, 2)  # [N, 2]
    return torch.cat([head, targets, dev], dim=-1)                                   # [N, 8]


@torch.no_grad()
def rollout(lm: Any, policy: RecurrentActorCriticPolicy, blocks: Tensor, targets: Tensor, grid: ActionGrid, *,
            T: int, K: int, tau: float = 1.0, greedy: bool = False, reward: str = "ll",
            generator: Optional[torch.Generator] = None, min_len: Optional[int] = None) -> Episode:
    """Dense prefill of blocks[:, :-T-1], then T teacher-forced steps under policy control, K rollouts each.

    blocks [B, ctx+T+1]: step t feeds token ctx+t and scores token ctx+t+1. targets [B, 3].
    """
    B, n = blocks.shape
    ctx, N = n - T - 1, B * K
    min_len = gate_of(lm).min_len if min_len is None else min_len
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
    cache = tiled
    h = hid[:, -1].float().repeat_interleave(K, 0)                    # [N, D]
    E = lm.embed(blocks[:, ctx:ctx + T]).float().repeat_interleave(K, 0)   # [N, T, D]
    labels = blocks[:, ctx + 1:ctx + T + 1].repeat_interleave(K, 0)        # [N, T]
    ids = blocks[:, ctx:ctx + T].repeat_interleave(K, 0)                   # [N, T]
    C = targets.float().repeat_interleave(K, 0)                            # [N, 3]
    usage_sum, count = torch.zeros(N, 3), torch.zeros(N)
    prev = torch.full((N,), policy.bos, dtype=torch.long)
    state = None
    out = {k: [] for k in ("h", "s", "prev", "a", "logp", "eff", "r", "lp")}
    for t in range(T):
        eff = cache.length + 1 > min_len
        s = step_scalars(t, T, eff, C, usage_sum, count)                  # [N, 8]
        logits, state = policy.step(h, E[:, t], s, prev, t, state, tau)  # [N, A]
        logp_all = F.log_softmax(logits, dim=-1)                          # [N, A]
        if greedy:
            a = logits.argmax(-1)                                          # [N]
        else:
            a = torch.multinomial(logp_all.exp(), 1, generator=generator)[:, 0]   # [N]
        a_eff = a if eff else torch.full_like(a, grid.dense_idx)           # [N]
        kappa, rho, bits = grid.decode(a_eff)                              # 3 x [N]
        lg, hid, cache = lm.step(ids[:, t, None], cache, kappa, rho, bits)  # [N, 1, V], [N, 1, D]
        lp_true = grpo.ll_reward(lg[:, 0], labels[:, t])                  # [N]
        if reward == "kl":
            lp_s = F.log_softmax(lg[:, 0].float(), dim=-1)                # [N, V]
            r = -(dense_lp[:, t].exp() * (dense_lp[:, t] - lp_s)).sum(-1)  # [N]
        else:
            r = lp_true
        if eff:
            usage_sum += grid.usage(a_eff)
            count += 1
        for k, v in (("h", h), ("s", s), ("prev", prev), ("a", a), ("logp", logp_all.gather(-1, a[:, None])[:, 0]),
                     ("eff", torch.full((N,), eff)), ("r", r), ("lp", lp_true)):
            out[k].append(v)
        prev, h = a_eff, hid[:, 0].float()
    st = {k: torch.stack(v, 1) for k, v in out.items()}
    return Episode(st["h"], E, st["s"], st["prev"], st["a"], st["logp"], st["eff"], st["r"], st["lp"],
                   grpo.realised_usage(usage_sum, count), C)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    policy: RecurrentActorCriticPolicy
    history: list[dict]
    checkpoint: Path


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_indices(shard: Tensor, batch: int, B: int, seed: int) -> Tensor:
    """Blocks of global batch number ``batch``: a fresh permutation of this rank's shard every epoch."""
    per_epoch = len(shard) // B
    epoch, i = divmod(batch, per_epoch)
    perm = torch.randperm(len(shard), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return shard[perm[i * B:(i + 1) * B]]


def _advantages(ep: Episode, cfg: TrainConfig, alpha: Tensor) -> tuple[Tensor, Tensor]:
    B, K, T = ep.reward.shape[0] // cfg.K, cfg.K, cfg.T
    G = grpo.discounted_returns(ep.reward.view(B, K, T), cfg.gamma)           # [B, K, T]
    pen = grpo.budget_penalty(ep.usage, ep.targets, alpha, cfg.dead_zone)    # [N]
    R = G - pen.view(B, K, 1)                                                 # [B, K, T]
    adv = grpo.group_advantages(R, ep.eff.view(B, K, T))                      # [B, K, T]
    return adv.reshape(B * K, T), pen


def _update(model, policy: RecurrentActorCriticPolicy, opt: torch.optim.Optimizer, buf: dict, cfg: TrainConfig,
            gen: torch.Generator, world: int) -> dict:
    """``ppo_epochs`` passes over the buffer: minibatches of ~minibatch_decisions, an AdamW step every grad_accum."""
    M = buf["actions"].shape[0]
    rows = max(1, cfg.minibatch_decisions // cfg.T)
    groups = []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(M, generator=gen)
        chunks = [order[i:i + rows] for i in range(0, M, rows)]
        per_step = cfg.grad_accum or len(chunks)
        groups += [chunks[i:i + per_step] for i in range(0, len(chunks), per_step)]
    stats = {"loss": 0.0, "entropy": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, "opt_steps": len(groups)}
    for group in groups:
        n_group = sum(buf["eff"][c].sum() for c in group).clamp(min=1)
        opt.zero_grad(set_to_none=True)
        for j, c in enumerate(group):
            sync = world == 1 or j == len(group) - 1
            with nullcontext() if sync else model.no_sync():
                logits = model(buf["h"][c], buf["e"][c], buf["scalars"][c], buf["prev"][c], cfg.tau)  # [m, T, A]
                logp = F.log_softmax(logits, -1).gather(-1, buf["actions"][c][..., None])[..., 0]   # [m, T]
                loss, st = grpo.clipped_loss(logp, buf["logp"][c], buf["adv"][c], grpo.entropy(logits),
                                             buf["eff"][c], cfg.clip, cfg.entropy_coef)
                w = buf["eff"][c].sum() / n_group
                (loss * w).backward()
            stats["loss"] += float(loss.detach() * w) / len(groups)
            stats["entropy"] += float(st["entropy"] * w) / len(groups)
            stats["clip_frac"] += float(st["clip_frac"] * w) / len(groups)
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        opt.step()
        stats["grad_norm"] += float(gn) / len(groups)
    opt.zero_grad(set_to_none=True)
    return stats


def _reduce(metrics: dict, world: int) -> dict:
    if world == 1:
        return metrics
    keys = sorted(metrics)
    v = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(v)
    return {k: float(x) / world for k, x in zip(keys, v)}


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _save(out: Path, cfg: TrainConfig, gate: GateConfig, ident: dict, policy, opt, step: int, batches: int,
          gen: torch.Generator, history: list, rank: int, world: int) -> None:
    states = [gen.get_state()]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, gen.get_state())
    if rank == 0:
        checkpoint.save(out / CHECKPOINT, {
            **checkpoint.policy_payload(policy, cfg.grid, gate, ident, cfg.to_dict()),
            "optimizer": opt.state_dict(), "step": step, "batches": batches,
            "rng": states, "world_size": world, "history": history})
        _write_text_atomic(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))
    if world > 1:
        dist.barrier()


def _restore(path: Path, lm: Any, cfg: TrainConfig, policy, opt, gen: torch.Generator, rank: int, world: int):
    ck = checkpoint.read(path)
    checkpoint.check_identity(path, ck, lm.info)
    old = {k: v for k, v in ck["train_config"].items() if k not in _RESUMABLE}
    new = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise UserError(f"{path}: cannot resume, the train config differs in {', '.join(diff)}")
    if int(ck.get("world_size", 1)) != world:
        raise UserError(f"{path}: cannot resume, saved with {ck.get('world_size')} processes, running {world}")
    if "optimizer" not in ck:
        raise UserError(f"{path}: cannot resume, the checkpoint holds no optimiser state")
    policy.load_state_dict(ck["policy"])
    opt.load_state_dict(ck["optimizer"])
    for g in opt.param_groups:                     # a resume may change the learning rate (_RESUMABLE)
        g["lr"] = cfg.lr
    gen.set_state(ck["rng"][rank])
    return int(ck["step"]), int(ck["batches"]), list(ck["history"])


def _collect(lm, policy, blocks: Tensor, shard: Tensor, batches: int, n_batches: int, cfg: TrainConfig,
             gate: GateConfig, gen: torch.Generator) -> tuple[list[Episode], dict, int]:
    """Roll out ``n_batches`` batches of B blocks; return the episodes, the update buffer and the batch counter."""
    alpha = grpo.penalty_alpha(cfg.grid, cfg.alpha)
    policy.eval()
    eps, advs, pens = [], [], []
    for _ in range(n_batches):
        idx = _batch_indices(shard, batches, cfg.B, cfg.seed)
        batches += 1
        targets = grpo.sample_budgets(cfg.B, cfg.grid, gen)
        ep = rollout(lm, policy, blocks[idx], targets, cfg.grid, T=cfg.T, K=cfg.K, tau=cfg.tau,
                     reward=cfg.reward, generator=gen, min_len=gate.min_len)
        adv, pen = _advantages(ep, cfg, alpha)
        eps.append(ep), advs.append(adv), pens.append(pen)
    keys = ("h", "e", "scalars", "prev", "actions", "logp", "eff")
    buf = {k: torch.cat([getattr(ep, k) for ep in eps]) for k in keys}
    buf["adv"], buf["penalty"] = torch.cat(advs), torch.cat(pens)
    return eps, buf, batches


def _episode_metrics(eps: list[Episode], buf: dict) -> dict:
    usage, targets = torch.cat([ep.usage for ep in eps]), torch.cat([ep.targets for ep in eps])
    return {"reward": float(torch.cat([ep.reward for ep in eps]).mean()),
            "nll": float(-torch.cat([ep.logp_true for ep in eps]).mean()),
            "penalty": float(buf["penalty"].mean()),
            **{f"use_{a}": float(u) for a, u in zip(AXES, usage.mean(0))},
            **{f"target_{a}": float(u) for a, u in zip(AXES, targets.mean(0))},
            **{f"err_{a}": float(u) for a, u in zip(AXES, (usage - targets).abs().mean(0))}}


def train(lm: Any, blocks: Tensor, cfg: TrainConfig, out: Path, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Train a policy for ``lm`` on token ``blocks`` [N, ctx+T+1]; checkpoints go to ``out/checkpoint.pt``."""
    out = Path(out)
    rank, world = _dist()
    if blocks.dim() != 2 or blocks.shape[1] != cfg.ctx + cfg.T + 1:
        raise UserError(f"training blocks must be [N, ctx+T+1] = [N, {cfg.ctx + cfg.T + 1}], "
                        f"got {list(blocks.shape)}")
    shard = torch.arange(blocks.shape[0])[rank::world]
    if len(shard) < cfg.B:
        raise UserError(f"{blocks.shape[0]} training blocks over {world} process(es) leave fewer than B={cfg.B} each")
    gate, ident = gate_of(lm), checkpoint.model_identity(lm.info)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        policy = RecurrentActorCriticPolicy(ident["hidden_size"], cfg.grid.num_actions, cfg.policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * (rank + 1))
    path = out / CHECKPOINT
    step, batches, history = 0, 0, []
    if resume:
        step, batches, history = _restore(path, lm, cfg, policy, opt, gen, rank, world)
    elif path.exists():
        raise UserError(f"{path} exists; pass resume=True to continue it, or choose another output directory")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model = policy
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(policy)
    n_batches = math.ceil(math.ceil(cfg.buffer_decisions / world) / (cfg.B * cfg.K * cfg.T))
    bar = tqdm(total=cfg.updates, initial=step, desc="grpo", unit="upd", disable=not progress or rank != 0)
    while step < cfg.updates:
        t0 = time.perf_counter()
        eps, buf, batches = _collect(lm, policy, blocks, shard, batches, n_batches, cfg, gate, gen)
        t_roll = time.perf_counter() - t0
        policy.train()
        stats = _update(model, policy, opt, buf, cfg, gen, world)
        step += 1
        timing = {"rollout_s": t_roll, "update_s": time.perf_counter() - t0, "lr": cfg.lr,
                  "entropy_coef": cfg.entropy_coef, **{f"alpha_{a}": w for a, w in zip(AXES, cfg.alpha)}}
        metrics = {"step": step, **_reduce({**_episode_metrics(eps, buf), **stats, **timing}, world)}
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(r=f"{metrics['reward']:.3f}", tok=f"{metrics['use_tok']:.2f}", pru=f"{metrics['use_pru']:.2f}",
                        q=f"{metrics['use_q']:.2f}", loss=f"{metrics['loss']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.updates:
            _save(out, cfg, gate, ident, policy, opt, step, batches, gen, history, rank, world)
    bar.close()
    policy.eval()
    return TrainResult(policy, history, path)
