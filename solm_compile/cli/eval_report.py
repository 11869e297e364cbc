"""How ``solm eval`` prints and writes its results: the perplexity and accuracy tables, the sweep's markdown
and Pareto plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

ORDER = ("dense", "policy", "floor", "fixed", "random_median", "random_best", "emc", "dac", "uniform", "schedule",
         "layers", "static_attn", "static_mlp", "static_bits")


# ---------------------------------------------------------------------------------------------- output
def _fmt(x, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ordered(methods: dict) -> list[str]:
    return [m for m in ORDER if m in methods] + [m for m in methods if m not in ORDER]


def format_ppl(r: dict) -> str:
    u, t = r["matched_usage"], r["targets"]
    static = r["policy"] == "static"
    who = "no policy (--policy static)" if static else f"policy {Path(r['policy']).name} (step {r['policy_step']})"
    got = ("; every method is matched to the targets" if static else f" -> the policy realised κ {u['attn_keep']:.3f}"
           f", ρ {u['mlp_keep']:.3f}, bits {u['bits']:.2f}; baselines are matched to that")
    lines = [f"{r['model']} on {r['data']}: {r['blocks']} blocks x {r['T']} scored tokens after a {r['ctx']}-token "
             f"dense prefill; {who}",
             f"targets κ {t['attn_keep']:.3f}, ρ {t['mlp_keep']:.3f}, bits {t['bits']:.2f}{got}",
             f"{'method':<14}{'ppl':>9}{'±se':>8}{'Δnll':>9}{'±se':>7}{'κ̄':>7}{'ρ̄':>7}{'b̄':>6}{'net':>7}"
             f"{'FLOPs':>7}{'bytes':>7}"]
    for name in _ordered(r["methods"]):
        m = r["methods"][name]
        lines.append(f"{name:<14}{m['ppl']:>9.3f}{_fmt(m['ppl_se']):>8}{_fmt(m.get('delta_nll_vs_policy'), '+.4f'):>9}"
                     f"{_fmt(m.get('delta_nll_vs_policy_se'), '.4f'):>7}{m['usage']['attn_keep']:>7.3f}"
                     f"{m['usage']['mlp_keep']:>7.3f}{m['usage']['bits']:>6.2f}{m['net_keep']:>7.3f}"
                     f"{_fmt(m.get('flops_fraction')):>7}{_fmt(m.get('bytes_fraction')):>7}")
    if "floor" in r["methods"]:
        f = r["methods"]["floor"]
        cal = ", ".join(f"{k} {v:.3f}" for k, v in f["calibration_ppl"].items())
        lines.append(f"floor = {f['floor_of']}: the best static allocation on {f['calibration_blocks']} calibration "
                     f"blocks (training genres' validation split; ppl {cal})")
    timing = ", ".join(f"{k} {v:.1f}" for k, v in r["timing"].items())
    lines.append(f"Δnll: paired mean per-block NLL difference to the policy (> 0: worse than the policy). "
                 f"Time: {timing}; wall {r['wall_s']:.1f} s")
    return "\n".join(lines)


def format_choices(r: dict) -> str:
    u = r["matched_usage"]
    lines = [f"{r['model']} on {r['task']} ({r['items']} items); policy realised κ {u['attn_keep']:.3f}, "
             f"ρ {u['mlp_keep']:.3f}, bits {u['bits']:.2f}",
             f"{'method':<14}{'acc':>7}{'±se':>7}{'Δacc':>8}{'±se':>7}{'acc_norm':>9}{'±se':>7}{'Δnorm':>8}{'±se':>7}"
             f"{'net':>7}{'FLOPs':>7}{'bytes':>7}"]
    for name in _ordered(r["methods"]):
        m = r["methods"][name]
        lines.append(f"{name:<14}{m['acc']:>7.3f}{m['acc_se']:>7.3f}{_fmt(m.get('delta_acc_vs_policy'), '+.3f'):>8}"
                     f"{_fmt(m.get('delta_acc_vs_policy_se')):>7}{m['acc_norm']:>9.3f}{m['acc_norm_se']:>7.3f}"
                     f"{_fmt(m.get('delta_acc_norm_vs_policy'), '+.3f'):>8}{_fmt(m.get('delta_acc_norm_vs_policy_se')):>7}"
                     f"{m['net_keep']:>7.3f}{_fmt(m.get('flops_fraction')):>7}{_fmt(m.get('bytes_fraction')):>7}")
    lines.append(f"Δacc: paired per-item accuracy difference policy - method (> 0: worse than the policy). "
                 f"wall {r['wall_s']:.1f} s")
    return "\n".join(lines)


def choices_markdown(results: Sequence[dict]) -> str:
    """One table over multiple-choice results (``solm eval --task ... --json``), a row per task and method."""
    lines = ["| task (items) | target → realised κ/ρ/b | method | net keep | acc ± se | Δacc ± se | acc_norm ± se | "
             "Δacc_norm ± se | FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        t, u = r["targets"], r["matched_usage"]
        tag = (f"{t['attn_keep']:.2f}/{t['mlp_keep']:.2f}/{t['bits']:g} → "
               f"{u['attn_keep']:.2f}/{u['mlp_keep']:.2f}/{u['bits']:.1f}")
        for name in _ordered(r["methods"]):
            m = r["methods"][name]
            d = f"{_fmt(m.get('delta_acc_vs_policy'), '+.3f')} ± {_fmt(m.get('delta_acc_vs_policy_se'))}"
            dn = f"{_fmt(m.get('delta_acc_norm_vs_policy'), '+.3f')} ± {_fmt(m.get('delta_acc_norm_vs_policy_se'))}"
            lines.append(f"| {r['task']} ({r['items']}) | {tag} | {name} | {m['net_keep']:.3f} | {m['acc']:.3f} ± "
                         f"{m['acc_se']:.3f} | {d} | {m['acc_norm']:.3f} ± {m['acc_norm_se']:.3f} | {dn} | "
                         f"{_fmt(m.get('flops_fraction'))} |")
    return "\n".join(lines) + "\n"


def sweep_markdown(r: dict) -> str:
    lines = [f"# solm eval sweep: {r['model']} on {r['data']}", "",
             f"{r['blocks']} blocks x {r['T']} scored tokens (ctx {r['ctx']}); policy `{Path(r['policy']).name}`; "
             f"{r['random_seeds']} random seeds. Budget points: (κ, ρ, bits) targets for the policy; every baseline "
             "is matched to the usage the policy realised. Δnll = NLL(method) − NLL(policy), paired per block: "
             "> 0 means the policy is better.", "",
             "| target (κ, ρ, b) | method | net keep | ppl ± se | Δnll ± se | κ̄ | ρ̄ | b̄ | FLOPs | bytes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in r["points"]:
        t = p["targets"]
        tag = f"({t['attn_keep']:.2f}, {t['mlp_keep']:.2f}, {t['bits']:g})"
        for name in _ordered(p["methods"]):
            m = p["methods"][name]
            u = m["usage"]
            dnll = f"{_fmt(m.get('delta_nll_vs_policy'), '+.4f')} ± {_fmt(m.get('delta_nll_vs_policy_se'), '.4f')}"
            lines.append(f"| {tag} | {name} | {m['net_keep']:.3f} | {m['ppl']:.3f} ± {_fmt(m['ppl_se'])} | {dnll} | "
                         f"{u['attn_keep']:.3f} | {u['mlp_keep']:.3f} | {u['bits']:.2f} | "
                         f"{_fmt(m.get('flops_fraction'))} | {_fmt(m.get('bytes_fraction'))} |")
    return "\n".join(lines) + "\n"


def plot_sweep(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    names = _ordered({k: None for p in r["points"] for k in p["methods"]})
    palette = matplotlib.colormaps["tab20"]
    for i, name in enumerate(names):
        pts = sorted((p["methods"][name]["net_keep"], p["methods"][name]["ppl"], p["methods"][name]["ppl_se"] or 0.0)
                     for p in r["points"] if name in p["methods"])
        if name == "dense":
            ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="dense")
            continue
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=2, lw=2.5 if name == "policy" else 1.2,
                    color="crimson" if name == "policy" else palette((2 * i) % 20 + (2 * i) // 20 % 2),
                    ls="-" if not name.startswith("static") else ":", label=name, zorder=3 if name == "policy" else 2)
    ax.set_xlabel("SOL net keep (κ̄ + ρ̄ + b̄/16) / 3")
    ax.set_ylabel(f"perplexity ({r['data']}, {r['blocks']} blocks x {r['T']} tokens)")
    ax.set_title(f"{r['model']}: policy vs matched baselines")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
