"""Write the ``.solm.onnx`` artifact: the gated decode step with the policy inside, plus metadata and tokenizer.

Three kinds, one exporter:

- ``solm`` (default): sparse ops are ``ai.solm`` nodes (SolmEP runs them and skips the work);
- ``portable``: the same semantics in standard ONNX ops (masks), runs on stock onnxruntime;
- ``dense``: the original model, ungated — the baseline benchmarks compare against;
- ``fixed``: the gated graph with ``ai.solm`` ops and *no policy*: the controls ``attn_keep``, ``mlp_keep``,
  ``bits`` [B] are graph inputs (gated by ``GateControls`` as usual). For kernel measurements (``solm bench``)
  and external controllers.

The ``ai.solm`` kinds keep their KV cache in pre-allocated buffers that QuestAttention appends to in place
(``passes/kv_buffer.py``: fp16 by default, ``kv="fp32"`` the exact reference; ``solm.kv_cache`` in the metadata;
``runtime/session.py`` drives it). They also keep each layer's Quest page state like the KV cache
(``passes/carry_page_state.py``, then ``kv_buffer``): buffers ``past_page_min_i``/``past_page_max_i``
[B, Hkv, C/page_size, d] bound in place as ``present_page_min_i``/``present_page_max_i``, right after the KV
cache's inputs and outputs; with ``past_length`` per row this is step protocol 2 (docs/protocol.md: rows of different
lengths in one run). ``per_kv_head=True`` picks
SolmEP's per-KV-head page selection (coarser than the reference's per query head; recorded as
``solm.select_per_kv_head``).

The file is written atomically and is byte-identical when compiled twice from the same inputs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch.export import Dim

from solm_compile import __version__
from solm_compile.artifact.protocol import BUFFER_PROTOCOL, PROTOCOL
from solm_compile.artifact.step import ArtifactStep, initial_policy_state
from solm_compile.policy.checkpoint import check_mlp_skip
from solm_compile.policy.step import STATE_NAMES, PolicyStep, episode_length
from solm_compile.errors import UserError
from solm_compile.io import atomic_write_bytes
from solm_compile.frontend.gated import GatedLM
from solm_compile.analysis.inspect import shapes_from_gated

log = logging.getLogger(__name__)

KINDS = ("solm", "portable", "dense", "fixed")


class DenseStep(torch.nn.Module):
    """The ungated decode step with the artifact's names: (logits, presents...)."""

    def __init__(self, original: torch.fx.GraphModule):
        super().__init__()
        self.lm = original

    def forward(self, input_ids, position_ids, past):
        out = self.lm(input_ids, position_ids, *past)
        return (out[0], *out[2:])


class FixedStep(torch.nn.Module):
    """The gated decode step with the controls as inputs and the artifact's names: (logits, presents...)."""

    def __init__(self, gated: torch.fx.GraphModule):
        super().__init__()
        self.lm = gated

    def forward(self, input_ids, position_ids, past, attn_keep, mlp_keep, bits):
        out = self.lm(input_ids, position_ids, *past, attn_keep, mlp_keep, bits)
        return (out[0], *out[2:])


def _kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def _example(lm: GatedLM, policy, batch: int = 2, T: int = 3, past: int = 9, t: int = 2, kind: str = "solm"):
    ids = torch.randint(0, lm.info.vocab_size, (batch, T))
    pos = torch.arange(past, past + T).expand(batch, T).contiguous()
    kv = tuple(torch.randn(batch, lm.kv_heads, past, lm.head_dim) for _ in range(2 * lm.info.num_layers))
    if kind == "fixed":
        return (ids, pos, kv, torch.rand(batch), torch.rand(batch), torch.full((batch,), 8.0))
    if policy is None:
        return (ids, pos, kv)
    state = list(initial_policy_state(policy, batch, torch.randn(batch, lm.info.hidden_size)))
    state[0], state[1] = torch.randn_like(state[0]), torch.randn_like(state[1])      # [B, H, T_ep, hd]
    state[5] = torch.full((batch,), t, dtype=torch.long)
    return (ids, pos, kv, *state, torch.rand(batch, 3))


def _dynamic_shapes(args, policy):
    tok, kv = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, {0: Dim.DYNAMIC, 2: Dim.DYNAMIC}
    shapes = [tok, tok, tuple(kv for _ in args[2])]
    if policy is None and len(args) == 6:           # kind "fixed": attn_keep, mlp_keep, bits [B]
        shapes += [{0: Dim.DYNAMIC}] * 3
    if policy is not None:
        row = {0: Dim.DYNAMIC}
        shapes += [row] * 8
    return tuple(shapes)


