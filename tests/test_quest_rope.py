"""QuestAttentionRope on SolmEP (kernels_attention_rope.cc): the packed q/k/v projection in, the rotary embedding and
the head layout inside, QuestAttention's KV cache buffer and page state as the artifact carries them.

Against a plain PyTorch reference: the rotary written here (float64, rounded once to float32), the attention by
``reference.quest_attention_cache_ref`` (softmax(q·kᵀ/√d) over the selected pages, the sinks and the window), over a
prefill and three decode steps that carry the kernel's own caches, fp16 and fp32 caches, both rotary conventions, a
padding mask, per-row cos/sin and broadcast ones, rows of different past lengths; every ISA variant SOLM_EP_ISA can
force (a fresh process each); one and two threads bit-identical.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from quest_graph import one_node_session
from require import registered_ep

from solm_compile.ops import reference as ref

ort = pytest.importorskip("onnxruntime")

F, F16, I64, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64, TensorProto.BOOL
B, H, HKV, D, C, S, SINKS, WINDOW = 2, 4, 2, 16, 48, 8, 2, 4
P0, STEPS = 21, 3                  # prefill tokens (a partial last page), then single-token steps
IN = ["qkv", "cos", "sin", "mask", "kappa", "past_page_min", "past_page_max", "past_key", "past_value", "past_length"]
OUT = ["out", "present_page_min", "present_page_max", "present_key", "present_value"]


def rope_session(kv_type: int, interleaved: int, threads: int | None = None):
    """One QuestAttentionRope node (page state and KV cache as buffers) on SolmEP."""
    node = helper.make_node("QuestAttentionRope", IN, OUT, domain="ai.solm", page_size=S, sinks=SINKS, window=WINDOW,
                            num_heads=H, kv_num_heads=HKV, interleaved=interleaved)
    types = {n: F for n in IN} | {"mask": BOOL, "past_key": kv_type, "past_value": kv_type, "past_length": I64}
    return one_node_session(ort, node, types, {n: types.get(n.replace("present", "past"), F) for n in OUT}, threads)


def trig(positions: np.ndarray, broadcast: bool) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [B|1, T, d/2] of Llama's angles pos·10000^(−2i/d) (row 1 two positions ahead: per-row tables)."""
    inv = 10000.0 ** (-np.arange(0, D, 2) / D)                                  # [d/2]
    rows = positions[None] + (np.arange(1 if broadcast else B)[:, None] * 2)    # [B|1, T]
    ang = rows[..., None] * inv                                                 # [B|1, T, d/2]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rotate(x: torch.Tensor, cos: np.ndarray, sin: np.ndarray, interleaved: int) -> torch.Tensor:
    """RotaryEmbedding, written out: x [B, N, T, d]; pairs (x[i], x[i+d/2]) or (x[2i], x[2i+1]) turned by the angle."""
    x = x.double()
    c, s = torch.from_numpy(cos).double()[:, None], torch.from_numpy(sin).double()[:, None]   # [B|1, 1, T, d/2]
    idx_a = torch.arange(0, D, 2) if interleaved else torch.arange(D // 2)
    idx_b = idx_a + 1 if interleaved else idx_a + D // 2
    y = torch.empty_like(x)
    y[..., idx_a] = x[..., idx_a] * c - x[..., idx_b] * s
    y[..., idx_b] = x[..., idx_b] * c + x[..., idx_a] * s
    return y.float()


def expected(qkv, cos, sin, mask, kappa, past_key, past_value, past_length, interleaved):
    """out [B, T, H·d], present_key, present_value by the plain reference."""
    T = qkv.shape[1]
    heads = torch.from_numpy(qkv).view(B, T, H + 2 * HKV, D).transpose(1, 2)    # [B, H + 2Hkv, T, d]
    q, k, v = heads[:, :H], heads[:, H:H + HKV], heads[:, H + HKV:]             # [B, H|Hkv, T, d]
    t = torch.from_numpy
    out, pk, pv = ref.quest_attention_cache_ref(
        rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved), v.contiguous(), t(mask), t(kappa),
        t(past_key), t(past_value), t(past_length), 1 / math.sqrt(D), S, SINKS, WINDOW)
    return out.transpose(1, 2).reshape(B, T, H * D).numpy(), pk.numpy(), pv.numpy()


