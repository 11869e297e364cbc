"""``solm bench --engines``: the adapters, the PPL arithmetic, the protocol's bookkeeping and the outputs.

The peers (llama.cpp, onnxruntime-genai) come from the ``bench`` extra, which CI does not install: their tests
skip with that reason there and fail under SOLM_REQUIRE_BENCH=1 (tests/require.py). Timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import pytest

from require import need_bench, need_ep
from solm_compile.bench import engines as E
from solm_compile.bench import engines_report as report
from solm_compile.bench import engines_run as run
from solm_compile.errors import UserError


# ---------------------------------------------------------------------------------------------- arithmetic
def test_nll_and_perplexity_by_hand():
    logits = np.array([[0.0, math.log(3.0)],        # p(1) = 3/4
                       [1.0, 1.0]])                   # p(0) = 1/2
    nll = E.nll_from_logits(logits, [1, 0])
    assert nll == pytest.approx([math.log(4 / 3), math.log(2)], abs=1e-12)
    assert E.perplexity(nll) == pytest.approx(math.sqrt(4 / 3 * 2), abs=1e-12)
    big = np.array([[1000.0, 0.0]])                  # no overflow: log-sum-exp is shifted
    assert E.nll_from_logits(big, [0])[0] == pytest.approx(0.0, abs=1e-12)


class Bigram(E.Engine):
    """logits = log of a fixed next-token table given the last token; counts calls to check the protocol."""

    TABLE = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]]))

    def __init__(self, label="bigram"):
        super().__init__(E.EngineSpec("bigram", label, "-", "none"), 1, 64)
        self.fed, self.log = [], []

    def prefill(self, ids):
        self.fed = list(ids)
        self.base = list(ids)
        self.log.append(("prefill", len(ids)))
        return self.TABLE[ids[-1]].copy()

    def reset(self):
        self.fed = list(self.base)
        self.log.append(("reset",))

    def step(self, token):
        self.fed.append(token)
        self.log.append(("step", token))
        return self.TABLE[token].copy()


def test_engine_nll_scores_each_token_given_all_before_it():
    ids = [0, 1, 2, 2, 0]
    e = Bigram()
    nll = e.nll(ids, start=2)
    # p(ids[2]=2 | last 1) = 0.25, p(2 | 2) = 0.6, p(0 | 2) = 0.2
    assert nll == pytest.approx([-math.log(0.25), -math.log(0.6), -math.log(0.2)])
    assert e.log == [("prefill", 2), ("step", 2), ("step", 2)]       # the last id is scored, never fed
    assert e.fed == [0, 1, 2, 2]


def test_ppl_all_pools_every_texts_scored_ids_and_keeps_each_texts_own():
    cfg = run.EnginesConfig(ppl_window=4, ppl_tokens=2, memory=False)
    texts = {"persuasion": [0, 1, 2, 2, 9], "jargon": [1, 0, 1, 1]}       # the window cuts the 9 off
    out = run.ppl_all({"b": Bigram()}, texts, cfg, lambda s: None)["b"]
    # persuasion scores p(2 | 1) = 0.25, p(2 | 2) = 0.6; jargon p(1 | 0) = 0.6, p(1 | 1) = 0.25
    assert out["texts"]["persuasion"] == pytest.approx(1 / math.sqrt(0.25 * 0.6))
    assert out["texts"]["jargon"] == pytest.approx(1 / math.sqrt(0.6 * 0.25))
    assert out["pooled"] == pytest.approx((0.25 * 0.6 * 0.6 * 0.25) ** -0.25)
    skew = run.ppl_all({"b": Bigram()}, {"a": [0, 1, 2, 2], "b": [0, 0, 0, 0]}, cfg, lambda s: None)["b"]
    # p(2 | 1) = 0.25, p(2 | 2) = 0.6 and p(0 | 0) = 0.1 twice: pooled is the geometric mean over 4 ids, not of
    # the two texts' perplexities' arithmetic mean
    assert skew["pooled"] == pytest.approx((0.25 * 0.6 * 0.1 * 0.1) ** -0.25)
    assert skew["pooled"] != pytest.approx((skew["texts"]["a"] + skew["texts"]["b"]) / 2)


class _Words:
    """A tokenizer: one id per character (mod 50), enough to tell texts apart."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 50 for c in text]