def build_module(lm: GatedLM, kind: str, loaded_policy=None):
    """The module to export and its ``PolicyStep`` (None for the dense and fixed kinds)."""
    if kind == "dense":
        return DenseStep(lm.model.original), None
    if kind == "fixed":
        return FixedStep(lm.model.gm), None
    if loaded_policy is None:
        raise UserError("a solm artifact needs a policy: pass --policy POLICY.pt (train one with `solm train`)")
    step = PolicyStep.from_loaded(loaded_policy)
    return ArtifactStep(lm.model.gm, step, lm._embedding, lm.gate.min_len), step


def io_names(lm: GatedLM, kind: str) -> tuple[list[str], list[str]]:
    n = lm.info.num_layers
    ins = ["input_ids", "position_ids", *_kv_names(n, "past")]
    outs = ["logits", *_kv_names(n, "present")]
    if kind == "fixed":
        ins += ["attn_keep", "mlp_keep", "bits"]
    elif kind != "dense":
        state = list(STATE_NAMES)
        ins += [*state, "budget"]
        outs += [f"{s}_out" for s in state] + ["action", "controls"]
    return ins, outs


def chat_metadata(tokenizer) -> dict:
    """What ``solm run`` needs to talk to an instruct model: its chat template and end-of-sequence token(s)."""
    if tokenizer is None:
        return {}
    eos = getattr(tokenizer, "eos_token_id", None)
    return {"chat_template": getattr(tokenizer, "chat_template", None) or None,
            "bos_token": getattr(tokenizer, "bos_token", None), "eos_token": getattr(tokenizer, "eos_token", None),
            "eos_token_ids": [] if eos is None else sorted({int(x) for x in (eos if isinstance(eos, list) else [eos])})}


def metadata(lm: GatedLM, kind: str, loaded_policy, tokenizer_file: str | None, tokenizer=None) -> dict:
    meta = {
        "version": __version__, "protocol": PROTOCOL, "kind": kind, "model": lm.info.to_dict(),
        "num_layers": lm.info.num_layers,
        "hidden_size": lm.info.hidden_size, "vocab_size": lm.info.vocab_size, "kv_heads": lm.kv_heads,
        "head_dim": lm.head_dim, "gate": lm.gate.to_dict(), "tokenizer": tokenizer_file, **chat_metadata(tokenizer),
        "cost_shapes": shapes_from_gated(lm.model).to_dict(),   # what `solm run --show` costs each token with
    }
    if kind == "fixed":
        meta["budget_ranges"] = [[0.05, 1.0], [0.1, 1.0], [2, 16]]
    if loaded_policy is not None and kind not in ("dense", "fixed"):
        grid, pol = loaded_policy.grid, loaded_policy.policy
        meta.update({
            "action_grid": grid.to_dict(), "num_actions": grid.num_actions, "dense_action": grid.dense_idx,
            "budget_ranges": [[grid.kappa_levels[0], 1.0], [grid.rho_levels[0], 1.0], [grid.bit_levels[0], 16]],
            "episode_len": episode_length(loaded_policy.train_config), "policy_heads": pol.n_heads,
            "policy_head_dim": pol.head_dim,
            "policy_file": loaded_policy.path.name, "policy_step": loaded_policy.step,
        })
    return meta


def export_onnx(module: torch.nn.Module, args: tuple, policy, ins: list[str], outs: list[str], kind: str):
    from solm_compile.ops.onnx_export import export
    from solm_compile.ops.to_onnx import translation_table

    table = translation_table(portable=(kind == "portable")) if kind != "dense" else None
    return export(module, args, table, _dynamic_shapes(args, policy), ins, outs)


KV_DTYPES = {"fp16": "float16", "fp32": "float32"}     # --kv -> the KV cache buffers' element type


def carry_ep_state(program, kind: str, per_kv_head: bool = False, kv: str | None = "fp16") -> dict:
    """The ONNX passes of the ``ai.solm`` kinds (on ``program.model``, in place, in this order); returns their
    metadata. ``kv``: the KV cache buffers' precision (``passes/kv_buffer.py``; fp32 is the exactness reference),
    or None for the concat form artifacts had before issue 16 (for tests)."""
    from solm_compile.passes.carry_page_state import carry_page_state, select_per_kv_head
    from solm_compile.passes.kv_buffer import LAYOUT, kv_buffer

    if kind not in ("solm", "fixed"):
        return {}
    if kv is not None and kv not in KV_DTYPES:
        raise UserError(f"--kv must be one of {', '.join(KV_DTYPES)}, got {kv!r}")
    carried = carry_page_state(program.model)
    log.debug("carry_page_state: %s (skipped: %s)", dict(carried.counts), carried.skipped)
    meta = {"page_state": carried.counts["page_state"], "select_per_kv_head": bool(per_kv_head)}
    if per_kv_head:
        select_per_kv_head(program.model)
    if kv is None:                  # the concat form of artifacts before issue 16 (tests compare against it)
        return meta
    buffered = kv_buffer(program.model, KV_DTYPES[kv])
    log.debug("kv_buffer: %s (skipped: %s)", dict(buffered.counts), buffered.skipped)
    if buffered.skipped:
        raise UserError(f"cannot put this model's KV cache in a buffer: {buffered.skipped[0]}")
    # the buffers (KV and page state) with per-row lengths: step protocol 2 (docs/protocol.md)
    return {**meta, "kv_cache": {"layout": LAYOUT, "dtype": KV_DTYPES[kv]}, "protocol": BUFFER_PROTOCOL}


