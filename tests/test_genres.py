"""The genre registry (solm_compile.data.genres), its parsers, and ``solm eval --data GENRE``.

No network: every parser gets a tiny input written here in its source's real format, and the mixture tests swap
the readers for fakes, so the splits are checked on documents whose content we know.
"""

from __future__ import annotations

import platform

import pytest

from solm_compile.cli import app as cli
from solm_compile.cli import eval_data
from solm_compile.data import genres, parsers
from solm_compile.errors import UserError

# ---------------------------------------------------------------------------------------------- parsers


def test_novel_chapters_keeps_the_title_page_apart() -> None:
    text = "EMMA\n\nVOLUME I\n\nCHAPTER I\n\nEmma Woodhouse.\n\nHandsome.\n\nCHAPTER II\n\nMr. Weston.\n"
    assert parsers.novel_chapters(text) == ["EMMA\n\nVOLUME I", "CHAPTER I\n\nEmma Woodhouse.\n\nHandsome.",
                                            "CHAPTER II\n\nMr. Weston."]
    assert parsers.novel_chapters("Chapter 1\n\nA.\n\nChapter 2\n\nB.") == ["Chapter 1\n\nA.", "Chapter 2\n\nB."]


GUTENBERG = ("\ufeffThe Project Gutenberg EBook of Moby Dick\r\n\r\nlicence words\r\n\r\n"
             "*** START OF THIS PROJECT GUTENBERG EBOOK MOBY DICK ***\r\n\r\n\r\nETYMOLOGY.\r\n\r\n"
             "The pale Usher--threadbare\r\nin coat.\r\n\r\n\r\nCHAPTER 1. Loomings.\r\n\r\n"
             "Call me Ishmael. Some  years\r\nago.\r\n\r\nSecond paragraph.\r\n\r\nCHAPTER 2. The Carpet-Bag.\r\n\r\n"
             "I stuffed a shirt.\r\n\r\nEpilogue\r\n\r\n\"AND I ONLY AM ESCAPED.\"\r\n\r\n\r\n"
             "End of Project Gutenberg's Moby Dick\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\r\n")


def test_gutenberg_chapters_drop_licence_and_unwrap() -> None:
    assert parsers.gutenberg_chapters(GUTENBERG) == [
        "ETYMOLOGY.\n\nThe pale Usher--threadbare in coat.",
        "CHAPTER 1. Loomings.\n\nCall me Ishmael. Some years ago.\n\nSecond paragraph.",
        "CHAPTER 2. The Carpet-Bag.\n\nI stuffed a shirt.",
        "Epilogue\n\n\"AND I ONLY AM ESCAPED.\""]
    with pytest.raises(UserError, match="no '\\*\\*\\* START"):
        parsers.gutenberg_chapters("just some text\r\n")


# The layout of jargon-text's jargon.txt: a table of contents, essay chapters (non-breaking spaces in the
# headings), the glossary with a table of headwords before each letter's entries, then the appendices.
JARGON = """                                The Jargon File

   Table of Contents

   1. Hacker Slang and Hacker Culture

Chapter\u00a01.\u00a0Hacker Slang and Hacker Culture

   This document is a collection of slang
   terms used by hackers.

Glossary

   0

   /dev/null

   :0:

   Numeric zero, as opposed to the
   letter 'O'.

   A

   ABEND

   :/dev/null: /dev-nuhl/, n.

   A notional black hole. See {bit bucket}.

   :ABEND: n.

   1. Abnormal termination.

   2. See {crash}.

Appendix\u00a0A.\u00a0Hacker Folklore

   The Meaning of Hack.
"""


def test_jargon_documents_entries_and_sections() -> None:
    assert parsers.jargon_documents(JARGON) == [
        "Chapter 1. Hacker Slang and Hacker Culture\n\nThis document is a collection of slang terms used by "
        "hackers.",
        ":0:\n\nNumeric zero, as opposed to the letter 'O'.",  # the letter-A headword table is gone
        ":/dev/null: /dev-nuhl/, n.\n\nA notional black hole. See {bit bucket}.",
        ":ABEND: n.\n\n1. Abnormal termination.\n\n2. See {crash}.",
        "Appendix A. Hacker Folklore\n\nThe Meaning of Hack."]  # non-breaking spaces become spaces
    with pytest.raises(UserError, match="no 'Chapter 1.' heading"):
        parsers.jargon_documents("   :foo: n.\n\n   bar\n")


def test_pydoc_documents_sorted_and_deduplicated() -> None:
    topics = {"while": "The while statement\n", "assert": "The assert statement", "if": "The while statement",
              "empty": "  "}
    assert parsers.pydoc_documents(topics) == ["The assert statement", "The while statement"]


PY = '''"""Module doc."""

import os

X = 1


# a comment that belongs to f
@decorator
def f(a):
    return a


class C:
    def m(self):
        pass

Y = f(2)
'''


