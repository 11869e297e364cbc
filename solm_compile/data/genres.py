"""The genres a policy is trained and checked on (issue 18): real text of five kinds, from registry packages.

A ``Genre`` is one or more ``Source`` s, each read from a pinned registry asset (``assets.ASSETS``) or, for
``pydoc_data``, from the running Python's standard library (its version is recorded). Every source is cut into
documents by ``parsers``; each document falls in the ``train``, ``validation`` or ``heldout`` split by a
sha256 of its genre and its own text, so the split of a document never depends on file order or on the other
documents, and two identical documents cannot land on both sides of a split.

``MIXTURE`` names the genres training may draw from and the ones it never sees. ``record(MIXTURE, tok)`` is
what a checkpoint stores as its exact training mixture: genre → source → package@version → split → documents
and tokens.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from solm_compile.data import assets, corpora, parsers
from solm_compile.errors import UserError

SPLITS = ("train", "validation", "heldout")


@dataclass(frozen=True)
class Source:
    """One real source of a genre: the asset it is read from (None: the Python stdlib) and how it is read."""

    name: str
    asset: str | None  # an ``assets.ASSETS`` name
    reader: str  # a function of this module: () -> list of documents
    what: str
    only: str | None = None  # every document of the source goes to this split (e.g. Persuasion: heldout)

    def __post_init__(self) -> None:
        if self.asset is not None:
            assets.spec(self.asset)  # a UserError naming the valid assets
        if self.reader not in _READERS:
            raise UserError(f"source {self.name}: unknown reader {self.reader!r}")
        if self.only is not None and self.only not in SPLITS:
            raise UserError(f"source {self.name}: only={self.only!r} is not one of {', '.join(SPLITS)}")

    def provenance(self) -> dict[str, str]:
        """Registry, package and version the text comes from, as a checkpoint records it."""
        if self.asset is None:
            return {"registry": "Python stdlib", "package": "pydoc_data", "version": platform.python_version()}
        a = assets.spec(self.asset)
        return {"registry": a.registry, "package": a.packages[0], "version": a.version}

    def documents(self) -> list[str]:
        return list(_read(self.reader, str(assets.cache_dir())))


@dataclass(frozen=True)
class Genre:
    name: str
    what: str
    sources: tuple[Source, ...]

    def __post_init__(self) -> None:
        if not self.sources:
            raise UserError(f"genre {self.name} has no source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise UserError(f"genre {self.name} names a source twice: {names}")


@dataclass(frozen=True)
class Mixture:
    """Which genres training draws from (train split; validation split for checkpoint selection) and which it
    never sees; ``fractions`` = (train, validation) shares of each genre's documents, the rest is heldout."""

    genres: tuple[Genre, ...] = field(repr=False)
    train_genres: tuple[str, ...]
    heldout_genres: tuple[str, ...]
    fractions: tuple[float, float] = (0.8, 0.1)
    salt: str = "solm-genres-v1"  # part of every split hash: change it and every split is drawn anew

    def __post_init__(self) -> None:
        known = [g.name for g in self.genres]
        for name in (*self.train_genres, *self.heldout_genres):
            if name not in known:
                raise UserError(f"mixture names unknown genre {name!r}; genres: {', '.join(known)}")
        both = set(self.train_genres) & set(self.heldout_genres)
        if both:
            raise UserError(f"genres both trained on and held out: {', '.join(sorted(both))}")
        t, v = self.fractions
        if not (0 < t and 0 <= v and t + v < 1):
            raise UserError(f"split fractions {self.fractions}: need train > 0, validation >= 0, sum < 1")

    def genre(self, name: str) -> Genre:
        for g in self.genres:
            if g.name == name:
                return g
        raise UserError(f"unknown genre {name!r}; choose one of: {', '.join(g.name for g in self.genres)}")

    def split_of(self, genre: str, text: str) -> str:
        """The split of one document: a sha256 of (salt, genre, text) mapped to [0, 1) and cut at fractions."""
        h = hashlib.sha256(f"{self.salt}\0{genre}\0{text}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        t, v = self.fractions
        return "train" if u < t else "validation" if u < t + v else "heldout"

    def split(self, genre: str, split: str) -> list[str]:
        """The documents of ``genre`` in ``split``, in source order."""
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
        return [d for s in self.genre(genre).sources for d in s.documents()
                if (s.only or self.split_of(genre, d)) == split]

    def training(self, split: str = "train") -> dict[str, list[str]]:
        """What training may read: the ``train`` (or ``validation``) documents of the training genres only."""
        if split == "heldout":
            raise UserError("training never reads the heldout split")
        return {g: self.split(g, split) for g in self.train_genres}

    def eval_documents(self, genre: str) -> list[str]:
        """The text ``solm eval --data GENRE`` scores: a held-out genre whole (no part of it is trained on or
        selected with), a training genre's heldout split."""
        if genre in self.heldout_genres:
            return [d for s in self.genre(genre).sources for d in s.documents()]
        return self.split(genre, "heldout")


# ---------------------------------------------------------------------------------------------- readers


def _olmo_rows(task: str) -> list[dict[str, Any]]:
    path = assets.olmo_text_dir() / f"oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _austen() -> list[str]:
    novels = corpora.austen_novels()
    return [c for name, text in novels.items() if name != corpora.HELDOUT_NOVEL
            for c in parsers.novel_chapters(text)]


def _persuasion() -> list[str]:
    return parsers.novel_chapters(corpora.heldout_text())


def _moby_dick() -> list[str]:
    db = assets.moby_dick_dir() / "usr/lib/R/site-library/tokenizers/data/Rdata"
    objects = corpora.read_r_lazyload(db)
    if "mobydick" not in objects:
        raise UserError(f"{db}: no 'mobydick' object (has {', '.join(sorted(objects))})")
    return parsers.gutenberg_chapters(str(objects["mobydick"][0]))


def _jargon() -> list[str]:
    path = assets.jargon_dir() / "usr/share/doc/jargon-text/jargon.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return parsers.jargon_documents(f.read())


def _pydoc() -> list[str]:
    from pydoc_data.topics import topics

    return parsers.pydoc_documents(topics)


def _click() -> list[str]:
    root = assets.click_dir()
    return [d for p in sorted((root / "click").glob("*.py"))
            for d in parsers.python_documents(p.read_text(encoding="utf-8"), str(p.relative_to(root)))]


def _qa() -> list[str]:
    tasks = ("arc_challenge", "openbookqa", "sciq", "csqa")
    return [d for task in tasks for d in parsers.qa_documents(_olmo_rows(task))]


def _wikipedia() -> list[str]:
    return parsers.wiki_passages(_olmo_rows("boolq"))


_READERS: dict[str, Callable[[], list[str]]] = {
    "austen": _austen, "persuasion": _persuasion, "moby_dick": _moby_dick, "jargon": _jargon, "pydoc": _pydoc,
    "click": _click, "qa": _qa, "wikipedia": _wikipedia}


@functools.lru_cache(maxsize=None)
def _read(reader: str, cache: str) -> tuple[str, ...]:
    """A source's documents, parsed once per process and cache directory (so a different ``$SOLM_CACHE`` is
    never served stale text; Moby Dick's R database takes about a second)."""
    return tuple(_READERS[reader]())


# ---------------------------------------------------------------------------------------------- the registry


GENRES: tuple[Genre, ...] = (
    Genre("fiction", "19th-century novels", (
        Source("austen", "austen", "austen", "five Austen novels (not Persuasion), by chapter"),
        Source("persuasion", "austen", "persuasion", "Austen's Persuasion, by chapter: held out, as before",
               only="heldout"),
        Source("moby-dick", "moby-dick", "moby_dick", "Melville's Moby Dick, by chapter"))),
    Genre("technical", "technical and reference prose", (
        Source("jargon", "jargon", "jargon", "the Jargon File 4.4.7, by glossary entry and essay section"),
        Source("pydoc", None, "pydoc", "the Python language reference's help() topics (pydoc_data.topics)"))),
    Genre("code", "Python source code", (
        Source("click", "click", "click", "click 8.1.7's modules, by top-level definition"),)),
    Genre("qa", "exam questions with their correct answers", (
        Source("olmo-qa", "olmo-text", "qa", "ARC-Challenge, OpenBookQA, SciQ and CommonsenseQA (0-shot "
               "oe-eval formatting), one question and its correct answer per document"),)),
    Genre("encyclopedic", "Wikipedia passages", (
        Source("boolq-wikipedia", "olmo-text", "wikipedia", "the distinct Wikipedia passages BoolQ quotes"),)),
)

# Held out: technical prose is the genre the shipped policy lost on (issue 18), code the furthest from prose.
MIXTURE = Mixture(GENRES, train_genres=("fiction", "qa", "encyclopedic"), heldout_genres=("technical", "code"))


def names() -> tuple[str, ...]:
    return tuple(g.name for g in GENRES)


def source(name: str) -> tuple[Genre, Source]:
    """The genre and the source named ``name`` (e.g. ``jargon``), for a reader of one source's text."""
    for g in GENRES:
        for s in g.sources:
            if s.name == name:
                return g, s
    raise UserError(f"unknown source {name!r}; sources: {', '.join(s.name for g in GENRES for s in g.sources)}")


def asset_names() -> tuple[str, ...]:
    """Every registry asset the genres are read from, once each, in genre order (``solm fetch genres``)."""
    return tuple(dict.fromkeys(s.asset for g in GENRES for s in g.sources if s.asset is not None))


def record(mixture: Mixture, count_tokens: Callable[[str], int] | None = None) -> dict[str, Any]:
    """The mixture as JSON-able data: per genre its role, and per source its provenance and, per split, the
    number of documents (and of tokens, if ``count_tokens`` is given)."""
    out: dict[str, Any] = {"salt": mixture.salt, "fractions": list(mixture.fractions),
                           "train_genres": list(mixture.train_genres),
                           "heldout_genres": list(mixture.heldout_genres), "genres": {}}
    for name in (*mixture.train_genres, *mixture.heldout_genres):
        g = mixture.genre(name)
        sources = []
        for s in g.sources:
            per: dict[str, dict[str, int]] = {sp: {"documents": 0, "tokens": 0} for sp in SPLITS}
            for d in s.documents():
                sp = s.only or mixture.split_of(name, d)
                per[sp]["documents"] += 1
                per[sp]["tokens"] += count_tokens(d) if count_tokens else 0
            if count_tokens is None:
                per = {sp: {"documents": v["documents"]} for sp, v in per.items()}
            sources.append({"name": s.name, **s.provenance(), "what": s.what, "splits": per})
        role = "train" if name in mixture.train_genres else "heldout"
        out["genres"][name] = {"role": role, "what": g.what, "sources": sources}
    return out


def joined(documents: Sequence[str]) -> str:
    """Documents as one text, a blank line apart (how ``solm eval`` cuts a genre into token blocks)."""
    return "\n\n".join(documents)
