"""The optional CMake build of SolmEP (runtime/ep/CMakeLists.txt) configures, builds, and yields a library that
onnxruntime registers and that computes what the ep_build.py library computes.

Without this test the CMake file was only grepped for its source list (test_ep_prefill.py), never run. It builds
once per session into a temporary directory (about as long as one ep_build build); skipped without cmake.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from solm_compile.runtime import ep
from solm_compile.runtime import ep_build

EP_DIR = Path(ep_build.__file__).resolve().parent / "ep"


@pytest.fixture(scope="module")
def cmake_lib(tmp_path_factory):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed")
    try:
        include = ep_build.headers_dir(quiet=True)
    except ep_build.BuildError as e:
        if os.environ.get("SOLM_REQUIRE_EP"):
            pytest.fail(str(e))
        pytest.skip(f"no onnxruntime headers: {e}")
    build = tmp_path_factory.mktemp("cmake-ep")
    for cmd in ([cmake, "-S", str(EP_DIR), "-B", str(build), f"-DORT_INCLUDE_DIR={include}"],
                [cmake, "--build", str(build), "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lib = build / "libsolm_ep.so"
    assert lib.is_file(), sorted(p.name for p in build.iterdir())
    return lib


_SCRIPT = r"""
import sys
import numpy as np
import onnxruntime as ort
sys.path.insert(0, sys.argv[2])
from solm_compile.runtime import ep
assert ep.register(ort, path=sys.argv[1]) and str(ep._registered) == sys.argv[1]
import test_solm_ep as t
rng = np.random.default_rng(5)
q, k, v, mask = t._attn_inputs(rng, 2, 4, 2, 1, 40, 16, True)
kappa = np.array([0.3, 1.0], np.float32)
out = t._session(t._quest_model(8, 1, 2, True)).run(None, {"q": q, "k": k, "v": v, "mask": mask, "kappa": kappa})[0]
t._close(out, t._quest_ref(q, k, v, mask, kappa, None, 8, 1, 2))
w = t._mlp_weights(rng, 40, 96, True, True)
x = rng.standard_normal((2, 3, 40), dtype=np.float32)
rho, bits = np.array([0.5, 1.0], np.float32), np.array([16, 16], np.float32)
y = t._session(t._mlp_model(w, "silu")).run(None, {"x": x, "rho": rho, "bits": bits})[0]
t._close(y, t._mlp_ref(x, w, rho, bits, "silu"))
print("ok")
"""


def test_cmake_build_registers_and_matches_reference(cmake_lib):
    """onnxruntime registers the CMake library as SolmEP (in a fresh process), and QuestAttention (decode, masked)
    and SparseMLP run on it equal the references."""
    pytest.importorskip("onnxruntime")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(cmake_lib), str(Path(__file__).parent)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_cmake_build_has_the_same_op_table(cmake_lib):
    """The op table and C API of the CMake library are those of the ep_build.py library (same sources)."""
    try:
        ours = ep_build.build_cached()
    except ep_build.BuildError as e:
        pytest.skip(f"SolmEP cannot be built here: {e}")
    assert ep.registered_ops(cmake_lib) == ep.registered_ops(ours)
    assert set(ep.isa_report(cmake_lib)) == set(ep.isa_report(ours))