def test_python_documents_cut_at_top_level_definitions() -> None:
    assert parsers.python_documents(PY, "m.py") == [
        '"""Module doc."""\n\nimport os\n\nX = 1',
        "# a comment that belongs to f\n@decorator\ndef f(a):\n    return a",
        "class C:\n    def m(self):\n        pass\n\nY = f(2)"]
    with pytest.raises(UserError, match=r"^bad.py: not valid Python \(.*line 1\)$"):
        parsers.python_documents("def (:\n", "bad.py")


def mc_row(doc_id: int, idx: int, label: int, context: str, cont: str) -> dict:
    return {"doc_id": doc_id, "idx": idx, "label": label, "request": {"context": context, "continuation": cont}}


def test_qa_documents_keep_the_correct_answer_only() -> None:
    q = "Question: Which is a mammal?\nAnswer:"
    rows = [mc_row(1, 0, 1, q, " trout"), mc_row(1, 1, 1, q, " whale"),
            mc_row(0, 0, 0, "Question: 2+2?\nAnswer:", " 4"), mc_row(0, 1, 0, "Question: 2+2?\nAnswer:", " 5"),
            mc_row(1_000_001, 1, 1, "Answer:", " whale")]
    assert parsers.qa_documents(rows) == ["Question: 2+2?\nAnswer: 4", "Question: Which is a mammal?\nAnswer: whale"]


def test_wiki_passages_once_each_without_the_question() -> None:
    def row(query: str) -> dict:
        return {"doc": {"query": query}}
    rows = [row("Ethanol fuel -- All biomass is grown.\nQuestion: is it grown?\nAnswer:"),
            row("Ethanol fuel -- All biomass is grown.\nQuestion: is it burned?\nAnswer:"),
            row("Bats -- Bats fly -- at night.\nQuestion: do bats fly?\nAnswer:")]
    assert parsers.wiki_passages(rows) == ["Ethanol fuel\n\nAll biomass is grown.", "Bats\n\nBats fly -- at night."]


# ---------------------------------------------------------------------------------------------- the mixture

FAKE = {reader: [f"{reader} document {i}" for i in range(400)] for reader in genres._READERS}


@pytest.fixture
def fake_sources(monkeypatch: pytest.MonkeyPatch):
    """Every reader returns 400 known documents; the per-process parse cache is emptied before and after."""
    for reader, docs in FAKE.items():
        monkeypatch.setitem(genres._READERS, reader, lambda docs=docs: list(docs))
    genres._read.cache_clear()
    yield
    genres._read.cache_clear()


def test_splits_are_disjoint_complete_and_deterministic(fake_sources) -> None:
    m = genres.MIXTURE
    for g in genres.GENRES:
        parts = {sp: m.split(g.name, sp) for sp in genres.SPLITS}
        everything = [d for s in g.sources for d in FAKE[s.reader]]
        assert sorted(d for docs in parts.values() for d in docs) == sorted(everything)  # each once, none lost
        assert parts == {sp: m.split(g.name, sp) for sp in genres.SPLITS}
        # 400 documents per source at 80/10/10: the binomial sd of the train share is 2 points
        free = [d for s in g.sources if s.only is None for d in FAKE[s.reader]]
        share = sum(d in set(parts["train"]) for d in free) / len(free)
        assert 0.72 < share < 0.88, (g.name, share)
    other = genres.Mixture(genres.GENRES, ("fiction",), (), salt="another salt")
    assert other.split("qa", "train") != m.split("qa", "train")  # the salt redraws the splits


def test_a_pinned_source_stays_in_its_split(fake_sources) -> None:
    heldout = genres.MIXTURE.split("fiction", "heldout")
    assert all(d in heldout for d in FAKE["persuasion"])
    assert not any(d in FAKE["persuasion"] for sp in ("train", "validation")
                   for d in genres.MIXTURE.split("fiction", sp))


def test_training_never_sees_a_heldout_genre(fake_sources) -> None:
    m = genres.MIXTURE
    assert set(m.heldout_genres) == {"technical", "code"}
    banned = {d for g in m.heldout_genres for s in m.genre(g).sources for d in FAKE[s.reader]}
    for split in ("train", "validation"):
        seen = m.training(split)
        assert set(seen) == {"fiction", "qa", "encyclopedic"}
        assert not banned & {d for docs in seen.values() for d in docs}
        assert not set(seen["fiction"]) & set(m.split("fiction", "heldout"))
    with pytest.raises(UserError, match="never reads the heldout split"):
        m.training("heldout")
    assert sorted(m.eval_documents("code")) == sorted(FAKE["click"])  # a held-out genre is scored whole
    assert m.eval_documents("qa") == m.split("qa", "heldout")


