"""``BlockQuant``: the one low-bit weight format every solm path reads.

A weight ``W [N, K]`` (nn.Linear layout: N outputs, K inputs) is cut into blocks of ``block`` consecutive inputs
per output row. Each block stores unsigned integer codes ``q`` (``bits`` wide), a scale ``d`` and an offset ``m``,
and means ``w = d·q + m``. All of GGUF's simple block formats are this form, exactly:

===========  =====  =========================  =========================
GGUF type    bits   d                          m
===========  =====  =========================  =========================
Q4_0         4      d                          −8·d
Q4_1         4      d                          m
Q5_0         8*     d                          −16·d
Q8_0         8      d                          −128·d   (codes = q + 128)
Q4_K         4      d·sc_j (per 32)            −dmin·m_j
Q6_K         8*     d·sc_j (per 16: block 16)  −32·d·sc_j
===========  =====  =========================  =========================

(*) 5- and 6-bit codes are stored one per byte. Where the offset is an integer multiple of the scale (every type
but Q4_1 and Q4_K) the block records that ``zero_point`` z and ``dequantize()`` computes d·(q − z), otherwise
(d·q) + m: the same one rounding as GGUF's own dequantiser, so ``dequantize()`` is bit-identical to
``gguf.quants.dequantize`` (tests/test_quant.py checks every type on random blocks; the weight lookup also reads
−0 as +0).

The round-to-nearest quantizers (``int4``: asymmetric, group 32; ``int8``: symmetric, group 32) keep their scales
fp16-representable for the same reason, and they also record an integer ``zero_point`` (``m = −zero_point·d``):
that is what ``MatMulNBits`` needs on stock onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

BLOCK = 32


@dataclass(frozen=True, eq=False)
class BlockQuant:
    codes: np.ndarray                  # [N, K/block, block] uint8, one code per byte
    scale: np.ndarray                  # [N, K/block] float32
    offset: np.ndarray                 # [N, K/block] float32
    bits: int                          # 4 or 8: the width the codes are stored at
    fmt: str                           # where it came from: "Q4_1", "int4-rtn", ...
    zero_point: Optional[np.ndarray] = None   # [N, K/block] uint8 when offset == −zero_point·scale exactly

    def __post_init__(self):
        n, nb, block = self.codes.shape
        if self.codes.dtype != np.uint8:
            raise ValueError(f"codes must be uint8, got {self.codes.dtype}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if int(self.codes.max(initial=0)) >= 1 << self.bits:
            raise ValueError(f"a code exceeds {self.bits} bits")
        for name in ("scale", "offset"):
            a = getattr(self, name)
            if a.shape != (n, nb) or a.dtype != np.float32:
                raise ValueError(f"{name} must be float32 [{n}, {nb}], got {a.dtype} {list(a.shape)}")
        if self.zero_point is not None and (self.zero_point.shape != (n, nb) or self.zero_point.dtype != np.uint8):
            raise ValueError("zero_point must be uint8 [N, K/block]")

    @property
    def shape(self) -> tuple[int, int]:
        n, nb, block = self.codes.shape
        return n, nb * block

    @property
    def block(self) -> int:
        return self.codes.shape[2]

    def dequantize(self) -> np.ndarray:
        """W [N, K] float32, computed as GGUF does: d·(q − z) with an integer zero point, else (d·q) + m."""
        if self.zero_point is not None:
            q = self.codes.astype(np.float32) - self.zero_point[..., None].astype(np.float32)   # exact small ints
            return (q * self.scale[..., None]).reshape(self.shape)
        w = self.codes.astype(np.float32) * self.scale[..., None]         # [N, nb, block]
        w = w + self.offset[..., None]                                      # [N, nb, block]
        return w.reshape(self.shape)

    def take_rows(self, rows: np.ndarray) -> "BlockQuant":
        zp = None if self.zero_point is None else self.zero_point[rows]
        return BlockQuant(self.codes[rows], self.scale[rows], self.offset[rows], self.bits, self.fmt, zp)

    def nbytes(self) -> int:
        """Bytes this weight costs in a packed layout (codes at ``bits``, fp16 scale and offset per block)."""
        n, nb, block = self.codes.shape
        per_block = block * self.bits // 8 + (2 if self.zero_point is not None and self.fmt.endswith("-rtn") else 4)
        return n * nb * per_block


def _fp16_scale(s: np.ndarray) -> np.ndarray:
    """Scales rounded to fp16 and back (never to 0): d·q then stays exact in fp32."""
    s16 = s.astype(np.float16)
    s16 = np.where(s16 == 0, np.float16(1.0), s16)
    return s16.astype(np.float32)


def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    n, k = w.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block size {block}")
    return np.ascontiguousarray(w, dtype=np.float32).reshape(n, k // block, block)   # [N, nb, block]


def quantize_int4(w: np.ndarray, block: int = BLOCK) -> BlockQuant:
    """Asymmetric round-to-nearest, 4 bits, one (scale, zero point) per block of ``block`` inputs."""
    x = _blocks(w, block)                                                   # [N, nb, block]
    lo = np.minimum(x.min(axis=2), 0.0)                                     # [N, nb] the grid spans 0
    hi = np.maximum(x.max(axis=2), 0.0)                                     # [N, nb]
    d = _fp16_scale((hi - lo) / 15.0)                                       # [N, nb]
    zp = np.clip(np.rint(-lo / d), 0, 15).astype(np.uint8)                  # [N, nb]
    q = np.clip(np.rint(x / d[..., None]) + zp[..., None], 0, 15).astype(np.uint8)   # [N, nb, block]
    return BlockQuant(q, d, (-(zp.astype(np.float32)) * d).astype(np.float32), 4, "int4-rtn", zp)


def quantize_int8(w: np.ndarray, block: int = BLOCK) -> BlockQuant:
    """Symmetric round-to-nearest, 8 bits (codes = q + 128), one scale per block of ``block`` inputs."""
    x = _blocks(w, block)                                                   # [N, nb, block]
    d = _fp16_scale(np.abs(x).max(axis=2) / 127.0)                          # [N, nb]
    q = np.clip(np.rint(x / d[..., None]), -127, 127) + 128                 # [N, nb, block]
    zp = np.full(d.shape, 128, np.uint8)
    return BlockQuant(q.astype(np.uint8), d, (-128.0 * d).astype(np.float32), 8, "int8-rtn", zp)


QUANTIZERS = {"int4": quantize_int4, "int8": quantize_int8}


def requantize_transposed(bq: BlockQuant, bits: int = 8) -> BlockQuant:
    """The blocks of Wᵀ ([K, N], blocks of 32 along N) from ``bq``'s W [N, K]: W dequantised, transposed, and
    re-quantised round-to-nearest at ``bits`` (8: symmetric, 4: asymmetric; QUANTIZERS). SparseMLPBlocks' skip="h"
    stores down so (one contiguous row per intermediate unit); the rounding is new error against the source."""
    if bits not in (4, 8):
        raise ValueError(f"requantize_transposed: bits must be 4 or 8, got {bits}")
    wt = np.ascontiguousarray(bq.dequantize().T)
    return (quantize_int8 if bits == 8 else quantize_int4)(wt)