def test_ppl_texts_reads_each_text_and_says_which_it_left_out(monkeypatch):
    from solm_compile.bench import measure
    from solm_compile.errors import UserError as UE

    def fake(name):
        if name == "jargon":
            raise UE("jargon-text: apt-get download failed")
        return "Captain Wentworth " * 20

    monkeypatch.setattr(measure, "_ppl_text", fake)
    texts, notes = measure.ppl_texts(_Words(), ("persuasion", "jargon"), 16, vocab=50)
    assert list(texts) == ["persuasion"] and texts["persuasion"] == [ord(c) % 50 for c in "Captain Wentworth "][:16]
    assert notes == ["PPL text jargon left out: jargon-text: apt-get download failed"]
    short, notes = measure.ppl_texts(_Words(), ("persuasion",), 1000, vocab=50)
    assert list(short) == ["random"] and len(short["random"]) == 1000     # too short: random ids, said
    assert notes == ["PPL text persuasion left out: 360 ids, the window needs 1000"]
    none, notes = measure.ppl_texts(None, ("persuasion",), 8, vocab=50)
    assert list(none) == ["random"] and notes == []


def test_the_protocol_texts_are_fiction_and_non_fiction_outside_training():
    from solm_compile.bench.measure import PPL_TEXTS
    from solm_compile.data import corpora, genres

    assert tuple(PPL_TEXTS) == run.EnginesConfig().ppl_texts == ("persuasion", "jargon")
    genre, src = genres.source("jargon")
    assert genre.name in genres.MIXTURE.heldout_genres                    # never trained on, never tuned on
    fiction, persuasion = genres.source("persuasion")
    assert persuasion.only == "heldout" and corpora.HELDOUT_NOVEL == "persuasion"
    with pytest.raises(UserError, match="unknown source 'nope'"):
        genres.source("nope")


# ---------------------------------------------------------------------------------------------- protocol
def test_time_block_rounds_rotate_and_start_from_the_prefill():
    cfg = run.EnginesConfig(contexts=(3,), threads=(1,), reps=3, steps=2, warmup=1, memory=False,
                            ppl_window=8, ppl_tokens=2)
    engines = {"a": Bigram("a"), "b": Bigram("b")}
    ids = [0, 1, 2, 0, 1, 2, 0, 1]
    secs = run.time_block(engines, ids, 3, cfg)
    assert {k: len(v) for k, v in secs.items()} == {"a": 3, "b": 3}
    for e in engines.values():
        assert e.log[0] == ("prefill", 3) and e.log[2] == ("step", 0)          # warm-up: the id after the context
        rounds = [i for i, x in enumerate(e.log) if x == ("reset",)][1:]
        assert len(rounds) == 3
        for i in rounds:                                                      # every timed round: same 2 ids
            assert e.log[i + 1:i + 3] == [("step", 0), ("step", 1)]
        assert e.fed == [0, 1, 2, 0, 1]


def test_block_rows_ratio_is_the_median_of_per_round_ratios():
    cfg = run.EnginesConfig(reps=3, steps=4, memory=False)
    specs = {"llama.cpp": E.EngineSpec("llama.cpp", "llama.cpp", "x.gguf", "Q4_1 GGUF"),
             "solm keep 0.5": E.EngineSpec("solm", "solm keep 0.5", "f.onnx", "fp32", (0.5, 0.5, 16.0))}
    secs = {"llama.cpp": [1.0, 2.0, 3.0], "solm keep 0.5": [3.0, 1.0, 2.0]}
    rows = run.block_rows(secs, specs, 1024, 2, cfg)
    solm = rows[1]
    assert solm["ratio_to"] == "llama.cpp" and solm["ratio"] == pytest.approx(1.5)   # medians' ratio would be 1.0
    assert (solm["ratio_min"], solm["ratio_max"]) == pytest.approx((1 / 3, 2.0))
    assert solm["tok_s"] == pytest.approx(2.0) and solm["tok_s_min"] == pytest.approx(4 / 3)
    assert solm["weights"] == "fp32" and solm["kind"] == "solm" and rows[0]["ratio"] == 1.0


