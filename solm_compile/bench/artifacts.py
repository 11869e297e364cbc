"""The artifacts ``solm bench`` times, compiled once and cached by everything that decides their contents.

``<solm cache>/bench/<model>-<weights hash>/<kind>-<key>.onnx``; the key hashes the model identity, the gate config,
the policy file (policy kinds), the solm version and the exporter's sources, so an edit recompiles.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from solm_compile.errors import UserError

# Sources whose edits change what an artifact contains (part of the cache key).
_EXPORT_SOURCES = ("artifact/write.py", "artifact/step.py", "ops/to_onnx.py", "ops/torch_ops.py", "frontend/export.py",
                   "frontend/gated.py", "policy/network.py", "policy/step.py", "quant/blocks.py", "quant/gguf.py",
                   "quant/weights.py", "artifact/dense.py", "ops/registry.py")


def bench_dir(info) -> Path:
    from solm_compile.data.assets import cache_dir

    return cache_dir() / "bench" / f"{_safe(info.name)}-{info.weights_hash}"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "model"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def export_code_hash() -> str:
    """Hash of the sources that decide what an artifact contains (so editing the exporter invalidates the cache)."""
    from solm_compile import __version__

    here = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    for name in _EXPORT_SOURCES:
        p = here / name
        if p.is_file():
            h.update(name.encode() + b"\0" + p.read_bytes())
    try:
        from solm_compile import passes

        for p in sorted(Path(passes.__file__).resolve().parent.glob("*.py")):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    except ImportError:  # pragma: no cover - passes always ships with the package
        pass
    return h.hexdigest()[:16]


def artifact_key(info, gate, kind: str, policy_path: Path | None, weights: str = "fp32", kv: str = "fp16") -> str:
    from solm_compile.policy.checkpoint import model_identity

    payload = {"model": model_identity(info), "gate": gate.to_dict(), "kind": kind, "code": export_code_hash(),
               "weights": weights, "kv": kv if kind in ("solm", "fixed") else None,
               "policy": _file_hash(policy_path) if policy_path is not None and kind in ("solm", "portable") else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def random_policy(lm, seed: int = 0) -> Path:
    """A random-init policy checkpoint for ``lm`` (timing only: its decisions are arbitrary), cached by seed."""
    import torch

    from solm_compile.policy import checkpoint
    from solm_compile.policy.network import RecurrentActorCriticPolicy
    from solm_compile.train.config import TrainConfig

    path = bench_dir(lm.info) / f"random-policy-s{seed}.pt"
    if path.is_file():
        return path
    cfg = TrainConfig()
    torch.manual_seed(seed)
    policy = RecurrentActorCriticPolicy(lm.info.hidden_size, cfg.grid.num_actions, cfg.policy).eval()
    checkpoint.save(path, checkpoint.policy_payload(policy, cfg.grid, lm.gate, checkpoint.model_identity(lm.info),
                                                    cfg.to_dict()))
    return path


def policy_arg(lm, policy: str | Path | None, seed: int = 0) -> Path | None:
    """--policy as given: 'random' (a cached random-init policy), a checkpoint path (must exist), or None."""
    if policy == "random":
        return random_policy(lm, seed)
    if not policy:
        return None
    path = Path(policy)
    if not path.is_file():
        raise UserError(f"--policy {policy}: no such file")
    return path


def ensure_artifacts(lm, kinds, policy_path: Path | None, say: Callable[[str], None] = lambda s: None) -> dict:
    """kind -> path of the cached artifact, compiling the missing ones."""
    from solm_compile.artifact.write import write_artifact
    from solm_compile.policy.checkpoint import load_policy

    d = bench_dir(lm.info)
    d.mkdir(parents=True, exist_ok=True)
    loaded_policy = None
    out = {}
    for kind in kinds:
        needs_policy = kind in ("solm", "portable")
        if needs_policy and policy_path is None:
            raise UserError("the solm and portable variants need a policy: pass --policy POLICY.pt, or "
                            "--policy random (a random-init policy: timing only)")
        table = getattr(lm, "weights", None)                  # bench.decode.prepare sets it (--weights)
        mode = table.weights if table is not None else "fp32"
        mode += "-head4" if getattr(table, "head_bits", 8) == 4 else ""      # --head-bits 4: another table
        kv = getattr(lm, "kv", "fp16")                        # --kv (prepare sets it): the SolmEP kinds' cache
        key = artifact_key(lm.info, lm.gate, kind, policy_path if needs_policy else None, mode, kv)
        path = d / f"{kind}-{mode}-{key}.onnx"
        if not path.is_file():
            if needs_policy and loaded_policy is None:
                loaded_policy = load_policy(policy_path, lm.info)
            say(f"compiling the {kind} artifact -> {path}")
            t0 = time.perf_counter()
            write_artifact(lm, path, kind, loaded_policy if needs_policy else None, weights=table, kv=kv)
            say(f"  {kind}: {time.perf_counter() - t0:.0f} s")
        out[kind] = path
    return out
