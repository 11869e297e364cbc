"""``solm eval --out PREFIX`` writes ``PREFIX.html``: a few held-out passages with each controlled token shaded by
the compute the policy gave it, a legend, the run's summary table and (a sweep) the Pareto plot.

One self-contained file: inline CSS, the plot as a base64 ``data:`` image, no script, every text escaped. The
shades are ``analysis/shade.py``'s viridis, the same scale as ``solm run --show``; each token's value is the cost
model's bytes fraction at its step's L and controls (``CostModel.fraction``), kept for the first
``PPLEvaluator.keep_passages`` blocks of each run only.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Callable, Optional, Sequence

from solm_compile.analysis import shade

CONTEXT_SHOWN = 40          # tokens of the dense prefill shown (unshaded) before each passage's controlled steps

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; }
.passage { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 14px; line-height: 1.9;
           border: 1px solid #ddd; padding: .6em .8em; margin: .8em 0; }
.ctx { color: #888; }
.t { border-radius: 2px; }
.legend { display: flex; align-items: center; gap: .6em; margin: 1em 0; }
.bar { width: 18em; height: 1em; border: 1px solid #999; }
table { border-collapse: collapse; font-size: 13px; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .2em .5em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
"""


def passages_of(trace, blocks, ctx: int, cost, grid, keep: int) -> dict:
    """The first ``keep`` blocks of a policy ``trace``: per block the shown context ids and, per controlled step t
    (which feeds token ``ctx + t`` at KV length L = ctx + t + 1), its id, action, controls and bytes fraction;
    plus ``lo``, the cheapest fraction the grid allows at the longest L (the bottom of the colour scale)."""
    T = trace.controls.shape[1]
    out = []
    for i in range(min(keep, trace.controls.shape[0])):
        L = [int(trace.L0[i]) + t + 1 for t in range(T)]
        ctl = [[float(c) for c in trace.controls[i, t].tolist()] for t in range(T)]
        acts = None if trace.actions is None else [int(a) for a in trace.actions[i].tolist()]
        out.append({"block": i, "context": [int(x) for x in blocks[i, max(0, ctx - CONTEXT_SHOWN):ctx].tolist()],
                    "ids": [int(x) for x in blocks[i, ctx:ctx + T].tolist()], "L": L, "controls": ctl,
                    "actions": acts,
                    "cost_fraction": [None if cost is None else cost.fraction(l, *c)[1] for l, c in zip(L, ctl)]})
    lo = 0.0
    if cost is not None:
        Lmax = ctx + T
        lo = min(cost.fraction(Lmax, k, r, b)[1] for k in grid.kappa_levels for r in grid.rho_levels
                 for b in grid.bit_levels)
    return {"lo": int(lo * 20 + 1e-9) / 20, "passages": out}


# ---------------------------------------------------------------------------------------------- html pieces
def _e(x) -> str:
    return html.escape(str(x), quote=True)


def legend_html(lo: float, hi: float = 1.0) -> str:
    stops = ", ".join(f"{shade.hex_colour(shade.colour(lo + (hi - lo) * i / 8, lo, hi))} {100 * i / 8:.1f}%"
                      for i in range(9))
    return (f'<div class="legend"><span>{lo:.2f}</span><span class="bar" style="background: linear-gradient('
            f'to right, {stops})"></span><span>{hi:.2f}</span><span>compute per token: bytes read over the dense '
            f"budget's at the same context length (viridis; darker = less)</span></div>")


def passage_html(p: dict, decode: Callable[[list[int]], str], lo: float, grid=None) -> str:
    """One passage: the context tail unshaded, then one span per display unit (tokens that split a character
    are joined) with its shade, its cost in ``data-cost`` and a tooltip."""
    texts = shade.token_texts(decode, p["context"] + p["ids"])
    ctx_text, own = "".join(texts[:len(p["context"])]), texts[len(p["context"]):]
    recs = [{"text": t, "cost_fraction": c if c is not None else 1.0, "controls": ctl, "action": a}
            for t, c, ctl, a in zip(own, p["cost_fraction"], p["controls"], p["actions"] or [None] * len(own))]
    spans = []
    for text, value, members in shade.groups(recs):
        bg = shade.colour(value, lo)
        fg = shade.foreground(bg)
        tips = []
        for m in members:
            k, r, b = m["controls"]
            a = m["action"]
            tag = f"{grid.tag(a)} " if grid is not None and a is not None and a >= 0 else ""
            tips.append(f"{tag}κ {k:g} ρ {r:g} bits {b:g}: {m['cost_fraction']:.3f} of dense bytes")
        spans.append(f'<span class="t" style="background:{shade.hex_colour(bg)};color:{shade.hex_colour(fg)}" '
                     f'data-cost="{value:.6f}" data-tokens="{len(members)}" title="{_e("; ".join(tips))}">'
                     f"{_e(text)}</span>")
    return f'<div class="passage"><span class="ctx">…{_e(ctx_text)}</span>{"".join(spans)}</div>'


