"""Build SolmEP, the C++ onnxruntime plugin execution provider in ``runtime/ep/``, into ``libsolm_ep.so``.

``python -m solm_compile.runtime.ep_build`` builds it into the installed package (beside this file), where
``solm_compile.runtime.ep.library_path`` looks first. ``build(out_dir)`` builds it anywhere; ``build_cached()``
builds it once per source version into solm's cache (what the tests use).

Needs a C++17 compiler (``$CXX``, else g++) and the onnxruntime C headers of version >= 1.24 (the plugin-EP API).
The PyPI wheels ship no headers, so they come from, in order:

1. ``$ORT_INCLUDE_DIR`` (any directory holding ``onnxruntime_c_api.h`` and ``onnxruntime_ep_c_api.h``);
2. the build cache ``<solm cache>/ort-headers/1.29.0/include``;
3. ``npm pack com.github.asus4.onnxruntime@0.4.9`` (MIT; onnxruntime 1.29.0 with its headers, ~150 MB download,
   of which only the headers are kept in 2).

The headers are never copied into the repository. This module is standalone (stdlib only) so ``setup.py`` can
load it by path during a wheel build.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LIB_NAME = "libsolm_ep.so"
ORT_HEADERS_VERSION = "1.29.0"
NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
# Inside the npm tarball: the (platform-independent) C/C++ headers of the iOS simulator framework.
NPM_HEADERS_DIR = ("package/Plugins/iOS~/onnxruntime.xcframework/ios-arm64_x86_64-simulator/"
                   "onnxruntime.framework/Headers/")
REQUIRED_HEADERS = ("onnxruntime_c_api.h", "onnxruntime_ep_c_api.h")
MIN_ORT_API = 24  # solm_ep.cc asks onnxruntime for this API level

SRC_DIR = Path(__file__).resolve().parent / "ep"
SOURCES = ("kernels_attention.cc", "kernels_attention_prefill.cc", "kernels_attention_cache.cc",
           "kernels_attention_rope.cc", "kernels_mlp.cc",
           "kernels_mlp_tiles.cc", "kernels_mlp_blocks.cc", "kernels_mlp_blocks_op.cc", "kernels_mlp_blocks_int8.cc",
           "kernels_mlp_blocks_h.cc", "kernels_mlp_blocks_hg.cc", "kernels_blocks_layout.cc", "kernels_stats.cc",
           "kernels_topk.cc", "ort_kernels.cc", "ort_kernels_attention.cc", "ep_graph.cc", "ep_build_kernel.cc",
           "solm_ep.cc", "c_api.cc")
HEADERS = ("kernels.h", "kernels_util.h", "kernels_attention_rows.h", "kernels_attention_select.h", "op_table.h",
           "ort_kernels.h", "ep_graph.h")
# Portable code: no -march=native. The hot loops are compiled per ISA (AVX-512 / AVX2+FMA / baseline, target
# attributes) and dispatched once per process (kernels_util.h IsaLevel), so plain -O3 is safe on every x86-64.
CXXFLAGS = ("-std=c++17", "-O3", "-fPIC", "-fvisibility=hidden", "-fno-math-errno", "-Wall", "-Wextra", "-Wno-psabi")
LDFLAGS = ("-shared", "-Wl,--no-undefined", "-Wl,-z,defs")


class BuildError(RuntimeError):
    """SolmEP could not be built; the message says what is missing."""


def cache_dir() -> Path:
    """solm's cache root (same rule as ``solm_compile.data.assets.cache_dir``): ``$SOLM_CACHE`` or ``~/.cache/solm``."""
    env = os.environ.get("SOLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "solm"


def package_library() -> Path:
    """Where ``python -m solm_compile.runtime.ep_build`` puts the library: beside this module."""
    return Path(__file__).resolve().parent / LIB_NAME


def sources_present() -> bool:
    return all((SRC_DIR / s).is_file() for s in SOURCES + HEADERS)


def source_hash() -> str:
    """Hash of the C++ sources and flags: names the cached build, so an edit rebuilds."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (SRC_DIR / name).read_bytes() + b"\0")
    h.update(" ".join(CXXFLAGS + LDFLAGS).encode())
    return h.hexdigest()[:16]


def cached_library(tag: str | None = None) -> Path:
    """The build-cache location of the library for source version ``tag`` (default: the current sources)."""
    if tag is None:
        tag = source_hash() if sources_present() else "none"
    return cache_dir() / "ep" / tag / LIB_NAME


def latest_cached_library() -> Path | None:
    """The current sources' cached build if present; else the most recently built one (installed package
    without sources); None if there is none."""
    if sources_present():
        p = cached_library()
        return p if p.is_file() else None
    builds = sorted((cache_dir() / "ep").glob(f"*/{LIB_NAME}"), key=lambda p: p.stat().st_mtime, reverse=True)
    return builds[0] if builds else None


def library_build_id(lib: str | os.PathLike) -> str | None:
    """The source hash a built library was compiled from (None if it cannot be read)."""
    import ctypes

    try:
        fn = ctypes.CDLL(str(lib)).SolmEpBuildId
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    out = fn()
    return out.decode() if out else None


def is_stale(lib: str | os.PathLike) -> bool:
    """True if the sources are present and ``lib`` was built from other sources."""
    return sources_present() and library_build_id(lib) != source_hash()


# ---------------------------------------------------------------------------------------------- headers


def _has_headers(d: Path) -> bool:
    return all((d / h).is_file() for h in REQUIRED_HEADERS)


def _api_version(include: Path) -> int:
    for line in (include / "onnxruntime_c_api.h").read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "#define" and parts[1] == "ORT_API_VERSION":
            return int(parts[2])
    return 0


def _check_headers(include: Path, origin: str) -> Path:
    if not _has_headers(include):
        raise BuildError(f"{origin}: {include} lacks {' / '.join(REQUIRED_HEADERS)} (need onnxruntime >= 1.24 headers)")
    v = _api_version(include)
    if v < MIN_ORT_API:
        raise BuildError(f"{origin}: {include} has ORT_API_VERSION {v}; SolmEP needs >= {MIN_ORT_API}")
    return include


def headers_dir(*, quiet: bool = False) -> Path:
    """The onnxruntime include directory: ``$ORT_INCLUDE_DIR``, else the cache, else fetched with npm."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        return _check_headers(Path(env).expanduser(), "ORT_INCLUDE_DIR")
    target = cache_dir() / "ort-headers" / ORT_HEADERS_VERSION / "include"
    if _has_headers(target):
        return _check_headers(target, "header cache")
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError("no onnxruntime headers: set ORT_INCLUDE_DIR, or install npm so the build can fetch "
                         f"{NPM_PACKAGE}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-", dir=target.parent) as tmp:
        if not quiet:
            print(f"[ep_build] fetching onnxruntime {ORT_HEADERS_VERSION} headers: npm pack {NPM_PACKAGE}",
                  file=sys.stderr)
        r = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
                           cwd=tmp, capture_output=True, text=True)
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if r.returncode != 0 or not tgz:
            raise BuildError(f"npm pack {NPM_PACKAGE} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
        staged = Path(tmp) / "include"
        staged.mkdir()
        with tarfile.open(tgz[0], "r:gz") as tf:
            for m in tf:
                if not (m.isfile() and m.name.startswith(NPM_HEADERS_DIR) and m.name.endswith(".h")):
                    continue
                name = m.name[len(NPM_HEADERS_DIR):]
                if "/" in name or not name:
                    continue
                src = tf.extractfile(m)
                assert src is not None
                (staged / name).write_bytes(src.read())
        tgz[0].unlink()
        _check_headers(staged, f"npm {NPM_PACKAGE}")
        try:
            os.replace(staged, target)
        except OSError:
            if not _has_headers(target):  # not a racing process that got there first
                raise
    return _check_headers(target, "header cache")


# ---------------------------------------------------------------------------------------------- build


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise BuildError("no C++ compiler: install g++ (apt-get install g++) or set CXX")
    return cxx


def build(out_dir: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """Compile ``runtime/ep/*.cc`` into ``<out_dir>/libsolm_ep.so`` (default: the package directory)."""
    if not sources_present():
        raise BuildError(f"SolmEP sources not found under {SRC_DIR} (an installed wheel has none; build from a "
                         "source checkout)")
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else package_library().parent
    out.mkdir(parents=True, exist_ok=True)
    include = headers_dir(quiet=quiet)
    cxx = _compiler()
    build_id = source_hash()
    with tempfile.TemporaryDirectory(prefix=".solm-ep-", dir=out) as tmp:
        def compile_one(src: str) -> Path:
            obj = Path(tmp) / (src + ".o")
            cmd = [cxx, *CXXFLAGS, f"-I{include}", f'-DSOLM_EP_BUILD_ID="{build_id}"', "-c", str(SRC_DIR / src),
                   "-o", str(obj)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"compiling {src} failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
            return obj
        with concurrent.futures.ThreadPoolExecutor(len(SOURCES)) as pool:
            objs = list(pool.map(compile_one, SOURCES))
        staged = Path(tmp) / LIB_NAME
        cmd = [cxx, *LDFLAGS, *map(str, objs), "-o", str(staged)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"linking {LIB_NAME} failed:\n{' '.join(cmd)}\n{r.stderr[-4000:]}")
        final = out / LIB_NAME
        os.replace(staged, final)  # atomic: a loaded old copy keeps its inode
    if not quiet:
        print(f"[ep_build] built {final}", file=sys.stderr)
    return final


def build_cached(*, force: bool = False, quiet: bool = True) -> Path:
    """Build into ``<solm cache>/ep/<source hash>/`` unless that build already exists; return the library."""
    lib = cached_library()
    if lib.is_file() and not force:
        return lib
    return build(lib.parent, quiet=quiet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m solm_compile.runtime.ep_build",
                                 description="Build SolmEP (libsolm_ep.so), the onnxruntime plugin EP of solm.")
    ap.add_argument("--out", default=None, help="output directory (default: the installed package directory)")
    ap.add_argument("--cache", action="store_true", help="build into solm's cache instead (keyed by source hash)")
    args = ap.parse_args(argv)
    try:
        path = build_cached(force=True, quiet=False) if args.cache else build(args.out)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
