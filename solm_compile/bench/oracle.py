"""How much could ANY per-step allocation gain over a uniform one at matched usage? (issue 18's headroom)

An upper bound that needs no policy: at each decode step the torch gated graph is run at several budget shifts
δ (κ = κ̄ + δ, ρ = ρ̄ + δ, every layer alike) from the same KV history (the uniform one's), and an oracle that sees
the target token picks one shift per step, minimising the summed NLL under the constraint that the mean shift over
every step of every block is ≤ 0 (it spends no more than uniform). Beside it, rules a policy could learn from what
it reads before the token: up (+0.125) when the previous step's predictive entropy, or its surprisal, is above the
median, down (−0.125) otherwise (matched usage by construction); and the *lagged* oracle, the shift the oracle chose
for the previous token (does the need carry over from one token to the next?). If the oracle gains and the causal
rules do not, the information is in the target, not in the state a policy sees. The oracle also profits from the
noise between shifts (it keeps whichever happened to score the target best), so its gain is a loose bound.

    python -m solm_compile.bench.oracle smollm2 --mlp-skip h --blocks 48 --budget 0.5/0.75 \\
        --out results/oracle-smollm2-h.json

Blocks are drawn from the training genres' *validation* split (never the held-out genres). Per-block paired
differences give the standard errors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

SHIFTS = (-0.25, -0.125, 0.0, 0.125, 0.25)


def step_nlls(lm, ids: torch.Tensor, ctx: int, T: int, kappa: float, rho: float):
    """ids [ctx + T + 1]: dense prefill of ids[:ctx], then T steps feeding ids[ctx + t]; returns nll [T, S] (each
    shift's NLL of ids[ctx + t + 1], all from the uniform history) and the uniform step's predictive entropy [T]."""
    S = len(SHIFTS)
    _, _, cache = lm.prefill(ids[None, :ctx])                                   # [1, ctx, V]
    k = torch.tensor([min(1.0, max(0.0, kappa + s)) for s in SHIFTS])          # [S]
    r = torch.tensor([min(1.0, max(0.0, rho + s)) for s in SHIFTS])            # [S]
    b = torch.full((S,), 16.0)                                                 # [S]
    u = SHIFTS.index(0.0)
    nll, ent = np.zeros((T, S)), np.zeros(T)
    for t in range(T):
        x = ids[ctx + t].repeat(S, 1)                                          # [S, 1]
        wide = type(cache)([c.expand(S, *c.shape[1:]) for c in cache.tensors])
        logits, _, present = lm.step(x, wide, k, r, b)                         # [S, 1, V]
        logp = torch.log_softmax(logits[:, -1].double(), -1)                   # [S, V]
        nll[t] = (-logp[:, ids[ctx + t + 1]]).numpy()
        ent[t] = float(-(logp[u].exp() * logp[u]).sum())
        cache = type(cache)([c[u:u + 1] for c in present.tensors])            # the uniform row's history
    return nll, ent


def oracle_choice(nll: np.ndarray) -> np.ndarray:
    """[N, S] -> shift index per step minimising Σ nll with mean shift ≤ 0 (Lagrangian, bisection on λ)."""
    shifts = np.asarray(SHIFTS)

    def pick(lam):
        return np.argmin(nll + lam * shifts[None, :], axis=1)

    lo, hi = 0.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if shifts[pick(mid)].mean() <= 0 else (mid, hi)
    return pick(hi)


def entropy_rule(ent: np.ndarray) -> np.ndarray:
    """[B, T] -> shift index [B, T]: up (+0.125) after a step whose predictive entropy is above the median of every
    step's, down (−0.125) otherwise (half up, half down: the usage matches uniform's); the first step stays uniform.
    Causal but for that one threshold."""
    up, down, zero = SHIFTS.index(0.125), SHIFTS.index(-0.125), SHIFTS.index(0.0)
    prev = ent[:, :-1]                                                         # [B, T-1]
    out = np.full(ent.shape, zero)
    out[:, 1:] = np.where(prev > np.median(prev), up, down)
    return out


def lagged(choice: np.ndarray) -> np.ndarray:
    """[B, T] -> [B, T]: step t takes what ``choice`` picked at t − 1 (the first step uniform): a causal rule if the
    per-step need carries over from one token to the next."""
    out = np.full(choice.shape, SHIFTS.index(0.0))
    out[:, 1:] = choice[:, :-1]
    return out


def surprisal_rule(nll_u: np.ndarray) -> np.ndarray:
    """[B, T] uniform NLLs -> shift index: up after a token that surprised (NLL above the median of every step's),
    down otherwise; what the policy reads as its 'surprisal of the previous step' input."""
    up, down, zero = SHIFTS.index(0.125), SHIFTS.index(-0.125), SHIFTS.index(0.0)
    prev = nll_u[:, :-1]
    out = np.full(nll_u.shape, zero)
    out[:, 1:] = np.where(prev > np.median(prev), up, down)
    return out


def main(argv: list[str] | None = None) -> int:
    from solm_compile.config import GateConfig
    from solm_compile.data import corpora as d, genres
    from solm_compile.frontend.gated import GatedLM, _kv_shape_from_graph, compile_gated
    from solm_compile.frontend.models import load
    from solm_compile.io import atomic_write_text

    p = argparse.ArgumentParser(prog="python -m solm_compile.bench.oracle", description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--mlp-skip", choices=("x", "h"), default="h")
    p.add_argument("--blocks", type=int, default=48, help="blocks per training genre's validation split")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--T", type=int, default=16)
    p.add_argument("--budget", default="0.5/0.75", help="κ̄/ρ̄")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    kappa, rho = (float(x) for x in a.budget.split("/"))
    torch.manual_seed(a.seed)
    loaded = load(a.model)
    lm = GatedLM(compile_gated(loaded, GateConfig(mlp_skip=a.mlp_skip)), _kv_shape_from_graph(loaded))
    t0, per_genre = time.perf_counter(), {}
    for g, docs in genres.MIXTURE.training("validation").items():
        blocks = d.token_blocks(loaded.tokenizer, [genres.joined(docs)], a.ctx + a.T + 1, a.blocks, seed=a.seed)
        nll, ent = zip(*(step_nlls(lm, torch.as_tensor(blk), a.ctx, a.T, kappa, rho) for blk in blocks))
        per_genre[g] = (np.stack(nll), np.stack(ent))                         # [B, T, S], [B, T]
        print(f"{g}: {len(blocks)} blocks, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    nll = np.concatenate([v[0] for v in per_genre.values()])                   # [B, T, S]
    ent = np.concatenate([v[1] for v in per_genre.values()])                   # [B, T]
    B, T, S = nll.shape
    u = SHIFTS.index(0.0)
    rows = {"uniform": np.full((B, T), u), "oracle": oracle_choice(nll.reshape(B * T, S)).reshape(B, T),
            "entropy_rule": entropy_rule(ent), "surprisal_rule": surprisal_rule(nll[:, :, u])}
    rows["lagged_oracle"] = lagged(rows["oracle"])
    base = nll[:, :, u].mean(1)                                                # [B] per-block mean NLL
    report = {"model": a.model, "mlp_skip": a.mlp_skip, "budget": [kappa, rho], "shifts": SHIFTS, "ctx": a.ctx,
              "T": a.T, "blocks": B, "genres": {g: len(v[0]) for g, v in per_genre.items()},
              "split": "validation of the training genres", "wall_s": time.perf_counter() - t0, "methods": {}}
    for name, choice in rows.items():
        got = np.take_along_axis(nll, choice[..., None], 2)[..., 0].mean(1)   # [B]
        diff = got - base
        report["methods"][name] = {
            "nll": float(got.mean()), "ppl": math.exp(got.mean()), "mean_shift": float(np.asarray(SHIFTS)[choice].mean()),
            "dnll_vs_uniform": float(diff.mean()), "se": float(diff.std(ddof=1) / math.sqrt(B))}
    out = Path(a.out)
    atomic_write_text(out, json.dumps(report, indent=1) + "\n")
    np.savez_compressed(out.with_suffix(".npz"), nll=nll, entropy=ent)        # [B, T, S], [B, T]: rules offline
    for name, m in report["methods"].items():
        print(f"{name:>13}: PPL {m['ppl']:.3f}  mean shift {m['mean_shift']:+.4f}  "
              f"Δnll vs uniform {m['dnll_vs_uniform']:+.4f} ± {m['se']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
