"""Chunked prefill (issue 16's peak memory): a prompt fed in runs of ``prefill_chunk`` tokens, each run after the
first a multi-token run with past_length > 0, leaves the same state as one prefill run.

The reference is the one-run prefill of the same artifact (``prefill_chunk=0``), which the step protocol's tests
check on their own. What must agree: the last position's logits (fp32 KV buffer: to float rounding, the attention
of a later run reading the earlier runs' rows from the buffer; fp16 KV: the same, since one run also reads its keys
back from the rounded buffer), and then every greedy token and every policy action of the decode that follows,
which exercises the KV rows, the Quest page min/max carried across runs and the policy's episode restart.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from require import registered_ep
from solm_compile.runtime.session import SolmSession, prefill_spans

PROMPTS = {9: [[3, 8, 1, 12, 5, 7, 2, 9, 4]],                        # spans 4, 5: the 1-token tail joins its run
           11: [[3, 8, 1, 12, 5, 7, 2, 9, 4, 6, 10], [5, 2, 7, 7, 1, 9, 3, 11, 8, 4, 2]]}   # spans 4, 4, 3; B = 2


@pytest.fixture(scope="module")
def solm_ep():
    return registered_ep()


BUDGET = {"solm": (0.3, 0.5, 8), "fixed": (0.3, 0.5, 16)}


def test_prefill_spans_cover_the_prompt_without_one_token_runs():
    assert prefill_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert prefill_spans(9, 4) == [(0, 4), (4, 9)]           # not (8, 9): a one-token run would be a decode step
    assert prefill_spans(8, 4) == [(0, 4), (4, 8)]
    assert prefill_spans(4, 4) == [(0, 4)]
    assert prefill_spans(1, 4) == [(0, 1)]
    assert prefill_spans(2048, 0) == [(0, 2048)]              # 0: one run
    assert prefill_spans(2048, 256)[-1] == (1792, 2048) and len(prefill_spans(2048, 256)) == 8


def test_concat_kinds_prefill_in_one_run(step_artifacts):
    """dense and portable (onnxruntime's GroupQueryAttention) get the whole prompt in one run, whatever the chunk."""
    s = SolmSession(step_artifacts["dense"], tokenizer=False, threads=1, prefill_chunk=4)
    runs = []
    run = s._run
    s._run = lambda feeds: runs.append(feeds["input_ids"].shape) or run(feeds)
    list(s.steps(PROMPTS[11], (1.0, 1.0, 16), max_new_tokens=2))
    assert runs == [(2, 11), (2, 1), (2, 1)]


def test_prefill_chunk_of_one_is_refused(step_artifacts):
    from solm_compile.errors import UserError

    with pytest.raises(UserError, match="--prefill-chunk 1"):
        SolmSession(step_artifacts["dense"], tokenizer=False, threads=1, prefill_chunk=1)


def _decode(path, chunk, prompt, budget, n=10):
    s = SolmSession(path, tokenizer=False, threads=1, prefill_chunk=chunk)
    steps = list(s.steps(prompt, budget, max_new_tokens=n))
    tokens = np.stack([st["token"] for st in steps[1:]])                       # [n, B]
    actions = [st["action"].tolist() for st in steps[1:] if st["action"] is not None]
    return steps[0]["logits"], tokens, actions, np.stack([st["logits"] for st in steps[1:]])


@pytest.mark.parametrize("T", sorted(PROMPTS))
@pytest.mark.parametrize("kind", ["solm", "fixed"])     # the concat kinds prefill in one run (SolmSession.prefill)
def test_chunked_prefill_decodes_as_one_prefill_run(solm_ep, step_artifacts, kind, T):
    path = step_artifacts[kind]
    first1, tok1, act1, lg1 = _decode(path, 0, PROMPTS[T], BUDGET[kind])
    first4, tok4, act4, lg4 = _decode(path, 4, PROMPTS[T], BUDGET[kind])
    np.testing.assert_allclose(first4, first1, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(tok4, tok1)
    assert act4 == act1
    if kind == "solm":
        assert len(act1) == 10 and len({a for row in act1 for a in row}) > 1   # the policy acted, not one action
    np.testing.assert_allclose(lg4, lg1, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def fp32_fixed(tmp_path_factory, tiny_llama):
    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend.gated import GatedLM

    torch.manual_seed(0)
    return write_artifact(GatedLM.from_hf(tiny_llama), tmp_path_factory.mktemp("chunk") / "tiny.fp32.onnx",
                          "fixed", kv="fp32")


def test_chunked_prefill_on_an_fp32_kv_buffer_is_exact_to_float_rounding(solm_ep, fp32_fixed):
    first1, tok1, _, lg1 = _decode(fp32_fixed, 0, PROMPTS[11], BUDGET["fixed"], n=16)
    first3, tok3, _, lg3 = _decode(fp32_fixed, 3, PROMPTS[11], BUDGET["fixed"], n=16)
    assert SolmSession(fp32_fixed, tokenizer=False).kv.dtype == np.float32
    np.testing.assert_allclose(first3, first1, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(tok3, tok1)
    np.testing.assert_allclose(lg3, lg1, rtol=0, atol=2e-6)


def test_bench_engine_prefills_in_chunks_and_decodes_as_one_run(solm_ep, step_artifacts):
    """`solm bench --engines`' solm rows (ArtifactEngine, whose child process reports the peak memory) prefill
    through SolmSession.prefill: in runs of the session's chunk, to the one-run state."""
    from solm_compile.bench.engines import ArtifactEngine, EngineSpec

    spec = EngineSpec("solm", "solm", str(step_artifacts["fixed"]), "fp32", (0.3, 0.5, 16.0))
    got = {}
    for chunk in (0, 4):
        s = SolmSession(step_artifacts["fixed"], tokenizer=False, threads=1, prefill_chunk=chunk)
        runs, run = [], s._run
        def counted(feeds, run=run, runs=runs):
            x = feeds["input_ids"]                                   # numpy in a prefill, an OrtValue in a step
            runs.append((x.shape() if callable(x.shape) else x.shape)[1])
            return run(feeds)
        s._run = counted
        e = ArtifactEngine(spec, 1, 32, session=s)
        first = e.prefill(PROMPTS[9][0])
        got[chunk] = (runs[:], first, [e.step(t).copy() for t in (5, 9, 2)])
    assert got[0][0] == [9] and got[4][0] == [4, 5]           # the prefill runs (taken before the steps)
    np.testing.assert_allclose(got[4][1], got[0][1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.stack(got[4][2]), np.stack(got[0][2]), rtol=0, atol=1e-4)
