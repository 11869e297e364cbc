"""ONNX pass (the dense kind; the solm and fixed kinds with low-bit weights): the residual add and the RMSNorm
after it as one node.

After ``fuse_norm_rope`` each layer's two residual joins read::

    s = Add(a, b)                      [B, T, D]   (the residual stream, read again by the next join)
    y = RMSNormalization(s, gamma)     [B, T, D]   axis -1, float32 statistics

onnxruntime's contrib ``SkipSimplifiedLayerNormalization(a, b, gamma)`` computes both: output 0 is y, output 3 is s
(what onnxruntime-genai's int4 model ships). The same sum s bit for bit and y up to a few ulps (the contrib kernel
sums the squares in its own order: 9 ulps at most over [1, 4, 576] normals), one dispatched node instead of two
(60 of a SmolLM2 step's nodes). An Add whose operands are not two tensors of the norm's shape, or a
norm with another axis or statistics type, is left as it is.
"""

from __future__ import annotations

from onnxscript import ir

from solm_compile.passes.base import PassResult

MS = "com.microsoft"


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _same_shape(a: ir.Value, b: ir.Value, out: ir.Value) -> bool:
    """Both operands rank 3 and, where the shapes are known, the output's shape (no broadcast to undo)."""
    shapes = [v.shape for v in (a, b, out)]
    if any(s is None or len(s) != 3 for s in shapes):
        return False
    return all(str(x) == str(y) for s in shapes[:2] for x, y in zip(s, shapes[2]))


def fuse_skip_norm(model: ir.Model) -> PassResult:
    graph, result = model.graph, PassResult("fuse_skip_norm")
    for norm in list(graph):
        if norm.op_type != "RMSNormalization" or norm.domain != "":
            continue
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or add.domain != "" or len(norm.inputs) != 2:
            continue
        if _attr(norm, "axis", -1) != -1 or _attr(norm, "stash_type", 1) != 1:
            result.skipped.append(f"{norm.name}: axis or stash_type not (-1, float32)")
            continue
        a, b = add.inputs
        if not _same_shape(a, b, add.outputs[0]):
            result.skipped.append(f"{add.name}: operands are not two [B, T, D] tensors")
            continue
        eps = ir.AttrFloat32("epsilon", float(_attr(norm, "epsilon", 1e-5)))
        fused = ir.Node(MS, "SkipSimplifiedLayerNormalization", [a, b, norm.inputs[1]], [eps], num_outputs=4)
        y, _, _, s = fused.outputs
        for new, old in ((y, norm.outputs[0]), (s, add.outputs[0])):
            new.type, new.shape = ir.TensorType(ir.DataType.FLOAT), old.shape
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        graph.insert_before(add, fused)
        graph.remove([norm, add], safe=True)
        result.counts["skip_simplified_layer_norm"] += 1
    if result.counts:
        model.opset_imports.setdefault(MS, 1)
        result.modified = True
    return result
