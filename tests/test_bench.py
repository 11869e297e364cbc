"""``solm bench`` machinery on a tiny random Llama: every variant runs, the rows are complete and consistent.

Smoke test only (timings on a tiny model are noise): the real measurement is ``solm bench smollm2``.
"""

import json

import numpy as np
import pytest
import torch

from solm_compile.bench import decode as bench
from solm_compile.cli import app as cli
from solm_compile.frontend import models
from solm_compile.bench.prefill import prefill_rows
from solm_compile.frontend.gated import GatedLM
from solm_compile.runtime import ep
from require import need_ep

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_lm():
    """One layer (GQA 4/2 heads): the exports dominate this module's time."""
    from test_artifact import word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    return GatedLM.from_loaded(models._from_hf(hf, word_tokenizer(), name="tiny", source="<test>"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Every artifact of this module in one fresh solm cache (SolmEP registered first, from its usual place)."""
    has_ep = ep.register(ort)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOLM_CACHE", str(tmp_path_factory.mktemp("solm-cache")))
        yield has_ep


def test_bench_rows(tiny_lm, cache):
    need_ep(cache)
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
    by = {r["mode"] if r["variant"] != "portable" else "portable": r for r in rows}
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
    assert 0 < by["policy"]["policy_profile_ms"] and 0 < by["policy"]["policy_profile_pct"] < 100
    assert by["fixed"]["policy_profile_ms"] is None
    assert by["dense_budget"]["usage"] == {"attn_keep": 1.0, "mlp_keep": 1.0, "bits": 16.0}
    # --prefill: one row per artifact, dense work whatever the budget, timed against the dense artifact
    pre = prefill_rows(b, 24, 1)
    assert [(r["variant"], r["mode"]) for r in pre] == [("dense", "prefill"), ("solm", "prefill"),
                                                         ("solm-fixed", "prefill"), ("portable", "prefill")]
    for r in pre:
        assert set(bench.ROW_KEYS) <= set(r) and r["tok_s"] > 0 and len(r["step_ms_reps"]) == 2
        assert r["ratio"] == pytest.approx(pre[0]["step_ms"] / r["step_ms"])
    s = b.sessions(1)["solm"]
    at_budget = s._run(bench.prefill_feeds(s, b.token_ids[:24], cfg.budget))["logits"].numpy()
    dense = s._run(bench.prefill_feeds(s, b.token_ids[:24]))["logits"].numpy()
    np.testing.assert_array_equal(at_budget, dense)    # a multi-token call is dense at any budget
    # the cache is reused: a second prepare compiles nothing
    again = bench.prepare_lm(tiny_lm, cfg, "random")
    assert again.artifacts == b.artifacts
    assert "dense" in bench.format_table(rows)


def test_fixed_artifact_equals_gated_graph(tiny_lm, cache):
    """The fixed artifact (controls as inputs, no policy) computes the torch gated graph at those controls."""
    import numpy as np

    from solm_compile.runtime.session import SolmSession

    tiny_lm.kv = "fp32"                  # an exact comparison: the fp32 KV cache (fp16's tolerance: test_kv_cache.py)
    try:
        arts = bench.ensure_artifacts(tiny_lm, ["fixed"], None)
    finally:
        del tiny_lm.kv
    import onnx

    m = onnx.load(str(arts["fixed"]))
    assert [i.name for i in m.graph.input][-3:] == ["attn_keep", "mlp_keep", "bits"]
    assert not any("policy" in i.name or i.name == "budget" for i in m.graph.input)
    need_ep(cache)
    s = SolmSession(arts["fixed"], tokenizer=False)
    assert s.kind == "fixed" and s.ep_active
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
    """Bad flags: one line naming the flag, exit 2, before the model loads."""
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "smollm2", "--context", "1,x"])
    assert e.value.code == 2 and "--context" in capsys.readouterr().err
    assert cli.main(["bench", "smollm2", "--attn-keep", "3"]) == 2
    assert "--attn-keep" in capsys.readouterr().err
    assert cli.main(["bench", "smollm2", "--variants", "dense,nope"]) == 2
    assert "--variants" in capsys.readouterr().err


def test_torch_backend_rows(cache):
    """`solm bench --backend torch`: inductor dense, solm at the dense budget and solm at the budget, one row each,
    with the solm rows' usage taken from the backend's own controller."""
    from solm_compile.bench.torch_compile import torch_rows
    from solm_compile.analysis.inspect import shapes_from_gated

    loaded = models._from_hf(_tiny_hf(), None, name="tiny", source="<test>")
    lm = GatedLM.from_loaded(loaded)
    cfg = bench.BenchConfig(contexts=(24,), threads=(1,), reps=3, steps=4, warmup=1, attn_keep=0.5, mlp_keep=0.5)
    ids = torch.randint(1, 160, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    rows = torch_rows(loaded, cfg, bench.CostTable(shapes_from_gated(lm.model), lm.gate), ids,
                      bench.random_policy(lm))
    json.dumps(rows)
    assert [(r["variant"], r["mode"]) for r in rows] == [("inductor", "dense"), ("torch-solm", "dense_budget"),
                                                         ("torch-solm", "budget")]
    for r in rows:
        assert set(bench.ROW_KEYS) <= set(r) and r["tok_s"] > 0 and len(r["step_ms_reps"]) == 3
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["usage"] == {"attn_keep": 1.0, "mlp_keep": 1.0, "bits": 16.0}
    u = rows[2]["usage"]
    assert u["attn_keep"] < 1 or u["mlp_keep"] < 1 or u["bits"] < 16      # the policy pruned somewhere
    assert rows[2]["ideal_ratio"] > 1.0


def _tiny_hf():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def test_cold_mlp_bench_rows_and_bytes(tmp_path, capsys):
    """`python -m solm_compile.bench.mlp_blocks --cold` (issue 17's gather-vs-stream table): one row per ρ, and the
    down's bytes by hand: Q4_1 codes (½ byte a weight) plus a half d and m per block of 32 units, 576 x 1536; below
    ρ 1 the kept units' codes (⌈ρ·1536⌉ of them) plus every group's scales."""
    from solm_compile.bench import mlp_blocks

    need_ep(ep.library_path() is not None)
    out = tmp_path / "cold.json"
    mlp_blocks.main(["--cold", "--layers", "2", "--rounds", "1", "--reps", "20", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["rho"] for r in rows] == [1.0, 0.8, 0.6, 0.4, 0.2]
    scales = 576 * (1536 // 32) * 2 * 2
    assert rows[0]["down_kib"] * 1024 == 576 * 1536 // 2 + scales
    assert rows[2]["down_kib"] * 1024 == 922 * 576 // 2 + scales            # ⌈0.6·1536⌉ = 922 units
    assert all(r["us_layer"] > 0 for r in rows) and "| ρ (h) |" in capsys.readouterr().out
