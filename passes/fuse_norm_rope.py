"""ONNX pass: each RMSNorm and each rotary embedding as the exporter spells them out becomes one ONNX node.

torch.onnx writes a model's RMSNorm and rotary embedding op by op, as the eager code computes them::

    RMSNorm   y = Mul(w, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), [-1]), eps)))))
    RoPE      y = Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, d/2:d)), Slice(x, 0:d/2)), sin))
              cos, sin = Unsqueeze(Cos(Concat(f, f)), 1), Unsqueeze(Sin(Concat(f, f)), 1)

Six and fourteen nodes per use (a SmolLM2 decode step runs ~1,400 nodes, the rest of the layer ~300), each paying
onnxruntime's per-node dispatch on a one-token step. This pass rewrites them as opset 23's ``RMSNormalization``
(``stash_type`` float32) and ``RotaryEmbedding`` (4-D input [B, H, T, d], no position ids, cos/sin [B, T, d/2] =
``Cos(f)``/``Sin(f)``: the half that ``Concat(f, f)`` repeats), and raises the model's default opset to 23 (the
graph's other ops read the same at 23). It computes what the exported graph computes: the same float32 reduction and
the same cos/sin values (``tests/test_fuse_norm_rope.py`` checks outputs against the unfused graph).

A norm whose chain differs (no scalar eps, another exponent, a reduction over other axes) or a rotary whose halves
are not the standard ``rotate_half`` is left as it is, and ``skipped`` says why; Gemma's ``(1 + w)`` norm weight is
an initializer by the time this runs (constant folding), so it matches as any other.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from solm_compile.passes.base import PassResult

OPSET = 23


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    c = value.const_value
    if c is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        c = attr.value if attr is not None else None
    return None if c is None else np.asarray(c.numpy())


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value:
    """The input of the two-input ``node`` that is not ``value``."""
    return node.inputs[1] if node.inputs[0] is value else node.inputs[0]


def _norm_at(mul_w: ir.Node) -> tuple[ir.Value, ir.Value, float] | str:
    """(x, weight, eps) if ``mul_w`` = Mul(w, Mul(x, 1/sqrt(mean(x²) + eps))), else why not."""
    for j in (0, 1):
        inner = _producer(mul_w.inputs[j], "Mul")
        w = mul_w.inputs[1 - j]
        if inner is None or _const(w) is None or _const(w).ndim != 1:
            continue
        for k in (0, 1):
            recip = _producer(inner.inputs[k], "Reciprocal")
            x = inner.inputs[1 - k]
            sqrt = _producer(recip.inputs[0], "Sqrt") if recip else None
            add = _producer(sqrt.inputs[0], "Add") if sqrt else None
            if add is None:
                continue
            for m in (0, 1):
                mean = _producer(add.inputs[m], "ReduceMean")
                eps = _const(add.inputs[1 - m])
                pow_ = _producer(mean.inputs[0], "Pow") if mean else None
                if pow_ is None or eps is None or eps.size != 1 or pow_.inputs[0] is not x:
                    continue
                two, axes = _const(pow_.inputs[1]), _const(mean.inputs[1]) if len(mean.inputs) > 1 else None
                keep = mean.attributes.get("keepdims")
                rank = len(x.shape) if x.shape is not None else None
                if two is None or two.size != 1 or float(two.reshape(())) != 2.0:
                    return "Pow exponent is not 2"
                if axes is None or axes.size != 1 or (rank is None and int(axes[0]) != -1) or \
                        (rank is not None and int(axes[0]) % rank != rank - 1):
                    return "ReduceMean is not over the last axis"
                if keep is not None and keep.as_int() != 1:
                    return "ReduceMean drops the axis"
                return x, w, float(eps.reshape(()))
    return "not Mul(w, Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))"


def fuse_rms_norm(model: ir.Model) -> PassResult:
    graph, result = model.graph, PassResult("fuse_rms_norm")
    for node in list(graph):
        if node.op_type != "Mul" or node.domain != "" or _producer(node.inputs[0], "Mul") is None and \
                _producer(node.inputs[1], "Mul") is None:
            continue
        found = _norm_at(node)
        if isinstance(found, str):
            if "Reciprocal" not in found:                       # a near miss is worth a line; other Muls are not
                result.skipped.append(f"{node.name}: {found}")
            continue
        x, w, eps = found
        norm = ir.Node("", "RMSNormalization", [x, w], [ir.AttrInt64("axis", -1), ir.AttrFloat32("epsilon", eps),
                                                          ir.AttrInt64("stash_type", 1)])
        graph.insert_before(node, norm)
        norm.outputs[0].shape, norm.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_all_uses_with(node.outputs[0], norm.outputs[0], replace_graph_outputs=True)
        result.counts["rms_norm"] += 1
    return _finish(model, result)


def _half_angles(trig: ir.Value, op_type: str) -> ir.Value | None:
    """f if ``trig`` = Unsqueeze(op_type(Concat(f, f)), 1), else None."""
    unsq = _producer(trig, "Unsqueeze")
    fn = _producer(unsq.inputs[0], op_type) if unsq else None
    cat = _producer(fn.inputs[0], "Concat") if fn else None
    if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        return None
    axes = _const(unsq.inputs[1]) if len(unsq.inputs) > 1 else None
    return cat.inputs[0] if axes is not None and axes.size == 1 and int(axes[0]) == 1 else None


def _rotate_half_of(value: ir.Value) -> ir.Value | None:
    """x if ``value`` = Concat(Neg(Slice(x, d/2:)), Slice(x, :d/2)) on the last axis, else None."""
    cat = _producer(value, "Concat")
    if cat is None or len(cat.inputs) != 2 or cat.attributes.get("axis") is None:
        return None
    neg = _producer(cat.inputs[0], "Neg")
    hi, lo = (_producer(neg.inputs[0], "Slice") if neg else None), _producer(cat.inputs[1], "Slice")
    if hi is None or lo is None or hi.inputs[0] is not lo.inputs[0]:
        return None
    x = lo.inputs[0]
    d = x.shape[-1] if x.shape is not None else None
    if not isinstance(d, int) or cat.attributes["axis"].as_int() not in (-1, 3):
        return None
    bounds = [(_const(s.inputs[1]), _const(s.inputs[2]), _const(s.inputs[3]) if len(s.inputs) > 3 else None)
              for s in (lo, hi)]
    if any(v is None for b in bounds for v in b):
        return None
    (lo0, lo1, lo_ax), (hi0, hi1, hi_ax) = bounds
    last = all(int(a[0]) in (-1, 3) for a in (lo_ax, hi_ax))
    if last and int(lo0[0]) == 0 and int(lo1[0]) == d // 2 and int(hi0[0]) == d // 2 and int(hi1[0]) >= d:
        return x
    return None


def fuse_rotary(model: ir.Model) -> PassResult:
    graph, result = model.graph, PassResult("fuse_rotary")
    halves: dict[tuple[int, str], ir.Value] = {}
    for add in list(graph):
        if add.op_type != "Add" or add.domain != "":
            continue
        muls = [_producer(v, "Mul") for v in add.inputs]
        if any(m is None for m in muls):
            continue
        match = None
        for a, b in ((0, 1), (1, 0)):          # a: Mul(x, cos), b: Mul(rotate_half(x), sin)
            for ia in (0, 1):
                for ib in (0, 1):
                    x, f_cos = muls[a].inputs[ia], _half_angles(muls[a].inputs[1 - ia], "Cos")
                    rot, f_sin = _rotate_half_of(muls[b].inputs[ib]), _half_angles(muls[b].inputs[1 - ib], "Sin")
                    if f_cos is not None and f_cos is f_sin and rot is x and len(x.shape or ()) == 4:
                        match = (x, f_cos)
        if match is None:
            continue
        x, f = match
        trig = []
        for op in ("Cos", "Sin"):                 # one Cos(f) / Sin(f) shared by every layer
            key = (id(f), op)
            if key not in halves:
                node = ir.Node("", op, [f])
                graph.insert_after(f.producer(), node) if f.producer() is not None else graph.insert_before(add, node)
                halves[key] = node.outputs[0]
            trig.append(halves[key])
        rope = ir.Node("", "RotaryEmbedding", [x, *trig], [ir.AttrInt64("interleaved", 0)])
        graph.insert_before(add, rope)
        rope.outputs[0].shape, rope.outputs[0].type = add.outputs[0].shape, add.outputs[0].type
        ir.convenience.replace_all_uses_with(add.outputs[0], rope.outputs[0], replace_graph_outputs=True)
        result.counts["rotary"] += 1
    return _finish(model, result)


def _finish(model: ir.Model, result: PassResult) -> PassResult:
    result.modified = bool(result.counts)
    if result.modified:
        model.opset_imports[""] = max(model.opset_imports.get("", OPSET), OPSET)
        ir.passes.common.RemoveUnusedNodesPass()(model)
    return result
