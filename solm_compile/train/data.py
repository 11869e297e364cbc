"""What ``solm train --data mixture`` (or ``--data GENRE ...``) trains and selects on (issue 18).

Blocks are drawn EVENLY per genre, not by size: ``n // k`` blocks from each of the k genres' ``train`` split
(qa alone holds more tokens than fiction and encyclopedic together; sampling by size would train a qa policy).
The validation blocks checkpoint selection scores are drawn the same way from the ``validation`` split. A
held-out genre is refused: training and selection never read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from solm_compile.data import genres as gn
from solm_compile.errors import UserError

MIXTURE_NAME = "mixture"


def training_genres(data: Sequence[str], mixture: gn.Mixture = gn.MIXTURE) -> tuple[str, ...] | None:
    """The genres ``--data`` names ('mixture': every training genre), or None when it names no genre (austen
    or files). A held-out genre, or genres mixed with files, is a one-line ``UserError``."""
    names = set(gn.names()) | {MIXTURE_NAME}
    picked = [d for d in data if d in names]
    if not picked:
        return None
    for d in picked:
        if d in mixture.heldout_genres:
            raise UserError(f"--data {d}: a held-out genre, never trained on; use 'mixture' or training genres "
                            f"({', '.join(mixture.train_genres)})")
    if len(picked) != len(data):
        other = next(d for d in data if d not in names)
        raise UserError(f"--data {other}: genres cannot be mixed with files or 'austen'; give genres only")
    if MIXTURE_NAME in picked:
        return tuple(mixture.train_genres)
    return tuple(dict.fromkeys(picked))


def genre_blocks(tokenizer: Any, genre_names: Sequence[str], block_len: int, n: int, split: str, seed: int,
                 mixture: gn.Mixture = gn.MIXTURE) -> tuple[Tensor, list[str]]:
    """``n // k`` blocks [block_len] from each of the k genres' ``split`` (train or validation): the blocks
    [(n // k)·k, block_len] in genre order, and the genre of each row."""
    from solm_compile.data import corpora

    k = len(genre_names)
    per = n // k
    if per < 1:
        raise UserError(f"--blocks {n}: fewer than one block for each of the {k} genres ({', '.join(genre_names)})")
    docs = mixture.training(split)
    parts, labels = [], []
    for i, g in enumerate(genre_names):
        try:
            parts.append(corpora.token_blocks(tokenizer, [gn.joined(docs[g])], block_len, per, seed=seed + i))
        except UserError as e:
            raise UserError(f"--data {g} ({split} split): {e}") from e
        labels += [g] * per
    return torch.cat(parts), labels                                          # [per·k, block_len]


def data_record(genre_names: Sequence[str], per_genre: int, val_per_genre: int, seed: int, tokenizer: Any,
                mixture: gn.Mixture = gn.MIXTURE) -> dict:
    """What a checkpoint stores of its training data: the genres drawn from, the blocks per genre (train and
    validation split) and ``genres.record`` (sources, package@version, split documents and tokens)."""
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return {"kind": MIXTURE_NAME, "genres": list(genre_names), "blocks_per_genre": per_genre,
            "validation_blocks_per_genre": val_per_genre, "seed": seed, "sampling": "even per genre",
            "mixture": gn.record(mixture, count)}
