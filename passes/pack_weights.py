"""ONNX pass: store each weight the ``WeightTable`` knows as its low-bit blocks, read by onnxruntime's own kernels.

Runs on the exported ``ir.Model`` of every artifact kind (``artifact.write_artifact``), after ``--weights`` put the
low-bit values into the torch model (``quant/weights.py``). A weight is found by value: the float32 initializer
[K, N] of ``MatMul(x, W)`` (or [V, D] of the embedding's ``Gather``) whose transpose the table holds.

    MatMul(x, W)       ->  MatMulNBits(x, codes, scale, zero_point)                  w = d·(q − z), z integer
                       ->  MatMulNBits(x, codes, scale, 0) + MatMul(blocksum(x), m)  w = d·q + m  (GGUF Q4_1)
    Gather(W, ids)     ->  GatherBlockQuantized(codes, ids, scale, zero_point)       8 or 4 bits, integer z
    GatherND(W, ids)   ->  GatherBlockQuantized(codes, Squeeze(ids, -1), ...)        ids [..., 1], batch_dims 0

The Q4_1 form is lossless: Σ_k x_k (d q_k + m) = d Σ_k x_k q_k + m Σ_k x_k per block, and the block sums of x are
computed once per input and shared by the layers reading it (q, k, v; gate, up). ``accuracy_level`` 4 lets the
CPU kernel quantize activations to int8 per block, as llama.cpp's Q4/Q8 dot products do; 0 keeps them float32.
A ``SparseMLP`` (the ai.solm kinds' MLP) whose weights the table knows becomes ``SparseMLPBlocks`` on the same
blocks (``pack_mlp.py``), run by SolmEP, with the same trade: activations "int8" under accuracy_level 4 (the
default), "fp32" (exact) otherwise; ``mlp_activations`` overrides it; ``mlp_skip`` / ``mlp_down_bits`` are
pack_mlp's ``skip`` / ``down_bits`` (what ρ keeps; "h" stores down transposed). Weights the table does not know (norms) stay float32.
"""

from __future__ import annotations

import numpy as np
from onnxscript import ir

from solm_compile.passes.base import PassResult
from solm_compile.passes.pack_mlp import pack_mlp
from solm_compile.quant.blocks import BlockQuant
from solm_compile.quant.weights import WeightTable

MS = "com.microsoft"


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[N, nb, block] codes -> [N, nb, block·bits/8] bytes, two 4-bit codes per byte (even one low)."""
    if bits == 8:
        return codes
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _pack_zero_point(zp: np.ndarray, bits: int) -> np.ndarray:
    """[N, nb] -> MatMulNBits' zero points: [N, nb] for 8 bits, [N, ceil(nb/2)] nibbles for 4 bits."""
    if bits == 8:
        return zp
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)


class _Builder:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.block_sums: dict[tuple[int, int], ir.Value] = {}
        self.tables: dict[int, list[ir.Value]] = {}          # id(BlockQuant) -> its packed Gather operands

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        self.graph.register_initializer(value)
        return value

    def node(self, at: ir.Node, op_type: str, inputs, domain: str = "", **attrs) -> ir.Value:
        attributes = [ir.AttrInt64(k, v) if isinstance(v, int) else ir.AttrInt64s(k, v) for k, v in attrs.items()]
        node = ir.Node(domain, op_type, inputs, attributes)
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)    # every value this pass makes is float32
        self.graph.insert_before(at, node)
        return node.outputs[0]

    def block_sum(self, at: ir.Node, x: ir.Value, nb: int, block: int) -> ir.Value:
        """Σ over each block of ``x``'s last axis: [..., K] -> [..., K/block] (once per input value)."""
        key = (id(x), block)
        if key not in self.block_sums:
            producer = x.producer()
            where = at if producer is None else _next(self.graph, producer)
            rank = len(x.shape) if x.shape is not None else 3
            shape = self.const(f"{x.name}.blocks{block}.shape", np.array([0] * (rank - 1) + [nb, block], np.int64))
            axes = self.const(f"{x.name}.blocks{block}.axes", np.array([-1], np.int64))
            split = self.node(where, "Reshape", [x, shape])
            self.block_sums[key] = self.node(where, "ReduceSum", [split, axes], keepdims=0)
        return self.block_sums[key]


def _next(graph: ir.Graph, node: ir.Node) -> ir.Node:
    nodes = list(graph)
    return nodes[nodes.index(node) + 1]


def _matmul(b: _Builder, node: ir.Node, bq: BlockQuant, accuracy_level: int) -> ir.Value:
    x, w = node.inputs
    n, k = bq.shape
    nb = k // bq.block
    name = w.name
    codes = b.const(f"{name}.q{bq.bits}", _pack(bq.codes, bq.bits))
    scale = b.const(f"{name}.scale", bq.scale)
    zp = bq.zero_point if bq.zero_point is not None else np.zeros_like(bq.codes[..., 0])
    zero = b.const(f"{name}.zero_point", _pack_zero_point(zp, bq.bits))
    y = b.node(node, "MatMulNBits", [x, codes, scale, zero], MS, K=k, N=n, bits=bq.bits, block_size=bq.block,
               accuracy_level=accuracy_level)
    if bq.zero_point is None:                               # w = d·q + m: add m · blocksum(x)
        offset = b.const(f"{name}.offset", bq.offset.T)     # [nb, N]
        y = b.node(node, "Add", [y, b.node(node, "MatMul", [b.block_sum(node, x, nb, bq.block), offset])])
    return y


