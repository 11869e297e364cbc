"""``solm-compile MODEL --emit mlir --out step.mlir``: the decode step as an MLIR module (``pip install
solm-compile[mlir]``: torch-mlir 20261001, which installs next to torch 2.13.0).

The step is exported with ``torch.export`` exactly as the ONNX artifact's, dynamic batch and lengths included, and
imported with ``torch_mlir.fx.export_and_import``:

- ``--dense``: the original, ungated step ``(input_ids, position_ids, past k/v...) -> (logits, presents...)``,
  lowered to ``linalg-on-tensors`` (default) or ``stablehlo``. It contains no gating op.
- default: the gated step with the budget as function arguments, as in the ``--fixed`` artifact:
  ``(input_ids, position_ids, past k/v..., attn_keep [B], mlp_keep [B], bits [B])``. Its solm ops stay as
  ``torch.operator`` nodes named ``torch.solm.gate_controls``, ``torch.solm.quest_attention`` and
  ``torch.solm.sparse_mlp`` (the ``ai.solm`` ops of the artifact, with the same operands as
  ``solm_compile/ops/torch_ops.py``) in the ``raw`` torch dialect the FX importer writes. They do not lower to
  linalg or stablehlo yet: torch-mlir's backend pipeline refuses ``torch.operator``, and decomposing them into
  their torch references does not export (the references branch on tensor values: "Could not guard on
  data-dependent expression"). A portable, branch-free torch form, like the ONNX ``--portable`` translation, would.
  The policy is not part of the module.

The module is verified (``Operation.verify``) before it is written, atomically.
"""

from __future__ import annotations

from pathlib import Path

from solm_compile.errors import UserError

DIALECTS = ("linalg-on-tensors", "stablehlo", "raw")
GATED_OPS = ("torch.solm.gate_controls", "torch.solm.quest_attention", "torch.solm.sparse_mlp")
INSTALL = "pip install 'solm-compile[mlir]' (torch-mlir 20261001, next to torch 2.13.0)"


def torch_mlir_fx():
    """torch-mlir's FX importer, or one line saying how to install the extra."""
    try:
        from torch_mlir import fx
    except ImportError:
        raise UserError(f"--emit mlir needs torch-mlir, which is not installed here: {INSTALL}") from None
    return fx


def check_dialect(dialect: str | None, dense: bool) -> str:
    """The dialect to write (default: linalg-on-tensors for --dense, raw for the gated step), or a one-line error."""
    if dialect is None:
        return "linalg-on-tensors" if dense else "raw"
    if dialect not in DIALECTS:
        raise UserError(f"--mlir-dialect: must be one of {', '.join(DIALECTS)}, got {dialect!r}")
    if not dense and dialect != "raw":
        raise UserError(f"--mlir-dialect {dialect}: the gated step's solm ops do not lower to {dialect} yet "
                        "(they stay torch.operator); use --mlir-dialect raw, or --dense for the ungated step")
    return dialect


def emit_mlir(lm, out: str | Path, dense: bool = False, dialect: str | None = None) -> Path:
    """Write ``lm``'s decode step (``--dense``: the original, ungated) to ``out`` as MLIR text; returns the path."""
    import torch

    from solm_compile.artifact.write import _dynamic_shapes, _example, build_module
    from solm_compile.io import atomic_write_bytes

    fx = torch_mlir_fx()
    dialect = check_dialect(dialect, dense)
    kind = "dense" if dense else "fixed"
    module, _ = build_module(lm, kind)
    args = _example(lm, None, kind=kind)
    with torch.no_grad():
        program = torch.export.export(module.eval(), args, dynamic_shapes=_dynamic_shapes(args, None))
    mlir = fx.export_and_import(program, output_type=dialect, func_name="decode_step")
    if not mlir.operation.verify():
        raise RuntimeError(f"torch-mlir produced a module that does not verify ({dialect})")
    out = Path(out)
    atomic_write_bytes(out, str(mlir).encode())
    return out
