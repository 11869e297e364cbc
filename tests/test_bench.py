"""``solm bench`` machinery on a tiny random Llama: every variant runs, the rows are complete and consistent.

Smoke test only (timings on a tiny model are noise): the real measurement is ``solm bench smollm2``.
"""

import json

import pytest
import torch

from solm_compile import bench, cli, models
from solm_compile.gated import GatedLM
from solm_compile.runtime import ep

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama):
    from test_artifact import word_tokenizer

    loaded = models._from_hf(tiny_llama, word_tokenizer(), name="tiny", source="<test>")
    return GatedLM.from_loaded(loaded)


def test_bench_rows(tiny_lm, tmp_path, monkeypatch):
    if not ep.register(ort):   # the package's (or the cache's) SolmEP, before the cache moves to tmp_path
        pytest.skip("SolmEP is not built here (python -m solm_compile.runtime.ep_build)")
    monkeypatch.setenv("SOLM_CACHE", str(tmp_path))
    cfg = bench.BenchConfig(contexts=(24,), threads=(1,), reps=2, steps=4, warmup=1)
    assert cfg.modes() == ["dense", "policy", "replay", "fixed", "dense_budget", "portable"]
    b = bench.prepare_lm(tiny_lm, cfg, "random")
    assert sorted(b.artifacts) == ["dense", "fixed", "portable", "solm"]
    rows = bench.run_all(b)
    json.dumps(rows)                                  # plain JSON
    assert [(r["variant"], r["mode"]) for r in rows] == [
        ("dense", "dense"), ("solm", "policy"), ("solm", "replay"), ("solm", "fixed"), ("solm", "dense_budget"),
        ("portable", "policy")]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r)
        assert r["context"] == 24 and r["threads"] == 1 and r["tok_s"] > 0 and r["ideal_ratio"] > 0
        assert r["pct_of_ideal"] == pytest.approx(100 * r["ratio"] / r["ideal_ratio"])
        assert len(r["step_ms_reps"]) == 2
    by = {r["mode"]: r for r in rows}
    assert by["dense"]["ratio"] == 1.0 and by["dense"]["ideal_ratio"] == 1.0
    assert by["dense"]["provider"] == "CPUExecutionProvider" and by["policy"]["provider"] == "SolmEP"
    assert by["portable"]["provider"] == "CPUExecutionProvider"
    # fixed controls: the budget itself (L = 25.. > ts + tw + 1), and an ideal above 1
    assert by["fixed"]["usage"] == {"attn_keep": 0.5, "mlp_keep": 0.5, "bits": 16.0}
    assert by["fixed"]["ideal_ratio"] > 1
    # replay feeds the policy's own controls: same realised usage, same ideal
    assert by["replay"]["usage"] == pytest.approx(by["policy"]["usage"])
    assert by["replay"]["ideal_ratio"] == pytest.approx(by["policy"]["ideal_ratio"])
    assert by["policy"]["policy_ms"] is not None and by["policy"]["policy_pct"] is not None
    assert by["dense_budget"]["usage"] == {"attn_keep": 1.0, "mlp_keep": 1.0, "bits": 16.0}
    # the cache is reused: a second prepare compiles nothing
    again = bench.prepare_lm(tiny_lm, cfg, "random")
    assert again.artifacts == b.artifacts
    assert "dense" in bench.format_table(rows)


def test_fixed_artifact_equals_gated_graph(tiny_lm, tmp_path, monkeypatch):
    """The fixed artifact (controls as inputs, no policy) computes the torch gated graph at those controls."""
    import numpy as np

    from solm_compile.runtime.session import SolmSession

    monkeypatch.setenv("SOLM_CACHE", str(tmp_path))
    arts = bench.ensure_artifacts(tiny_lm, ["fixed"], None)
    s = SolmSession(arts["fixed"], tokenizer=False, use_ep=False)   # the custom ops need SolmEP: check on the EP
    assert s.kind == "fixed" and {"attn_keep", "mlp_keep", "bits"} <= set(s.input_names)
    if not ep.register(ort):
        pytest.skip("SolmEP is not built here")
    s = SolmSession(arts["fixed"], tokenizer=False)
    prompt = list(range(3, 23))
    got = [st for st in s.steps([prompt], (0.5, 0.5, 8), max_new_tokens=4)]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        logits, _, cache = tiny_lm.prefill(ids)
        np.testing.assert_allclose(got[0]["logits"][0], logits[0, -1].numpy(), atol=1e-4)
        for st in got[1:]:
            tok = torch.tensor([[int(st["token"][0])]])
            logits, _, cache = tiny_lm.step(tok, cache, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([8.0]))
            np.testing.assert_allclose(st["logits"][0], logits[0, -1].numpy(), atol=1e-4)
            np.testing.assert_allclose(st["controls"][0], [0.5, 0.5, 8.0])


def test_bench_cli_errors(capsys):
    assert cli.main(["bench", "smollm2", "--context", "1,x"]) == 2
    assert "--context" in capsys.readouterr().err
    assert cli.main(["bench", "smollm2", "--attn-keep", "3"]) == 2
    assert "--attn-keep" in capsys.readouterr().err
    assert cli.main(["bench", "smollm2", "--variants", "dense,nope"]) == 2
    assert "--variants" in capsys.readouterr().err
