"""The interface of each ``solm`` custom op, written once: names, the ONNX domain, inputs, outputs, attributes.

Everything else reads it or is checked against it:

- ``torch_ops.OPS`` pairs each entry with its torch op and reference (``tests/test_ops.py`` checks the torch
  schema's argument names, optional tensors and output count against the entry);
- ``to_onnx`` builds its local ``ai.solm`` ONNX schemas from the entries (the export form, see below);
- ``passes/carry_page_state.py`` takes the domain and QuestAttention's full input/output counts from here;
- SolmEP's C++ op table (``runtime/ep/op_table.h``) is the one thing this module cannot generate: the built library
  reports it (``runtime.ep.registered_ops()``) and ``tests/test_ops.py`` asserts it equals ``ep_view`` of every
  entry, so the two cannot drift silently.

Two forms of an op. The *export* form is what ``torch.onnx.export`` writes (one node per torch op call): inputs and
outputs with ``state=False``, attributes with ``export=True``. The *artifact* form is what SolmEP runs: all of
them. QuestAttention's page state (``past_page_min/max`` in, ``present_page_min/max`` out) is added after export by
``passes/carry_page_state.py``, and its KV cache buffer (``past_key``, ``past_value``, ``past_length`` in,
``present_key``, ``present_value`` out) by ``passes/kv_buffer.py``; ``is_causal`` is a torch argument the exporter
refuses to translate (``True``) or drops (``False``), which SolmEP still reads; ``select_per_kv_head`` is set by a pass or a provider option. Every
attribute is optional to SolmEP (each has a default there); the export schemas declare the exported ones required,
since the translation always writes them.

Stdlib only: passes and the runtime import it without pulling in torch or onnx.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "ai.solm"
VERSION = 1
TORCH_NAMESPACE = "solm"

FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)")
INT_TYPES = ("tensor(int64)", "tensor(int32)")
ATTR_KINDS = ("int", "float", "string")


@dataclass(frozen=True)
class Param:
    """One input or output, by position. ``type_var`` names one of the op's ``types``."""
    name: str
    type_var: str
    optional: bool = False
    state: bool = False        # artifact form only (added after export by passes/carry_page_state.py)


@dataclass(frozen=True)
class Attr:
    name: str
    kind: str                  # one of ATTR_KINDS
    torch: bool = True         # an argument of the torch op
    export: bool = True        # written by the ONNX translation (to_onnx.CUSTOM)


@dataclass(frozen=True)
class OpSig:
    name: str                  # torch: torch.ops.<TORCH_NAMESPACE>.<name>
    onnx_name: str             # ONNX: <DOMAIN>::<onnx_name>, version VERSION
    inputs: tuple[Param, ...]
    outputs: tuple[Param, ...]
    attributes: tuple[Attr, ...]
    types: tuple[tuple[str, tuple[str, ...]], ...]   # (type var, allowed ONNX types), the schema's constraints
    from_pass: bool = False    # made by an ONNX pass on the artifact, never by export (it still has every part)

    @property
    def torch_qualname(self) -> str:
        return f"{TORCH_NAMESPACE}::{self.name}"

    def export_inputs(self) -> tuple[Param, ...]:
        return tuple(p for p in self.inputs if not p.state)

    def export_outputs(self) -> tuple[Param, ...]:
        return tuple(p for p in self.outputs if not p.state)

    def export_attributes(self) -> tuple[Attr, ...]:
        return tuple(a for a in self.attributes if a.export)

    def torch_attributes(self) -> tuple[Attr, ...]:
        return tuple(a for a in self.attributes if a.torch)


GATE_CONTROLS = OpSig(
    "gate_controls", "GateControls",
    inputs=(Param("input_ids", "I"), Param("past_key", "T"), Param("kappa", "C"), Param("rho", "C"),
            Param("bits", "C"), Param("past_length", "I", optional=True, state=True)),
    outputs=(Param("kappa_e", "C"), Param("rho_e", "C"), Param("bits_e", "C")),
    attributes=(Attr("min_len", "int"),),
    types=(("I", INT_TYPES), ("T", FLOAT_TYPES), ("C", FLOAT_TYPES)))

