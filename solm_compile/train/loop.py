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
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from solm_compile.config import GateConfig
from solm_compile.errors import UserError
from solm_compile.io import atomic_write_text
from solm_compile.policy import checkpoint
from solm_compile.policy.actions import AXES
from solm_compile.policy.network import RecurrentActorCriticPolicy
from solm_compile.train import grpo
from solm_compile.eval.floor import LayerCosts
from solm_compile.train.kinds import kind_of
from solm_compile.train.config import _RESUMABLE, BEST, CHECKPOINT, METRICS, TrainConfig  # noqa: F401
from solm_compile.train.rollout import Episode, gate_of, rollout  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    policy: RecurrentActorCriticPolicy
    history: list[dict]
    checkpoint: Path
    best: dict            # {step, score, validation} of the best checkpoint on validation; {} without validate


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


def _update(model, policy: RecurrentActorCriticPolicy, kind, opt: torch.optim.Optimizer, buf: dict, cfg: TrainConfig,
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
                logp, ent = kind.logp_entropy(logits, buf["actions"][c])                            # [m, T] each
                loss, st = grpo.clipped_loss(logp, buf["logp"][c], buf["adv"][c], ent, buf["eff"][c], cfg.clip,
                                             cfg.entropy_coef)
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


def _plain(x):
    """Numbers, tensors and their lists/dicts as JSON-ready floats (for metrics.jsonl)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, Tensor):
        return _plain(x.tolist())
    return float(x) if isinstance(x, (int, float)) else x


def _select(out: Path, validate: Callable, policy, payload: dict, step: int, history: list, best: dict) -> dict:
    """Score the policy on the validation blocks (lower is better); a new best is written to ``out/best.pt``."""
    policy.eval()
    v = validate(policy)
    score = float(v["score"])
    history[-1]["val_score"] = score
    history[-1]["val_usage"] = _plain(v.get("usage"))      # per validation target: what the policy realised
    if not best or score < best["score"]:
        best = {"step": step, "score": score, "validation": {k: x for k, x in v.items() if k != "score"}}
        checkpoint.save(out / BEST, {**payload, "step": step, "selection": dict(best)})
    return best


def _save(out: Path, cfg: TrainConfig, gate: GateConfig, ident: dict, kind, policy, opt, step: int, batches: int,
          gen: torch.Generator, history: list, rank: int, world: int, meta: dict, validate: Optional[Callable],
          best: dict) -> dict:
    states = [gen.get_state()]
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, gen.get_state())
    if rank == 0:
        payload = {**checkpoint.policy_payload(policy, cfg.grid, gate, ident, cfg.to_dict()), **kind.record(), **meta}
        if validate is not None:
            best = _select(out, validate, policy, payload, step, history, best)
        checkpoint.save(out / CHECKPOINT, {
            **payload, "optimizer": opt.state_dict(), "step": step, "batches": batches,
            "rng": states, "world_size": world, "history": history, "best": best})
        atomic_write_text(out / METRICS, "".join(json.dumps(h) + "\n" for h in history))
    if world > 1:
        dist.barrier()
    return best


def _restore(path: Path, lm: Any, cfg: TrainConfig, policy, opt, gen: torch.Generator, rank: int, world: int):
    ck = checkpoint.read(path)
    checkpoint.check_identity(path, ck, lm.info)
    was_kind = ck["train_config"].get("policy_kind", "joint")     # checkpoints before the kinds were joint
    if was_kind != cfg.policy_kind:
        raise UserError(f"--policy-kind {cfg.policy_kind}: cannot resume {path}, trained with --policy-kind {was_kind}")
    saved = {"policy_kind": "joint", "floor": "uniform", **ck["train_config"]}
    old = {k: v for k, v in saved.items() if k not in _RESUMABLE}
    new = {k: v for k, v in cfg.to_dict().items() if k not in _RESUMABLE}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise UserError(f"{path}: cannot resume, the train config differs in {', '.join(diff)}")
    if int(ck.get("world_size", 1)) != world:
        raise UserError(f"{path}: cannot resume, saved with {ck.get('world_size')} processes, running {world}")
    if "optimizer" not in ck:
        raise UserError(f"{path}: cannot resume, the checkpoint holds no optimiser state")
    was = GateConfig.from_dict(dict(ck["gate"])).mlp_skip
    if was != gate_of(lm).mlp_skip:
        raise UserError(f"--mlp-skip {gate_of(lm).mlp_skip}: cannot resume {path}, trained with ρ on {was}")
    policy.load_state_dict(ck["policy"])
    opt.load_state_dict(ck["optimizer"])
    for g in opt.param_groups:                     # a resume may change the learning rate (_RESUMABLE)
        g["lr"] = cfg.lr
    gen.set_state(ck["rng"][rank])
    return int(ck["step"]), int(ck["batches"]), list(ck["history"]), dict(ck.get("best") or {})


def _collect(lm, policy, kind, blocks: Tensor, shard: Tensor, batches: int, n_batches: int, cfg: TrainConfig,
             gate: GateConfig, gen: torch.Generator) -> tuple[list[Episode], dict, int]:
    """Roll out ``n_batches`` batches of B blocks; return the episodes, the update buffer and the batch counter."""
    alpha = grpo.penalty_alpha(cfg.grid, cfg.alpha)
    policy.eval()
    eps, advs, pens = [], [], []
    for _ in range(n_batches):
        idx = _batch_indices(shard, batches, cfg.B, cfg.seed)
        batches += 1
        targets = grpo.sample_budgets(cfg.B, cfg.grid, gen)
        ep = kind.rollout(lm, policy, blocks[idx], targets, gen, gate.min_len)
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
          progress: bool = True, validate: Optional[Callable] = None, meta: Optional[dict] = None,
          floor_costs: Optional[LayerCosts] = None) -> TrainResult:
    """Train a policy for ``lm`` on token ``blocks`` [N, ctx+T+1]; checkpoints go to ``out/checkpoint.pt``.

    ``validate(policy) -> {"score": lower is better, ...}`` (rank 0, at every checkpoint): the best-scoring
    checkpoint so far is kept as ``out/best.pt`` with ``selection`` = {step, score, validation}; the run's
    checkpoint records it (``best``) so a resume goes on comparing against it. ``meta`` (e.g. the training data's
    record) is stored in every checkpoint. ``floor_costs``: the ``layers`` calibration an ``offsets`` policy's floor
    is (``cfg.floor`` 'layers:<hash>'; ``train/kinds.py``)."""
    out = Path(out)
    rank, world = _dist()
    if blocks.dim() != 2 or blocks.shape[1] != cfg.ctx + cfg.T + 1:
        raise UserError(f"training blocks must be [N, ctx+T+1] = [N, {cfg.ctx + cfg.T + 1}], "
                        f"got {list(blocks.shape)}")
    shard = torch.arange(blocks.shape[0])[rank::world]
    if len(shard) < cfg.B:
        raise UserError(f"{blocks.shape[0]} training blocks over {world} process(es) leave fewer than B={cfg.B} each")
    gate, ident = gate_of(lm), checkpoint.model_identity(lm.info)
    kind = kind_of(cfg, floor_costs, ident["num_layers"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        policy = kind.make(ident["hidden_size"])
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 7919 * (rank + 1))
    path = out / CHECKPOINT
    step, batches, history, best = 0, 0, [], {}
    if resume:
        step, batches, history, best = _restore(path, lm, cfg, policy, opt, gen, rank, world)
        if best and not (out / BEST).is_file():
            # the run directory came back without best.pt (a repo carries checkpoint.pt alone): its weights are gone,
            # so selection restarts from the next checkpoint instead of comparing against a score nothing can ship
            log.warning("%s: no %s beside the checkpoint; the best on validation (step %s, %.4f) is not kept, "
                        "selection restarts", out, BEST, best.get("step"), best.get("score", float("nan")))
            best = {}
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
        eps, buf, batches = _collect(lm, policy, kind, blocks, shard, batches, n_batches, cfg, gate, gen)
        t_roll = time.perf_counter() - t0
        policy.train()
        stats = _update(model, policy, kind, opt, buf, cfg, gen, world)
        step += 1
        timing = {"rollout_s": t_roll, "update_s": time.perf_counter() - t0, "lr": cfg.lr,
                  "entropy_coef": cfg.entropy_coef, **{f"alpha_{a}": w for a, w in zip(AXES, cfg.alpha)}}
        metrics = {"step": step, **_reduce({**_episode_metrics(eps, buf), **stats, **timing}, world)}
        history.append(metrics)
        bar.update(1)
        bar.set_postfix(r=f"{metrics['reward']:.3f}", tok=f"{metrics['use_tok']:.2f}", pru=f"{metrics['use_pru']:.2f}",
                        q=f"{metrics['use_q']:.2f}", loss=f"{metrics['loss']:.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.updates:
            best = _save(out, cfg, gate, ident, kind, policy, opt, step, batches, gen, history, rank, world, meta or {},
                         validate, best)
    bar.close()
    policy.eval()
    return TrainResult(policy, history, path, best)