def fuse_norm_rope(program) -> dict:
    """``passes/fuse_norm_rope`` on ``program.model``: RMSNorm and RoPE as one opset-23 node each (exact); then
    ``passes/unpack_heads`` (the dense kind's GroupQueryAttention reads q, k, v without the head transposes)."""
    from solm_compile.passes.fuse_norm_rope import fuse_rms_norm, fuse_rotary
    from solm_compile.passes.unpack_heads import unpack_heads

    counts = {}
    for fuse in (fuse_rms_norm, fuse_rotary, unpack_heads):
        r = fuse(program.model)
        log.debug("%s: %s (skipped: %s)", r.name, dict(r.counts), r.skipped)
        counts.update(r.counts)
    return counts


def trim_nodes(program, skip_norm: bool = True) -> dict:
    """Fewer nodes on the decode step (after ``pack_low_bit``): ``passes/fuse_qkv`` (q, k and v as one MatMulNBits
    split by heads), ``passes/fuse_linear_blocks`` (each low-bit projection but the LM head, with Q4_1's block-sum
    offset, as one SolmEP LinearBlocks: int8 activations where MatMulNBits had them), ``passes/
    drop_identity_reshapes``, ``passes/fuse_rope_attention`` (the head split, rotary and head merge inside
    QuestAttentionRope, exact) and, if ``skip_norm``, ``passes/fuse_skip_norm`` (residual Add + RMSNorm as one
    SkipSimplifiedLayerNormalization: equal up to a few ulps, its own summation order); {"qkv", "linear_blocks",
    "identity_reshapes", "rope_attention", "skip_norm"}: counts."""
    from solm_compile.passes.drop_identity_reshapes import drop_identity_reshapes
    from solm_compile.passes.fuse_linear_blocks import fuse_linear_blocks
    from solm_compile.passes.fuse_qkv import fuse_qkv
    from solm_compile.passes.fuse_rope_attention import fuse_rope_attention
    from solm_compile.passes.fuse_skip_norm import fuse_skip_norm

    counts = {}
    for name, key, run in (("qkv", "fused", fuse_qkv), ("linear_blocks", "linear_blocks", fuse_linear_blocks),
                           ("identity_reshapes", "reshape", drop_identity_reshapes),
                           ("rope_attention", "fused", fuse_rope_attention),
                           ("skip_norm", "skip_simplified_layer_norm", fuse_skip_norm)):
        if run is fuse_skip_norm and not skip_norm:
            counts[name] = 0
            continue
        r = run(program.model)
        log.debug("%s: %s (skipped: %s)", r.name, dict(r.counts), r.skipped)
        counts[name] = r.counts[key]
    return counts


def pack_low_bit(program, weights, activations: str = "int8", down_bits: int = 8) -> dict:
    """``passes/pack_weights`` on ``program.model``; returns the metadata saying what each weight is stored as.
    ``activations``: "int8" (MatMulNBits accuracy_level 4, SparseMLPBlocks activations="int8": int8 activations per
    block, llama.cpp's trade) or "fp32" (accuracy_level 0 and activations="fp32": exact up to float rounding).
    What ρ keeps is each SparseMLP node's own ``skip`` (pack_mlp copies it): under "h" a SparseMLPBlocks stores down
    re-quantised transposed, an MLP left SparseMLP (no blocks of 32) runs h on SolmEP's fp32 kernel, and the
    portable kind's masked down (TopK over |h|) is a MatMulNBits like any other MatMul. ``down_bits`` (8 or 4): the
    bits of that transposed down (``--mlp-down-bits``; recorded as ``weights.mlp_down_bits`` under "h")."""
    from solm_compile.passes.pack_weights import pack_weights

    if weights is None:
        return {"weights": "fp32", "formats": {}}
    if activations not in ("int8", "fp32"):
        raise UserError(f"activations must be int8 or fp32, got {activations!r}")
    if down_bits not in (4, 8):
        raise UserError(f"--mlp-down-bits: must be 4 or 8, got {down_bits!r}")
    packed = pack_weights(program.model, weights, accuracy_level=4 if activations == "int8" else 0,
                          mlp_activations=activations, mlp_down_bits=down_bits)
    log.debug("pack_weights: %s (skipped: %s)", dict(packed.counts), packed.skipped)
    meta = {**weights.to_dict(), "packed": dict(sorted(packed.counts.items())), "activations": activations}
    if any(k.startswith("mlp_downT") for k in packed.counts):
        meta["mlp_down_bits"] = down_bits
    return meta


