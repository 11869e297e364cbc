"""``solm eval ARTIFACT.onnx``: perplexity measured on what ships.

The same blocks and protocol as the model evaluation (``evaluate.PPLEvaluator``): each block's first ``ctx`` tokens
are a dense prefill, then ``T`` teacher-forced steps, each a run of the artifact in which its own policy (or, for a
``fixed`` artifact, the budget itself) picks the controls; the NLL of the ``T`` next tokens is reported with the
realised usage, next to the same artifact at the dense budget (which forces the dense action). The policy's
step-fraction feature counts the artifact's episode (16 steps), as when serving, so with ``T`` = 16 the numbers
equal the model evaluation's policy row on the same blocks (tests/test_artifact.py).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

from solm_compile.errors import UserError


class _Ids:
    """``tokenizers.Tokenizer`` → the ``encode(text) -> ids`` that ``data.token_blocks`` expects."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _trace(sess, blocks: np.ndarray, ctx: int, T: int, budget, batch_rows: int) -> dict:
    """Per-block mean NLL, the effective steps' controls and actions for one budget."""
    rows, controls, actions = [], [], Counter()
    for s in range(0, len(blocks), batch_rows):
        b = blocks[s:s + batch_rows]                                               # [B, ctx+T+1]
        gen = sess.steps(b[:, :ctx].tolist(), budget, forced=b[:, ctx:ctx + T].tolist())
        next(gen)                                                                  # the dense prefill
        nll = np.zeros(len(b))
        for t, step in enumerate(gen):
            lp = _log_softmax(step["logits"])                                      # [B, V]
            nll -= lp[np.arange(len(b)), b[:, ctx + t + 1]]
            if step["controls"] is not None:
                controls.append(step["controls"])                                  # [B, 3]
            if step["action"] is not None:
                actions.update(int(a) for a in step["action"])
        rows.append(nll / T)
    c = np.concatenate(controls) if controls else np.tile([1.0, 1.0, 16.0], (1, 1))
    return {"rows": np.concatenate(rows), "usage": {"attn_keep": float(c[:, 0].mean()),
                                                    "mlp_keep": float(c[:, 1].mean()), "bits": float(c[:, 2].mean())},
            "actions": actions}


def _summary(rows: np.ndarray) -> dict:
    n, mean = len(rows), float(rows.mean())
    se = float(rows.std(ddof=1)) / math.sqrt(n) if n > 1 else None
    return {"nll": mean, "nll_se": se, "ppl": math.exp(mean), "ppl_se": math.exp(mean) * se if se else None}


def evaluate_artifact(path: Path, texts: Sequence[str], budget, *, ctx: int, T: int, blocks: int, seed: int,
                      batch_rows: int = 16, threads: int | None = None) -> dict:
    from solm_compile.data import corpora as d
    from solm_compile.runtime.session import SolmSession

    t0 = time.perf_counter()
    sess = SolmSession(path, threads=threads)
    if sess.kind == "dense" and tuple(budget) != (1.0, 1.0, 16):
        raise UserError(f"{path}: a dense artifact has no budget; drop --attn-keep/--mlp-keep/--bits")
    sess.check_budget(budget)
    episode = int(sess.meta.get("episode_len", 16))
    if sess.kind in ("solm", "portable") and T > episode:
        raise UserError(f"--T {T} exceeds the artifact's policy episode ({episode} steps)")
    ids = d.token_blocks(_Ids(sess.tokenizer), list(texts), ctx + T + 1, blocks, seed=seed).numpy()
    dense = _trace(sess, ids, ctx, T, (1.0, 1.0, 16), batch_rows)
    run = _trace(sess, ids, ctx, T, budget, batch_rows) if tuple(budget) != (1.0, 1.0, 16) else dense
    grid = sess.meta.get("action_grid")
    tags = None
    if grid and run["actions"]:
        from solm_compile.policy.actions import ActionGrid

        g = ActionGrid.from_dict(grid)
        tags = {g.tag(a): n for a, n in sorted(run["actions"].items())}
    delta = run["rows"] - dense["rows"]
    return {"artifact": str(path), "kind": sess.kind, "ep_active": sess.ep_active,
            "budget": {"attn_keep": float(budget[0]), "mlp_keep": float(budget[1]), "bits": float(budget[2])},
            "blocks": int(len(ids)), "ctx": ctx, "T": T, "tokens": int(len(ids) * T),
            **_summary(run["rows"]), "usage": run["usage"], "actions": tags,
            "dense": _summary(dense["rows"]),
            "delta_nll_vs_dense": float(delta.mean()),
            "delta_nll_vs_dense_se": float(delta.std(ddof=1)) / math.sqrt(len(delta)) if len(delta) > 1 else None,
            "wall_s": time.perf_counter() - t0}


def format_artifact_eval(r: dict) -> str:
    u, b = r["usage"], r["budget"]
    lines = [f"{r['artifact']} ({r['kind']}{', SolmEP' if r['ep_active'] else ''}): {r['blocks']} blocks × "
             f"{r['T']} steps after {r['ctx']} dense tokens",
             f"  budget      κ̄ {b['attn_keep']:.3f}  ρ̄ {b['mlp_keep']:.3f}  b̄ {b['bits']:.2f}",
             f"  realised    κ̄ {u['attn_keep']:.3f}  ρ̄ {u['mlp_keep']:.3f}  b̄ {u['bits']:.2f}",
             f"  ppl {r['ppl']:.3f}   dense {r['dense']['ppl']:.3f}   ΔNLL vs dense {r['delta_nll_vs_dense']:+.4f}"
             + (f" ± {r['delta_nll_vs_dense_se']:.4f}" if r["delta_nll_vs_dense_se"] is not None else "")]
    if r["actions"]:
        lines.append("  actions     " + ", ".join(f"{k} {v}" for k, v in r["actions"].items()))
    return "\n".join(lines)
