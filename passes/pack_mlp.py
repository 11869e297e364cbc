"""ONNX pass: a ``SparseMLP`` whose weights the ``WeightTable`` knows becomes ``SparseMLPBlocks`` on their blocks.

Called by ``pack_weights`` (every artifact kind; only the ``ai.solm`` kinds have SparseMLP nodes: the portable
kind's MLP is MatMuls, which ``pack_weights`` itself stores as MatMulNBits). SparseMLP's w_gate/w_up/w_down are
float32 initializers [N, K] in nn.Linear layout, found by value as they are (no transpose):

    SparseMLP(x, Wg, bg, Wu, bu, Wd, bd, rho, bits)
        -> SparseMLPBlocks(x, codes_g, scale_g, offset_g, bg, codes_u, ..., codes_d, scale_d, offset_d, bd, rho, bits)

codes [N, K/32, 32·bits/8] uint8 (4 bits: two per byte, the even input low, as MatMulNBits), scale and offset
[N, K/32] float32: w = scale·code + offset, exactly the blocks the table holds. ``activations`` ("int8" from ``pack_weights`` by
default, the trade MatMulNBits' accuracy_level 4 makes for the other layers; "fp32": exact) is written on the node. A node is left float32 (and said
why in ``skipped``) unless every one of its weights has blocks of 32.

``skip`` (registry.MLP_SKIPS): the SparseMLP node's own attribute (absent: "x"; passes/gate_mlp.py writes
GateConfig.mlp_skip there, the one source), copied to the new node: "x" as above; "h" (issue 17: ρ keeps units of h) stores down
transposed, the blocks of W_downᵀ [I, D] re-quantised round-to-nearest at ``down_bits`` (8 by default, or 4) from
the dequantised source (``quant.blocks.requantize_transposed``: new rounding error, counted as ``mlp_downT_*``),
and keeps the source blocks of down as ``*_down_dense`` too (lossless; SparseMLPBlocks runs them for tokens at ρ ≥ 1,
so the dense budget reads the source's bytes, not downT's; counted as ``mlp_down_dense_*``).
"""

from __future__ import annotations

from onnxscript import ir

from solm_compile.ops import registry
from solm_compile.passes.base import PassResult
from solm_compile.quant.blocks import requantize_transposed
from solm_compile.quant.weights import WeightTable


def _find(value: ir.Value | None, table: WeightTable):
    if value is None or value.const_value is None or value.const_value.dtype != ir.DataType.FLOAT:
        return None
    if len(value.shape or ()) != 2:
        return None
    return table.find(value.const_value.numpy())


def pack_mlp(model: ir.Model, table: WeightTable, result: PassResult, pack, const,
             activations: str = "int8", down_bits: int = 8) -> None:
    """Rewrite every SparseMLP of ``model.graph`` whose weights ``table`` knows. ``pack``: codes -> packed bytes;
    ``const(name, array)``: a new initializer value (both from pack_weights); ``activations``: the node attribute
    (registry.BLOCK_ACTIVATIONS); a node's ``skip`` "h" has down re-quantised transposed at ``down_bits``."""
    if activations not in registry.BLOCK_ACTIVATIONS:
        raise ValueError(f"pack_mlp: activations must be one of {registry.BLOCK_ACTIVATIONS}, got {activations!r}")
    graph = model.graph
    sig = registry.SPARSE_MLP_BLOCKS
    for node in list(graph):
        if node.domain != registry.DOMAIN or node.op_type != registry.SPARSE_MLP.onnx_name:
            continue
        skip = node.attributes["skip"].as_string() if "skip" in node.attributes else "x"
        if skip not in registry.MLP_SKIPS:
            raise ValueError(f"pack_mlp: {node.name}: skip must be one of {registry.MLP_SKIPS}, got {skip!r}")
        ins = list(node.inputs) + [None] * (9 - len(node.inputs))
        x, wg, bg, wu, bu, wd, bd, rho, bits = ins
        parts = {"gate": wg, "up": wu, "down": wd}
        found = {p: _find(v, table) for p, v in parts.items() if v is not None}
        missing = [p for p, bq in found.items() if bq is None or bq.block != 32]
        if missing:
            result.skipped.append(f"{node.name}: SparseMLP {', '.join(missing)} without blocks of 32: left float32")
            continue
        operands, attrs = [x], [ir.AttrString("act", node.attributes["act"].as_string()
                                              if "act" in node.attributes else "silu"),
                                ir.AttrInt64("block_size", 32), ir.AttrString("activations", activations),
                                ir.AttrString("skip", skip)]
        for p, bias in (("gate", bg), ("up", bu), ("down", bd)):
            bq = found.get(p)
            if bq is None:
                operands += [None, None, None, bias]
                continue
            name = parts[p].name
            if p == "down" and skip == "h":
                bq = requantize_transposed(bq, down_bits)
                name = f"{name}.T"
                result.counts[f"mlp_downT_{bq.fmt}"] += 1
            else:
                result.counts[f"mlp_{p}_{bq.fmt}"] += 1
            operands += [const(f"{name}.codes{bq.bits}", pack(bq.codes, bq.bits)), const(f"{name}.scale", bq.scale),
                         const(f"{name}.offset", bq.offset), bias]
            attrs.append(ir.AttrInt64(f"bits_{p}", bq.bits))
        operands += [rho, bits]
        if skip == "h":   # down in its source layout too, for tokens at ρ ≥ 1 (lossless: the table's blocks)
            bq = found["down"]
            operands += [const(f"{parts['down'].name}.codes{bq.bits}", pack(bq.codes, bq.bits)),
                         const(f"{parts['down'].name}.scale", bq.scale), const(f"{parts['down'].name}.offset", bq.offset)]
            attrs.append(ir.AttrInt64("bits_down_dense", bq.bits))
            result.counts[f"mlp_down_dense_{bq.fmt}"] += 1
        while operands and operands[-1] is None:
            operands.pop()
        new = ir.Node(registry.DOMAIN, sig.onnx_name, operands, attrs, name=f"{node.name}.blocks")
        y = new.outputs[0]
        old = node.outputs[0]
        y.type, y.shape = old.type, old.shape
        graph.insert_before(node, new)
        name = old.name
        ir.convenience.replace_all_uses_with(old, y, replace_graph_outputs=True)
        old.name = f"{name}.float32"
        graph.remove(node, safe=True)
        y.name = name
        result.counts["sparse_mlp_blocks"] += 1