# The KV cache buffer form (issue 16; passes/kv_buffer.py, reference.quest_attention_cache_ref): with past_key,
# past_value [B, Hkv, C, d] (float16 or float32, C the capacity) and past_length [B] (int64, every row equal for now)
# given, k and v are the T new rows only: they are written at [past_length, past_length + T) of present_key /
# present_value (same shape and type; meant to be the same buffers as past_key / past_value, bound so by the
# caller: then written in place, otherwise the valid past rows are copied first), and the op attends over the
# L = past_length + T valid rows. attn_mask is then [.., T, L]. Without them (export, portable): k/v are all L keys.
# The page state (P) is float32, or float16 over a float16 cache (step protocol 3: a min/max of fp16 keys is exact).
QUEST_ATTENTION = OpSig(
    "quest_attention", "QuestAttention",
    inputs=(Param("q", "T"), Param("k", "T"), Param("v", "T"), Param("attn_mask", "M", optional=True),
            Param("kappa", "C"),
            Param("past_page_min", "P", optional=True, state=True),
            Param("past_page_max", "P", optional=True, state=True),
            Param("past_key", "K", optional=True, state=True),
            Param("past_value", "K", optional=True, state=True),
            Param("past_length", "I", optional=True, state=True)),
    outputs=(Param("out", "T"),
             Param("present_page_min", "P", optional=True, state=True),
             Param("present_page_max", "P", optional=True, state=True),
             Param("present_key", "K", optional=True, state=True),
             Param("present_value", "K", optional=True, state=True)),
    attributes=(Attr("scale", "float"), Attr("is_causal", "int", export=False), Attr("page_size", "int"),
                Attr("sinks", "int"), Attr("window", "int"),
                Attr("select_per_kv_head", "int", torch=False, export=False)),
    types=(("T", FLOAT_TYPES), ("M", ("tensor(bool)",) + FLOAT_TYPES), ("C", FLOAT_TYPES),
           ("K", ("tensor(float)", "tensor(float16)")), ("P", ("tensor(float)", "tensor(float16)")),
           ("I", ("tensor(int64)",))))

# QuestAttention with the head layout and the rotary embedding inside (issue 17; made by passes/fuse_rope_attention.py
# on the SolmEP kinds, never by export): qkv [B, T, (H + 2·Hkv)·d] is the q, k and v projections side by side
# (fuse_qkv's one projection), cos/sin [B|1, T, d/2] are ONNX RotaryEmbedding's tables (the values the graph's shared
# Cos/Sin compute from the positions). Per token and head q and k are rotated as RotaryEmbedding does (interleaved 0:
# the halves x[i], x[i + d/2]; 1: the pairs x[2i], x[2i + 1]; y1 = x1·cos − x2·sin, y2 = x2·cos + x1·sin), then
# QuestAttention runs unchanged, and out is [B, T, H·d] (the heads back beside each other: the o projection's input).
# Inputs 3.. and every output sit where QuestAttention has them. The torch op (export form) attends over the T
# tokens only; SolmEP runs the buffer form (past_key/past_value/past_length given), which the pass always writes.
QUEST_ATTENTION_ROPE = OpSig(
    "quest_attention_rope", "QuestAttentionRope",
    inputs=(Param("qkv", "T"), Param("cos", "T"), Param("sin", "T")) + QUEST_ATTENTION.inputs[3:],
    outputs=QUEST_ATTENTION.outputs,
    attributes=(Attr("scale", "float"), Attr("page_size", "int"), Attr("sinks", "int"), Attr("window", "int"),
                Attr("num_heads", "int"), Attr("kv_num_heads", "int"), Attr("interleaved", "int"),
                Attr("select_per_kv_head", "int", torch=False, export=False)),
    types=QUEST_ATTENTION.types,
    from_pass=True)

