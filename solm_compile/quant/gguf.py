"""GGUF block formats read into ``BlockQuant`` without touching a value (Q4_0, Q4_1, Q5_0, Q8_0).

GGUF stores a 2-D weight as ``ne = [K, N]``: N rows of K inputs, each row a run of blocks of 32 inputs. The bytes
of one block, by type (d and m are fp16)::

    Q4_0   d | 16 bytes: code j < 16 in the low nibble of byte j, code 16 + j in its high nibble    w = d·(q − 8)
    Q4_1   d | m | 16 bytes as Q4_0                                                                  w = d·q + m
    Q5_0   d | 4 bytes: bit j = the 5th bit of code j | 16 bytes as Q4_0 for the low 4 bits         w = d·(q − 16)
    Q8_0   d | 32 int8                                                                               w = d·q

Other types (the K-quants, F16, ...) are not read here: ``read_blocks`` lists them as skipped, and the weights they
hold stay as the loader dequantised them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from solm_compile.quant.blocks import BlockQuant

_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q8_0": 34}


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
    q = blocks[..., 2:34].view(np.int8).astype(np.int16) + 128              # [N, nb, 32] Q8_0
    zp = np.full(d.shape, 128, np.uint8)
    return BlockQuant(q.astype(np.uint8), d, -128.0 * d, 8, kind, zp)


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
