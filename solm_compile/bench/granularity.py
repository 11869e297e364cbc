"""What MLP skip granularity costs in quality: a measurement for the sparse low-bit kernels (issue 17).

A skipped weight costs no bytes only when whole quantisation blocks are skipped, so a kernel on 4-bit blocks of 32
wants skips in groups of 32. This measures, on the real model and held-out text, what each way of choosing the
MLP's work costs at keep fraction ρ (every token, every layer, teacher forced; PPL against dense on the same ids):

    x_channel      SOL's ρ: the ⌈ρ·D⌉ largest-|x| input channels of gate/up (channel granularity)
    x_group32      the same on groups of 32 consecutive input channels (score: Σ x² of the group)
    x_group32_perm groups of 32 after a per-layer channel order sorted by calibration mean |x|
    h_channel      the ⌈ρ·I⌉ largest-|h| intermediate units feed the down projection (gate and up dense)
    h_group32      the same on groups of 32 consecutive units; h_group32_perm: after a calibrated unit order
    gate_u         units ranked by |act(gate)|·E|up| (calibrated): up's rows and down's columns skipped with them

``mlp_bytes`` is the fraction of the three MLP matrices read (they are the same size). The calibration (orders, E|up|)
uses training novels; the scored text is the held-out novel, which nothing here is tuned on. Works on models whose MLP
has gate_proj/up_proj/down_proj/act_fn (Llama, Gemma). Not a test: ``python -m solm_compile.bench.granularity``
prints a markdown table and writes JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

MODES = ("x_channel", "x_group32", "x_group32_perm", "h_channel", "h_group32", "h_group32_perm", "gate_u")
GROUP = 32


def mlp_bytes(mode: str, rho: float) -> float:
    """Fraction of gate+up+down bytes read at keep ρ (all three matrices the same size)."""
    if mode.startswith("x_"):
        return (2 * rho + 1) / 3
    if mode.startswith("h_"):
        return (2 + rho) / 3
    return (1 + 2 * rho) / 3


def _topk(score: torch.Tensor, k: int) -> torch.Tensor:
    return score >= score.topk(k, -1).values[..., -1:]                   # [..., n] bool, ties kept


def _grouped(score: torch.Tensor, rho: float, perm: torch.Tensor) -> torch.Tensor:
    """Keep flags [..., n] from per-unit scores: the ⌈ρ·n/32⌉ groups of 32 (in ``perm`` order) of largest Σ score."""
    n = score.shape[-1]
    gs = score[..., perm].reshape(*score.shape[:-1], n // GROUP, GROUP).sum(-1)   # [..., n/32]
    kg = _topk(gs, max(1, math.ceil(rho * n / GROUP - 1e-9))).repeat_interleave(GROUP, -1)  # [..., n] perm order
    keep = torch.empty_like(kg)
    keep[..., perm] = kg
    return keep


class Sparsifier:
    """Replaces each MLP's forward; ``mode`` None is dense, "calib" gathers mean |x|, |h|, |up| per unit."""

    def __init__(self, mlps):
        self.mlps, self.mode, self.rho = list(mlps), None, 1.0
        self.sums = [{"x": 0.0, "h": 0.0, "u": 0.0} for _ in self.mlps]
        for i, m in enumerate(self.mlps):
            m.forward = self._forward(i, m)

    def calibrated(self) -> None:
        self.order = [{k: torch.argsort(v, descending=True) for k, v in s.items()} for s in self.sums]

    def _forward(self, i, m):
        def forward(x):                                                   # x [B,T,D]
            mode, rho = self.mode, self.rho
            if mode is not None and mode.startswith("x_") and rho < 1:
                score = x.abs() ** 2                                      # [B,T,D]
                keep = (_topk(score, max(1, math.ceil(rho * x.shape[-1] - 1e-9))) if mode == "x_channel" else
                        _grouped(score, rho, self._perm(i, "x", mode, x.shape[-1])))
                x = torch.where(keep, x, torch.zeros_like(x))
            g = m.act_fn(m.gate_proj(x))                                  # [B,T,I]
            u = m.up_proj(x)                                              # [B,T,I]
            h = g * u                                                     # [B,T,I]
            if mode == "calib":
                s = self.sums[i]
                for key, t in (("x", x), ("h", h), ("u", u)):
                    s[key] = s[key] + t.abs().reshape(-1, t.shape[-1]).mean(0)
            elif mode is not None and not mode.startswith("x_") and rho < 1:
                n = h.shape[-1]
                if mode == "h_channel":
                    keep = _topk(h.abs(), max(1, math.ceil(rho * n - 1e-9)))
                elif mode == "gate_u":
                    keep = _topk(g.abs() * self.sums[i]["u"], max(1, math.ceil(rho * n - 1e-9)))
                else:
                    keep = _grouped(h.abs() ** 2, rho, self._perm(i, "h", mode, n))
                h = torch.where(keep, h, torch.zeros_like(h))
            return m.down_proj(h)                                         # [B,T,D]
        return forward

    def _perm(self, i: int, key: str, mode: str, n: int) -> torch.Tensor:
        return self.order[i][key] if mode.endswith("_perm") else torch.arange(n)


