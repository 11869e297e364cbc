"""What the compiler did to a model: the gated layers, and the cost model built from the gated graph's ops."""

from __future__ import annotations

import torch

from solm_compile.analysis.cost import LayerShapes, ModelShapes, decode_cost, fraction, net_keep
from solm_compile.frontend.gated import GatedModel


def _const(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    """The constant tensor behind a get_attr (optionally transposed by aten.t), or None."""
    if node is None:
        return None
    if node.op == "call_function" and node.target is torch.ops.aten.t.default:
        inner = _const(gm, node.args[0])
        return None if inner is None else inner.t()
    if node.op != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def shapes_from_gated(model: GatedModel) -> ModelShapes:
    """ModelShapes read off the gated ops: heads and head dim from each quest_attention's q/k, MLP sizes from
    each sparse_mlp's weights. Layers pair the i-th attention with the i-th MLP."""
    gm = model.gm
    attn = [n for n in gm.graph.nodes if n.target is torch.ops.solm.quest_attention.default]
    mlps = [n for n in gm.graph.nodes if n.target is torch.ops.solm.sparse_mlp.default]
    layers = []
    for a, m in zip(attn, mlps):
        q, k = a.args[0].meta["val"], a.args[1].meta["val"]
        w_gate, w_up, b_up = _const(gm, m.args[1]), _const(gm, m.args[3]), m.args[4]
        I, D = w_up.shape
        layers.append(LayerShapes(D=int(D), H=int(q.shape[1]), Hkv=int(k.shape[1]), d=int(q.shape[3]), I=int(I),
                                  glu=w_gate is not None, mlp_bias=b_up is not None))
    D = layers[0].D if layers else model.info.hidden_size
    return ModelShapes(layers=tuple(layers), vocab=model.info.vocab_size, D=D)


def inspect_report(model: GatedModel, context: int = 1024) -> dict:
    shapes = shapes_from_gated(model)
    cost = decode_cost(shapes, model.gate)
    dense = cost.at(context)
    half = cost.at(context, kappa=0.5, rho=0.5, b=16)
    return {
        "model": model.info.name,
        "architecture": model.info.architecture,
        "num_layers": model.info.num_layers,
        "hidden_size": model.info.hidden_size,
        "vocab_size": model.info.vocab_size,
        "weights_hash": model.info.weights_hash,
        "gated_attention": model.count("attention"),
        "gated_mlp": model.count("mlp"),
        "gated_layers": [{"op": kind, "layer": layer} for kind, layer in model.gated],
        "passes": [{"name": r.name, "modified": r.modified, "counts": dict(r.counts), "skipped": r.skipped}
                   for r in model.results],
        "gate": model.gate.to_dict(),
        "cost": {
            "context": context,
            "dense": {"flops": dense["flops"], "bytes": dense["bytes"]},
            "half": {"attn_keep": 0.5, "mlp_keep": 0.5, "bits": 16, "flops": half["flops"], "bytes": half["bytes"],
                     **{f"{k}_fraction": v for k, v in fraction(shapes, model.gate, context, 0.5, 0.5, 16).items()},
                     "net_keep": net_keep(0.5, 0.5, 16)},
        },
    }


def format_inspect(r: dict) -> str:
    c = r["cost"]
    lines = [
        f"{r['model']}: {r['architecture']}, {r['num_layers']} layers, hidden {r['hidden_size']}, "
        f"vocab {r['vocab_size']}",
        f"gated: {r['gated_attention']} attention (solm.quest_attention), {r['gated_mlp']} MLP (solm.sparse_mlp)",
    ]
    by_layer: dict[str, list[str]] = {}
    for g in r["gated_layers"]:
        by_layer.setdefault(g["layer"], []).append(g["op"])
    lines.append("layers: " + ", ".join(f"{k}[{'+'.join(v)}]" for k, v in by_layer.items()))
    for p in r["passes"]:
        counts = ", ".join(f"{k}={v}" for k, v in p["counts"].items()) or "no change"
        lines.append(f"  pass {p['name']:<20} {counts}")
    h = c["half"]
    lines.append(f"cost per decode token at L={c['context']}: dense {c['dense']['flops'] / 1e6:.1f} MFLOP, "
                 f"{c['dense']['bytes'] / 1e6:.1f} MB; κ=ρ=0.5: {h['flops_fraction']:.3f} of FLOPs, "
                 f"{h['bytes_fraction']:.3f} of bytes (SOL net keep {h['net_keep']:.3f})")
    return "\n".join(lines)
