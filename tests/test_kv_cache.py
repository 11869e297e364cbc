"""The KV cache buffer (issue 16): QuestAttention's buffer form on SolmEP and SolmSession driving it.

One-node models check the op against ``reference.quest_attention_cache_ref`` (fp32 caches: exact; fp16 caches: exact
against the reference on the rounded cache, and within a bound derived from fp16 rounding against the fp32
reference), in place against copied, and its errors. A tiny Llama artifact (exported once, in the concat form of
artifacts before issue 16; the buffer forms made from it by ``passes/kv_buffer.py``) checks that an fp32 buffer
decodes exactly as the concat form and an fp16 buffer greedily as the fp32 one.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from onnx import TensorProto
from quest_graph import quest_buffer_session
from require import registered_ep

from solm_compile.artifact.protocol import BUFFER_PROTOCOL
from solm_compile.ops import reference as ref

ort = pytest.importorskip("onnxruntime")

F, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
B, H, HKV, D, C, S = 2, 4, 2, 16, 40, 8
U16 = 2.0 ** -11            # fp16's unit roundoff (round to nearest: relative error <= 2^-11)


@pytest.fixture(scope="module")
def lib():
    return registered_ep()


def _session(kv_type):
    return quest_buffer_session(ort, kv_type, S)


def _run(sess, feeds, past_k, past_v, in_place=True):
    """One call; the caches are OrtValues, bound as present too when ``in_place``. Returns out, present k, v."""
    b = sess.io_binding()
    for name, x in feeds.items():
        b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x))
    b.bind_ortvalue_input("past_key", past_k)
    b.bind_ortvalue_input("past_value", past_v)
    b.bind_output("out", "cpu")
    for name, past in (("present_key", past_k), ("present_value", past_v)):
        if in_place:
            b.bind_ortvalue_output(name, past)
        else:
            b.bind_output(name, "cpu")
    sess.run_with_iobinding(b)
    # copies: numpy() of an output bound to a caller's buffer is a view of that buffer, which dies with past_k/v
    return tuple(x.numpy().copy() for x in b.get_outputs())


def _case(dtype, P, T, seed):
    rng = np.random.default_rng(seed)
    cache_k = np.zeros((B, HKV, C, D), dtype)
    cache_v = np.zeros((B, HKV, C, D), dtype)
    cache_k[:, :, :P] = rng.standard_normal((B, HKV, P, D)).astype(dtype)
    cache_v[:, :, :P] = rng.standard_normal((B, HKV, P, D)).astype(dtype)
    feeds = {"q": rng.standard_normal((B, H, T, D)).astype(np.float32),
             "k": rng.standard_normal((B, HKV, T, D)).astype(np.float32),
             "v": rng.standard_normal((B, HKV, T, D)).astype(np.float32),
             "kappa": np.array([1.0, 0.3], np.float32), "past_length": np.full((B,), P, np.int64)}
    return feeds, cache_k, cache_v


def _reference(feeds, cache_k, cache_v):
    t = torch.from_numpy
    return [x.numpy() for x in ref.quest_attention_cache_ref(
        t(feeds["q"]), t(feeds["k"]), t(feeds["v"]), None, t(feeds["kappa"]), t(cache_k), t(cache_v),
        t(feeds["past_length"]), 1 / math.sqrt(D), S, 2, 4)]


@pytest.mark.parametrize("P,T", [(0, 6), (3, 5), (27, 1), (37, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_op_appends_and_attends_like_the_reference(lib, dtype, P, T):
    """out equals the reference on the cache the op wrote (fp32 rounding apart; fp16: the rows rounded to nearest
    even, as numpy's cast), present holds the past rows and the new ones, and in place equals copied."""
    sess = _session(F16 if dtype == np.float16 else F)
    feeds, ck, cv = _case(dtype, P, T, seed=P + T)
    want_out, want_k, want_v = _reference(feeds, ck, cv)
    ov = ort.OrtValue.ortvalue_from_numpy
    out, pk, pv = _run(sess, feeds, ov(ck.copy()), ov(cv.copy()), in_place=True)
    L = P + T
    np.testing.assert_array_equal(pk[:, :, :L], want_k[:, :, :L])
    np.testing.assert_array_equal(pv[:, :, :L], want_v[:, :, :L])
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-5)
    out2, pk2, pv2 = _run(sess, feeds, ov(ck.copy()), ov(cv.copy()), in_place=False)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(pk2[:, :, :L], pk[:, :, :L])
    np.testing.assert_array_equal(pv2[:, :, :L], pv[:, :, :L])


