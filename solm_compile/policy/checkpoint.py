"""Policy checkpoints: a plain dict of tensors and primitive containers, loadable with ``weights_only=True``.

Layout (``FORMAT``, ``VERSION``)::

    format, version          "solm-policy", 1
    model                    base-model identity: architecture, hidden_size, num_layers, vocab_size, weights_hash
    train_config             TrainConfig.to_dict()  (holds the policy dims and the action grid too)
    grid, gate               ActionGrid.to_dict(), GateConfig.to_dict()
    policy                   policy state_dict
    optimizer, step, batches, rng, history     training state for ``resume`` (absent in a stripped export)
    offset_grid, floor       train_config.policy_kind "offsets" only (train/kinds.py): the OffsetGrid and the floor
                             (id "uniform" or "layers:<sha256>", and the layer_costs of a layers floor)

Writes are atomic (a temp file in the same directory, then ``os.replace``): a reader sees the old or the new
checkpoint, never half of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from solm_compile.policy.actions import ActionGrid
from solm_compile.config import GateConfig
from solm_compile.errors import UserError
from solm_compile.io import atomic_path
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from solm_compile.policy.offset_network import OffsetPolicy
from solm_compile.policy.offsets import OffsetGrid

FORMAT = "solm-policy"
VERSION = 1
IDENTITY = ("architecture", "hidden_size", "num_layers", "vocab_size", "weights_hash")


def model_identity(info: Any) -> dict:
    """The base-model identity a policy is tied to, from a ``ModelInfo`` (or a dict with the same keys)."""
    get = info.get if isinstance(info, dict) else lambda k: getattr(info, k)
    ident = {k: get(k) for k in IDENTITY}
    for k in ("hidden_size", "num_layers", "vocab_size"):
        ident[k] = int(ident[k])
    ident["architecture"], ident["weights_hash"] = str(ident["architecture"]), str(ident["weights_hash"])
    return ident


def _describe(ident: dict) -> str:
    return (f"{ident['architecture']} (hidden {ident['hidden_size']}, {ident['num_layers']} layers, "
            f"vocab {ident['vocab_size']}, weights {str(ident['weights_hash'])[:12]})")


def save(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def policy_payload(policy: RecurrentActorCriticPolicy, grid: ActionGrid, gate: GateConfig, ident: dict,
                   train_config: dict) -> dict:
    """The part of a checkpoint that serving needs (no optimiser or RNG state)."""
    return {"format": FORMAT, "version": VERSION, "model": ident, "train_config": train_config,
            "grid": grid.to_dict(), "gate": gate.to_dict(), "policy": policy.state_dict()}


def read(path: Path) -> dict:
    """Load and sanity-check a checkpoint dict; ``UserError`` (one line, naming the file) if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such policy checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or pickled classes (refused by weights_only)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable solm policy checkpoint ({reason[:160]})") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"{path}: not a solm policy checkpoint (no format={FORMAT!r} marker)")
    if ck.get("version") != VERSION:
        raise UserError(f"{path}: policy checkpoint version {ck.get('version')!r}, this solm reads {VERSION}")
    missing = [k for k in ("model", "train_config", "grid", "gate", "policy") if k not in ck]
    if missing:
        raise UserError(f"{path}: policy checkpoint is missing {', '.join(missing)}")
    return ck


def check_identity(path: Path, ck: dict, lm_info: Any) -> None:
    want, have = ck["model"], model_identity(lm_info)
    if {k: want.get(k) for k in IDENTITY} != have:
        raise UserError(f"{path}: policy was trained for {_describe(want)}, but the model is {_describe(have)}")


@dataclass
class LoadedPolicy:
    policy: RecurrentActorCriticPolicy      # eval mode, on CPU
    grid: ActionGrid
    gate: GateConfig
    train_config: dict                      # TrainConfig.to_dict() as saved
    step: int                               # updates done when it was saved
    path: Path
    floor: dict | None = None               # offsets: {"id", "layer_costs"} of the floor it deviates from

    @property
    def kind(self) -> str:
        return str(self.train_config.get("policy_kind", "joint"))


def check_mlp_skip(lp: "LoadedPolicy", gate: GateConfig) -> None:
    """A policy's ρ means what it was trained on: x (input channels) or h (units of h); one line if the graph differs."""
    if lp.gate.mlp_skip != gate.mlp_skip:
        raise UserError(f"--mlp-skip {gate.mlp_skip}: {lp.path} was trained with ρ on {lp.gate.mlp_skip} (--mlp-skip "
                        f"{lp.gate.mlp_skip}); its ρ does not transfer")


def require_joint(lp: "LoadedPolicy", what: str) -> "LoadedPolicy":
    """An offsets policy runs in the torch engine only (``solm eval``); ``what`` (the artifact, the torch.compile
    backend) takes one joint action per row (docs/policy.md, item 4 of what is left)."""
    if lp.kind != "joint":
        raise UserError(f"{lp.path}: a --policy-kind {lp.kind} policy; {what} runs joint policies only "
                        "(solm eval evaluates it; docs/policy.md)")
    return lp


def build_policy(ck: dict) -> tuple[RecurrentActorCriticPolicy, ActionGrid]:
    grid = ActionGrid.from_dict(ck["grid"])
    pcfg = PolicyConfig.from_dict(dict(ck["train_config"]["policy"]))
    if ck["train_config"].get("policy_kind", "joint") == "offsets":
        og = dict(ck["offset_grid"])
        og = OffsetGrid(tuple(og["offsets"]), int(og["groups"]), float(og["prior"]), tuple(og["lowest"]))
        policy = OffsetPolicy(int(ck["model"]["hidden_size"]), og, pcfg)
    else:
        policy = RecurrentActorCriticPolicy(int(ck["model"]["hidden_size"]), grid.num_actions, pcfg)
    policy.load_state_dict(ck["policy"])
    return policy, grid


def load_policy(path: Path, lm_info: Any) -> LoadedPolicy:
    """Load a trained policy for the model described by ``lm_info``; refuses a mismatched or broken file."""
    path = Path(path)
    ck = read(path)
    check_identity(path, ck, lm_info)
    try:
        policy, grid = build_policy(ck)
        gate = GateConfig.from_dict(dict(ck["gate"]))
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: policy checkpoint does not match its own config ({reason[:160]})") from e
    return LoadedPolicy(policy.eval(), grid, gate, dict(ck["train_config"]), int(ck.get("step", 0)), path,
                        ck.get("floor"))


POLICY_DIR = Path(__file__).resolve().parent / "shipped"


def shipped_policy(info: Any) -> Path | None:
    """The policy shipped in the package for this model's identity: shipped/<name>.pt first, then any match."""
    for path in [POLICY_DIR / f"{info.name}.pt"] + sorted(POLICY_DIR.glob("*.pt")):
        if not path.is_file():
            continue
        try:
            ck = read(path)
        except UserError:  # a broken shipped file is simply not a match
            continue
        if info.same_model(ck.get("model", {})):
            return path
    return None