def summary_html(points: Sequence[dict], order: Sequence[str]) -> str:
    """The methods of each run point: ppl ± se, Δnll vs the policy, realised usage, net keep, FLOPs, bytes."""
    def f(x, spec=".3f"):
        return "—" if x is None else format(x, spec)

    rows = []
    for p in points:
        t = p["targets"]
        tag = f"({t['attn_keep']:.2f}, {t['mlp_keep']:.2f}, {t['bits']:g})"
        names = [m for m in order if m in p["methods"]] + [m for m in p["methods"] if m not in order]
        for name in names:
            m, u = p["methods"][name], p["methods"][name]["usage"]
            cells = [tag, name, f"{m['ppl']:.3f} ± {f(m.get('ppl_se'))}",
                     f"{f(m.get('delta_nll_vs_policy'), '+.4f')} ± {f(m.get('delta_nll_vs_policy_se'), '.4f')}",
                     f"{u['attn_keep']:.3f}", f"{u['mlp_keep']:.3f}", f"{u['bits']:.2f}", f"{m['net_keep']:.3f}",
                     f(m.get("flops_fraction")), f(m.get("bytes_fraction"))]
            rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in ("target (κ, ρ, b)", "method", "ppl ± se", "Δnll ± se", "κ̄", "ρ̄",
                                                 "b̄", "net keep", "FLOPs", "bytes"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def report_html(result: dict, shown: Sequence[dict], decode: Callable[[list[int]], str], grid=None,
                png: Optional[Path] = None, order: Sequence[str] = ()) -> str:
    """The whole page. ``result``: one run (``targets``, ``methods``) or a sweep (``points``); ``shown``: per run
    point, ``passages_of``'s dict, in the same order."""
    points = result.get("points") or [result]
    parts = [f"<h1>solm eval: {_e(result.get('model', ''))} on {_e(result.get('data', ''))}</h1>",
             f"<p>{_e(result.get('blocks', ''))} blocks × {_e(result.get('T', ''))} controlled tokens after a "
             f"{_e(result.get('ctx', ''))}-token dense prefill; policy "
             f"{_e(Path(str(result.get('policy', ''))).name)}. "
             "Each shaded token is one step of the policy on held-out text (grey: the end of the dense prefill); "
             "hover a token for its action and cost.</p>"]
    for p, s in zip(points, shown):
        t, u = p["targets"], p["matched_usage"]
        parts.append(f"<h2>target κ {t['attn_keep']:.2f}, ρ {t['mlp_keep']:.2f}, bits {t['bits']:g} → realised "
                     f"κ {u['attn_keep']:.3f}, ρ {u['mlp_keep']:.3f}, bits {u['bits']:.2f}</h2>")
        parts.append(legend_html(s["lo"]))
        parts += [passage_html(q, decode, s["lo"], grid) for q in s["passages"]]
    parts.append("<h2>Summary</h2>" + summary_html(points, order))
    if png is not None and Path(png).is_file():
        data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
        parts.append(f'<h2>Pareto plot</h2><img alt="perplexity against net keep" src="data:image/png;base64,{data}">')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>solm eval '
            f"{_e(result.get('model', ''))}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def write_report(prefix: str | Path, result: dict, shown: Sequence[dict], tokenizer, grid=None,
                 order: Sequence[str] = ()) -> Path:
    """Write ``PREFIX.html`` (atomically) beside ``PREFIX.png`` when the run made one; returns its path."""
    from solm_compile.io import atomic_write_text

    path = Path(f"{prefix}.html")
    atomic_write_text(path, report_html(result, shown, lambda ids: tokenizer.decode(ids), grid,
                                        Path(f"{prefix}.png"), order))
    return path