def test_config_is_checked_at_construction():
    for bad in (dict(weights="int3"), dict(ppl_tokens=4096), dict(keeps=(0.0,)), dict(contexts=()),
                dict(engines=("vllm",)), dict(reps=0), dict(ppl_texts=()), dict(ppl_texts=("wikitext",))):
        with pytest.raises(UserError):
            run.EnginesConfig(**bad)
    assert run.EnginesConfig(contexts=(4096,), steps=32).tokens_needed() == 4096 + 32


def test_keeps_take_pairs_for_unequal_attention_and_mlp_keeps():
    from solm_compile.cli.bench import _keep_list

    keeps = _keep_list("0.5, 0.25/0.4")
    assert keeps == (0.5, (0.25, 0.4))
    assert [run.keep_pair(k) for k in keeps] == [(0.5, 0.5), (0.25, 0.4)]
    assert [run.keep_label(k) for k in keeps] == ["0.5", "0.25/0.4"]
    assert run.EnginesConfig(keeps=keeps).keeps == keeps
    with pytest.raises(UserError, match="0.25/0"):
        run.EnginesConfig(keeps=((0.25, 0.0),))
    for bad in ("", "0.5/", "a/0.4"):
        with pytest.raises(argparse.ArgumentTypeError, match="--keeps"):
            _keep_list(bad)
    # the sweep is ordered by the mean of the two keeps: 0.25/0.4 sits between 0.3 and 0.5
    names = ["solm keep 0.5", "solm dense-budget", "solm keep 0.3", "solm keep 0.25/0.4"]
    assert sorted(names, key=lambda n: -report._keep(n)) == ["solm dense-budget", "solm keep 0.5",
                                                         "solm keep 0.25/0.4", "solm keep 0.3"]


def test_spin_reaches_solm_sessions_and_defaults_on_for_the_engines_bench():
    import onnxruntime as ort

    from solm_compile.cli.app import build_parser
    from solm_compile.runtime.session import session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(ort, 2).get_session_config_entry(key) == "0"          # serving / tests: no spinning
    assert session_options(ort, 2, spin=True).get_session_config_entry(key) == "1"
    parse = build_parser().parse_args
    from solm_compile.cli.bench import engines_config_from_args
    assert engines_config_from_args(parse(["bench", "smollm2", "--engines"])).spin is True
    assert engines_config_from_args(parse(["bench", "smollm2", "--engines", "--no-spin"])).spin is False


def test_weights_go_to_load_only_where_it_takes_them():
    def old(model, trust_pickle=False):
        pass

    def new(model, trust_pickle=False, weights="source"):
        pass

    assert run.weights_plan("source", old) == ({}, False)
    assert run.weights_plan("int4", new) == ({"weights": "int4"}, True)
    assert run.weights_plan("int4", new, head_bits=4) == ({"weights": "int4", "head_bits": 4}, True)
    with pytest.raises(UserError, match="--head-bits 4"):
        run.EnginesConfig(weights="int8", head_bits=4)
    with pytest.raises(UserError, match="--weights int4"):
        run.weights_plan("int4", old)
    assert run.solm_weights_label("source", False, "Q4_1") == "fp32 (dequantized Q4_1 GGUF)"
    assert run.solm_weights_label("source", True, "Q4_1") == "source (Q4_1 GGUF blocks)"
    assert run.solm_weights_label("int8", True, "Q4_1") == "int8"


