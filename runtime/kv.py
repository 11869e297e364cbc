"""An artifact's KV cache protocol, in one place: what to feed as the empty cache, how to bind it for a run, how to
carry it to the next step, and how to snapshot and restore it. ``SolmSession`` drives every consumer through it.

Two layouts, named by the artifact's ``solm.kv_cache`` metadata:

- ``concat`` (portable artifacts, dense ones whose attention did not fuse, and ai.solm artifacts written before
  issue 16): ``past_key_i`` /
  ``past_value_i`` float32 [B, Hkv, T_past, d]; the graph concatenates the new rows and returns the grown cache as
  ``present_*``, which the next step feeds back.
- ``buffer`` (the ai.solm kinds, ``passes/kv_buffer.py``; the dense kind in float32 where its attention is
  GroupQueryAttention, ``passes/fuse_attention.py``): ``past_key_i`` / ``past_value_i`` [B, Hkv, C, d] of the
  artifact's dtype (float16 by default), allocated once per decode with capacity C, plus ``past_length`` [B] int64.
  Each run binds ``present_*`` to the *same* OrtValues as ``past_*`` (onnxruntime writes the op's output into the
  bound buffer), so QuestAttention writes only the new rows, in place; carrying a step is ``past_length += T``.
  In step protocol 2 (``paged``, docs/protocol.md) each row has its own ``past_length`` and the Quest page state
  ``past_page_min_i`` / ``past_page_max_i`` is a float32 buffer [B, Hkv, C/S, d] of its own, bound in place the same
  way (protocol 1: carried tensors that grow, which ``SolmSession`` carries itself); protocol 3 keeps it in the
  cache's dtype (``page_dtype``: a min or max of float16 keys is a float16 value, so nothing is rounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solm_compile.errors import UserError

LAYOUTS = ("concat", "buffer")
DTYPES = {"float16": np.float16, "float32": np.float32}


def _ortvalue(x):
    import onnxruntime as ort

    return x if isinstance(x, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x))


def _shape(x) -> tuple:
    return tuple(x.shape() if callable(getattr(x, "shape", None)) else x.shape)


@dataclass(frozen=True)
class KvCache:
    """The KV cache protocol of one artifact (``KvCache.of(meta)``)."""
    layout: str
    dtype: type
    n_layers: int
    kv_heads: int
    head_dim: int
    page_size: int
    paged: bool = False      # step protocol 2: the page state is a buffer too, and rows may differ in length
    page_dtype: type = np.float32  # the page state buffers' dtype: the cache's from protocol 3 on

    @classmethod
    def of(cls, meta: dict, path="artifact") -> "KvCache":
        spec = meta.get("kv_cache") or {"layout": "concat", "dtype": "float32"}
        layout, dtype = spec.get("layout"), spec.get("dtype")
        if layout not in LAYOUTS or dtype not in DTYPES or (layout == "concat" and dtype != "float32"):
            raise UserError(f"{path}: KV cache {layout}/{dtype} is not one this runtime drives (concat/float32 or "
                            f"buffer/float16|float32); update solm or compile the model again")
        protocol = int(meta.get("protocol", 1))
        paged = layout == "buffer" and protocol >= 2
        page_dtype = DTYPES[dtype] if paged and protocol >= 3 else np.float32
        return cls(layout, DTYPES[dtype], int(meta["num_layers"]), int(meta["kv_heads"]), int(meta["head_dim"]),
                   int((meta.get("gate") or {}).get("page_size", 8)), paged, page_dtype)

    @property
    def buffered(self) -> bool:
        return self.layout == "buffer"

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]

    def page_names(self, prefix: str) -> list[str]:
        """The page state buffers (protocol 2; else none): ``{prefix}_page_min_i``, ``{prefix}_page_max_i``."""
        return [f"{prefix}_page_{m}_{i}" for i in range(self.n_layers) for m in ("min", "max")] if self.paged else []

    def row_bytes(self, tokens: int) -> int:
        """Bytes of one row's cache of ``tokens`` positions (every layer's keys and values, and its page buffers)."""
        C = self.capacity(tokens)
        kv = 2 * self.n_layers * self.kv_heads * C * self.head_dim * np.dtype(self.dtype).itemsize
        pages = len(self.page_names("past")) * self.kv_heads * (C // self.page_size) * self.head_dim
        return kv + pages * np.dtype(self.page_dtype).itemsize

    def page_shape(self, batch: int, capacity: int) -> tuple:
        return (batch, self.kv_heads, self.capacity(capacity) // self.page_size, self.head_dim)  # [B, Hkv, C/S, d]

    def capacity(self, tokens: int) -> int:
        """Rows to allocate for ``tokens`` positions: rounded up to whole pages."""
        S = self.page_size
        return max(-(-int(tokens) // S) * S, S)

    def empty(self, batch: int, capacity: int = 0) -> dict:
        """The feeds of an empty cache: concat, [B, Hkv, 0, d] float32; buffer, zeroed [B, Hkv, capacity, d]
        OrtValues (one per input: each is written in place) and past_length = 0."""
        if not self.buffered:
            z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)               # [B, Hkv, 0, d]
            return {name: z for name in self.names("past")}
        if capacity <= 0:
            raise ValueError("a KV cache buffer needs its capacity (prompt + new tokens)")
        shape = (batch, self.kv_heads, self.capacity(capacity), self.head_dim)               # [B, Hkv, C, d]
        pages = self.page_shape(batch, capacity)                                             # [B, Hkv, C/S, d]
        return {**{name: _ortvalue(np.zeros(shape, self.dtype)) for name in self.names("past")},
                **{name: _ortvalue(np.zeros(pages, self.page_dtype)) for name in self.page_names("past")},
                "past_length": np.zeros((batch,), np.int64)}                                  # [B]

    def aliases(self) -> dict:
        """{present_* output: past_* input} whose OrtValues a run binds as one (buffer layout; else empty)."""
        if not self.buffered:
            return {}
        return dict(zip(self.names("present") + self.page_names("present"),
                        self.names("past") + self.page_names("past")))

    def carry(self, out: dict, feeds: dict) -> None:
        """After a run on ``feeds``: the cache feeds of the next step."""
        if not self.buffered:
            for past, present in zip(self.names("past"), self.names("present")):
                feeds[past] = out[present]
            return
        T = _shape(feeds["input_ids"])[1]
        length = np.asarray(feeds["past_length"]) + T                                          # [B]
        C = _shape(feeds["past_key_0"])[2]
        if int(length.max(initial=0)) > C:
            raise UserError(f"KV cache overflow: {int(length.max())} positions > capacity {C}")
        feeds["past_length"] = length.astype(np.int64)

    def length(self, feeds: dict) -> int:
        """Valid positions in the cache (row 0; ``snapshot``/``restore`` need every row of the same length)."""
        if self.buffered:
            return int(np.asarray(feeds["past_length"])[0])
        return _shape(feeds["past_key_0"])[2]

    def snapshot(self, feeds: dict) -> dict:
        """The cache's valid rows, layout-free: {past_key_i / past_value_i: [B, Hkv, L, d]} in the cache's own dtype
        (half the bytes of a float32 copy for a float16 buffer; ``restore`` widens losslessly), to ``restore`` into
        this or another artifact's layout as often as needed."""
        L = self.length(feeds)
        rows = {}
        for name in self.names("past"):
            x = feeds[name].numpy() if hasattr(feeds[name], "numpy") else np.asarray(feeds[name])
            rows[name] = x[:, :, :L].copy()                                                      # [B, Hkv, L, d]
        pages = -(-L // self.page_size)
        for name in self.page_names("past"):                     # protocol 2: the pages of those rows
            rows[name] = feeds[name].numpy()[:, :, :pages].copy()                               # [B, Hkv, ⌈L/S⌉, d]
        return rows

    def _pages(self, snap: dict, name: str, L: int) -> np.ndarray:
        """A snapshot without page state (e.g. from torch): the page min or max of its keys as the buffer holds them
        (cast to its dtype), [B, Hkv, ⌈L/S⌉, d] — exactly what SolmEP folds (min and max round nothing)."""
        m, layer = name.split("_")[2], name.split("_")[3]
        keys = snap[f"past_key_{layer}"].astype(self.dtype).astype(np.float32)                 # [B, Hkv, L, d]
        S, P = self.page_size, -(-L // self.page_size)
        if L == 0:
            return keys
        pad = np.concatenate([keys, np.repeat(keys[:, :, -1:], P * S - L, axis=2)], axis=2)    # [B, Hkv, P·S, d]
        pages = pad.reshape(*keys.shape[:2], P, S, keys.shape[3])                               # [B, Hkv, P, S, d]
        return pages.min(3) if m == "min" else pages.max(3)

    def restore(self, snap: dict, capacity: int = 0) -> dict:
        """Fresh cache feeds holding a ``snapshot`` (a buffer of ``capacity`` positions, the rows cast to its dtype:
        float16 rounds to nearest even, as the kernel does), so decoding from them leaves the snapshot intact."""
        if not self.buffered:
            return {name: _ortvalue(rows.astype(np.float32)) for name, rows in snap.items()}     # a copy
        B, _, L, _ = snap["past_key_0"].shape
        shape = (B, self.kv_heads, self.capacity(max(capacity, L)), self.head_dim)               # [B, Hkv, C, d]
        feeds = {}
        for name in self.names("past"):
            buf = np.zeros(shape, self.dtype)
            buf[:, :, :L] = snap[name].astype(self.dtype)
            feeds[name] = _ortvalue(buf)
        for name in self.page_names("past"):
            buf = np.zeros(self.page_shape(B, max(capacity, L)), self.page_dtype)               # [B, Hkv, C/S, d]
            pages = snap[name] if name in snap else self._pages(snap, name, L)                  # [B, Hkv, ⌈L/S⌉, d]
            buf[:, :, :pages.shape[2]] = pages                  # fp16 pages of fp16 keys: exact either way
            feeds[name] = _ortvalue(buf)
        feeds["past_length"] = np.full((B,), L, np.int64)                                        # [B]
        return feeds
