"""What a test needs from the machine: under CI's require flags a missing piece fails the test instead of skipping.

CI sets SOLM_REQUIRE_EP=1: the CI machine builds SolmEP, so a test that needs it and finds it missing is a failure.
SOLM_REQUIRE_BENCH=1 does the same for the peer engines of `solm bench --engines` (the bench extra), and
SOLM_REQUIRE_BROWSER=1 for headless Chromium, which drives `solm serve`'s web page, SOLM_REQUIRE_TOOLS=1 (CI's
`.[test]` includes the tools extra) for onnx-graphsurgeon and SOLM_REQUIRE_MLIR=1 for torch-mlir.
"""

from __future__ import annotations

import os

import pytest


def missing(flag: str, why: str):
    """A piece the test needs is missing: a failure under the require ``flag`` (CI), else a skip saying ``why``."""
    if os.environ.get(flag):
        pytest.fail(f"{flag} is set: {why}")
    pytest.skip(why)


def _module(module: str, flag: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        missing(flag, f"{module} is not installed (pip install solm-compile[{extra}])")


def need_ep(available: bool, why: str = "SolmEP is not built here (python -m solm_compile.runtime.ep_build)"):
    if not available:
        missing("SOLM_REQUIRE_EP", why)


def registered_ep() -> str:
    """SolmEP built (cached) and registered with onnxruntime: its library path; ``need_ep`` when it cannot be."""
    import onnxruntime as ort

    from solm_compile.runtime import ep, ep_build

    try:
        path = ep_build.build_cached()
    except ep_build.BuildError as e:
        need_ep(False, f"SolmEP cannot be built here: {e}")
    need_ep(ep._ort_version(ort) >= ep.MIN_ORT and ep.register(ort, path=path))
    return path


def need_bench(module: str):
    """A peer engine of ``solm bench --engines`` (the ``bench`` extra). CI installs only ``.[test]``: there the test
    is skipped with the reason; under SOLM_REQUIRE_BENCH=1 (a machine with the extra) a missing peer fails it."""
    return _module(module, "SOLM_REQUIRE_BENCH", "bench")


def need_browser(why: str) -> None:
    """Headless Chromium for the web-page tests (Debian's ``chromium`` and ``chromium-driver``, which ``.ci/run``
    installs). Missing: skipped with ``why``; under SOLM_REQUIRE_BROWSER=1 (CI) a failure."""
    missing("SOLM_REQUIRE_BROWSER", why)


def need_tools(module: str):
    """A library of the ``tools`` extra (onnx-graphsurgeon). ``.[test]`` includes it and CI sets SOLM_REQUIRE_TOOLS=1,
    so there a missing one fails the test; elsewhere (an environment without it) the test is skipped, saying why."""
    return _module(module, "SOLM_REQUIRE_TOOLS", "tools")


def need_cuda():
    """onnxruntime-gpu's CUDA EP and a GPU. Skipped without them (CI, the usual CPU machine); SOLM_REQUIRE_CUDA=1 on a
    GPU machine turns a missing CUDA EP into a failure."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        missing("SOLM_REQUIRE_CUDA", "no CUDAExecutionProvider here (pip uninstall -y onnxruntime && pip install -r "
                                     "requirements-gpu.txt)")


def need_mlir():
    """torch-mlir (the ``mlir`` extra, also in ``.[test]``). Skipped without it, saying how to install it;
    SOLM_REQUIRE_MLIR=1 (CI) turns a missing one into a failure."""
    return _module("torch_mlir.fx", "SOLM_REQUIRE_MLIR", "mlir")


def need_driver():
    """The C++ driver of the step protocol (``runtime/driver_build.py``), built here; returns its path. CI sets
    SOLM_REQUIRE_EP=1 (it builds SolmEP with the same compiler and headers), so there a failed build fails the test;
    elsewhere the test is skipped with the build's one-line reason."""
    from solm_compile.runtime import driver_build

    try:
        return driver_build.build()
    except driver_build.BuildError as e:
        missing("SOLM_REQUIRE_EP", f"the C++ driver does not build here: {str(e).splitlines()[0]}")
