"""``--weights``: which bytes the model's linear layers and embedding are stored as, decided once at load.

- ``source`` (default): what the model file holds. A GGUF keeps its own blocks (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K,
  Q6_K; read losslessly, see ``gguf.py``); other types stay fp32 (dequantised), and an HF checkpoint stays in its
  own floats.
- ``fp32``: every weight dequantised to float32: the exactness reference (``solm verify`` against HF eager).
- ``int4``: every linear layer (q, k, v, o, gate, up, down) round-to-nearest asymmetric int4, block 32; the
  embedding and the LM head at ``head_bits`` (``--head-bits``): 8 (symmetric int8, as GGUF's own Q4 files keep that
  tensor at Q8_0) or 4 (the linears' int4, as onnxruntime-genai's int4 model stores it).
- ``int8``: every linear layer and the embedding / LM head symmetric int8, block 32.

``quantize_model`` writes the dequantised low-bit values into the torch model, so training, ``solm eval`` and
``torch.compile`` compute with exactly the weights that ship; the returned ``WeightTable`` lets the artifact
writer find each weight's blocks again by value (``passes/pack_weights.py``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from solm_compile.errors import UserError
from solm_compile.quant.blocks import QUANTIZERS, BlockQuant

log = logging.getLogger(__name__)

WEIGHTS = ("source", "fp32", "int8", "int4")
HEAD_BITS = (8, 4)


def check_head_bits(weights: str, head_bits: int) -> None:
    """One line for a bad ``--head-bits``: 8 or 4, and 4 only where ``--weights int4`` quantizes the table."""
    if head_bits not in HEAD_BITS:
        raise UserError(f"--head-bits: must be 8 or 4, got {head_bits!r}")
    if head_bits != 8 and weights != "int4":
        raise UserError(f"--head-bits {head_bits}: applies to --weights int4 only (got --weights {weights})")


def content_key(w: np.ndarray) -> str:
    """The key a weight [N, K] is found by: its float32 bytes (row-major), −0 read as +0 (GGUF's d·(q − 8) and
    our d·q − 8d differ only there)."""
    return hashlib.sha256((np.ascontiguousarray(w, np.float32) + np.float32(0)).tobytes()).hexdigest()


@dataclass
class WeightTable:
    """Low-bit blocks of the model's weights, by ``content_key`` of the float32 weight [N, K] they dequantise to.

    For ``source`` the GGUF is read on first use of ``by_key``/``formats``/``skipped``: loading a model to train or
    evaluate it does not pay for it."""

    weights: str = "fp32"
    head_bits: int = 8                                        # the embedding / LM head's bits under int4
    pending: Optional[Callable[["WeightTable"], None]] = None
    _keys: dict = field(default_factory=dict)                 # content key -> BlockQuant
    _formats: dict = field(default_factory=dict)              # fmt -> tensors
    _skipped: list = field(default_factory=list)              # "name: why" of weights left float32

    def _ready(self) -> "WeightTable":
        if self.pending is not None:
            build, self.pending = self.pending, None
            build(self)
        return self

    @property
    def by_key(self) -> dict[str, BlockQuant]:
        return self._ready()._keys

    @property
    def formats(self) -> dict[str, int]:
        return self._ready()._formats

    @property
    def skipped(self) -> list[str]:
        return self._ready()._skipped

    def add(self, w: np.ndarray, bq: BlockQuant) -> None:
        self._keys[content_key(w)] = bq
        self._formats[bq.fmt] = self._formats.get(bq.fmt, 0) + 1

    def skip(self, why: str) -> None:
        self._skipped.append(why)

    def find(self, w: np.ndarray) -> BlockQuant | None:
        return self.by_key.get(content_key(w)) if self.by_key else None

    def describe(self) -> str:
        if not self.by_key:
            return f"{self.weights}: float32"
        fmts = ", ".join(f"{k}×{v}" for k, v in sorted(self.formats.items()))
        return f"{self.weights}: {fmts}" + (f" (float32: {len(self.skipped)} others)" if self.skipped else "")

    def to_dict(self) -> dict:
        out = {"weights": self.weights, "formats": dict(sorted(self.formats.items())), "float32": self.skipped}
        return {**out, "head_bits": self.head_bits} if self.weights == "int4" else out


def _targets(model) -> dict[str, "object"]:
    """The parameters that get blocks: every nn.Linear weight and the input embedding (tied ones once)."""
    import torch

    out, seen = {}, set()
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and w is not None and w.dim() == 2:
            if id(w) not in seen:
                seen.add(id(w))
                out[f"{name}.weight"] = w
    return out


def _is_table(model, name: str) -> bool:
    """The embedding / LM head (vocab-sized), quantized at ``head_bits`` in int4 mode."""
    emb = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    params = dict(model.named_parameters(remove_duplicate=False))
    return emb is not None and params.get(name) is emb or name.startswith("lm_head")


def quantize_model(model, weights: str, gguf_path: Path | None = None, head_bits: int = 8) -> WeightTable:
    """Decide the low-bit blocks for ``model`` (in place for int4/int8: the parameters become the dequantised
    values). ``gguf_path``: the file the model was loaded from, for ``source``; ``head_bits``: the embedding / LM
    head's bits under int4 (8 or 4)."""
    import torch

    if weights not in WEIGHTS:
        raise UserError(f"--weights: must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    check_head_bits(weights, head_bits)
    table = WeightTable(weights, head_bits)
    if weights == "fp32" or (weights == "source" and gguf_path is None):
        return table
    targets = _targets(model)
    if weights == "source":
        params = {n: w.detach().float().numpy() for n, w in targets.items()}
        table.pending = lambda t: _read_source(t, params, gguf_path)
        return table
    with torch.no_grad():
        for name, w in targets.items():
            if w.shape[1] % 32:
                table.skip(f"{name}: K={w.shape[1]} not a multiple of 32")
                continue
            table_8 = _is_table(model, name) and head_bits == 8
            quant = QUANTIZERS["int8" if weights == "int8" or table_8 else "int4"]
            bq = quant(w.detach().float().numpy())
            w.copy_(torch.from_numpy(bq.dequantize()).to(w.dtype))
            table.add(bq.dequantize(), bq)
    log.info("weights %s", table.describe())
    return table


def _read_source(table: WeightTable, params: dict[str, np.ndarray], gguf_path: Path) -> None:
    from solm_compile.quant import gguf

    blocks, skipped = gguf.read_blocks(gguf_path)
    found = gguf.match(params, blocks)
    for why in skipped + [f"{n}: no lossless GGUF blocks" for n in sorted(set(params) - set(found))]:
        table.skip(why)
    for name, bq in found.items():
        table.add(params[name], bq)
    log.info("weights %s", table.describe())
