"""``solm train``: GRPO training of the allocation policy on real text (the Austen novels by default, or the genre
mixture: ``--data mixture`` / ``--data GENRE ...``, blocks drawn evenly per genre, the shipped file the checkpoint
that scored best on the mixture's validation split)."""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

DATA_HELP = ("training text: 'austen' (the Austen novels except Persuasion, the held-out one), 'mixture' (the "
             "training genres fiction, qa and encyclopedic, blocks drawn evenly per genre from their train split; the "
             "shipped file is the checkpoint best on their validation split), training genres, or text files "
             "(default austen)")


def add_train_parser(sub, common) -> None:
    from solm_compile.train.config import POLICY_KINDS, TrainConfig

    p = sub.add_parser("train", help="train the policy with GRPO (checkpoints, --resume, torchrun for DDP)")
    common(p)
    p.add_argument("--data", nargs="+", default=["austen"], help=DATA_HELP)
    p.add_argument("--out", required=True, help="policy file to write, e.g. policy.pt (a run directory "
                   "<out>.run/ beside it keeps the resumable checkpoint and metrics)")
    p.add_argument("--resume", action="store_true", help="continue the run in <out>.run/")
    p.add_argument("--blocks", type=int, default=3000, help="training blocks of ctx+T+1 tokens (default 3000)")
    p.add_argument("--val-blocks", type=int, default=12, help="with genres: validation blocks (evenly per genre) "
                   "every checkpoint is scored on, 0 = ship the last checkpoint (default 12)")
    defaults = TrainConfig()
    for name, help_ in (
            ("ctx", "dense prefill tokens per episode"), ("T", "controlled steps per episode"),
            ("K", "counterfactual rollouts per sequence"), ("B", "sequences per rollout batch"),
            ("reward", "ll (log-likelihood, SOL's default) or kl (−KL(dense‖sparse))"),
            ("seed", "seed (same seed, same machine ⇒ same checkpoint)"),
            ("updates", "PPO/GRPO updates"), ("checkpoint_every", "updates between checkpoints"),
            ("buffer_decisions", "decisions per update"), ("lr", "AdamW learning rate"),
            ("minibatch_decisions", "decisions per minibatch"),
            ("grad_accum", "minibatches per AdamW step (0 = the whole buffer, as SOL)"),
            ("ppo_epochs", "passes over each buffer (1 = SOL; more reuse the costly CPU rollouts)"),
            ("entropy_coef", "entropy bonus weight (SOL 0.05)")):
        default = getattr(defaults, name)
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=type(default), default=default,
                       help=f"{help_} (default {default})")
    for name, help_ in (("kappa_levels", "attention keep levels κ of the policy's action grid"),
                        ("rho_levels", "MLP keep levels ρ (units of h with --mlp-skip h)"),
                        ("bit_levels", "MLP-output bit levels; 16 alone = no bits axis (fake-quantising the MLP "
                         "output saves nothing on a CPU)")):
        default = list(getattr(defaults.grid, name))
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=float, nargs="+", default=default,
                       metavar="V", help=f"{help_}; increasing, ending at the dense level "
                       f"(default {' '.join(f'{v:g}' for v in default)})")
    p.add_argument("--d-model", dest="d_model", type=int, default=defaults.policy.d_model,
                   help=f"policy width (default {defaults.policy.d_model})")
    p.add_argument("--alpha", type=float, nargs=3, default=list(defaults.alpha), metavar=("TOK", "PRU", "Q"),
                   help="budget-penalty weight per axis (default SOL's 100 100 200); like --lr, --entropy-coef and "
                   "the schedule flags it may change on --resume")
    p.add_argument("--policy-kind", choices=POLICY_KINDS, default=defaults.policy_kind,
                   help="joint: one joint (κ, ρ, bits) action per step for every layer (SOL's); offsets: per "
                   "layer-group offsets over the floor, docs/policy.md (default %(default)s; fixed on --resume)")
    p.add_argument("--floor", metavar="FILE", help="with --policy-kind offsets: the floor is the per-layer "
                   "calibration of this static policy file (solm eval --floor writes it; with ρ on the same "
                   "--mlp-skip); default the uniform floor")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)


def action_grid(args: argparse.Namespace):
    """The ActionGrid of --kappa-levels / --rho-levels / --bit-levels; a bad level is one line naming its flag."""
    from solm_compile.errors import UserError
    from solm_compile.policy.actions import ActionGrid

    names = ("kappa_levels", "rho_levels", "bit_levels")
    try:
        return ActionGrid(**{n: tuple(getattr(args, n)) for n in names})
    except UserError as e:
        flag = next(("--" + n.replace("_", "-") for n in names if n in str(e)), "--kappa-levels")
        raise UserError(f"{flag}: {e}") from e