def test_record_is_the_mixture_with_provenance(fake_sources) -> None:
    r = genres.record(genres.MIXTURE, count_tokens=lambda text: len(text.split()))
    assert list(r["genres"]) == ["fiction", "qa", "encyclopedic", "technical", "code"]
    assert r["genres"]["code"]["role"] == "heldout" and r["genres"]["qa"]["role"] == "train"
    jargon, pydoc = r["genres"]["technical"]["sources"]
    assert (jargon["registry"], jargon["package"], jargon["version"]) == ("Debian", "jargon-text", "4.4.7-4.1")
    assert (pydoc["package"], pydoc["version"]) == ("pydoc_data", platform.python_version())
    click = r["genres"]["code"]["sources"][0]
    assert f"{click['package']}=={click['version']}" == "click==8.1.7"
    assert sum(v["documents"] for v in click["splits"].values()) == 400
    assert sum(v["tokens"] for v in click["splits"].values()) == 400 * 3  # "click document i" is 3 words
    persuasion = r["genres"]["fiction"]["sources"][1]
    assert persuasion["splits"]["heldout"] == {"documents": 400, "tokens": 1200}
    assert genres.record(genres.MIXTURE)["genres"]["qa"]["sources"][0]["splits"]["train"].keys() == {"documents"}


def test_mixture_validation() -> None:
    g = genres.GENRES
    with pytest.raises(UserError, match="unknown genre 'poetry'"):
        genres.Mixture(g, ("poetry",), ())
    with pytest.raises(UserError, match="both trained on and held out: code"):
        genres.Mixture(g, ("code", "qa"), ("code",))
    with pytest.raises(UserError, match="split fractions"):
        genres.Mixture(g, ("qa",), (), fractions=(0.9, 0.1))
    with pytest.raises(UserError, match="unknown asset 'nope'"):
        genres.Source("x", "nope", "qa", "")
    with pytest.raises(UserError, match="only='test'"):
        genres.Source("x", None, "qa", "", only="test")
    with pytest.raises(UserError, match="unknown split 'dev'"):
        genres.MIXTURE.split("qa", "dev")
    assert genres.asset_names() == ("austen", "moby-dick", "jargon", "click", "olmo-text")


# ---------------------------------------------------------------------------------------------- solm eval


def test_eval_texts_and_fit_texts_from_genres(fake_sources, tmp_path) -> None:
    (text,) = eval_data.texts("technical")
    assert text.split("\n\n") == [*FAKE["jargon"], *FAKE["pydoc"]]
    fit = eval_data.fit_texts(["qa", "encyclopedic"])
    assert [t.split("\n\n") for t in fit] == [genres.MIXTURE.split("qa", "train"),
                                              genres.MIXTURE.split("encyclopedic", "train")]
    f = tmp_path / "mine.txt"
    f.write_text("my text")
    assert eval_data.texts(str(f)) == ["my text"] and eval_data.fit_texts([str(f)]) == ["my text"]
    for name in ("persuasion", "lambada", *genres.names(), str(f)):
        eval_data.check_data(name)  # all accepted
    eval_data.check_fit_data(["austen", "fiction", "qa", str(f)])


EVAL = ["eval", "no-such-model", "--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "16"]


@pytest.mark.parametrize("extra, needles", [
    (["--data", "poetry"], ("--data poetry", "fiction, technical, code, qa, encyclopedic")),
    (["--fit-data", "code"], ("--fit-data code", "held-out genre")),
    (["--fit-data", "austen", "nope.txt"], ("--fit-data nope.txt", "existing text file")),
])
def test_eval_data_errors_are_one_line(capsys, extra, needles) -> None:
    code = cli.main([*EVAL, *extra])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- real assets (slow)


@pytest.mark.slow
def test_real_genres_parse_as_expected() -> None:
    g = {s.name: s.documents() for genre in genres.GENRES for s in genre.sources}
    moby = g["moby-dick"]
    assert sum(d.startswith("CHAPTER ") for d in moby) == 135 and moby[-1].startswith("Epilogue")
    assert moby[1].startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    assert not any("Project Gutenberg" in d for d in moby[1:])  # the licence header and footer are gone
    assert sum(d.startswith("CHAPTER") or d.startswith("Chapter") for d in g["persuasion"]) == 24
    assert any(d.startswith(":hacker ethic: n.\n\n1. The belief that information-sharing") for d in g["jargon"])
    assert any(d.startswith('The "assert" statement') for d in g["pydoc"])
    assert any(d.startswith("class Context:") or "\nclass Context:" in d for d in g["click"])
    assert all("Question: " in d and "\nAnswer: " in d for d in g["olmo-qa"])  # SciQ's start with a passage
    assert any(d.startswith("Ethanol fuel\n\nAll biomass goes through") for d in g["boolq-wikipedia"])
    for name, docs in g.items():
        assert len(docs) == len(set(docs)) or name == "olmo-qa", name  # QA sets may repeat a question