def test_missing_peers_are_skipped_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)            # import fails as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    assert not E.available("llama.cpp") and not E.available("onnxruntime-genai")
    cfg = run.EnginesConfig(engines=("llama.cpp", "onnxruntime-genai"), memory=False)
    specs, notes = run.engine_specs("model.pt2", None, cfg, False, lambda s: None)
    assert specs == [] and len(notes) == 1
    assert notes[0] == "skipped llama.cpp, onnxruntime-genai (not installed): pip install solm-compile[bench]"


def test_spec_round_trips_through_json():
    s = E.EngineSpec("solm", "solm keep 0.3", "/a/fixed.onnx", "fp32", (0.3, 0.3, 16.0))
    assert E.EngineSpec.from_json(s.to_json()) == s


# ---------------------------------------------------------------------------------------------- outputs
def _doc():
    cfg = run.EnginesConfig(contexts=(256, 1024), threads=(1, 2), reps=2, steps=4, memory=False)
    specs = {"llama.cpp": E.EngineSpec("llama.cpp", "llama.cpp", "x.gguf", "Q4_1 GGUF"),
             "solm dense-budget": E.EngineSpec("solm", "solm dense-budget", "f.onnx", "fp32", (1.0, 1.0, 16.0))}
    rows = []
    for t in cfg.threads:
        for c in cfg.contexts:
            for r in run.block_rows({"llama.cpp": [0.1, 0.12], "solm dense-budget": [0.2, 0.22]}, specs, c, t, cfg):
                rows.append({**r, "ppl": 10.0, "ppl_texts": {"persuasion": 12.0, "jargon": 8.5}, "peak_rss_mb": None})
    return {"model": "smollm2", "config": {}, "tokens": "text:persuasion", "skipped": ["skipped x"],
            "machine": report.machine([]), "ppl": {"window": 2048, "scored": 256, "texts": ["persuasion", "jargon"],
                                                   "values": {}},
            "memory_context": None, "rows": rows}


def test_table_json_and_plot(tmp_path):
    doc = _doc()
    lines = report.format_table(doc).splitlines()
    assert lines[0].split()[:3] == ["engine", "weights", "thr"]
    assert len(lines) == 1 + len(doc["rows"]) + 2                     # header, rows, footnote, skipped line
    assert "Q4_1 GGUF" in lines[1] and lines[-1] == "skipped x"
    assert lines[0].split()[9:12] == ["PPL", "persuasion", "jargon"]      # pooled, then each text's own
    assert lines[1].split()[-3:] == ["10.000", "12.000", "8.500"]         # no memory or bytes columns here
    out, png, ppl_png = report.write_outputs(doc, tmp_path / "res" / "engines.json")
    assert json.loads(out.read_text())["rows"] == doc["rows"]
    assert png == tmp_path / "res" / "engines.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ppl_png == tmp_path / "res" / "engines-ppl.png" and ppl_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "res").iterdir()) == ["engines-ppl.png", "engines.json", "engines.png"]


def test_speed_quality_points_are_the_largest_contexts_rows_with_a_perplexity(tmp_path):
    doc = _doc()                                     # contexts 256 and 1024, threads 1 and 2, every row ppl 10.0
    doc["rows"][-1]["ppl"] = None                    # the last row: solm dense-budget, ctx 1024, 2 threads
    pts = report.speed_quality_points(doc)
    want = {(r["engine"], r["threads"]): (10.0, r["tok_s"]) for r in doc["rows"][:-1] if r["context"] == 1024}
    assert pts == want and ("solm dense-budget", 2) not in pts and len(pts) == 3
    doc["rows"] = [{**r, "ppl": None} for r in doc["rows"]]
    assert report.speed_quality_points(doc) == {}
    assert len(report.write_outputs(doc, tmp_path / "e.json")) == 2   # no perplexity: no second plot


