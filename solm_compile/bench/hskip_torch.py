"""ρ on x vs ρ on h in the torch gated graph (issue 17): the uniform baseline's perplexity at each ρ.

Blocks as ``solm eval`` draws them (``--data``, ``--blocks`` of ctx + T + 1 tokens, ``--seed``); each block's ctx
tokens are a dense prefill, then T decode steps each at attention keep 1, bits 16 and the same MLP keep ρ (the
uniform schedule at exactly that target, no policy: the shipped one was trained with ρ on x and is refused in an h
graph) score the next token. Both graphs run the same weights (``--weights``) through ``solm.sparse_mlp``.
``python -m solm_compile.bench.hskip_torch [--model smollm2] [--blocks 16] [--rho 1,0.75,0.5,0.3] [--out F.json]``
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def uniform_nll(lm, blocks: torch.Tensor, ctx: int, rho: float, cache=None) -> torch.Tensor:
    """[n, T] negative log-likelihoods of blocks[:, ctx+1:] (T = len − ctx − 1), each token predicted by a decode
    step at κ 1, ρ ``rho``, b 16 after a dense prefill of blocks[:, :ctx] (``cache``: that prefill's, reused)."""
    B, T = blocks.shape[0], blocks.shape[1] - ctx - 1
    if cache is None:
        _, _, cache = lm.prefill(blocks[:, :ctx])
    one, out = torch.ones(B), []
    for t in range(T):
        logits, _, cache = lm.step(blocks[:, ctx + t:ctx + t + 1], cache, one, one * rho, one * 16)
        lp = torch.log_softmax(logits[:, -1].double(), -1)
        out.append(-lp.gather(1, blocks[:, ctx + t + 1:ctx + t + 2]).squeeze(1))
    return torch.stack(out, 1)


def run(model: str, weights: str, data: str, n_blocks: int, ctx: int, T: int, seed: int, rhos, say=print) -> dict:
    from solm_compile.cli.eval_data import texts
    from solm_compile.config import GateConfig
    from solm_compile.data import corpora as d
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.frontend.models import load

    loaded = load(model, weights=weights)
    blocks = d.token_blocks(loaded.tokenizer, texts(data), ctx + T + 1, n_blocks, seed=seed)
    rows = []
    for skip in ("x", "h"):
        lm = GatedLM.from_loaded(loaded, GateConfig(mlp_skip=skip))
        _, _, cache = lm.prefill(blocks[:, :ctx])
        for rho in rhos:
            t0 = time.perf_counter()
            nll = uniform_nll(lm, blocks, ctx, rho, cache)
            rows.append({"mlp_skip": skip, "rho": rho, "ppl": math.exp(nll.mean().item()), "scored": nll.numel(),
                         "s": round(time.perf_counter() - t0, 1)})
            say(json.dumps(rows[-1]))
    base = next(r["ppl"] for r in rows if r["mlp_skip"] == "x" and r["rho"] >= 1)
    for r in rows:
        r["vs_dense"] = r["ppl"] / base - 1
    return {"model": model, "weights": weights, "data": data, "blocks": n_blocks, "ctx": ctx, "T": T, "seed": seed,
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m solm_compile.bench.hskip_torch", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--weights", default="source")
    ap.add_argument("--data", default="persuasion")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rho", default="1,0.75,0.5,0.3", help="comma-separated MLP keep fractions")
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args(argv)
    r = run(a.model, a.weights, a.data, a.blocks, a.ctx, a.T, a.seed, [float(x) for x in a.rho.split(",")])
    print("| --mlp-skip | ρ | PPL | vs dense |\n|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['mlp_skip']} | {x['rho']} | {x['ppl']:.3f} | {x['vs_dense']:+.1%} |")
    if a.out:
        from solm_compile.io import atomic_write_text

        atomic_write_text(a.out, json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
