"""Build hook: compile SolmEP (the C++ onnxruntime plugin EP, runtime/ep/) while building the package.

All metadata lives in pyproject.toml; this file only extends ``build_py``. The EP is optional: if it cannot be
built (no g++, no npm / ORT_INCLUDE_DIR, no network) the package still builds, with a warning, and solm runs its
portable ONNX path. Set SOLM_SKIP_EP_BUILD=1 to skip it. Build it later with
``python -m solm_compile.runtime.ep_build``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _load_ep_build():
    # By path: the package is not importable while it is being built.
    spec = importlib.util.spec_from_file_location("_solm_ep_build", HERE / "runtime" / "ep_build.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


class BuildPyWithEp(build_py):
    def run(self):
        super().run()
        if os.environ.get("SOLM_SKIP_EP_BUILD"):
            return
        # Editable installs import solm_compile.runtime from runtime/ itself; wheels from build_lib.
        if getattr(self, "editable_mode", False):
            out = HERE / "runtime"
        else:
            out = Path(self.build_lib) / "solm_compile" / "runtime"
        try:
            lib = _load_ep_build().build(out)
            self.announce(f"built SolmEP: {lib}", level=2)
        except Exception as e:  # noqa: BLE001 - the EP is optional
            self.warn(f"SolmEP (C++ plugin EP) was not built: {e}\n"
                      "solm will run the portable path; build it later with "
                      "`python -m solm_compile.runtime.ep_build` (needs g++ and npm)")


setup(cmdclass={"build_py": BuildPyWithEp})
