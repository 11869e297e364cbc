"""QuestAttention decode over long row lists, split into chunks (flash-decoding, kernels_attention.cc).

A (row, KV head) item whose rows exceed 256 is attended in chunks of ~256 rows, each with its own softmax max and
sum, merged afterwards, so that B·Hkv items (3 for SmolLM2) spread evenly over the threads. Only the summation
order changes: the outputs are compared with a float64 numpy softmax written here (dense rows) and with
``reference.quest_attention_cache_ref`` (sparse rows; its page choice is the specification), within 2e-5 absolute
for outputs of magnitude ~1 (an fp32 sum of ~1000 terms; the fp16 cases against the rows as the cache rounded them).
The chunking depends only on the row count, so 1 and 2 threads give bit-identical outputs.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto
from quest_graph import quest_buffer_session
from require import registered_ep

from solm_compile.ops import reference as ref

ort = pytest.importorskip("onnxruntime")

F, F16, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
S = 8
TOL = 2e-5


@pytest.fixture(scope="module")
def lib():
    return registered_ep()


def _session(kv_type, threads=1):
    return quest_buffer_session(ort, kv_type, S, threads)


def _case(dtype, B, H, Hkv, d, C, P, kappa, seed):
    rng = np.random.default_rng(seed)
    ck = np.zeros((B, Hkv, C, d), dtype)
    cv = np.zeros((B, Hkv, C, d), dtype)
    ck[:, :, :P] = rng.standard_normal((B, Hkv, P, d)).astype(dtype)
    cv[:, :, :P] = rng.standard_normal((B, Hkv, P, d)).astype(dtype)
    feeds = {"q": rng.standard_normal((B, H, 1, d)).astype(np.float32),
             "k": rng.standard_normal((B, Hkv, 1, d)).astype(np.float32),
             "v": rng.standard_normal((B, Hkv, 1, d)).astype(np.float32),
             "kappa": np.array(kappa, np.float32), "past_length": np.full((B,), P, np.int64)}
    return feeds, ck, cv


def _run(sess, feeds, ck, cv):
    ov = ort.OrtValue.ortvalue_from_numpy
    pk, pv = ov(ck.copy()), ov(cv.copy())
    b = sess.io_binding()
    for name, x in feeds.items():
        b.bind_ortvalue_input(name, ov(x))
    b.bind_ortvalue_input("past_key", pk)
    b.bind_ortvalue_input("past_value", pv)
    b.bind_output("out", "cpu")
    b.bind_ortvalue_output("present_key", pk)
    b.bind_ortvalue_output("present_value", pv)
    sess.run_with_iobinding(b)
    return b.get_outputs()[0].numpy().copy()


def _dense_numpy(feeds, ck, cv):
    """Plain float64 softmax attention over every valid row (the new one written as the cache's dtype)."""
    P = int(feeds["past_length"][0])
    k = ck.astype(np.float64)
    v = cv.astype(np.float64)
    k[:, :, P] = feeds["k"][:, :, 0].astype(ck.dtype)
    v[:, :, P] = feeds["v"][:, :, 0].astype(cv.dtype)
    k, v = k[:, :, :P + 1], v[:, :, :P + 1]                                       # [B, Hkv, L, d]
    q = feeds["q"][:, :, 0].astype(np.float64)                                    # [B, H, d]
    G = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)                       # [B, H, L, d]
    s = np.einsum("bhd,bhld->bhl", q, k) / math.sqrt(q.shape[-1])                 # [B, H, L]
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhl,bhld->bhd", w, v)[:, :, None]                           # [B, H, 1, d]


def _spec(feeds, ck, cv):
    t = torch.from_numpy
    d = feeds["q"].shape[-1]
    return ref.quest_attention_cache_ref(t(feeds["q"]), t(feeds["k"]), t(feeds["v"]), None, t(feeds["kappa"]),
                                         t(ck), t(cv), t(feeds["past_length"]), 1 / math.sqrt(d), S, 2,
                                         4)[0].numpy()


# (B, H, Hkv, d, P): SmolLM2's group (3 heads, d 64: the register softmax·v and 3-head q·k at AVX-512), and a
# generic one (2 heads, d 24: the row-by-row paths); P + 1 rows = 4-9 chunks, not a multiple of 8 or of 256
SHAPES = [(1, 9, 3, 64, 1037), (2, 4, 2, 24, 2100)]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_rows_in_chunks_match_a_float64_softmax(lib, dtype, shape):
    B, H, Hkv, d, P = shape
    feeds, ck, cv = _case(dtype, B, H, Hkv, d, P + 8, P, [1.0] * B, seed=P)
    out = _run(_session(F16 if dtype == np.float16 else F), feeds, ck, cv)
    np.testing.assert_allclose(out, _dense_numpy(feeds, ck, cv), rtol=0, atol=TOL)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_rows_in_chunks_match_the_reference(lib, dtype, shape):
    B, H, Hkv, d, P = shape
    feeds, ck, cv = _case(dtype, B, H, Hkv, d, P + 8, P, [0.7, 0.4][:B], seed=P + 1)
    out = _run(_session(F16 if dtype == np.float16 else F), feeds, ck, cv)
    np.testing.assert_allclose(out, _spec(feeds, ck, cv), rtol=0, atol=TOL)


def test_threads_do_not_change_the_outputs(lib):
    """The chunks depend on the row count only: 1 and 2 threads give the same bits (dense and sparse rows)."""
    feeds, ck, cv = _case(np.float16, 2, 9, 3, 64, 1500, 1400, [1.0, 0.5], seed=3)
    one = _run(_session(F16, threads=1), feeds, ck, cv)
    two = _run(_session(F16, threads=2), feeds, ck, cv)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("isa", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_chunked_decode_in_every_isa_variant(lib, isa):
    """Each ISA variant of the decode family (a fresh process under SOLM_EP_ISA) attends in chunks like the
    references (fp16 rows: F16C in v3/v4, software in baseline)."""
    from test_ep_isa import RANK, host_isa

    if RANK[isa] > RANK[host_isa()]:
        pytest.skip(f"this CPU runs at most {host_isa()}")
    code = ("import test_decode_chunks as t; from solm_compile.runtime import ep; import onnxruntime as ort; "
            f"ep.register(ort, path={str(lib)!r}); "
            "[f(None, dt, s) for f in (t.test_dense_rows_in_chunks_match_a_float64_softmax, "
            "t.test_sparse_rows_in_chunks_match_the_reference) for dt in (t.np.float32, t.np.float16) "
            "for s in t.SHAPES]; print(ep.isa_report()['decode_attention'])")
    env = {**os.environ, "SOLM_EP_ISA": isa}
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == isa
