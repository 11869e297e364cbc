"""Which artifact session runs which benchmark row, and the feeds of one prefill for any artifact kind."""

from __future__ import annotations

import numpy as np

# Row (variant, mode) per mode, and the session that runs it.
MODES = {
    "dense": ("dense", "dense", "dense"),
    "policy": ("solm", "policy", "solm"),
    "replay": ("solm", "replay", "fixed"),
    "fixed": ("solm", "fixed", "fixed"),
    "fixed_kvhead": ("solm", "fixed_kvhead", "fixed_kvhead"),
    "dense_budget": ("solm", "dense_budget", "solm"),
    "portable": ("portable", "policy", "portable"),
}
# Session name -> (artifact kind, SolmEP provider options).
SESSIONS = {"dense": ("dense", None), "solm": ("solm", None), "portable": ("portable", None),
            "fixed": ("fixed", None), "fixed_kvhead": ("fixed", {"select_per_kv_head": "1"})}


def prefill_feeds(s, ids: list[int], budget=(1.0, 1.0, 16.0), capacity: int = 0) -> dict:
    """The feeds of one prefill of ``ids`` from an empty cache at ``budget``, for any artifact kind; ``capacity``:
    the positions a KV cache buffer holds (default: the prompt; runtime/kv.py)."""
    n = len(ids)
    feeds = {"input_ids": np.asarray([ids], np.int64), "position_ids": np.arange(n, dtype=np.int64)[None],
             **s._empty_past(1, max(capacity, n))}
    if s.kind in ("solm", "portable"):
        feeds.update(s._policy_start(1, np.zeros((1, s.meta["hidden_size"]), np.float32)),
                     budget=s.check_budget(budget)[None])
    elif s.kind == "fixed":
        feeds.update(attn_keep=np.full(1, budget[0], np.float32), mlp_keep=np.full(1, budget[1], np.float32),
                     bits=np.full(1, budget[2], np.float32))
    return feeds


def variants_for(device: str, variants: tuple, default: tuple, kinds: dict) -> tuple:
    """The variants ``solm bench --device`` times: on CUDA the default set shrinks to what the CUDA EP runs (SolmEP
    is CPU-only); a chosen variant it cannot run is a one-line error naming the flag."""
    from solm_compile.errors import UserError
    from solm_compile.runtime.device import CUDA_KINDS, check_device

    check_device(device)
    if device != "cuda":
        return variants
    if variants == default:
        variants = tuple(v for v in default if kinds[v] in CUDA_KINDS)
    off = [v for v in variants if kinds.get(v) not in CUDA_KINDS]
    if off:
        raise UserError(f"--device cuda: the {', '.join(off)} variants run on SolmEP, which is CPU-only "
                        f"(choose from --variants {','.join(CUDA_KINDS)})")
    return variants