def write_artifact(lm: GatedLM, out: Path, kind: str = "solm", loaded_policy=None, tokenizer=None,
                   per_kv_head: bool = False, weights=None, activations: str = "int8",
                   kv: str | None = "fp16", mlp_down_bits: int = 8) -> Path:
    """Export, attach metadata, write ``out`` (and the tokenizer beside it) atomically. ``weights``: the loaded
    model's ``WeightTable`` (``--weights``): the weights it knows are stored as their low-bit blocks, their layers
    computed with ``activations`` (``pack_low_bit``: "int8" per block, or "fp32"). ``kv``: the SolmEP kinds' KV cache
    buffer precision, "fp16" or "fp32" (``carry_ep_state``). What the MLP's ρ keeps is ``lm.gate.mlp_skip`` (on
    every SparseMLP node already), "x" or "h" (every kind but dense, any ``weights``); recorded as ``solm.mlp_skip``.
    ``mlp_down_bits``: under "h" on low-bit weights, the bits down is re-quantised to, transposed (8 or 4)."""
    import onnx

    if kind not in KINDS:
        raise UserError(f"unknown artifact kind {kind!r} (one of {', '.join(KINDS)})")
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    module, policy = build_module(lm, kind, loaded_policy if kind not in ("dense", "fixed") else None)
    module.eval()
    torch.manual_seed(0)
    args = _example(lm, policy, kind=kind)
    ins, outs = io_names(lm, kind)
    mlp_skip = lm.gate.mlp_skip if kind != "dense" else "x"     # the dense graph skips nothing: h is moot there
    if loaded_policy is not None and kind not in ("dense", "fixed"):
        check_mlp_skip(loaded_policy, lm.gate)
    if per_kv_head and kind not in ("solm", "fixed"):
        raise UserError(f"per-KV-head page selection is a SolmEP option: a {kind} artifact cannot have it")
    program = export_onnx(module, args, policy, ins, outs, kind)
    ep_meta = carry_ep_state(program, kind, per_kv_head, kv)
    if kind == "dense":      # before packing: the probe compares float32 graphs (int8 activations would add noise)
        from solm_compile.artifact.dense import fuse_dense_attention

        ep_meta["dense_attention"] = fuse_dense_attention(program)
        if ep_meta["dense_attention"].get("kv_cache") == "buffer":     # float32 buffers written in place (protocol 1)
            ep_meta["kv_cache"] = {"layout": "buffer", "dtype": "float32"}
    ep_meta["fused"] = fuse_norm_rope(program)
    ep_meta["weights"] = pack_low_bit(program, weights, activations, mlp_down_bits)
    if kind == "dense":      # stock onnxruntime's fused forms of what is left (onnxruntime-genai's graph)
        from solm_compile.artifact.dense import fuse_dense_ops

        ep_meta["dense_ops"] = fuse_dense_ops(program)
    if kind in ("solm", "fixed"):       # SolmEP's kinds: q, k, v and o as LinearBlocks, no identity Reshape; the fused
        # Add + RMSNorm only with low-bit weights: an fp32 artifact stays the portable kind's exact counterpart
        # (tests/test_solm_ep.py: 1e-4 over 64 steps at 6 bits, which the fused norm's few ulps can exceed)
        ep_meta["fused"].update(trim_nodes(program, skip_norm=weights is not None))
    ep_meta["mlp_skip"] = mlp_skip
    tok_name = None
    if tokenizer is not None:
        tok_name = out.name.split(".")[0] + ".tokenizer.json"
        atomic_write_bytes(out.parent / tok_name, tokenizer.backend_tokenizer.to_str(pretty=True).encode())
    model = program.model_proto
    model.producer_name, model.producer_version = "solm", __version__
    for k, v in {**metadata(lm, kind, loaded_policy, tok_name, tokenizer), **ep_meta}.items():
        model.metadata_props.add(key=f"solm.{k}", value=json.dumps(v, sort_keys=True))
    onnx.checker.check_model(model, full_check=False)
    large = model.ByteSize() > 1_900_000_000
    _atomic_save(model, out, external=large)
    return out


def _atomic_save(model, out: Path, external: bool) -> None:
    import onnx

    if not external:
        atomic_write_bytes(out, model.SerializeToString(deterministic=True))
        return
    data_name = out.name + ".data"
    tmp = out.parent / f".{out.name}.tmp"
    onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name + ".tmp")
    os.replace(out.parent / (data_name + ".tmp"), out.parent / data_name)
    m = onnx.load(str(tmp), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = data_name
    atomic_write_bytes(out, m.SerializeToString(deterministic=True))
    tmp.unlink()
