"""What ``solm eval`` reads: ``--data`` (held-out text) and ``--fit-data`` (text to fit a baseline on).

Names, not only files: 'persuasion' and 'lambada' as before, and every genre of ``solm_compile.data.genres``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

DATA_HELP = ("held-out text: 'persuasion' (the Austen novel never trained on), 'lambada' (the LAMBADA test "
             "passages, joined by blank lines), a genre (fiction, technical, code, qa, encyclopedic: the heldout "
             "split of a training genre, all of a held-out one; see docs/data.md) or a text file (default persuasion)")
FIT_HELP = ("training text the step-schedule baseline is fit on: 'austen' (the Austen novels but the held-out one), "
            "training genres (their train split) or text files (default austen)")


def check_data(data: str) -> None:
    """``--data``: 'persuasion', 'lambada', a genre name or an existing file; else a one-line UserError."""
    from solm_compile.data import genres
    from solm_compile.errors import UserError

    if data not in ("persuasion", "lambada", *genres.names()) and not Path(data).is_file():
        raise UserError(f"--data {data}: not 'persuasion', 'lambada', a genre ({', '.join(genres.names())}) "
                        "or an existing text file")


def check_fit_data(fit_data: Sequence[str]) -> None:
    """``--fit-data``: 'austen', training genres or files; a held-out genre is refused (never tune on it)."""
    from solm_compile.data import genres
    from solm_compile.errors import UserError

    for f in fit_data:
        if f in genres.MIXTURE.heldout_genres:
            raise UserError(f"--fit-data {f}: a held-out genre, never fit on; use a training genre "
                            f"({', '.join(genres.MIXTURE.train_genres)})")
        if f != "austen" and f not in genres.names() and not Path(f).is_file():
            raise UserError(f"--fit-data {f}: not 'austen', a training genre "
                            f"({', '.join(genres.MIXTURE.train_genres)}) or an existing text file")


def texts(data: str) -> list[str]:
    from solm_compile.data import corpora as d, genres

    if data == "persuasion":
        return [d.heldout_text()]
    if data == "lambada":
        return ["\n\n".join(d.lambada_passages())]
    if data in genres.names():
        return [genres.joined(genres.MIXTURE.eval_documents(data))]
    return [Path(data).read_text(encoding="utf-8", errors="replace")]


def fit_texts(fit_data: Sequence[str]) -> list[str]:
    from solm_compile.data import corpora as d, genres

    texts: list[str] = []
    for f in fit_data:
        if f == "austen":
            texts.extend(d.training_text())
        elif f in genres.names():
            texts.append(genres.joined(genres.MIXTURE.split(f, "train")))
        else:
            texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
    return texts
