"""Turn each genre source's raw format into documents (plain strings): pure functions, no files, no network.

A document is the unit the genre splits are drawn by (``solm_compile.data.genres``), so each parser cuts its
source where a reader would: a novel at its chapters, the Jargon File at its entries, a Python module at its
top-level definitions, a QA set at its questions. ``genres`` does the reading; these only parse, so the tests
can feed each one a tiny hand-made input in the real format.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from typing import Any

from solm_compile.data.corpora import join_paragraphs
from solm_compile.errors import UserError

_AUSTEN_CHAPTER = re.compile(r"^(?:CHAPTER|Chapter) (?:[IVXLC]+|\d+)\b")
_MOBY_CHAPTER = re.compile(r"^(?:CHAPTER \d+\.|Epilogue\b)")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF TH(?:IS|E) PROJECT GUTENBERG.*$", re.M)
_GUTENBERG_END = re.compile(r"^(?:End of (?:the )?Project Gutenberg|\*\*\* ?END OF TH)", re.M)
_JARGON_ENTRY = re.compile(r"^ {3}:([^:]+):")
_JARGON_BODY = re.compile(r"^Chapter\W+1\.", re.M)


def split_at(paragraphs: Iterable[str], heading: re.Pattern[str]) -> list[str]:
    """Group paragraphs into documents, a new one at each paragraph matching ``heading``; text before the
    first heading is a document of its own (a title page, a preface), blank documents are dropped."""
    docs: list[list[str]] = [[]]
    for para in paragraphs:
        if heading.match(para) and docs[-1]:
            docs.append([])
        docs[-1].append(para)
    return [text for d in docs if (text := "\n\n".join(d).strip())]


def novel_chapters(text: str) -> list[str]:
    """An Austen novel as ``corpora.austen_novels`` decodes it (one paragraph per blank-line block), by chapter."""
    return split_at(text.split("\n\n"), _AUSTEN_CHAPTER)


def gutenberg_chapters(raw: str) -> list[str]:
    """A Project Gutenberg e-text (CRLF, hard-wrapped, licence header and footer) as chapters of prose.

    The header up to the ``*** START`` line and everything from the ``End of Project Gutenberg`` line on are
    licence text, not the book; lines are unwrapped into paragraphs (``corpora.join_paragraphs``).
    """
    text = raw.lstrip("\ufeff").replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    if start is None:
        raise UserError("Gutenberg text has no '*** START OF THIS PROJECT GUTENBERG' line (has the package changed?)")
    body = text[start.end():]
    end = _GUTENBERG_END.search(body)
    body = body[:end.start()] if end else body
    return split_at(join_paragraphs(body.split("\n")).split("\n\n"), _MOBY_CHAPTER)


def jargon_documents(text: str) -> list[str]:
    """The Jargon File's plain text (jargon-text's ``jargon.txt``) as documents: one per glossary entry
    (``   :hacker ethic: n. ...``) and one per essay section (``Chapter 5. Hacker Writing Style`` ...).

    The front table of contents is dropped, and so are the per-letter tables of contents inside the glossary:
    paragraphs that are only a headword (or a one-character letter heading).
    """
    body = _JARGON_BODY.search(text)
    if body is None:
        raise UserError("Jargon File text has no 'Chapter 1.' heading (has the package changed?)")
    lines = text[body.start():].splitlines()
    headwords = {m.group(1).strip() for ln in lines if (m := _JARGON_ENTRY.match(ln))}
    sections: list[list[str]] = []
    for line in lines:
        if _JARGON_ENTRY.match(line) or (line.strip() and not line[0].isspace()):
            sections.append([])
        if sections:
            sections[-1].append(line)
    docs = []
    for lines_ in sections:
        if lines_[0].strip() == "Glossary":
            continue
        paras = join_paragraphs(lines_).split("\n\n")
        kept = paras[:1] + [p for p in paras[1:] if p not in headwords and len(p) > 2]
        if len(kept) > 1:
            docs.append("\n\n".join(kept))
    return docs


def pydoc_documents(topics: Mapping[str, str]) -> list[str]:
    """``pydoc_data.topics.topics`` (the help() texts of the language reference): one document per topic, in
    name order, duplicates (several keys sharing one text) once."""
    seen: dict[str, None] = {}
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            seen.setdefault(text, None)
    return list(seen)


def python_documents(source: str, path: str) -> list[str]:
    """A Python module as documents: the module header (docstring, imports, constants up to the first
    top-level ``def``/``class``) and each top-level ``def``/``class`` with its decorators and comments above it.

    Statements between two definitions stay with the definition above them. The text is the source itself,
    cut at line boundaries; nothing is reformatted. A module that does not parse is a one-line UserError.
    """
    try:
        tree = ast.parse(source, path)
    except SyntaxError as err:
        raise UserError(f"{path}: not valid Python ({err.msg}, line {err.lineno})") from err
    lines = source.splitlines(keepends=True)
    starts = [min([n.lineno, *(d.lineno for d in n.decorator_list)]) - 1 for n in tree.body
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    cuts = []
    for s in starts:  # pull comment lines directly above a definition into it
        while s > 0 and lines[s - 1].lstrip().startswith("#"):
            s -= 1
        cuts.append(s)
    bounds = [0, *cuts, len(lines)]
    docs = ["".join(lines[a:b]).strip("\n") for a, b in zip(bounds, bounds[1:])]
    return [d for d in docs if d.strip()]


def qa_documents(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """oe-eval 0-shot ranked-classification requests (one row per choice) as worked questions: the context the
    model was shown (``Question: ...\\nAnswer:``, after a support passage for SciQ) followed by the correct
    choice, one document per question.

    The rows with ``idx == label`` carry the correct continuation; oe-eval's "unconditional" copies (context
    ``Answer:`` alone, doc ids shifted by 1,000,000) hold no question and are skipped.
    """
    by_doc: dict[int, str] = {}
    for r in rows:
        if r["doc_id"] >= 1_000_000 or r["idx"] != r["label"]:
            continue
        by_doc.setdefault(int(r["doc_id"]), r["request"]["context"] + r["request"]["continuation"])
    return [by_doc[d] for d in sorted(by_doc)]


def wiki_passages(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """BoolQ requests as the Wikipedia passages they quote: ``Title -- text`` becomes ``Title\\n\\ntext``.

    The query is ``<title> -- <passage>\\nQuestion: ...?\\nAnswer:``; only the passage is kept, each distinct
    passage once (several questions share one), in order of first appearance.
    """
    seen: dict[str, None] = {}
    for r in rows:
        query = r["doc"]["query"]
        passage = query.rsplit("\nQuestion:", 1)[0].strip()
        title, sep, text = passage.partition(" -- ")
        seen.setdefault(f"{title.strip()}\n\n{text.strip()}" if sep else passage, None)
    return list(seen)