def _blocks(loaded, data: list[str], block_len: int, n: int):
    from solm_compile.data import corpora as d
    from solm_compile.errors import UserError

    if loaded.tokenizer is None:
        raise UserError(f"{loaded.info.name}: training needs the model's tokenizer (none found)")
    if "austen" in data and len(data) > 1:
        raise UserError(f"--data {' '.join(data)}: 'austen' stands alone; give it, genres, or files")
    if data == ["austen"]:
        texts = d.training_text()
    else:
        texts = []
        for f in data:
            path = Path(f)
            if not path.is_file():
                raise UserError(f"--data {f}: no such file")
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return d.token_blocks(loaded.tokenizer, texts, block_len, n, seed=0)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from solm_compile.policy import checkpoint
    from solm_compile.cli.common import kv_shape, load_gated
    from solm_compile.errors import UserError
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy.network import PolicyConfig
    from solm_compile.train.config import BEST, CHECKPOINT, TrainConfig
    from solm_compile.train.data import training_genres
    from solm_compile.train.loop import train

    cfg = TrainConfig(grid=action_grid(args), ctx=args.ctx, T=args.T, K=args.K, B=args.B, reward=args.reward,
                      seed=args.seed, updates=args.updates, checkpoint_every=args.checkpoint_every,
                      buffer_decisions=args.buffer_decisions, minibatch_decisions=args.minibatch_decisions,
                      grad_accum=args.grad_accum, ppo_epochs=args.ppo_epochs, lr=args.lr,
                      alpha=tuple(args.alpha), entropy_coef=args.entropy_coef,
                      policy=PolicyConfig(d_model=args.d_model), policy_kind=args.policy_kind,
                      floor=_floor_id(args))
    out = Path(args.out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    run_dir = out.with_name(out.name + ".run")
    if (run_dir / CHECKPOINT).exists() and not args.resume:
        raise UserError(f"--out {out}: {run_dir} holds a run already; pass --resume to continue it")
    if args.val_blocks < 0:
        raise UserError(f"--val-blocks must be >= 0, got {args.val_blocks}")
    picked = training_genres(args.data)          # a held-out genre is refused before the model loads
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded, gated = load_gated(args)
    from solm_compile.analysis.inspect import shapes_from_gated  # noqa: F401  (keeps the gated graph's ops registered)

    lm = GatedLM(gated, kv_shape(loaded))
    costs, floor_meta = _floor_costs(args, loaded, lm)
    validate, meta = None, floor_meta
    if picked is None:
        blocks = _blocks(loaded, args.data, cfg.ctx + cfg.T + 1, args.blocks)
    else:
        blocks, validate, data_meta = _genre_data(loaded.tokenizer, lm, picked, cfg, args, costs)
        meta = {**meta, **data_meta}
    log.info("training on %d blocks of %d tokens", blocks.shape[0], blocks.shape[1])
    result = train(lm, blocks, cfg, run_dir, resume=args.resume, progress=not args.no_progress, validate=validate,
                   meta=meta, floor_costs=costs)
    best = run_dir / BEST
    ck = checkpoint.read(best if validate is not None and best.is_file() else result.checkpoint)
    stripped = {k: v for k, v in ck.items() if k not in ("optimizer", "rng", "best")}
    if validate is not None:
        stripped["selection"] = {**result.best, "last_step": int(result.history[-1]["step"]),
                                 "scores": {int(h["step"]): h["val_score"] for h in result.history
                                            if "val_score" in h}}
    checkpoint.save(out, stripped)
    shutil.copyfile(run_dir / "metrics.jsonl", out.with_suffix(".metrics.jsonl"))
    last = result.history[-1] if result.history else {}
    versus = "uniform" if cfg.policy_kind == "joint" else "the floor"
    chosen = (f"; best on validation: score {result.best['score']:+.4f} nats vs {versus}"
              if validate is not None and result.best else "")
    print(f"wrote {out} (step {ck.get('step')}{chosen}; last reward {last.get('reward', float('nan')):.4f}, "
          f"usage tok/pru/q {last.get('use_tok', 0):.2f}/{last.get('use_pru', 0):.2f}/{last.get('use_q', 0):.2f})")
    return 0


def _floor_id(args) -> str:
    """TrainConfig.floor of --floor: 'uniform', or 'layers:' and the first 16 hex digits of the file's sha256."""
    import hashlib

    from solm_compile.errors import UserError

    if not args.floor:
        return "uniform"
    if args.policy_kind != "offsets":
        raise UserError(f"--floor {args.floor}: a floor is what offsets deviate from; add --policy-kind offsets")
    path = Path(args.floor)
    if not path.is_file():
        raise UserError(f"--floor {path}: no such file")
    return "layers:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _floor_costs(args, loaded, lm):
    """(LayerCosts of --floor or None, what the checkpoint records of the file)."""
    if not args.floor:
        return None, {}
    import hashlib

    from solm_compile.eval import floor as fl
    from solm_compile.policy.checkpoint import model_identity

    path = Path(args.floor)
    costs, _ = fl.load_static(path, model_identity(loaded.info), lm.gate.mlp_skip)
    return costs, {"floor_file": {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}}


def _genre_data(tokenizer, lm, picked, cfg, args, costs=None):
    """Blocks evenly per genre (train split), the validation scorer and the data record for the checkpoint."""
    from solm_compile.eval.select import offsets_validation_score, validation_score
    from solm_compile.train.data import data_record, genre_blocks

    if tokenizer is None:
        from solm_compile.errors import UserError
        raise UserError(f"{lm.info.name}: training needs the model's tokenizer (none found)")
    block_len = cfg.ctx + cfg.T + 1
    blocks, _ = genre_blocks(tokenizer, picked, block_len, args.blocks, "train", seed=0)
    validate, val_per = None, 0
    if args.val_blocks:
        val, _ = genre_blocks(tokenizer, picked, block_len, args.val_blocks, "validation", seed=1)
        val_per = val.shape[0] // len(picked)

        def validate(policy):
            if cfg.policy_kind == "offsets":
                floor = {"id": cfg.floor, "layer_costs": costs.to_dict() if costs is not None else None}
                return offsets_validation_score(lm, policy, cfg.grid, floor, val, cfg.ctx, cfg.T)
            return validation_score(lm, policy, cfg.grid, val, cfg.ctx, cfg.T)
    meta = {"data": data_record(picked, blocks.shape[0] // len(picked), val_per, 0, tokenizer)}
    return blocks, validate, meta