@torch.no_grad()
def block_nll(hf, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each block [n] (teacher forced, one block per forward)."""
    out = []
    for b in blocks:
        logits = hf(b[None]).logits[0, :-1].float()                       # [T-1, V]
        out.append(F.cross_entropy(logits, b[1:]))
    return torch.stack(out).double()


def run(model: str, ctx: int, n_blocks: int, rhos, modes, threads: int) -> dict:
    from solm_compile.data import corpora
    from solm_compile.frontend import models

    torch.set_num_threads(threads)
    loaded = models.load(model, weights="fp32")
    hf = loaded.hf.eval()
    tok = loaded.tokenizer
    calib = corpora.token_blocks(tok, corpora.training_text(), ctx, 4, seed=1)
    test = corpora.token_blocks(tok, corpora.heldout_text(), ctx, n_blocks, seed=0)
    sp = Sparsifier(layer.mlp for layer in hf.model.layers)
    sp.mode = "calib"
    block_nll(hf, calib)
    sp.calibrated()
    sp.mode = None
    dense = block_nll(hf, test)
    rows = [{"mode": "dense", "rho": 1.0, "mlp_bytes": 1.0, "ppl": math.exp(dense.mean()), "rel": 0.0, "se": 0.0}]
    for rho in rhos:
        for mode in modes:
            sp.mode, sp.rho = mode, rho
            t = time.perf_counter()
            nll = block_nll(hf, test)
            d = nll - dense                                               # [n] paired per-block differences
            rows.append({"mode": mode, "rho": rho, "mlp_bytes": round(mlp_bytes(mode, rho), 4),
                         "ppl": math.exp(nll.mean()), "rel": math.expm1(d.mean()),
                         "se": float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan"),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(f"  ρ {rho:.2f} {mode:15s} PPL {rows[-1]['ppl']:10.3f}", flush=True)
    return {"model": model, "weights": "fp32 (the source dequantised)", "ctx": ctx, "blocks": n_blocks,
            "text": f"held-out novel ({corpora.HELDOUT_NOVEL}); calibration: 4 blocks of the training novels",
            "rows": rows}


def table(r: dict) -> str:
    lines = [f"{r['model']}, {r['weights']}, ctx {r['ctx']}, {r['blocks']} blocks of {r['text']}", "",
             "| mode | ρ | MLP bytes read | PPL | vs dense (± paired s.e. of Δ log-PPL) |", "|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['mode']} | {x['rho']:.2f} | {x['mlp_bytes']:.3f} | {x['ppl']:.3f} | "
                     f"{x['rel']:+.1%} (± {x['se']:.3f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m solm_compile.bench.granularity", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--rho", default="0.5,0.3", help="comma-separated keep fractions")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="write the result as JSON here")
    a = ap.parse_args(argv)
    modes = a.modes.split(",")
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    r = run(a.model, a.ctx, a.blocks, [float(x) for x in a.rho.split(",")], modes, a.threads)
    print(table(r))
    if a.out:
        from solm_compile.io import atomic_write_text

        atomic_write_text(a.out, json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
