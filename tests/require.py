"""What a test needs from the machine: under CI's require flags a missing piece fails the test instead of skipping.

CI sets SOLM_REQUIRE_EP=1: the CI machine builds SolmEP, so a test that needs it and finds it missing is a failure.
SOLM_REQUIRE_BENCH=1 does the same for the peer engines of `solm bench --engines` (the bench extra), and
SOLM_REQUIRE_BROWSER=1 for headless Chromium, which drives `solm serve`'s web page, SOLM_REQUIRE_TOOLS=1 (CI's
`.[test]` includes the tools extra) for onnx-graphsurgeon and SOLM_REQUIRE_MLIR=1 for torch-mlir.
"""

from __future__ import annotations

import os

import pytest


def need_ep(available: bool, why: str = "SolmEP is not built here (python -m solm_compile.runtime.ep_build)"):
    if available:
        return
    if os.environ.get("SOLM_REQUIRE_EP"):
        pytest.fail(f"SOLM_REQUIRE_EP is set: {why}")
    pytest.skip(why)


def need_bench(module: str):
    """A peer engine of ``solm bench --engines`` (the ``bench`` extra). CI installs only ``.[test]``: there the test
    is skipped with the reason; under SOLM_REQUIRE_BENCH=1 (a machine with the extra) a missing peer fails it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        why = f"{module} is not installed (pip install solm-compile[bench])"
        if os.environ.get("SOLM_REQUIRE_BENCH"):
            pytest.fail(f"SOLM_REQUIRE_BENCH is set: {why}")
        pytest.skip(why)


def need_browser(why: str) -> None:
    """Headless Chromium for the web-page tests (Debian's ``chromium`` and ``chromium-driver``, which ``.ci/run``
    installs). Missing: skipped with ``why``; under SOLM_REQUIRE_BROWSER=1 (CI) a failure."""
    if os.environ.get("SOLM_REQUIRE_BROWSER"):
        pytest.fail(f"SOLM_REQUIRE_BROWSER is set: {why}")
    pytest.skip(why)


def need_tools(module: str):
    """A library of the ``tools`` extra (onnx-graphsurgeon). ``.[test]`` includes it and CI sets SOLM_REQUIRE_TOOLS=1,
    so there a missing one fails the test; elsewhere (an environment without it) the test is skipped, saying why."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        why = f"{module} is not installed (pip install solm-compile[tools])"
        if os.environ.get("SOLM_REQUIRE_TOOLS"):
            pytest.fail(f"SOLM_REQUIRE_TOOLS is set: {why}")
        pytest.skip(why)


def need_cuda():
    """onnxruntime-gpu's CUDA EP and a GPU. Skipped without them (CI, the usual CPU machine); SOLM_REQUIRE_CUDA=1 on a
    GPU machine turns a missing CUDA EP into a failure."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return
    why = "no CUDAExecutionProvider here (pip uninstall -y onnxruntime && pip install -r requirements-gpu.txt)"
    if os.environ.get("SOLM_REQUIRE_CUDA"):
        pytest.fail(f"SOLM_REQUIRE_CUDA is set: {why}")
    pytest.skip(why)


def need_mlir():
    """torch-mlir (the ``mlir`` extra, also in ``.[test]``). Skipped without it, saying how to
    install it; SOLM_REQUIRE_MLIR=1 on a machine with the extra turns a missing one into a failure."""
    import importlib

    try:
        return importlib.import_module("torch_mlir.fx")
    except ImportError:
        why = "torch-mlir is not installed (pip install solm-compile[mlir])"
        if os.environ.get("SOLM_REQUIRE_MLIR"):
            pytest.fail(f"SOLM_REQUIRE_MLIR is set: {why}")
        pytest.skip(why)
