"""SolmEP's C kernels (``runtime/ep/kernels_*.cc``) for the torch.compile path's custom ops, through ctypes.

``fast_ops.quest_attention_gather`` and ``fast_ops.sparse_mlp_gather`` call these first on CPU fp32 decode steps;
each returns None where it does not apply (no library, other dtype or device, non-contiguous input), and the op
then runs its torch implementation. One kernel serves both runtimes: onnxruntime's SolmEP and this path call the
same ``solm::QuestAttention`` / ``solm::SparseMlp`` through ``runtime/ep/c_api.cc``.

Why: the torch versions pay ~60 small eager ops per attention layer for page selection, and gather (copy) MLP
weight rows; the kernels select in one pass and read kept K/V rows and weight panels in place.

The library is the one ``runtime.ep.library_path()`` finds (built by ``python -m solm_compile.runtime.ep_build``).
Missing, stale without the C API, or unloadable: one debug log, and every call returns None. Calls run serially
on the calling thread (torch's intra-op pool is not reachable from C); scratch is per thread.

MLP weights are re-laid out input-major once per weight set (a C-side copy of gate/up/down, ~the weights' size),
cached per weight storage and version like ``fast_ops.packed_weight`` and freed when a weight dies, is modified in
place, or ``reset()`` runs. ctypes drops the GIL for the C call, so any of those can happen on another thread while
a call reads the copy: a call holds a reference on its handle (``_Handle.refs``, taken and given back under
``_lock``) and the C copy is freed by whoever drops the last reference, never while a call is in flight.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor

API_VERSION = 3           # runtime/ep/c_api.cc: solm_c_api_version()
STATS = {"attn_c_calls": 0, "attn_state_carried": 0, "mlp_c_calls": 0, "mlp_handles": 0}
_log = logging.getLogger(__name__)
_lock = threading.RLock()   # reentrant: a weight's finalizer may run (GC) while the handle cache is being filled
_state: dict = {}           # "lib": the loaded CDLL or None, once tried
_HANDLES: dict = {}

_P, _I64, _F32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "solm_quest_attention": (_INT, [_P, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64,
                                    _I64, _I64, _I64, _F32, _I64, _I64, _I64, _INT, _INT, _P]),
    "solm_quest_attention_state": (_INT, [_P, _P, _P, _P, _INT, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64,
                                          _I64, _I64, _I64, _I64, _F32, _I64, _I64, _I64, _INT, _INT,
                                          _P, _P, _I64, _P, _P, _P, _P, _P]),
    "solm_mlp_create": (_P, [_P, _P, _P, _P, _P, _P, _I64, _I64, _I64]),
    "solm_mlp_run": (_INT, [_P, _P, _I64, _I64, _P, _P, ctypes.c_char_p, _P]),
    "solm_mlp_free": (None, [_P]),
}


def _load(path=None) -> Optional[ctypes.CDLL]:
    """The library (default: ``ep.library_path()``) with its C API bound, or None (logged at debug level)."""
    try:
        if path is None:
            from solm_compile.runtime import ep
            path = ep.library_path()
        if path is None:
            raise OSError("libsolm_ep.so is not built (python -m solm_compile.runtime.ep_build)")
        lib = ctypes.CDLL(str(path))
        version = lib.solm_c_api_version()
        if version != API_VERSION:
            raise OSError(f"{path} has C API version {version}, expected {API_VERSION}")
        for name, (res, args) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        return lib
    except (OSError, AttributeError, ImportError) as e:   # AttributeError: an older build without the C API
        _log.debug("solm C kernels unavailable, the torch.compile path runs its torch ops: %s", e)
        return None


def library() -> Optional[ctypes.CDLL]:
    """The bound library, loaded on first use; None if unavailable."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = _load()
    return _state["lib"]


def reset() -> None:
    """Forget the loaded library and the cached MLP weight copies (the next call loads and re-lays out again).
    A copy that a call on another thread is using is freed when that call returns."""
    with _lock:
        _state.pop("lib", None)
        keys = list(_HANDLES)
    for key in keys:
        _drop(key)


