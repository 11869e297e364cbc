"""Training on the genre mixture (issue 18): even sampling per genre, the held-out refusal, the mixture record
in the checkpoint, and checkpoint selection on validation (the best, not the last).

The genre readers are faked (test_genres.fake_sources: 400 known documents per source), so which text each block
came from is known; the tokenizer is a character code, so a block decodes back to its text exactly.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from solm_compile.data import genres
from solm_compile.errors import UserError
from solm_compile.policy import checkpoint
from solm_compile.train.data import genre_blocks, training_genres
from solm_compile.train.loop import train
from test_cli_more import TRAIN, model_dir, one_line_error, run_cli  # noqa: F401 (fixture)
from test_genres import fake_sources  # noqa: F401 (fixture)
from test_train import TINY, _blocks
from tiny_lm import FakeGatedLM


class CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_blocks_are_drawn_evenly_per_genre(fake_sources) -> None:
    # qa's 400 documents are longer per token than fiction's 800 (austen + moby-dick; persuasion is heldout):
    # sampling by size would not give equal counts
    blocks, labels = genre_blocks(CharTokenizer(), ("fiction", "qa", "encyclopedic"), 20, 31, "train", seed=0)
    assert blocks.shape == (30, 20)                                   # 31 // 3 = 10 per genre
    assert {g: labels.count(g) for g in set(labels)} == {"fiction": 10, "qa": 10, "encyclopedic": 10}
    train_text = {g: "\n\n".join(genres.MIXTURE.split(g, "train")) for g in ("fiction", "qa", "encyclopedic")}
    for row, g in zip(blocks, labels):
        text = "".join(chr(int(c)) for c in row)
        assert text in train_text[g], (g, text)                      # from its own genre's train split
    val, vlabels = genre_blocks(CharTokenizer(), ("qa", "fiction"), 20, 4, "validation", seed=1)
    val_text = {g: "\n\n".join(genres.MIXTURE.split(g, "validation")) for g in ("qa", "fiction")}
    assert vlabels == ["qa", "qa", "fiction", "fiction"]
    assert all("".join(chr(int(c)) for c in r) in val_text[g] for r, g in zip(val, vlabels))


def test_genre_choice_and_the_held_out_refusal() -> None:
    assert training_genres(["mixture"]) == ("fiction", "qa", "encyclopedic")
    assert training_genres(["qa", "fiction", "qa"]) == ("qa", "fiction")
    assert training_genres(["austen"]) is None and training_genres(["my.txt"]) is None
    for bad, msg in ((["technical"], "--data technical: a held-out genre"), (["qa", "code"], "--data code"),
                     (["qa", "my.txt"], "--data my.txt: genres cannot be mixed")):
        with pytest.raises(UserError, match=msg):
            training_genres(bad)


def test_held_out_genre_is_refused_in_one_line(capsys, tmp_path, model_dir) -> None:  # noqa: F811
    one_line_error(capsys, ["train", model_dir, "--data", "technical", "--out", tmp_path / "p.pt", *TRAIN],
                   "--data technical", "held-out")
    assert not (tmp_path / "p.pt.run").exists()


def test_best_on_validation_is_shipped_not_the_last(tmp_path) -> None:
    scores, snapshots = iter([3.0, 1.0, 2.0]), []

    def validate(policy):                                             # hand-made scores: update 2 is best
        snapshots.append({k: v.clone() for k, v in policy.state_dict().items()})
        return {"score": next(scores), "note": len(snapshots)}

    cfg = dataclasses.replace(TINY, updates=3)
    res = train(FakeGatedLM(), _blocks(cfg), cfg, tmp_path, progress=False, validate=validate, meta={"data": {"x": 1}})
    best = checkpoint.read(tmp_path / "best.pt")
    assert best["step"] == 2 and best["selection"] == {"step": 2, "score": 1.0, "validation": {"note": 2}}
    assert all(torch.equal(best["policy"][k], v) for k, v in snapshots[1].items())
    assert any(not torch.equal(best["policy"][k], v) for k, v in snapshots[2].items())   # not the last
    assert best["data"] == {"x": 1} and res.best["step"] == 2
    assert [h["val_score"] for h in res.history] == [3.0, 1.0, 2.0]
    # a resume goes on comparing against the stored best: 1.5 is not better than 1.0
    scores = iter([1.5, 0.5])
    res = train(FakeGatedLM(), _blocks(cfg), dataclasses.replace(cfg, updates=5), tmp_path, resume=True,
                progress=False, validate=validate)
    assert res.best["step"] == 5 and checkpoint.read(tmp_path / "best.pt")["step"] == 5
    assert [h["val_score"] for h in res.history] == [3.0, 1.0, 2.0, 1.5, 0.5]


def test_train_mixture_records_the_mixture_and_ships_the_best(capsys, tmp_path, model_dir,  # noqa: F811
                                                              fake_sources) -> None:
    out = tmp_path / "policy.pt"
    code, stdout, err = run_cli(capsys, "train", model_dir, "--data", "mixture", "--out", out, "--updates", "2",
                                "--val-blocks", "3", *TRAIN)
    assert code == 0, err
    ck = checkpoint.read(out)
    data = ck["data"]
    assert data["genres"] == ["fiction", "qa", "encyclopedic"] and data["blocks_per_genre"] == 2   # 6 // 3
    assert data["validation_blocks_per_genre"] == 1
    rec = data["mixture"]
    assert rec["train_genres"] == ["fiction", "qa", "encyclopedic"] and rec["heldout_genres"] == ["technical", "code"]
    qa = rec["genres"]["qa"]["sources"][0]
    n_train = len(genres.MIXTURE.split("qa", "train"))
    assert qa["splits"]["train"]["documents"] == n_train
    # the tiny model's tokenizer is one token per character
    assert qa["splits"]["train"]["tokens"] == sum(len(d) for d in genres.MIXTURE.split("qa", "train"))
    sel = ck["selection"]
    assert set(sel["scores"]) == {1, 2} and sel["last_step"] == 2
    assert sel["score"] == min(sel["scores"].values()) and ck["step"] == sel["step"]
    assert "optimizer" not in ck and f"wrote {out}" in stdout and "best on validation" in stdout


def test_resume_without_best_pt_restarts_selection(tmp_path) -> None:
    """A run directory carried in the repo holds checkpoint.pt alone: the best score it records has no weights left,
    so selection restarts with the resume instead of never writing best.pt again."""
    scores = iter([1.0, 2.0])
    cfg = dataclasses.replace(TINY, updates=1)
    train(FakeGatedLM(), _blocks(cfg), cfg, tmp_path, progress=False, validate=lambda p: {"score": next(scores)})
    (tmp_path / "best.pt").unlink()
    res = train(FakeGatedLM(), _blocks(cfg), dataclasses.replace(cfg, updates=2), tmp_path, resume=True,
                progress=False, validate=lambda p: {"score": next(scores)})
    assert res.best["step"] == 2 and res.best["score"] == 2.0        # worse than the lost 1.0, but shippable
    assert checkpoint.read(tmp_path / "best.pt")["step"] == 2


def test_metrics_record_the_usage_validation_realised(tmp_path) -> None:
    def validate(policy):                                             # what the validators return: tensors or dicts
        return {"score": 0.5, "usage": [torch.tensor([0.25, 0.5, 1.0]), {"attn_keep": 0.75}]}

    cfg = dataclasses.replace(TINY, updates=1)
    train(FakeGatedLM(), _blocks(cfg), cfg, tmp_path, progress=False, validate=validate)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_usage"] == [[0.25, 0.5, 1.0], {"attn_keep": 0.75}]