def test_fp16_cache_within_the_rounding_bound_of_fp32(lib):
    """Dense decode over an fp16 cache against the fp32 reference on the unrounded keys and values. Bound from fp16
    rounding alone: each stored element is off by <= u|x| (u = 2^-11), so a logit s_j = scale·q·k_j by at most
    e = u·scale·Σ|q||k_j|; softmax weights then move by at most 2·max_j e_j (their sum stays 1), and each value by
    u|v|: |Δout| <= max|v|·(u + 2·max_j e_j) (to first order; a factor 1.5 covers the rest and fp32 summation)."""
    sess = _session(F16)
    rng = np.random.default_rng(7)
    P = 33
    k32 = rng.standard_normal((B, HKV, C, D)).astype(np.float32)
    v32 = rng.standard_normal((B, HKV, C, D)).astype(np.float32)
    feeds = {"q": rng.standard_normal((B, H, 1, D)).astype(np.float32), "k": k32[:, :, P:P + 1].copy(),
             "v": v32[:, :, P:P + 1].copy(), "kappa": np.ones(B, np.float32), "past_length": np.full((B,), P, np.int64)}
    ov = ort.OrtValue.ortvalue_from_numpy
    out, _, _ = _run(sess, feeds, ov(k32.astype(np.float16)), ov(v32.astype(np.float16)))
    t = torch.from_numpy
    want = ref.quest_attention_ref(t(feeds["q"]).double(), t(k32[:, :, :P + 1]).double(),
                                   t(v32[:, :, :P + 1]).double(), None, t(feeds["kappa"]), 1 / math.sqrt(D), S, 2,
                                   4).numpy()
    L, scale = P + 1, 1 / math.sqrt(D)
    k_h = np.repeat(k32[:, :, :L], H // HKV, axis=1)                              # [B, H, L, d]
    e = U16 * scale * np.einsum("bhd,bhld->bhl", np.abs(feeds["q"][:, :, 0]), np.abs(k_h)).max()
    bound = 1.5 * np.abs(v32[:, :, :L]).max() * (U16 + 2 * e)
    err = np.abs(out - want).max()
    assert err <= bound, (err, bound)
    assert err > 0                                                                # the cache really is fp16


@pytest.mark.parametrize("lengths", [(27, 3), (5, 37)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_op_rows_of_different_lengths_read_only_their_own_rows(lib, dtype, lengths):
    """Step protocol 2: a single-token call whose rows have different past_length equals each row run alone (the
    reference, row by row), writes each new row at its own length, and never reads a row at or past it (NaN there
    changes nothing)."""
    sess = _session(F16 if dtype == np.float16 else F)
    feeds, ck, cv = _case(dtype, max(lengths), 1, seed=sum(lengths))
    feeds["past_length"] = np.asarray(lengths, np.int64)
    for b, P in enumerate(lengths):
        ck[b, :, P:], cv[b, :, P:] = np.nan, np.nan                                  # stale rows: never read
    want_out, want_k, want_v = _reference(feeds, ck, cv)
    ov = ort.OrtValue.ortvalue_from_numpy
    out, pk, pv = _run(sess, feeds, ov(ck.copy()), ov(cv.copy()))
    for b, P in enumerate(lengths):
        np.testing.assert_array_equal(pk[b, :, :P + 1], want_k[b, :, :P + 1])
        np.testing.assert_array_equal(pv[b, :, :P + 1], want_v[b, :, :P + 1])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-5)


def test_op_errors_are_clear(lib):
    sess = _session(F16)
    feeds, ck, cv = _case(np.float16, 3, 2, seed=1)
    ov = ort.OrtValue.ortvalue_from_numpy
    with pytest.raises(Exception, match="past_length differs between rows in a 2-token run"):
        _run(sess, {**feeds, "past_length": np.array([3, 4], np.int64)}, ov(ck), ov(cv))
    feeds, ck, cv = _case(np.float16, 3, 1, seed=1)
    with pytest.raises(Exception, match="overflow: past_length 40 \\+ 1 new tokens > capacity 40"):
        _run(sess, {**feeds, "past_length": np.full((B,), C, np.int64)}, ov(ck), ov(cv))


# ---------------------------------------------------------------------------------------------- artifacts
@pytest.fixture(scope="module")
def artifacts(lib, tmp_path_factory):
    """The tiny Llama's fixed artifact in the concat form (exported once) and its fp32 / fp16 buffer forms."""
    from conftest import tiny_models
    from onnxscript import ir
    from solm_compile.passes.kv_buffer import kv_buffer

    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend.gated import GatedLM

    torch.manual_seed(0)
    lm = GatedLM.from_hf(tiny_models()["llama-gqa"]().eval())
    d = tmp_path_factory.mktemp("kv")
    paths = {"concat": write_artifact(lm, d / "tiny.concat.onnx", "fixed", kv=None)}
    for dtype in ("float32", "float16"):
        model = ir.load(str(paths["concat"]))
        r = kv_buffer(model, dtype)
        assert r.counts["kv_buffer"] == 2 and not r.skipped
        assert not kv_buffer(model, dtype).modified                  # a second run changes nothing
        model.metadata_props["solm.kv_cache"] = json.dumps({"layout": "buffer", "dtype": dtype})
        model.metadata_props["solm.protocol"] = str(BUFFER_PROTOCOL)  # the pass made the page state buffers too
        paths[dtype] = d / f"tiny.{dtype}.onnx"
        ir.save(model, str(paths[dtype]))
    return paths


def _decode(path, n=24):
    from solm_compile.runtime.session import SolmSession

    s = SolmSession(path, tokenizer=False, threads=1)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 5, 7, 3, 2, 9, 40, 41, 42, 7]]
    steps = list(s.steps(prompts, budget=(0.3, 1.0, 16), max_new_tokens=n))
    return s, np.stack([st["logits"] for st in steps]), np.stack([st["token"] for st in steps[1:]])


