"""solm's Python API: ``compile`` a model into a ``.solm.onnx`` artifact, ``load`` one to generate with it.

    import solm_compile as solm

    path = solm.compile("smollm2", solm.SolmConfig(), out="smollm2.solm.onnx")
    session = solm.load(path)
    result = session.generate("Name the capital of France.", max_new_tokens=16, budget=(0.5, 0.75, 8))
    print(result.text, result.usage)

``solm-compile`` and ``solm compile`` call ``compile`` with a ``SolmConfig`` built from their flags, so the command
line and the API share every default. For ``torch.compile(model, backend="solm")`` see solm_compile/backend/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from solm_compile.config import GateConfig
from solm_compile.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("auto", "solm", "portable", "fixed", "dense")
POLICY_NAMES = ("static", "shipped")     # --policy values that are not files


@dataclass(frozen=True)
class SolmConfig:
    """What to compile.

    kind        "auto" (default): the ``ai.solm`` artifact run by SolmEP where SolmEP is available here, else the
                portable one (the same semantics in standard ONNX ops); "solm" forces the ``ai.solm`` artifact,
                "portable" the standard-ops one, "fixed" the gated graph with the controls as inputs (no policy),
                "dense" the original model (the benchmark baseline)
    policy      "static" (what None means wherever the artifact runs on SolmEP): no learned policy, the floor, i.e.
                every layer at the requested budget (the ``fixed`` artifact, budgets as inputs): on held-out genres no
                learned policy has beaten it (docs/policy.md "Verdict"); "shipped": the learned policy shipped for the
                model; or a policy checkpoint file. The portable kind carries a learned policy (None: the shipped one)
    gate        where the gates go and how they select (Quest page size, sinks, window, warm-up)
    per_kv_head Quest pages chosen once per KV head (SolmEP artifacts only)
    weights     how the weights are stored: "source" (default: a GGUF keeps its own blocks, losslessly), "fp32"
                (the exactness reference), "int8" or "int4" (round-to-nearest, block 32); see quant/weights.py
    head_bits   under weights "int4", the embedding / LM head's bits: 8 (default; GGUF's Q4 files keep it at Q8_0)
                or 4 (onnxruntime-genai's int4 model; 14.6 MB/token less on SmolLM2, docs/measurements.md session 14)
    activations what the low-bit matmuls multiply the weights with: "int8" (default; per block of 32, as llama.cpp
                and onnxruntime-genai's int4 CPU model do: +0.2 % perplexity on SmolLM2) or "fp32" (exact)
    mlp_skip    (read-only: ``gate.mlp_skip``, the one source) what the MLP's ρ keeps: "x" (SOL's input channels,
                the shipped policies) or "h" (units of the down projection's input; every ONNX kind and weights
                format: SolmEP reads only the kept units' rows of down, fp32 or on low-bit weights re-quantised
                transposed; the portable kind masks h and multiplies down densely; a dense artifact skips nothing;
                --emit mlir refuses it; docs/measurements.md session 10)
    mlp_down_bits  under mlp_skip "h" on low-bit weights, SolmEP's down projection is stored transposed (a skipped
                unit reads no byte), re-quantised round-to-nearest from the source: 8 bits (default; +0.1 % PPL on
                SmolLM2, twice a Q4 down's bytes) or 4 (a Q4 down's bytes; docs/measurements.md session 12)
    kv          the SolmEP artifacts' KV cache buffer: "fp16" (default) or "fp32" (the exactness reference); the
                portable and dense artifacts keep fp32 caches grown by concatenation
    trust_pickle  allow a pickled model file (unpickling runs arbitrary code)
    emit        "onnx" (default: the artifact) or "mlir": the decode step as MLIR text through torch-mlir (the
                ``mlir`` extra; kind "auto" = the gated step with the budget as arguments, "dense" = the original)
    mlir_dialect  linalg-on-tensors | stablehlo | raw; None: linalg-on-tensors for dense, raw for the gated step
    """

    kind: str = "auto"
    policy: str | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    per_kv_head: bool = False
    trust_pickle: bool = False
    weights: str = "source"
    activations: str = "int8"
    emit: str = "onnx"
    mlir_dialect: str | None = None
    kv: str = "fp16"
    mlp_down_bits: int = 8
    head_bits: int = 8

    @property
    def mlp_skip(self) -> str:
        return self.gate.mlp_skip

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"SolmConfig: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.gate, GateConfig):
            raise UserError(f"SolmConfig: gate must be a GateConfig, got {type(self.gate).__name__}")
        if self.policy not in (None, *POLICY_NAMES) and not Path(self.policy).is_file():
            raise UserError(f"--policy {self.policy}: no such file (or one of: {', '.join(POLICY_NAMES)})")
        if self.policy == "static" and self.kind in ("portable", "dense"):
            raise UserError(f"--policy static is the fixed artifact's (SolmEP); the {self.kind} kind "
                            + ("carries a learned policy: --policy shipped or a checkpoint" if self.kind == "portable"
                               else "has no policy"))
        from solm_compile.quant.weights import WEIGHTS, check_head_bits

        if self.weights not in WEIGHTS:
            raise UserError(f"--weights: must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        check_head_bits(self.weights, self.head_bits)
        if self.kv not in ("fp16", "fp32"):
            raise UserError(f"--kv: must be fp16 or fp32, got {self.kv!r}")
        if self.activations not in ("int8", "fp32"):
            raise UserError(f"--activations: must be int8 or fp32, got {self.activations!r}")
        if self.mlp_down_bits not in (4, 8):
            raise UserError(f"--mlp-down-bits: must be 4 or 8, got {self.mlp_down_bits!r}")
        if self.mlp_skip == "h" and self.emit == "mlir" and self.kind != "dense":
            raise UserError("--mlp-skip h: --emit mlir writes the gated step with rho on x only (its torch.operator "
                            "form is untested with h); write an ONNX artifact, or --dense")
        if self.emit not in ("onnx", "mlir"):
            raise UserError(f"--emit: must be onnx or mlir, got {self.emit!r}")
        if self.emit == "mlir":     # before any model loads: the extra, the kind and the dialect, one line each
            from solm_compile.artifact.mlir import check_dialect, torch_mlir_fx

            if self.kind not in ("auto", "dense"):
                raise UserError(f"--emit mlir writes the gated step (budget as arguments) or, with --dense, the "
                                f"original; kind {self.kind!r} is an ONNX artifact kind")
            torch_mlir_fx()
            check_dialect(self.mlir_dialect, self.kind == "dense")
        if self.per_kv_head and self.kind in ("portable", "dense"):
            raise UserError(f"--per-kv-head: the {self.kind} artifact has no SolmEP attention to configure (it "
                            "applies to the ai.solm and --fixed artifacts)")


def resolve_kind(kind: str, policy: str | None) -> str:
    """The artifact kind ``compile`` writes: the floor (``policy`` None or "static") on a SolmEP kind is ``fixed``;
    auto without SolmEP here is portable, whose policy is then the shipped learned one unless a file is given."""
    kind = _resolve_kind(kind, policy)
    return "fixed" if kind == "solm" and policy in (None, "static") else kind


def _resolve_kind(kind: str, policy: str | None = None) -> str:
    if kind != "auto":
        return kind
    import warnings

    from solm_compile.runtime import ep

    with warnings.catch_warnings(record=True) as why:
        warnings.simplefilter("always")
        available = ep.register()
    if available:
        return "solm"
    reason = str(why[0].message) if why else "SolmEP is not available"
    if policy == "static":
        raise UserError(f"--policy static: {reason}; the static floor is the fixed artifact, which needs SolmEP "
                        "(--custom-ops writes it anyway)")
    log.warning("%s; writing the portable artifact instead (same semantics in standard ONNX ops%s; "
                "--custom-ops writes the ai.solm one anyway)", reason,
                ", with the shipped learned policy: the static floor needs SolmEP" if policy is None else "")
    return "portable"


def resolve_policy(arg: str | None, info):
    """Load ``arg``, or the policy shipped for the model; one line saying how to train one if there is none."""
    from solm_compile.policy.checkpoint import load_policy, require_joint, shipped_policy

    path = Path(arg) if arg not in (None, "shipped") else shipped_policy(info)
    if path is None:
        raise UserError(f"{info.name}: no policy shipped for this model; train one with "
                        f"`solm train {info.name} --out policy.pt` and pass --policy policy.pt (or use --dense)")
    if not path.is_file():
        raise UserError(f"--policy {path}: no such file")
    return require_joint(load_policy(path, info), "the artifact")


def compile(model: str, config: SolmConfig = SolmConfig(), out: str | Path = "model.solm.onnx") -> Path:  # noqa: A001
    """Compile ``model`` (smollm2 | gemma3-270m | an HF model directory | a .gguf | a .pt2 ExportedProgram) into the
    artifact ``out``, written atomically; returns its path."""
    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend.gated import GatedLM, _kv_shape_from_graph, compile_gated
    from solm_compile.frontend.models import load as load_model

    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: directory {out.parent} does not exist")
    loaded = load_model(model, trust_pickle=config.trust_pickle, weights=config.weights,
                        head_bits=config.head_bits)
    gated = compile_gated(loaded, config.gate)
    lm = GatedLM(gated, _kv_shape_from_graph(loaded))
    if config.emit == "mlir":
        from solm_compile.artifact.mlir import emit_mlir

        path = emit_mlir(lm, out, dense=config.kind == "dense", dialect=config.mlir_dialect)
        log.info("wrote %s (MLIR, %s)", path, "dense" if config.kind == "dense" else "gated")
        return path
    kind = resolve_kind(config.kind, config.policy)
    policy = None if kind in ("dense", "fixed") else resolve_policy(config.policy, loaded.info)
    path = write_artifact(lm, out, kind, policy, tokenizer=loaded.tokenizer, per_kv_head=config.per_kv_head,
                          weights=loaded.weights, activations=config.activations, kv=config.kv,
                          mlp_down_bits=config.mlp_down_bits)
    log.info("wrote %s (%s; gated %d attention and %d MLP ops%s; weights %s)", path, kind, gated.count("attention"),
             gated.count("mlp"), f"; policy {policy.path.name}" if policy else "", loaded.weights.describe())
    return path


def load(path: str | Path, threads: int | None = None, **options):
    """Open an artifact for generation: a ``SolmSession`` (``generate``, ``steps``, ``score``); SolmEP is
    registered for ``ai.solm`` artifacts. ``options`` go to ``SolmSession`` (providers, ep_options, ...)."""
    from solm_compile.runtime.session import SolmSession

    return SolmSession(path, threads=threads, **options)
