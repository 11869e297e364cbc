"""GGUF block formats read into ``BlockQuant`` without touching a value (Q4_0, Q4_1, Q5_0, Q8_0).

GGUF stores a 2-D weight as ``ne = [K, N]``: N rows of K inputs, each row a run of blocks of 32 inputs. The bytes
of one block, by type (d and m are fp16)::

    Q4_0   d | 16 bytes: code j < 16 in the low nibble of byte j, code 16 + j in its high nibble    w = d·(q − 8)
    Q4_1   d | m | 16 bytes as Q4_0                                                                  w = d·q + m
    Q5_0   d | 4 bytes: bit j = the 5th bit of code j | 16 bytes as Q4_0 for the low 4 bits         w = d·(q − 16)
    Q8_0   d | 32 int8                                                                               w = d·q

and the super-blocks of 256 (Gemma-3's Q4_K_M file mixes them with Q5_0 and Q8_0)::

    Q4_K   d | dmin | 12 bytes: eight 6-bit (sc, m) | 128 bytes: 4 runs of 32, low nibbles = sub-block 2r, high 2r+1
                                                                           w = (d·sc)·q − dmin·m   per 32
    Q6_K   128 bytes low 4 bits | 64 bytes high 2 bits | 16 int8 sc | d    w = (d·sc)·(q − 32)       per 16

Other types (Q5_K, Q2_K, F16, ...) are not read here: ``read_blocks`` lists them as skipped, and the weights they
hold stay as the loader dequantised them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from solm_compile.quant.blocks import BlockQuant

_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q8_0": 34, "Q4_K": 144, "Q6_K": 210}


def _fp16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]      # [N, nb]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[N, nb, 16] bytes -> [N, nb, 32] codes (the low nibbles, then the high ones)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode(kind: str, raw: np.ndarray) -> BlockQuant:
    """``raw`` [N, nb * bytes_per_block] uint8 of one GGUF tensor -> its BlockQuant (bit-exact)."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, _BYTES[kind])                              # [N, nb, bytes]
    d = _fp16(blocks[..., 0:2])                                             # [N, nb]
    if kind == "Q4_0":
        return BlockQuant(_nibbles(blocks[..., 2:18]), d, -8.0 * d, 4, kind, np.full(d.shape, 8, np.uint8))
    if kind == "Q4_1":
        return BlockQuant(_nibbles(blocks[..., 4:20]), d, _fp16(blocks[..., 2:4]), 4, kind)
    if kind == "Q5_0":
        qh = np.ascontiguousarray(blocks[..., 2:6]).view(np.uint32)         # [N, nb, 1]
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)   # [N, nb, 32]
        return BlockQuant(_nibbles(blocks[..., 6:22]) | (high << 4), d, -16.0 * d, 8, kind,
                          np.full(d.shape, 16, np.uint8))
    if kind == "Q8_0":
        q = blocks[..., 2:34].view(np.int8).astype(np.int16) + 128          # [N, nb, 32]
        return BlockQuant(q.astype(np.uint8), d, -128.0 * d, 8, kind, np.full(d.shape, 128, np.uint8))
    return _q4_k(blocks) if kind == "Q4_K" else _q6_k(blocks)