# ``skip`` (issue 17; MLP_SKIPS below): what ρ keeps. "x": the ⌈ρ·D⌉ input channels of largest |x| (SOL). "h": gate
# and up on all of x, h = act(gate)⊙up, the ⌈ρ·I⌉ units of largest |h| (ties at the threshold kept) feed down
# (``reference.sparse_mlp_ref``). SolmEP's fp32 SparseMLP kernel and SparseMLPBlocks run both (fp32: the dropped
# units are zeroed and down, stored one contiguous row per unit, reads only the kept units' rows).
SPARSE_MLP = OpSig(
    "sparse_mlp", "SparseMLP",
    inputs=(Param("x", "T"), Param("w_gate", "T", optional=True), Param("b_gate", "T", optional=True),
            Param("w_up", "T"), Param("b_up", "T", optional=True), Param("w_down", "T"),
            Param("b_down", "T", optional=True), Param("rho", "C"), Param("bits", "C")),
    outputs=(Param("y", "T"),),
    attributes=(Attr("act", "string"), Attr("skip", "string")),
    types=(("T", FLOAT_TYPES), ("C", FLOAT_TYPES)))

# SparseMLP on low-bit block weights (issue 16): each matrix W [N, K] (nn.Linear layout) as codes
# [N, K/block, block·bits/8] uint8 (4 bits: two codes per byte, the even input in the low nibble, as MatMulNBits),
# scale and offset [N, K/block] float32, meaning w = scale·code + offset (quant/blocks.py's BlockQuant). The same
# semantics as SparseMLP on the dequantised weights. Made by passes/pack_mlp.py from a SparseMLP whose weights the
# WeightTable knows (never by export: the portable kind's MLP is MatMuls that pack_weights packs itself).
# ``activations``: "fp32" (the default: the dot products in fp32, exact up to rounding) or "int8" (x and h quantised
# per block of 32 to int8, d = max|x|/127, round half to even, integer dot products with the codes, the offset term
# on the quantised block sums d·Σq, i.e. y = W·x̂ with x̂ = d·q: llama.cpp's Q4_1 x Q8_1;
# ``reference.quantize_blocks_ref``).
# ``skip`` (issue 17): what ρ keeps. "x" (the default): the top-k input channels of gate/up, as SparseMLP. "h": gate
# and up run on all of x, h = act(gate)⊙up, and the k units of largest |h| (k = ⌈ρ·I⌉, ties at the threshold kept:
# ``reference.topk_channels_ref`` on h) feed down; down is then stored TRANSPOSED, codes_down [I, D/32, 32·bits/8]
# and scale/offset_down [I, D/32] (the blocks of W_downᵀ: a unit's row of D weights is contiguous, so a skipped
# unit costs no byte), and y = Σ_kept h_j·downT[j, :]. With activations "int8" only gate/up take int8 x; h stays
# fp32 (downT's scales vary along the summed axis j, so there is no integer dot product to make).
# ``codes/scale/offset_down_dense`` (optional, skip "h" only; ``bits_down_dense``): down ALSO in its source layout
# [D, I/32, ..] (nn.Linear, the blocks the weight table holds, lossless). A token whose ρ ≥ 1 (every unit kept) then
# runs y = down(h) on these, as skip "x" does (int8: h quantised per block of 32), instead of downT: the dense budget
# reads the source's bytes (half of downT's 8-bit ones) at the int8 dot product's speed. With activations "int8" and
# a 4-bit copy (``bits_down_dense`` 4) every row does, on h masked to its kept units (the source's int8 dot product,
# lossless, reading only the kept units' codes: SolmEP regroups the copy unit-major), and downT goes unused.
BLOCK_ACTIVATIONS = ("fp32", "int8")
MLP_SKIPS = ("x", "h")
MLP_SKIP_DEFAULT = "x"       # the shipped policies were trained with ρ on x (solm-compile --mlp-skip, SolmConfig)
SPARSE_MLP_BLOCKS = OpSig(
    "sparse_mlp_blocks", "SparseMLPBlocks",
    inputs=(Param("x", "T"),
            Param("codes_gate", "Q", optional=True), Param("scale_gate", "T", optional=True),
            Param("offset_gate", "T", optional=True), Param("b_gate", "T", optional=True),
            Param("codes_up", "Q"), Param("scale_up", "T"), Param("offset_up", "T"), Param("b_up", "T", optional=True),
            Param("codes_down", "Q"), Param("scale_down", "T"), Param("offset_down", "T"),
            Param("b_down", "T", optional=True), Param("rho", "C"), Param("bits", "C"),
            Param("codes_down_dense", "Q", optional=True), Param("scale_down_dense", "T", optional=True),
            Param("offset_down_dense", "T", optional=True)),
    outputs=(Param("y", "T"),),
    attributes=(Attr("act", "string"), Attr("bits_gate", "int"), Attr("bits_up", "int"), Attr("bits_down", "int"),
                Attr("block_size", "int"), Attr("activations", "string"), Attr("skip", "string"),
                Attr("bits_down_dense", "int")),
    types=(("T", ("tensor(float)",)), ("Q", ("tensor(uint8)",)), ("C", ("tensor(float)",))),
    from_pass=True)

