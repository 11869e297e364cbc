"""An artifact's KV cache protocol, in one place: what to feed as the empty cache, how to bind it for a run, how to
carry it to the next step, and how to snapshot and restore it. ``SolmSession`` drives every consumer through it.

Two layouts, named by the artifact's ``solm.kv_cache`` metadata:

- ``concat`` (portable and dense artifacts, and ai.solm artifacts written before issue 16): ``past_key_i`` /
  ``past_value_i`` float32 [B, Hkv, T_past, d]; the graph concatenates the new rows and returns the grown cache as
  ``present_*``, which the next step feeds back.
- ``buffer`` (the ai.solm kinds, ``passes/kv_buffer.py``): ``past_key_i`` / ``past_value_i`` [B, Hkv, C, d] of the
  artifact's dtype (float16 by default), allocated once per decode with capacity C, plus ``past_length`` [B] int64.
  Each run binds ``present_*`` to the *same* OrtValues as ``past_*`` (onnxruntime writes the op's output into the
  bound buffer), so QuestAttention writes only the new rows, in place; carrying a step is ``past_length += T``.
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

    @classmethod
    def of(cls, meta: dict, path="artifact") -> "KvCache":
        spec = meta.get("kv_cache") or {"layout": "concat", "dtype": "float32"}
        layout, dtype = spec.get("layout"), spec.get("dtype")
        if layout not in LAYOUTS or dtype not in DTYPES or (layout == "concat" and dtype != "float32"):
            raise UserError(f"{path}: KV cache {layout}/{dtype} is not one this runtime drives (concat/float32 or "
                            f"buffer/float16|float32); update solm or compile the model again")
        return cls(layout, DTYPES[dtype], int(meta["num_layers"]), int(meta["kv_heads"]), int(meta["head_dim"]),
                   int((meta.get("gate") or {}).get("page_size", 8)))

    @property
    def buffered(self) -> bool:
        return self.layout == "buffer"

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]

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
        return {**{name: _ortvalue(np.zeros(shape, self.dtype)) for name in self.names("past")},
                "past_length": np.zeros((batch,), np.int64)}                                  # [B]

    def aliases(self) -> dict:
        """{present_* output: past_* input} whose OrtValues a run binds as one (buffer layout; else empty)."""
        return dict(zip(self.names("present"), self.names("past"))) if self.buffered else {}

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
        """Valid positions in the cache (row 0)."""
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
        return rows

    def restore(self, snap: dict, capacity: int = 0) -> dict:
        """Fresh cache feeds holding a ``snapshot`` (a buffer of ``capacity`` positions, the rows cast to its dtype:
        float16 rounds to nearest even, as the kernel does), so decoding from them leaves the snapshot intact."""
        if not self.buffered:
            return {name: _ortvalue(rows.astype(np.float32)) for name, rows in snap.items()}     # a copy
        B, _, L, _ = next(iter(snap.values())).shape
        shape = (B, self.kv_heads, self.capacity(max(capacity, L)), self.head_dim)               # [B, Hkv, C, d]
        feeds = {}
        for name, rows in snap.items():
            buf = np.zeros(shape, self.dtype)
            buf[:, :, :L] = rows.astype(self.dtype)
            feeds[name] = _ortvalue(buf)
        feeds["past_length"] = np.full((B,), L, np.int64)                                        # [B]
        return feeds