def _gather(b: _Builder, node: ir.Node, bq: BlockQuant) -> ir.Value:
    """Gather(W, ids), or GatherND(W, ids[..., 1]) (the policy's own embedding lookup) = Gather(W, ids[..., 0])."""
    w, ids = node.inputs
    if id(bq) not in b.tables:                              # one packed copy per table, however many lookups
        v, dim = bq.shape                                   # 4 bits: two codes and two zero points per byte
        b.tables[id(bq)] = [b.const(f"{w.name}.q{bq.bits}", _pack(bq.codes, bq.bits).reshape(v, dim * bq.bits // 8)),
                            b.const(f"{w.name}.scale", bq.scale),
                            b.const(f"{w.name}.zero_point", _pack_zero_point(bq.zero_point, bq.bits))]
    codes, scale, zero = b.tables[id(bq)]
    if node.op_type == "GatherND":
        ids = b.node(node, "Squeeze", [ids, b.const(f"{node.name}.axes", np.array([-1], np.int64))])
        ids.type = ir.TensorType(ir.DataType.INT64)
    return b.node(node, "GatherBlockQuantized", [codes, ids, scale, zero], MS, gather_axis=0, quantize_axis=1,
                  block_size=bq.block, bits=bq.bits)


def _lookup(node: ir.Node) -> bool:
    """A row lookup in a 2-D table: Gather on axis 0, or GatherND with batch_dims 0 and index tuples of length 1."""
    attrs = node.attributes
    if node.op_type == "Gather":
        return attrs.get("axis", ir.AttrInt64("axis", 0)).as_int() == 0
    ids = node.inputs[1]
    return (attrs.get("batch_dims", ir.AttrInt64("batch_dims", 0)).as_int() == 0 and ids is not None
            and ids.shape is not None and len(ids.shape) >= 1 and ids.shape[-1] == 1)


def _weight(value: ir.Value | None) -> np.ndarray | None:
    """The float32 2-D constant ``value`` holds: an initializer, or Transpose(perm=[1, 0]) of one (a tied LM head
    reads the embedding that way)."""
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        perm = producer.attributes.get("perm")
        inner = _weight(producer.inputs[0])
        return inner.T if inner is not None and perm is not None and list(perm.as_ints()) == [1, 0] else None
    if value is None or value.const_value is None or len(value.shape or ()) != 2:
        return None
    if value.const_value.dtype != ir.DataType.FLOAT:
        return None
    return value.const_value.numpy()


def pack_weights(model: ir.Model, table: WeightTable, accuracy_level: int = 4,
                 mlp_activations: str | None = None, mlp_down_bits: int = 8) -> PassResult:
    result = PassResult("pack_weights")
    if not table.by_key:
        return result
    graph, b = model.graph, _Builder(model.graph)
    acts = mlp_activations or ("int8" if accuracy_level >= 4 else "fp32")
    pack_mlp(model, table, result, _pack, b.const, activations=acts, down_bits=mlp_down_bits)
    for node in list(graph):
        if node.domain != "" or node.op_type not in ("MatMul", "Gather", "GatherND"):
            continue
        matmul = node.op_type == "MatMul"
        w = _weight(node.inputs[1] if matmul else node.inputs[0])
        if w is None or (not matmul and not _lookup(node)):
            continue
        bq = table.find(w.T if matmul else w)
        if bq is None:
            continue
        if not matmul and bq.zero_point is None:
            result.skipped.append(f"{node.name}: the embedding's {bq.fmt} blocks have no integer zero point")
            continue
        y = _matmul(b, node, bq, accuracy_level) if matmul else _gather(b, node, bq)
        old = node.outputs[0]
        y.shape = old.shape
        name, was_output = old.name, old.is_graph_output()
        ir.convenience.replace_all_uses_with(old, y, replace_graph_outputs=True)
        if was_output:                                     # keep the graph's output name (e.g. logits)
            old.name = f"{name}.float32"
            y.name = name
        graph.remove(node, safe=True)
        result.counts[f"{'matmul' if matmul else 'gather'}_{bq.fmt}"] += 1
    for node in [n for n in graph if n.op_type == "Transpose" and not any(o.uses() or o.is_graph_output()
                                                                          for o in n.outputs)]:
        graph.remove(node, safe=True)                      # a tied head's Transpose(embedding), now unread
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
        graph.initializers.pop(name)
    if result.counts:
        model.opset_imports.setdefault(MS, 1)
        result.modified = True
    return result