def _plain(t: Optional[Tensor]) -> bool:
    """A CPU fp32 contiguous tensor (or absent)."""
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


def _rows(t: Tensor, B: int) -> Optional[Tensor]:
    """A [B] fp32 control vector (one value per row, or one broadcast to every row); None if neither."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.numel() not in (1, B):
        return None
    if t.dim() == 1 and t.shape[0] == B and t.is_contiguous():         # already [B]: no view ops per step
        return t
    return t.reshape(-1).expand(B).contiguous()                        # [B]


# ---------------------------------------------------------------------------------------------- attention
def quest_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], kappa: Tensor,
                    scale: Optional[float], page_size: int, sinks: int, window: int) -> Optional[Tensor]:
    """``solm.quest_attention`` of single-token queries by ``solm::QuestAttention``; None if the C path does not
    apply. q [B,H,1,d], k [B,Hkv,L,d], v [B,Hkv,L,dv] → [B,H,1,dv]."""
    lib = library()
    if lib is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or not (_plain(q) and _plain(k) and _plain(v)):
        return None
    B, H, T, d = q.shape
    Hkv, L, dv = k.shape[1], k.shape[2], v.shape[3]
    if T != 1 or L == 0 or Hkv == 0 or H % Hkv or k.shape[0] != B or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        return None
    kap = _rows(kappa, B)                                              # [B]
    mask = _mask_view(attn_mask, B, H, T, L)
    if kap is None or mask is None:
        return None
    out = q.new_empty(B, H, T, dv)                                     # [B,H,1,dv]
    ptr, is_bool, strides = mask
    past_min, past_max, P_past, new_min, new_max, last = _page_state(k, page_size)
    lp = _ptr(last)
    rc = lib.solm_quest_attention_state(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), ptr, is_bool, *strides, kap.data_ptr(), B, H, Hkv, T, L, d, dv,
        0.0 if scale is None else float(scale), page_size, sinks, window, 0, 0, _ptr(past_min), _ptr(past_max),
        P_past, _ptr(new_min), _ptr(new_max), lp if P_past else None, lp, out.data_ptr())
    if rc < 0:
        _forget_page_state()
        return None
    STATS["attn_c_calls"] += 1
    STATS["attn_state_carried"] += int(P_past > 0 and rc == 0)   # 1: the key at L-2 changed, pages recomputed
    return out


def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------------------------------------- page state
class PageStates:
    """The Quest page min/max of one decode sequence, carried across the compiled model's calls like the
    artifact's ``present_page_*`` outputs, so a step folds only its new key instead of reading all of K.

    Owned by the ``PolicyController`` (reset with its episode at every prefill); a gated call activates it with
    ``carrying(states, key)`` and its attention ops take slots in call order. A slot is reused only if it was
    left by the previous step of the same sequence: the same shapes, length L-1, and the same key at L-2
    (so a reordered, cropped or foreign cache, or a different layer, recomputes every page instead)."""

    def __init__(self):
        self.slots: dict = {}
        self.key, self.i = None, 0

    def reset(self) -> None:
        self.slots.clear()


_active = threading.local()


class carrying:
    """``with carrying(states, key):`` the attention ops of one gated call (``key`` names the graph) use ``states``."""

    def __init__(self, states: Optional[PageStates], key):
        self.states, self.key = states, key

    def __enter__(self):
        self.prev = getattr(_active, "states", None)
        if self.states is not None:
            self.states.key, self.states.i = self.key, 0
        _active.states = self.states
        return self.states

    def __exit__(self, *exc):
        _active.states = self.prev
        return False


def _take_slot(k: Tensor, S: int, check_key: bool = True):
    """(states, slot key, the slot if it continues this sequence else None); (None, None, None) outside a call.
    ``check_key=False`` leaves the key at L-2 to the C kernel (``prev_key``), which compares it without a copy."""
    ps = getattr(_active, "states", None)
    if ps is None:
        return None, None, None
    B, Hkv, L, d = k.shape
    slot_key = (ps.key, ps.i)
    ps.i += 1
    _active.slot = slot_key
    slot = ps.slots.get(slot_key)
    if (slot is None or slot["shape"] != (B, Hkv, d, S) or slot["L"] != L - 1 or L < 2
            or (check_key and not torch.equal(slot["last"], k[:, :, L - 2]))):
        slot = None
    return ps, slot_key, slot


def _page_state(k: Tensor, S: int):
    """(past_min, past_max, P_past, new_min, new_max, last) for this call's slot, or no state outside a gated
    call. ``last`` [B,Hkv,d] holds the key at L-2 the past state was folded up to (the kernel's ``prev_key``,
    checked there) and receives the key at L-1."""
    ps, slot_key, slot = _take_slot(k, S, check_key=False)
    if ps is None:
        return None, None, 0, None, None, None
    B, Hkv, L, d = k.shape
    P, P_past = -(-L // S), -(-(L - 1) // S)
    if slot is not None:
        pmin, pmax, last = slot["min"], slot["max"], slot["last"]
        if P_past == P:                                   # the last page grows: update it in place
            nmin, nmax = pmin, pmax
        else:                                             # a new page starts: a buffer one page longer
            nmin, nmax = k.new_empty(B, Hkv, P, d), k.new_empty(B, Hkv, P, d)              # [B,Hkv,P,d]
    else:
        pmin = pmax = None
        P_past = 0
        nmin, nmax = k.new_empty(B, Hkv, P, d), k.new_empty(B, Hkv, P, d)                  # [B,Hkv,P,d]
        last = k.new_empty(B, Hkv, d)                                                      # [B,Hkv,d]
    ps.slots[slot_key] = {"shape": (B, Hkv, d, S), "L": L, "min": nmin, "max": nmax, "last": last}
    return pmin, pmax, P_past, nmin, nmax, last


def fold_dense_step(k: Tensor, S: int) -> None:
    """A decode step that runs dense (torch's SDPA) inside a gated call: fold its new key into the carried page
    min/max (exact: min and max do not depend on order), so the next pruned step still reads O(pages·d)."""
    ps, slot_key, slot = _take_slot(k, S)
    if ps is None:
        return
    if slot is None or not _plain(k):
        ps.slots.pop(slot_key, None)                      # nothing to continue: the next C call recomputes
        return
    L = k.shape[2]
    row = k[:, :, L - 1]                                                                   # [B,Hkv,d]
    if (L - 1) % S:                                       # the key joins the last page
        slot["min"][:, :, -1].copy_(torch.minimum(slot["min"][:, :, -1], row))
        slot["max"][:, :, -1].copy_(torch.maximum(slot["max"][:, :, -1], row))
    else:                                                 # the key starts a page
        slot["min"] = torch.cat([slot["min"], row[:, :, None]], 2)                         # [B,Hkv,P,d]
        slot["max"] = torch.cat([slot["max"], row[:, :, None]], 2)
    slot["L"], slot["last"] = L, row.clone()


def _forget_page_state() -> None:
    ps = getattr(_active, "states", None)
    if ps is not None:
        ps.slots.pop(getattr(_active, "slot", None), None)


def _mask_view(m: Optional[Tensor], B: int, H: int, T: int, L: int):
    """(pointer, is_bool, element strides of m broadcast to [B,H,T,L]); (None, 1, zeros) without a mask; None if
    the kernel cannot read it (dtype, device, not broadcastable)."""
    if m is None:
        return None, 1, (0, 0, 0, 0)
    if m.device.type != "cpu" or m.dtype not in (torch.bool, torch.float32) or m.dim() > 4:
        return None
    try:
        mv = m.expand(B, H, T, L)                                      # [B,H,T,L] view, stride 0 where broadcast
    except RuntimeError:
        return None
    return mv.data_ptr(), int(m.dtype == torch.bool), tuple(mv.stride())


# ---------------------------------------------------------------------------------------------- MLP
def sparse_mlp(x: Tensor, w_gate: Optional[Tensor], b_gate: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
               w_down: Tensor, b_down: Optional[Tensor], rho: Tensor, bits: Tensor, act: str) -> Optional[Tensor]:
    """``solm.sparse_mlp`` by ``solm::SparseMlp``; None if the C path does not apply. x [B,T,D] → [B,T,Dout]."""
    lib = library()
    ws = (w_gate, b_gate, w_up, b_up, w_down, b_down)
    if lib is None or x.dim() != 3 or not all(map(_plain, (x,) + ws)) or not _mlp_shapes_ok(x, *ws):
        return None
    B, T, _ = x.shape
    r, b = _rows(rho, B), _rows(bits, B)                               # [B], [B]
    if r is None or b is None:
        return None
    handle = _acquire(lib, ws)
    if handle is None:
        return None
    y = x.new_empty(B, T, w_down.shape[0])                             # [B,T,Dout]
    try:                                                               # the GIL is released inside the C call
        rc = handle.lib.solm_mlp_run(handle.ptr, x.data_ptr(), B, T, r.data_ptr(), b.data_ptr(), act.encode(),
                                     y.data_ptr())
    finally:
        _release(handle)
    if rc != 0:
        return None
    STATS["mlp_c_calls"] += 1
    return y


def _mlp_shapes_ok(x, w_gate, b_gate, w_up, b_up, w_down, b_down) -> bool:
    if w_up.dim() != 2 or w_down.dim() != 2:
        return False
    I, D = w_up.shape
    return (x.shape[-1] == D and w_down.shape[1] == I and (w_gate is None or w_gate.shape == w_up.shape)
            and all(bb is None or bb.numel() == n for bb, n in ((b_gate, I), (b_up, I), (b_down, w_down.shape[0]))))


def _key(t: Optional[Tensor]):
    return None if t is None else (t.data_ptr(), t.shape, t._version)


class _Handle:
    """One C-side weight copy (``solm_mlp_create``) and the calls using it: ``refs`` counts the cache's reference
    (until ``_drop``) plus one per call in flight; the copy is freed when it reaches 0. Guarded by ``_lock``."""

    __slots__ = ("ptr", "lib", "refs")

    def __init__(self, ptr: int, lib: ctypes.CDLL):
        self.ptr, self.lib, self.refs = ptr, lib, 1


def _acquire(lib: ctypes.CDLL, ws: tuple) -> Optional[_Handle]:
    """The C-side re-laid-out weights of ws (gate, b_gate, up, b_up, down, b_down), made on first use, with a
    reference held for the caller (give it back with ``_release``)."""
    key = tuple([_key(t) for t in ws])
    with _lock:
        h = _HANDLES.get(key)
        if h is None:
            h = _create(lib, ws, key)
        if h is not None:
            h.refs += 1
        return h


def _create(lib: ctypes.CDLL, ws: tuple, key) -> Optional[_Handle]:
    """Called under _lock (reentrant: a weight's finalizer may run _drop while this fills the cache)."""
    for old in [kk for kk in _HANDLES if kk[2][:2] == key[2][:2]]:
        _drop(old)                                       # the same weight modified in place: free the stale copy
    w_gate, b_gate, w_up, b_up, w_down, b_down = ws
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    p = lib.solm_mlp_create(*map(ptr, ws), w_up.shape[1], w_up.shape[0], w_down.shape[0])
    if not p:
        return None
    h = _HANDLES[key] = _Handle(p, lib)
    STATS["mlp_handles"] += 1
    for t in ws:
        if t is not None:
            weakref.finalize(t, _drop, key)              # uncached with the first of its weights that dies
    return h


def _release(h: _Handle) -> None:
    with _lock:
        h.refs -= 1
        last = h.refs == 0
    if last:
        h.lib.solm_mlp_free(h.ptr)


def _drop(key) -> None:
    """Uncache key's copy; it is freed now, or by the last call still using it."""
    with _lock:
        h = _HANDLES.pop(key, None)
    if h is not None:
        _release(h)
