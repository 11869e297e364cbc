"""Find, register and use SolmEP, solm's onnxruntime plugin execution provider.

SolmEP (``runtime/ep/*.cc``, built by ``ep_build``) executes the ``ai.solm`` nodes of a compiled artifact with
kernels that skip the pruned work; every other node stays on onnxruntime's CPU EP. Typical use::

    from solm_compile.runtime import ep
    so = ep.session_options_with_ep()           # SolmEP first, CPU EP after it, if the library is there
    sess = onnxruntime.InferenceSession(path, so)
    sess.get_providers()                         # ['SolmEP', 'CPUExecutionProvider']

Without the built library every function here degrades gracefully: ``register`` warns once and returns False,
``session_options_with_ep`` returns plain session options, and callers run the portable artifact instead. The one
exception is ``registered_ops`` (what the built library registers), which has nothing to report and raises.
"""

from __future__ import annotations

import ctypes
import json
import threading
import warnings
from pathlib import Path
from typing import Any

from solm_compile.runtime import ep_build

EP_NAME = "SolmEP"
MIN_ORT = (1, 24)  # the plugin-EP API level the library asks for
NOT_BUILT = ("SolmEP is not built, so only portable artifacts run here; build it with "
             "`python -m solm_compile.runtime.ep_build` (needs g++ and npm)")

_lock = threading.Lock()
_registered: Path | None = None
_warned = False


def library_path() -> Path | None:
    """The built library: first ``libsolm_ep.so`` inside the installed package, else the build cache; or None.

    In a source checkout a package library built from older sources is passed over for the cache build of the
    current sources when there is one (and used, with a warning, when there is not).
    """
    pkg = ep_build.package_library()
    if pkg.is_file():
        if not ep_build.is_stale(pkg):
            return pkg
        cached = ep_build.cached_library()
        if cached.is_file():
            return cached
        _warn_once(f"{pkg} was built from older sources than runtime/ep/; rebuild it with "
                   "`python -m solm_compile.runtime.ep_build`")
        return pkg
    return ep_build.latest_cached_library()


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _ort_version(ort: Any) -> tuple[int, int]:
    try:
        major, minor = ort.__version__.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return (0, 0)


def is_registered() -> bool:
    """Whether this process has registered SolmEP with onnxruntime."""
    return _registered is not None


def register(ort: Any = None, path: str | Path | None = None) -> bool:
    """Register SolmEP with onnxruntime once per process (idempotent); True if it is usable.

    ``ort`` is the onnxruntime module (imported if None); ``path`` overrides ``library_path()``. Returns False,
    warning once, when the library is missing, the runtime is older than 1.24, or registration fails.
    """
    global _registered
    if ort is None:
        import onnxruntime as ort
    with _lock:
        if _registered is not None:
            return True
        lib = Path(path) if path is not None else library_path()
        if lib is None or not lib.is_file():
            _warn_once(NOT_BUILT)
            return False
        if _ort_version(ort) < MIN_ORT or not hasattr(ort, "register_execution_provider_library"):
            _warn_once(f"SolmEP needs onnxruntime >= {MIN_ORT[0]}.{MIN_ORT[1]} (found "
                       f"{getattr(ort, '__version__', '?')}): only portable artifacts run here")
            return False
        try:
            ort.register_execution_provider_library(EP_NAME, str(lib))
        except Exception as e:  # noqa: BLE001 - onnxruntime raises plain RuntimeError/Fail types
            if "already" not in str(e).lower():
                _warn_once(f"SolmEP could not be registered from {lib}: {e}; only portable artifacts run here")
                return False
        if not any(d.ep_name == EP_NAME for d in ort.get_ep_devices()):
            _warn_once(f"SolmEP registered from {lib} but offers no device; only portable artifacts run here")
            return False
        _registered = lib
        return True


def ep_devices(ort: Any = None) -> list:
    """The OrtEpDevice entries of SolmEP (empty if it is not registered)."""
    if ort is None:
        import onnxruntime as ort
    return [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]