def test_fp32_buffer_decodes_exactly_as_concat_and_fp16_greedily_the_same(artifacts):
    s_cat, lg_cat, tok_cat = _decode(artifacts["concat"])
    s32, lg32, tok32 = _decode(artifacts["float32"])
    s16, lg16, tok16 = _decode(artifacts["float16"])
    assert (s_cat.kv.layout, s32.kv.layout, s16.kv.dtype) == ("concat", "buffer", np.float16)
    np.testing.assert_allclose(lg32, lg_cat, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(tok32, tok_cat)
    np.testing.assert_array_equal(tok16, tok32)
    np.testing.assert_allclose(lg16, lg32, rtol=0, atol=2e-3)   # random-init logits ~0.3: fp16 rounding's share
    assert np.abs(lg16 - lg32).max() > 0


def _as_protocol_2(path, out):
    """The same fp16 artifact as step protocol 2 wrote it: page state buffers in float32 over the float16 cache."""
    from onnxscript import ir

    model = ir.load(str(path))
    for v in [*model.graph.inputs, *model.graph.outputs]:
        if "_page_" in (v.name or ""):
            v.type = ir.TensorType(ir.DataType.FLOAT)
    model.metadata_props["solm.protocol"] = "2"
    ir.save(model, str(out))
    return out


def test_fp16_page_state_selects_as_fp32_and_holds_the_fp16_keys_min_max(artifacts, tmp_path):
    """Protocol 3 keeps the page min/max in the cache's float16: the min or max of float16 keys is one of them, so
    the pages hold exactly protocol 2's float32 values and every step selects the same pages (κ = 0.3: sparse)."""
    from solm_compile.runtime.session import SolmSession

    v2 = _as_protocol_2(artifacts["float16"], tmp_path / "v2.onnx")
    s16, lg16, tok16 = _decode(artifacts["float16"])
    s2, lg2, tok2 = _decode(v2)
    assert (s16.kv.page_dtype, s2.kv.page_dtype) == (np.float16, np.float32)
    np.testing.assert_array_equal(tok16, tok2)
    np.testing.assert_array_equal(lg16, lg2)                      # the same selections, so the same logits
    s = SolmSession(artifacts["float16"], tokenizer=False, threads=1)
    ctl = {"attn_keep": np.full(1, 0.3, np.float32), "mlp_keep": np.ones(1, np.float32), "bits": np.full(1, 16, np.float32)}
    feeds = {"input_ids": np.arange(1, 20)[None], "position_ids": np.arange(19)[None], **s._empty_past(1, 24), **ctl}
    s._carry(s._run(feeds), feeds)
    S = s.kv.page_size
    for i in range(s.kv.n_layers):                                # 19 keys: pages of 8, 8 and 3 (numpy's own fold)
        keys = feeds[f"past_key_{i}"].numpy()[:, :, :19].astype(np.float32)              # [1, Hkv, 19, d]
        for m, fold in (("min", np.min), ("max", np.max)):
            pages = feeds[f"past_page_{m}_{i}"].numpy()                                   # [1, Hkv, C/S, d]
            assert pages.dtype == np.float16
            want = np.stack([fold(keys[:, :, p * S:(p + 1) * S], axis=2) for p in range(3)], axis=2)
            np.testing.assert_array_equal(pages[:, :, :3].astype(np.float32), want)


def test_session_snapshot_restores_across_layouts(artifacts):
    """A cache prefilled by one layout restored into another (the bench does this) decodes as a fresh prefill."""
    from solm_compile.runtime.session import SolmSession

    cat = SolmSession(artifacts["concat"], tokenizer=False, threads=1)
    buf = SolmSession(artifacts["float32"], tokenizer=False, threads=1)
    ids = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    ctl = {"attn_keep": np.ones(1, np.float32), "mlp_keep": np.ones(1, np.float32), "bits": np.full(1, 16, np.float32)}
    feeds = {"input_ids": np.asarray(ids), "position_ids": np.arange(10)[None], **cat._empty_past(1), **ctl}
    cat._carry(cat._run(feeds), feeds)
    restored = {**buf._empty_past(1, 12), **buf.kv.restore(cat.kv.snapshot(feeds), capacity=12), **ctl,
                "input_ids": np.array([[3]]), "position_ids": np.array([[10]])}
    fresh = {"input_ids": np.asarray(ids), "position_ids": np.arange(10)[None], **buf._empty_past(1, 12), **ctl}
    buf._carry(buf._run(fresh), fresh)
    fresh.update(input_ids=np.array([[3]]), position_ids=np.array([[10]]))
    np.testing.assert_array_equal(buf._run(restored)["logits"].numpy(), buf._run(fresh)["logits"].numpy())


def test_session_writes_the_cache_in_place(artifacts):
    """SolmSession binds present to past's OrtValue: onnxruntime hands the kernel that buffer, so a step writes
    its row into the very buffer the caller holds, and carrying it is past_length += T."""
    from solm_compile.runtime.session import SolmSession

    s = SolmSession(artifacts["float16"], tokenizer=False, threads=1)
    ctl = {"attn_keep": np.ones(1, np.float32), "mlp_keep": np.ones(1, np.float32), "bits": np.full(1, 16, np.float32)}
    feeds = {"input_ids": np.array([[1, 2, 3, 4]]), "position_ids": np.arange(4)[None], **s._empty_past(1, 8), **ctl}
    buffers = {name: feeds[name] for name in s.kv.names("past")}
    out = s._run(feeds)
    for name, buf in buffers.items():
        present = out[name.replace("past_", "present_")]
        assert present.data_ptr() == buf.data_ptr()
        rows = buf.numpy()                                                   # [1, Hkv, 8, d]
        assert rows[:, :, :4].any(axis=-1).all() and not rows[:, :, 4:].any()    # the 4 prompt rows, no more
    s._carry(out, feeds)
    assert feeds["past_length"].tolist() == [4] and all(feeds[n] is b for n, b in buffers.items())


@pytest.mark.parametrize("isa", ["baseline", "x86-64-v3"])
def test_fp16_decode_in_every_isa_variant(lib, isa):
    """The fp16 rows are widened by F16C in the v3/v4 variants and in software in baseline: each variant (a fresh
    process under SOLM_EP_ISA, which the dispatch reads once) appends and attends as the reference."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import test_kv_cache as t; from solm_compile.runtime import ep; import onnxruntime as ort; "
            f"ep.register(ort, path={str(lib)!r}); t.test_op_appends_and_attends_like_the_reference("
            f"{str(lib)!r}, t.np.float16, 37, 1); print(ep.isa_report()['decode_attention'])")
    env = {**os.environ, "SOLM_EP_ISA": isa}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == isa