def _q4_k(blocks: np.ndarray) -> BlockQuant:
    """[N, nsb, 144] super-blocks -> blocks of 32: scale d·sc, offset −dmin·m."""
    n, nsb, _ = blocks.shape
    d, dmin = _fp16(blocks[..., 0:2]), _fp16(blocks[..., 2:4])              # [N, nsb]
    packed = blocks[..., 4:16].reshape(n, nsb, 3, 4)                        # 12 bytes: eight 6-bit pairs
    lo, hi, extra = packed[..., 0, :], packed[..., 1, :], packed[..., 2, :]  # [N, nsb, 4] each
    sc = np.concatenate([lo & 0x3F, (extra & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)    # [N, nsb, 8]
    mn = np.concatenate([hi & 0x3F, (extra >> 4) | ((hi >> 2) & 0x30)], axis=-1)      # [N, nsb, 8]
    runs = blocks[..., 16:144].reshape(n, nsb, 4, 32)                       # [N, nsb, 4, 32]
    codes = np.stack([runs & 0x0F, runs >> 4], axis=3).reshape(n, nsb * 8, 32)        # sub-blocks 2r, 2r+1
    scale = (d[..., None] * sc.astype(np.float32)).reshape(n, nsb * 8)
    offset = -(dmin[..., None] * mn.astype(np.float32)).reshape(n, nsb * 8)
    return BlockQuant(codes.astype(np.uint8), scale, offset, 4, "Q4_K")


def _q6_k(blocks: np.ndarray) -> BlockQuant:
    """[N, nsb, 210] super-blocks -> blocks of 16 with 6-bit codes (one per byte): scale d·sc, zero point 32."""
    n, nsb, _ = blocks.shape
    low = blocks[..., 0:128].reshape(n, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    low = (low & 0x0F).reshape(n, nsb, 8, 32)                               # [N, nsb, 8, 32]
    high = blocks[..., 128:192].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    high = (high & 0x03).reshape(n, nsb, 8, 32)                             # [N, nsb, 8, 32]
    codes = (low | (high << 4)).reshape(n, nsb * 16, 16)                    # [N, nb, 16], q + 32 in [0, 63]
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)              # [N, nsb, 16]
    scale = (_fp16(blocks[..., 208:210])[..., None] * sc).reshape(n, nsb * 16)
    return BlockQuant(codes.astype(np.uint8), scale.astype(np.float32), (-32.0 * scale).astype(np.float32), 8, "Q6_K",
                      np.full(scale.shape, 32, np.uint8))


def read_blocks(path: Path) -> tuple[dict[str, BlockQuant], list[str]]:
    """Every 2-D tensor of a supported block type -> (name -> BlockQuant, ["name: TYPE" skipped])."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found, skipped = {}, []
    for t in reader.tensors:
        kind = t.tensor_type.name
        if len(t.shape) != 2:
            continue
        if kind not in _BYTES:
            if kind not in ("F32", "F16", "BF16"):
                skipped.append(f"{t.name}: {kind}")
            continue
        found[t.name] = decode(kind, np.asarray(t.data))
    return found, skipped


def _row_keys(w: np.ndarray) -> list[bytes]:
    w = np.ascontiguousarray(w, np.float32) + np.float32(0)                # −0 -> +0 (see blocks.py)
    return [hashlib.blake2b(r.tobytes(), digest_size=12).digest() for r in w]


def match(params: dict[str, np.ndarray], blocks: dict[str, BlockQuant]) -> dict[str, BlockQuant]:
    """For each parameter [N, K] whose rows are, in some order, the rows of one GGUF tensor, that tensor's blocks with
    the rows put in the parameter's order (the HF loader permutes q/k rows for its RoPE layout).

    The match is by value: a parameter maps to a tensor only if every row dequantises bit-exactly to it (±0 aside)."""
    where: dict[bytes, tuple[str, int]] = {}                # row key -> (tensor, row); each row hashed once
    keys: dict[str, dict[bytes, int]] = {}
    for name, bq in blocks.items():
        keys[name] = {}
        for i, k in enumerate(_row_keys(bq.dequantize())):
            keys[name].setdefault(k, i)
            where.setdefault(k, (name, i))
    out = {}
    for pname, w in params.items():
        want = _row_keys(w)
        hit = where.get(want[0]) if want else None
        if hit is None or blocks[hit[0]].shape != tuple(w.shape):
            continue
        rows = [keys[hit[0]].get(k) for k in want]
        if all(r is not None for r in rows):
            out[pname] = blocks[hit[0]].take_rows(np.asarray(rows, dtype=np.int64))
    return out