# ---------------------------------------------------------------------------------------------- real engines
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Llama saved as an HF directory (the input of onnxruntime-genai's builder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    d = tmp_path_factory.mktemp("tiny-hf")
    hf.save_pretrained(d)
    from test_artifact import word_tokenizer

    word_tokenizer().save_pretrained(d)              # the builder writes the tokenizer beside the model
    return hf, d


def _hf_nll(hf, ids, start):
    import torch

    with torch.no_grad():
        z = hf(torch.tensor([ids])).logits[0].double().numpy()           # [T, V]
    return E.nll_from_logits(z[start - 1:-1], ids[start:])


def test_artifact_engine_matches_the_model_and_resets(tiny_hf, tmp_path):
    import onnxruntime as ort

    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.runtime import ep
    from test_artifact import word_tokenizer

    hf, _ = tiny_hf
    lm = GatedLM.from_loaded(models._from_hf(hf, word_tokenizer(), name="tiny", source="<test>"))
    ids = [int(x) for x in np.random.default_rng(0).integers(0, 160, 40)]
    kinds = ["dense"] + (["fixed"] if ep.register(ort) else [])
    for kind in kinds:
        path = tmp_path / f"{kind}.onnx"
        write_artifact(lm, path, kind)
        e = E.make_engine(E.EngineSpec("solm" if kind == "fixed" else "onnxruntime", kind, str(path), "fp32"), 1, 64)
        assert e.nll(ids, 30) == pytest.approx(_hf_nll(hf, ids, 30), abs=1e-4)
        e.prefill(ids[:30])
        first = [e.step(t).copy() for t in ids[30:33]]
        e.reset()
        again = [e.step(t).copy() for t in ids[30:33]]
        np.testing.assert_array_equal(np.stack(first), np.stack(again))   # reset returns to the prefill
    from solm_compile.bench.engines_rss import measure_child

    mem = measure_child(E.EngineSpec("onnxruntime", "dense", str(tmp_path / "dense.onnx"), "fp32"), ids, 30, 1)
    assert mem is not None and 0 < mem["after_imports_mb"] <= mem["rss_mb"] <= mem["peak_mb"]
    need_ep(len(kinds) == 2)


def test_genai_engine_matches_the_model_and_resets(tiny_hf, tmp_path):
    need_bench("onnxruntime_genai")
    from solm_compile.bench.engines_build import genai_model

    hf, d = tiny_hf
    path = genai_model(d, tmp_path, precision="fp32")
    assert genai_model(d, tmp_path, precision="fp32") == path                # cached: built once
    ids = [int(x) for x in np.random.default_rng(1).integers(0, 160, 40)]
    e = E.make_engine(E.EngineSpec("onnxruntime-genai", "genai", str(path), "fp32"), 1, 64)
    assert e.nll(ids, 30) == pytest.approx(_hf_nll(hf, ids, 30), abs=1e-3)
    e.prefill(ids[:30])
    first = e.step(ids[30]).copy()
    e.reset()
    np.testing.assert_allclose(e.step(ids[30]), first, atol=1e-6)


@pytest.mark.slow
def test_llama_cpp_on_the_smollm2_gguf():
    need_bench("llama_cpp")
    from solm_compile.bench.engines_build import gguf_for, gguf_type

    gguf = gguf_for("smollm2")
    assert gguf_type(gguf) == "Q4_1"
    e = E.make_engine(E.EngineSpec("llama.cpp", "llama.cpp", str(gguf), "Q4_1 GGUF"), 1, 128)
    ids = e.llm.tokenize(b"The capital of France is", add_bos=False)
    assert int(e.prefill(ids).argmax()) == e.llm.tokenize(b" Paris", add_bos=False)[0]
    text = b"It was a bright cold day in April, and the clocks were striking thirteen. " * 3
    ids = e.llm.tokenize(text, add_bos=False)
    nll = e.nll(ids, 8)
    assert len(nll) == len(ids) - 8 and 1.0 < E.perplexity(nll) < 30.0    # a repeated sentence is easy
    e.prefill(ids[:20])
    first = e.step(ids[20]).copy()
    e.reset()
    np.testing.assert_allclose(e.step(ids[20]), first, atol=1e-5)
    e.close()
