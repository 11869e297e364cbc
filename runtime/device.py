"""Which onnxruntime execution providers a session gets for ``device`` (``--device cpu|cuda``).

CUDA comes from the ``onnxruntime-gpu`` wheel, which replaces ``onnxruntime`` (both install the same
``onnxruntime`` package; docs/cli.md has the swap). A CUDA session lists ``CUDAExecutionProvider`` first and
``CPUExecutionProvider`` last, so the few nodes CUDA has no kernel for fall back to the CPU.

Only the artifacts made of standard (and ``com.microsoft``) ops go to CUDA: ``portable`` and ``dense``, at any
``--weights`` (``MatMulNBits`` and ``GroupQueryAttention`` have CUDA kernels). ``solm`` and ``fixed`` artifacts
are refused: their ``ai.solm`` ops run on SolmEP, which has CPU kernels only, and they sit in every layer (the
attention and the MLP), so the KV cache and activations would cross between host and GPU several times per layer
per step, slower than staying on the CPU.
"""

from __future__ import annotations

from solm_compile.errors import UserError

DEVICES = ("cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
CUDA_KINDS = ("portable", "dense")
SWAP = "pip uninstall -y onnxruntime && pip install -r requirements-gpu.txt"


def available(ort=None) -> list[str]:
    if ort is None:
        import onnxruntime as ort
    return list(ort.get_available_providers())


def check_device(device: str, flag: str = "--device", ort=None) -> str:
    """``device`` if this onnxruntime can run it, else a one-line UserError naming ``flag``."""
    if device not in DEVICES:
        raise UserError(f"{flag}: unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "cuda" and CUDA not in available(ort):
        raise UserError(f"{flag} cuda: this onnxruntime has no CUDAExecutionProvider (it offers "
                        f"{', '.join(available(ort))}); install onnxruntime-gpu instead: {SWAP}")
    return device


def providers_for(kind: str, device: str = "cpu", ort=None) -> list[str] | None:
    """The providers list for an artifact of ``kind`` on ``device``: None for the CPU and a ``solm``/``fixed``
    artifact (SolmEP is added through the session options, in front of the CPU provider), the CPU provider
    alone for the other kinds, CUDA first and the CPU last for ``cuda``."""
    check_device(device, ort=ort)
    if device == "cpu":
        return None if kind in ("solm", "fixed") else [CPU]
    if kind not in CUDA_KINDS:
        raise UserError(f"--device cuda: a {kind} artifact runs its ai.solm ops on SolmEP, which is CPU-only; "
                        f"compile with --portable (or --dense) for CUDA")
    return [CUDA, CPU]
