"""Build ``solm_driver``, the C++ host of the step protocol (``runtime/driver/solm_driver.cc``, docs/protocol.md).

``python -m solm_compile.runtime.driver_build`` builds it (once per source, compiler and onnxruntime library, into
solm's cache) and prints its path; ``build()`` does the same from Python (``tests/test_driver.py``). Then::

    echo "5 17 3" | solm_driver ARTIFACT path/to/libsolm_ep.so 0.5 0.75 8 32     # prints the generated ids

The compiler and the onnxruntime headers are found as for SolmEP (``ep_build``: ``$CXX`` or g++, ``$ORT_INCLUDE_DIR``
or the cached npm headers). It links the onnxruntime library of the installed ``onnxruntime`` wheel: the build
folder holds a link to it under its soname, found at run time through the rpath ``$ORIGIN``. Every failure is a
``BuildError`` of one line saying what is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from solm_compile.runtime import ep_build
from solm_compile.runtime.ep_build import BuildError

SOURCE = Path(__file__).resolve().parent / "driver" / "solm_driver.cc"
NAME = "solm_driver"
CXXFLAGS = ("-std=c++17", "-O2", "-Wall", "-Wextra")


def ort_library() -> Path:
    """The shared library inside the installed onnxruntime wheel (``onnxruntime/capi/libonnxruntime.so.X.Y.Z``)."""
    try:
        import onnxruntime
    except ImportError as e:
        raise BuildError("onnxruntime is not installed (pip install onnxruntime)") from e
    capi = Path(onnxruntime.__file__).resolve().parent / "capi"
    libs = sorted(p for p in capi.glob("libonnxruntime.so*") if p.is_file())
    if not libs:
        raise BuildError(f"no libonnxruntime.so* in {capi}: this onnxruntime wheel ships no C library")
    return libs[-1]


def soname(lib: Path) -> str:
    """The library's ELF soname (what the driver will ask the loader for), read with readelf; without readelf,
    the file name cut after its major version (``libonnxruntime.so.1.32.0`` -> ``libonnxruntime.so.1``)."""
    readelf = shutil.which("readelf")
    if readelf:
        out = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if "(SONAME)" in line and "[" in line:
                return line.split("[", 1)[1].split("]", 1)[0]
    m = re.match(r"(.+\.so\.\d+)", lib.name)
    return m.group(1) if m else lib.name


def _first_error(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln), lines[-1] if lines else "no message")[:300]


def build(out_dir: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Compile and link the driver; returns its path. Default ``out_dir``: ``<solm cache>/driver/<hash>``, reused
    while the source, flags, compiler and onnxruntime library stay the same."""
    if not SOURCE.is_file():
        raise BuildError(f"{SOURCE} is missing (an installed wheel has no C++ sources; build from a checkout)")
    include = ep_build.headers_dir(quiet=True)
    cxx = ep_build._compiler()
    lib = ort_library()
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update("\0".join((*CXXFLAGS, cxx, str(include), str(lib), str(lib.stat().st_size))).encode())
    out = Path(out_dir) if out_dir is not None else ep_build.cache_dir() / "driver" / h.hexdigest()[:16]
    exe = out / NAME
    if exe.is_file() and not force:
        return exe
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".driver-", dir=out) as tmp:
        link = Path(tmp) / soname(lib)
        link.symlink_to(lib)
        cmd = [cxx, *CXXFLAGS, f"-I{include}", str(SOURCE), "-o", str(Path(tmp) / NAME), str(link),
               "-Wl,-rpath,$ORIGIN"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"compiling {SOURCE.name} with {cxx} failed: {_first_error(r.stderr)}")
        final_link = out / link.name
        if final_link.is_symlink() or final_link.exists():
            final_link.unlink()
        os.replace(link, final_link)
        os.replace(Path(tmp) / NAME, exe)            # atomic: a running copy keeps its inode
    return exe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m solm_compile.runtime.driver_build",
                                 description="Build solm_driver, the C++ host of solm's step protocol.")
    ap.add_argument("--out", default=None, help="output directory (default: solm's cache)")
    args = ap.parse_args(argv)
    try:
        path = build(args.out, force=args.out is not None)
    except BuildError as e:
        print(f"error: cannot build {NAME}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
