"""Pass: rewrite each attention core into ``solm.quest_attention``.

Matches ``aten.scaled_dot_product_attention`` (transformers' sdpa path) and the explicit
``matmul(softmax(matmul(q, kᵀ)·scale + mask), v)`` form (eager path). GQA key/value repeats
(``reshape(expand(unsqueeze(k, 2)))``) are looked through, so the op sees the un-repeated cache.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from solm_compile.passes.base import PassContext, PassResult
from solm_compile.passes.match import erase_unused, layer_label, skip_transparent

aten = torch.ops.aten
FULL = 2 ** 62


def _full_slice(n) -> bool:
    return (isinstance(n, fx.Node) and n.target is aten.slice.Tensor and (len(n.args) < 3 or n.args[2] in (0, None))
            and (len(n.args) < 4 or n.args[3] is None or n.args[3] >= FULL))


def _skip_slices(n):
    while _full_slice(n):
        n = n.args[0]
    return n


def unrepeat_kv(node: fx.Node) -> fx.Node:
    """The [B,Hkv,L,d] source of a transformers ``repeat_kv`` (expand + reshape), or the node itself."""
    if node.target not in (aten.reshape.default, aten.view.default):
        return node
    exp = node.args[0]
    if not isinstance(exp, fx.Node) or exp.target is not aten.expand.default:
        return node
    uns = _skip_slices(exp.args[0])
    if not isinstance(uns, fx.Node) or uns.target is not aten.unsqueeze.default or uns.args[1] != 2:
        return node
    return _skip_slices(uns.args[0])


def _sdpa_args(node: fx.Node):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = (None, None, None, None, 0.0, False, None, False)
    args = dict(zip(names, defaults))
    args.update(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _match_explicit(sm: fx.Node):
    """(q, k, v, mask, scale, out) for ``softmax(q@kᵀ*s + m) @ v``, or None."""
    if sm.target not in (aten.softmax.int, aten._softmax.default) or sm.args[1] not in (-1, 3):
        return None
    users = list(sm.users)
    nxt = users[0] if len(users) == 1 else None
    while nxt is not None and nxt.target in (aten.dropout.default, aten.to.dtype) and len(nxt.users) == 1:
        nxt = next(iter(nxt.users))
    if nxt is None or nxt.target is not aten.matmul.default or skip_transparent(nxt.args[0]) is not sm and nxt.args[0] is not sm:
        return None
    x, mask, scale = skip_transparent(sm.args[0]), None, 1.0
    if x.target is aten.add.Tensor and isinstance(x.args[1], fx.Node):
        x, mask = skip_transparent(x.args[0]), x.args[1]
    if x.target in (aten.mul.Tensor, aten.div.Tensor) and isinstance(x.args[1], (int, float)):
        scale = x.args[1] if x.target is aten.mul.Tensor else 1.0 / x.args[1]
        x = x.args[0]
    if x.target is not aten.matmul.default:
        return None
    q, kt = x.args
    if kt.target is not aten.transpose.int or sorted(a % 4 for a in kt.args[1:]) != [2, 3]:
        return None
    return q, kt.args[0], nxt.args[1], mask, float(scale), nxt


def gate_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    result = PassResult("gate_attention")
    controls = ctx.controls(gm.graph)
    if controls is None:
        result.skipped.append("no controls: run add_controls first")
        return result
    kappa = controls[0]
    g = ctx.gate
    for node in list(gm.graph.nodes):
        if node.target is aten.scaled_dot_product_attention.default:
            a = _sdpa_args(node)
            if a["dropout_p"]:
                result.skipped.append(f"{node.name}: dropout_p={a['dropout_p']} (training graph)")
                continue
            q, k, v, mask, scale, causal, out = (a["query"], a["key"], a["value"], a["attn_mask"], a["scale"],
                                                 bool(a["is_causal"]), node)
        elif node.target in (aten.softmax.int, aten._softmax.default):
            hit = _match_explicit(node)
            if hit is None:
                result.skipped.append(f"{node.name}: softmax not in the softmax(QKᵀ)V form")
                continue
            q, k, v, mask, scale, out = hit
            causal = False
        else:
            continue
        k_src, v_src = unrepeat_kv(k), unrepeat_kv(v)
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.ops.solm.quest_attention.default, (
                q, k_src, v_src, mask, kappa, scale, causal, g.page_size, g.forced_sinks, g.forced_window))
        out.replace_all_uses_with(new)
        if "val" in out.meta:
            new.meta["val"] = out.meta["val"]
        erase_unused(out)
        result.counts["quest_attention"] += 1
        result.gated.append(("attention", layer_label(*_weights_near(q))))
    if result.counts:
        gm.graph.eliminate_dead_code()
        gm.recompile()
        result.modified = True
    return result


def _weights_near(node: fx.Node, depth: int = 12) -> list[fx.Node]:
    """get_attr nodes feeding ``node`` within a few hops (to name the layer)."""
    seen, frontier, found = set(), [node], []
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                (found if a.op == "get_attr" else nxt).append(a)
        if found:
            return found
        frontier = nxt
    return found