# One dense projection on low-bit blocks (issue 17): y = x·Wᵀ (+ bias), W [N, K] given as SparseMLPBlocks' operands
# (codes [N, K/32, 32·bits/8] uint8, 4 bits two a byte even input low; scale, offset [N, K/32]: w = scale·code +
# offset). ``activations`` as SparseMLPBlocks': "fp32" or "int8" (x per block of 32, ``reference.
# linear_blocks_int8_ref``). Made by passes/fuse_linear_blocks.py from a MatMulNBits (+ Q4_1's offset MatMul and
# Add) in the ai.solm kinds, never by export; SolmEP runs it on the MLP's gate/up row kernels.
LINEAR_BLOCKS = OpSig(
    "linear_blocks", "LinearBlocks",
    inputs=(Param("x", "T"), Param("codes", "Q"), Param("scale", "T"), Param("offset", "T"),
            Param("bias", "T", optional=True)),
    outputs=(Param("y", "T"),),
    attributes=(Attr("bits", "int"), Attr("block_size", "int"), Attr("activations", "string")),
    types=(("T", ("tensor(float)",)), ("Q", ("tensor(uint8)",))),
    from_pass=True)

OPS = (GATE_CONTROLS, QUEST_ATTENTION, SPARSE_MLP, SPARSE_MLP_BLOCKS, QUEST_ATTENTION_ROPE, LINEAR_BLOCKS)
BY_NAME = {op.name: op for op in OPS}
BY_ONNX_NAME = {op.onnx_name: op for op in OPS}


def ep_view(op: OpSig) -> dict:
    """What SolmEP must report for ``op`` (``runtime.ep.registered_ops()``): the artifact form's counts, which
    positions are optional, and the attribute names, in the C++ table's terms."""
    return {
        "op_type": op.onnx_name,
        "domain": DOMAIN,
        "since_version": VERSION,
        "inputs": len(op.inputs),
        "optional_inputs": [i for i, p in enumerate(op.inputs) if p.optional],
        "outputs": len(op.outputs),
        "optional_outputs": [i for i, p in enumerate(op.outputs) if p.optional],
        "attributes": sorted(a.name for a in op.attributes),
    }


def _check(ops: tuple[OpSig, ...]) -> None:
    """Import-time sanity: unique names, known kinds and type vars, state params optional and last."""
    assert len({o.name for o in ops}) == len(ops) and len({o.onnx_name for o in ops}) == len(ops)
    for o in ops:
        vars_ = {v for v, _ in o.types}
        for params in (o.inputs, o.outputs):
            assert all(p.type_var in vars_ for p in params), o.name
            flags = [p.state for p in params]
            assert flags == sorted(flags), f"{o.name}: state params come after the exported ones"
            assert all(p.optional for p in params if p.state), o.name
        assert all(a.kind in ATTR_KINDS for a in o.attributes), o.name
        names = [p.name for p in o.inputs + o.outputs] + [a.name for a in o.attributes]
        assert len(set(names)) == len(names), o.name


_check(OPS)