def drive(sess, kv_dtype, interleaved: int, broadcast: bool, seed: int = 0) -> list[tuple[list, list]]:
    """A prefill of P0 tokens then STEPS decode steps, each call fed the previous call's caches and page state;
    returns per call (kernel outputs, reference outputs, valid cache rows L)."""
    rng = np.random.default_rng(seed)
    state = {"past_key": np.zeros((B, HKV, C, D), kv_dtype), "past_value": np.zeros((B, HKV, C, D), kv_dtype),
             "past_page_min": np.zeros((B, HKV, C // S, D), np.float32),
             "past_page_max": np.zeros((B, HKV, C // S, D), np.float32)}
    calls, past = [], 0
    for T, kappa in [(P0, [1.0, 1.0])] + [(1, [0.3, 0.5])] * STEPS:
        L = past + T
        mask = np.tril(np.ones((T, L), bool), k=past)[None, None].repeat(B, 0)    # [B, 1, T, L] causal
        mask[1, :, :, :2] = False                                                  # row 1: two pad tokens
        cos, sin = trig(np.arange(past, L), broadcast)
        feeds = {"qkv": rng.standard_normal((B, T, (H + 2 * HKV) * D)).astype(np.float32), "cos": cos, "sin": sin,
                 "mask": mask, "kappa": np.array(kappa, np.float32), "past_length": np.full((B,), past, np.int64),
                 **state}
        got = sess.run(None, feeds)
        want = expected(feeds["qkv"], cos, sin, mask, feeds["kappa"], state["past_key"], state["past_value"],
                        feeds["past_length"], interleaved)
        calls.append((got, want, L))
        state = dict(zip(["past_page_min", "past_page_max", "past_key", "past_value"], got[1:]))
        past = L
    return calls


def check(calls, kv_dtype) -> None:
    tol = 2e-5 if kv_dtype == np.float32 else 2e-3          # fp16: a rotated key may round to the other neighbour
    for got, (out, pk, pv), L in calls:            # present_* are new buffers here: rows >= L are not written
        assert got[0].shape == out.shape
        np.testing.assert_allclose(got[0], out, rtol=tol, atol=tol)
        np.testing.assert_allclose(got[3][:, :, :L].astype(np.float32), pk[:, :, :L].astype(np.float32), rtol=tol,
                                   atol=tol)
        assert np.array_equal(got[4][:, :, :L], pv[:, :, :L])   # v is copied, not rotated: exact in either dtype


@pytest.fixture(scope="module")
def lib():
    return registered_ep()


@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("kv", ["fp32", "fp16"])
def test_rope_attention_matches_the_reference(lib, kv, interleaved, broadcast):
    kv_type, kv_dtype = (F, np.float32) if kv == "fp32" else (F16, np.float16)
    check(drive(rope_session(kv_type, interleaved), kv_dtype, interleaved, broadcast), kv_dtype)


def test_one_and_two_threads_are_bit_identical(lib):
    for kv_type, kv_dtype in ((F, np.float32), (F16, np.float16)):
        one = drive(rope_session(kv_type, 0, threads=1), kv_dtype, 0, False, seed=3)
        two = drive(rope_session(kv_type, 0, threads=2), kv_dtype, 0, False, seed=3)
        for (a, _, L), (b, _, _) in zip(one, two):
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[3][:, :, :L], b[3][:, :, :L])


def test_shape_errors_are_one_line(lib):
    sess = rope_session(F, 0)
    feeds = {"qkv": np.zeros((1, 1, 8 * D + 4), np.float32), "cos": np.zeros((1, 1, D // 2), np.float32),
             "sin": np.zeros((1, 1, D // 2), np.float32), "mask": np.ones((1, 1, 1, 1), bool),
             "kappa": np.ones(1, np.float32), "past_length": np.zeros(1, np.int64),
             "past_key": np.zeros((1, HKV, C, D), np.float32), "past_value": np.zeros((1, HKV, C, D), np.float32),
             "past_page_min": np.zeros((1, HKV, C // S, D), np.float32),
             "past_page_max": np.zeros((1, HKV, C // S, D), np.float32)}
    with pytest.raises(Exception, match=r"QuestAttentionRope expects qkv \[B,T,\(H\+2Hkv\)·d\] with H=4, Hkv=2"):
        sess.run(None, feeds)
    feeds["qkv"] = np.zeros((1, 1, 8 * D), np.float32)
    feeds["cos"] = np.zeros((1, 2, D // 2), np.float32)
    with pytest.raises(Exception, match=r"cos/sin \[1,2,8\] / \[1,1,8\] are not \[B\|1,T,d/2\]"):
        sess.run(None, feeds)


_CAP_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[2])
import test_quest_rope as t
from solm_compile.runtime import ep
errs = {}
for kv, dt in (("fp32", np.float32), ("fp16", np.float16)):
    for threads in (1, 2):
        calls = t.drive(t.rope_session(t.F if kv == "fp32" else t.F16, 0, threads), dt, 0, False, seed=5)
        t.check(calls, dt)
        errs[f"{kv}-{threads}"] = [got[0].tolist() for got, _, _ in calls]
print("REPORT " + json.dumps({"isa": ep.isa_report(), "outs": errs}))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4"])
def test_every_isa_variant_matches_the_reference(lib, cap):
    from test_ep_isa import report_under_cap

    from solm_compile.runtime import ep_build

    rep = report_under_cap(cap, _CAP_SCRIPT, str(ep_build.build_cached()), Path(__file__).parent)
    assert rep["isa"]["decode_attention"] == cap and rep["isa"]["prefill_attention"] == cap
    for kv in ("fp32", "fp16"):
        assert rep["outs"][f"{kv}-1"] == rep["outs"][f"{kv}-2"]      # 1 and 2 threads bit-identical


def test_rows_of_different_lengths_decode_each_over_its_own(lib):
    """Step protocol 2: one decode step with past lengths 21 and 9 (the page state of the random past computed
    here), each row against the reference over its own keys and its own positions' angles."""
    rng = np.random.default_rng(7)
    lens = np.array([21, 9], np.int64)
    keys = rng.standard_normal((B, HKV, C, D)).astype(np.float32)
    pmin = np.zeros((B, HKV, C // S, D), np.float32)
    pmax = np.zeros((B, HKV, C // S, D), np.float32)
    for b in range(B):
        for p in range(-(-int(lens[b]) // S)):
            rows = keys[b, :, p * S:min((p + 1) * S, int(lens[b]))]             # [Hkv, ≤S, d] valid keys of page p
            pmin[b, :, p], pmax[b, :, p] = rows.min(1), rows.max(1)
    ang = lens[:, None, None] * 10000.0 ** (-np.arange(0, D, 2) / D)           # [B, 1, d/2] each row's position
    feeds = {"qkv": rng.standard_normal((B, 1, (H + 2 * HKV) * D)).astype(np.float32),
             "cos": np.cos(ang).astype(np.float32), "sin": np.sin(ang).astype(np.float32),
             "mask": np.ones((B, 1, 1, int(lens.max()) + 1), bool), "kappa": np.array([0.3, 0.6], np.float32),
             "past_length": lens, "past_key": keys, "past_page_min": pmin, "past_page_max": pmax,
             "past_value": rng.standard_normal((B, HKV, C, D)).astype(np.float32)}
    got = rope_session(F, 0).run(None, feeds)
    out, _, _ = expected(feeds["qkv"], feeds["cos"], feeds["sin"], feeds["mask"], feeds["kappa"], keys,
                         feeds["past_value"], lens, 0)
    np.testing.assert_allclose(got[0], out, rtol=2e-5, atol=2e-5)