def session_options_with_ep(so: Any = None, *, ort: Any = None, provider_options: dict[str, str] | None = None,
                            select_per_kv_head: bool | None = None, intra_op_num_threads: int | None = None) -> Any:
    """Session options with SolmEP added in front of the CPU EP (registering it first if needed).

    ``so`` is extended in place (a new ``SessionOptions`` if None) and returned. If SolmEP is unavailable ``so`` is
    returned without it (and ``register`` has warned once). ``select_per_kv_head`` overrides the attribute of every
    QuestAttention node (pages chosen once per KV head instead of per query head). The kernels parallelise over
    onnxruntime's intra-op thread pool, so ``intra_op_num_threads`` sets their thread count.
    """
    if ort is None:
        import onnxruntime as ort
    if so is None:
        so = ort.SessionOptions()
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    if not register(ort):
        return so
    opts = {str(k): str(v) for k, v in (provider_options or {}).items()}
    if select_per_kv_head is not None:
        opts["select_per_kv_head"] = "1" if select_per_kv_head else "0"
    so.add_provider_for_devices(ep_devices(ort), opts)
    return so


def registered_ops(path: str | Path | None = None) -> list[dict]:
    """The ``ai.solm`` ops the built library registers, read from its own op table (``runtime/ep/op_table.h``,
    through the C function ``solm_ep_registered_ops``), one dict per op::

        {"op_type": "QuestAttention", "domain": "ai.solm", "since_version": 1, "inputs": 7,
         "optional_inputs": [3, 5, 6], "outputs": 3, "optional_outputs": [1, 2],
         "attributes": ["scale", "is_causal", ...]}

    ``path`` overrides ``library_path()``. Needs no onnxruntime (the library is only loaded, not registered).
    Raises FileNotFoundError without a built library, AttributeError for a library older than this function.
    ``solm_compile.ops.registry.ep_view`` gives the same form for each op of the Python registry.
    """
    lib = Path(path) if path is not None else library_path()
    if lib is None or not lib.is_file():
        raise FileNotFoundError(NOT_BUILT)
    fn = ctypes.CDLL(str(lib)).solm_ep_registered_ops
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return json.loads(fn().decode())


def isa_report(path: str | Path | None = None) -> dict:
    """Which SIMD variant each SolmEP kernel family ran last in this process, from the library itself (the C
    function ``solm_ep_isa_report``)::

        {"selected": "x86-64-v4", "cap": None, "decode_attention": "x86-64-v4", "prefill_attention": None,
         "sparse_mlp": "x86-64-v4"}

    ``selected`` is what the CPU supports, capped by the environment variable SOLM_EP_ISA (baseline | x86-64-v3 |
    x86-64-v4, read once per process); a family is None until it has run. ``path`` overrides the registered library
    (else ``library_path()``); loading the library the process registered shares its state. Raises
    FileNotFoundError without a built library.
    """
    lib = Path(path) if path is not None else (_registered or library_path())
    if lib is None or not lib.is_file():
        raise FileNotFoundError(NOT_BUILT)
    fn = ctypes.CDLL(str(lib)).solm_ep_isa_report
    fn.restype, fn.argtypes = ctypes.c_char_p, []
    return json.loads(fn().decode())


COUNTERS = ("attn_calls", "attn_keys_scored", "attn_keys_dense", "attn_kv_rows_read", "mlp_calls", "mlp_in_rows",
            "mlp_in_rows_dense", "mlp_down_rows", "mlp_down_rows_dense", "attn_minmax_rows", "mlp_down_dense_rows")


def work_counters(path: str | Path | None = None) -> dict[str, int]:
    """SolmEP's work counters, summed over this process (the C function ``SolmEpGetStats``; runtime/ep/kernels.h
    says what each counts): what the kernels really read, e.g. ``attn_kv_rows_read`` (K and V rows, once per KV head
    and query row) and ``mlp_down_rows`` against ``mlp_down_rows_dense``. Take two readings and subtract. ``path``
    as in ``isa_report``. Raises FileNotFoundError without a built library."""
    lib = Path(path) if path is not None else (_registered or library_path())
    if lib is None or not lib.is_file():
        raise FileNotFoundError(NOT_BUILT)
    buf = (ctypes.c_uint64 * len(COUNTERS))()
    ctypes.CDLL(str(lib)).SolmEpGetStats(buf, len(COUNTERS))
    return dict(zip(COUNTERS, buf))
