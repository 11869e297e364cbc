"""SolmEP (the C++ onnxruntime plugin EP) against the plain PyTorch references in ``solm_compile.ops.reference``.

Each test builds a one-node ONNX model (domain ``ai.solm``; data as graph inputs, weights as initializers), runs it
on onnxruntime with SolmEP registered, and compares with the reference. The library is built once per test session
into solm's cache (``ep_build.build_cached``); the module is skipped, with the reason, if it cannot be built
(or fails, if SOLM_REQUIRE_EP=1).
"""

from __future__ import annotations

import ctypes
import math
import os
import warnings
import zlib

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from solm_compile.ops import reference as ref
from solm_compile.runtime import ep
from solm_compile.runtime import ep_build

ort = pytest.importorskip("onnxruntime")

F, BOOL, I64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64
RTOL = 1e-4
IR_VERSION = 10  # readable by every onnxruntime with the plugin-EP API (onnx 1.23 writes 14 by default)


def _unavailable(reason: str):
    # CI sets SOLM_REQUIRE_EP=1 so that a machine that should build the EP fails instead of skipping.
    if os.environ.get("SOLM_REQUIRE_EP"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def lib():
    if ep._ort_version(ort) < ep.MIN_ORT:
        _unavailable(f"SolmEP needs onnxruntime >= 1.24, found {ort.__version__}")
    try:
        path = ep_build.build_cached()
    except ep_build.BuildError as e:
        _unavailable(f"SolmEP cannot be built here: {e}")
    assert ep.register(ort, path=path)
    return ctypes.CDLL(str(ep._registered))  # the same mapping onnxruntime loaded: shares the work counters


def _model(op, inputs, outputs, attrs=None, inits=()):
    """One ai.solm node. ``inputs``: (name, elem_type) or None for an absent optional input; initializer names are
    given in ``inits`` as (name, array) and are not graph inputs."""
    init_names = {n for n, _ in inits}
    node = helper.make_node(op, [i[0] if i else "" for i in inputs], list(outputs), domain="ai.solm",
                            **(attrs or {}))
    graph_inputs = [helper.make_tensor_value_info(n, t, None) for n, t in (i for i in inputs if i)
                    if n not in init_names]
    graph = helper.make_graph([node], "g", graph_inputs,
                              [helper.make_tensor_value_info(o, F, None) for o in outputs],
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits])
    return helper.make_model(graph, ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.solm", 1)])


def _session(model, threads=1, **ep_kwargs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so = ep.session_options_with_ep(so, ort=ort, **ep_kwargs)
    sess = ort.InferenceSession(model.SerializeToString(), so)
    assert sess.get_providers()[0] == "SolmEP"
    return sess


def _close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(1.0, float(np.abs(want).max())))


def _close_quantized(got, want, unquantized, bits):
    """Like ``_close``, but an element whose unquantised value lies on a rounding boundary (within float noise of
    k+½ steps) may land one quantisation step either side: the kernel's and the reference's matmuls sum in different
    orders. Every other element must match; a flipped element must differ by exactly one step."""
    got, want, unq = (np.asarray(a, np.float64) for a in (got, want, unquantized))
    ok = np.isclose(got, want, rtol=RTOL, atol=RTOL * max(1.0, float(np.abs(want).max())))
    for b in np.ndindex(*got.shape[:-1]):
        if ok[b].all() or bits[b[0]] >= 16:
            continue
        step = np.abs(unq[b]).max() / (2 ** (int(bits[b[0]]) - 1) - 1)
        bad = ~ok[b]
        on_boundary = np.abs(np.abs(unq[b][bad] / step) % 1 - 0.5) < 1e-3
        one_step = np.isclose(np.abs(got[b][bad] - want[b][bad]), step, rtol=1e-3)
        assert on_boundary.all() and one_step.all(), f"row {b}: {bad.sum()} elements off the reference"


# ---------------------------------------------------------------------------------------------- QuestAttention

def _quest_model(page_size, sinks, window, with_mask, scale=None, **extra):
    attrs = dict(page_size=page_size, sinks=sinks, window=window, **extra)
    if scale is not None:
        attrs["scale"] = scale
    ins = [("q", F), ("k", F), ("v", F), ("mask", BOOL) if with_mask else None, ("kappa", F)]
    return _model("QuestAttention", ins, ["out"], attrs)


def _attn_inputs(rng, B, H, Hkv, T, L, d, with_mask):
    q = rng.standard_normal((B, H, T, d), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
    mask = None
    if with_mask:
        if T > 1:  # causal over the last T positions, per row a different left padding
            pos = np.arange(L)[None, :]
            qpos = (L - T + np.arange(T))[:, None]
            mask = np.broadcast_to(pos <= qpos, (B, 1, T, L)).copy()
            for b in range(B):
                mask[b, :, :, :b] = False
        else:
            mask = rng.random((B, 1, 1, L)) > 0.15
            mask[..., -1] = True
    return q, k, v, mask


def _quest_ref(q, k, v, mask, kappa, scale, S, sinks, window):
    t = torch.from_numpy
    return ref.quest_attention_ref(t(q), t(k), t(v), None if mask is None else t(mask), t(kappa), scale, S, sinks,
                                   window).numpy()


@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("sinks,window", [(0, 0), (2, 3)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_quest_attention_matches_reference(lib, T, sinks, window, with_mask):
    rng = np.random.default_rng(100 * T + 10 * sinks + with_mask)
    B, H, Hkv, L, d, S = 3, 4, 2, 37, 16, 8  # GQA 4/2, L = 4 full pages + a partial page of 5
    q, k, v, mask = _attn_inputs(rng, B, H, Hkv, T, L, d, with_mask)
    kappa = np.array([1.0, 0.5, 0.2], np.float32)
    sess = _session(_quest_model(S, sinks, window, with_mask, scale=0.3))
    feeds = {"q": q, "k": k, "v": v, "kappa": kappa}
    if with_mask:
        feeds["mask"] = mask
    out = sess.run(None, feeds)[0]
    assert out.shape == (B, H, T, d)
    _close(out, _quest_ref(q, k, v, mask, kappa, 0.3, S, sinks, window))


@pytest.mark.parametrize("d,L", [(12, 29), (24, 8), (8, 3)])
def test_quest_decode_row_blocks_and_head_dims(lib, d, L):
    """The decode kernel scores 8 K rows per reduction when d is a multiple of 8 and one at a time otherwise (or
    for the rows after the last full block): both agree with the reference, with and without a mask."""
    rng = np.random.default_rng(d * 100 + L)
    B, H, Hkv, S = 3, 6, 2, 4
    for with_mask in (False, True):
        q, k, v, mask = _attn_inputs(rng, B, H, Hkv, 1, L, d, with_mask)
        kappa = np.array([1.0, 0.6, 0.3], np.float32)
        feeds = {"q": q, "k": k, "v": v, "kappa": kappa}
        if with_mask:
            feeds["mask"] = mask
        out = _session(_quest_model(S, 1, 1, with_mask)).run(None, feeds)[0]
        _close(out, _quest_ref(q, k, v, mask, kappa, None, S, 1, 1))


@pytest.mark.parametrize("kappa", [1.0, 0.5, 0.2, 0.0])
def test_quest_attention_default_scale_each_kappa(lib, kappa):
    rng = np.random.default_rng(7)
    B, H, Hkv, L, d, S = 2, 4, 2, 45, 8, 4
    q, k, v, _ = _attn_inputs(rng, B, H, Hkv, 1, L, d, False)
    kap = np.full(B, kappa, np.float32)
    sess = _session(_quest_model(S, 1, 2, False))  # no scale attribute: 1/sqrt(d)
    out = sess.run(None, {"q": q, "k": k, "v": v, "kappa": kap})[0]
    _close(out, _quest_ref(q, k, v, None, kap, None, S, 1, 2))


def test_quest_float_mask_and_is_causal(lib):
    rng = np.random.default_rng(12)
    B, H, Hkv, T, L, d = 2, 4, 1, 6, 6, 8
    q, k, v, _ = _attn_inputs(rng, B, H, Hkv, T, L, d, False)
    kappa = np.ones(B, np.float32)
    # additive float mask [B,1,1,L] with -inf entries
    fm = (rng.standard_normal((B, 1, 1, L)) * 0.5).astype(np.float32)
    fm[:, :, :, 1] = -np.inf
    m = _model("QuestAttention", [("q", F), ("k", F), ("v", F), ("mask", F), ("kappa", F)], ["out"],
               dict(page_size=4, sinks=0, window=0))
    out = _session(m).run(None, {"q": q, "k": k, "v": v, "mask": fm, "kappa": kappa})[0]
    _close(out, _quest_ref(q, k, v, fm, kappa, None, 4, 0, 0))
    # is_causal (multi-token calls): keys j <= t, top-left aligned like torch SDPA
    m = _model("QuestAttention", [("q", F), ("k", F), ("v", F), None, ("kappa", F)], ["out"],
               dict(page_size=4, sinks=0, window=0, is_causal=1))
    out = _session(m).run(None, {"q": q, "k": k, "v": v, "kappa": kappa})[0]
    causal = np.tril(np.ones((T, L), bool))[None, None]
    _close(out, _quest_ref(q, k, v, causal, kappa, None, 4, 0, 0))


def test_quest_per_row_kappa_equals_separate_runs(lib):
    rng = np.random.default_rng(3)
    B, H, Hkv, L, d, S = 4, 4, 2, 50, 16, 8
    q, k, v, _ = _attn_inputs(rng, B, H, Hkv, 1, L, d, False)
    kappa = np.array([1.0, 0.5, 0.2, 0.05], np.float32)
    sess = _session(_quest_model(S, 0, 0, False))  # sinks=window=0: SOL exact
    batched = sess.run(None, {"q": q, "k": k, "v": v, "kappa": kappa})[0]
    for b in range(B):
        single = sess.run(None, {"q": q[b:b + 1], "k": k[b:b + 1], "v": v[b:b + 1], "kappa": kappa[b:b + 1]})[0]
        np.testing.assert_array_equal(batched[b:b + 1], single)
    _close(batched, _quest_ref(q, k, v, None, kappa, None, S, 0, 0))


def _quest_group_ref(q, k, v, kappa, S, sinks, window):
    """select_per_kv_head=1: pages chosen once per KV head from scores summed over its query heads."""
    q, k, v = map(torch.from_numpy, (q, k, v))
    B, H, _, d = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G, P = H // Hkv, math.ceil(L / S)
    out = torch.empty_like(q)
    for b in range(B):
        pb = ref.page_budget(float(kappa[b]), L, S)
        for hk in range(Hkv):
            kh, vh = k[b, hk], v[b, hk]
            keep = torch.ones(L, dtype=torch.bool)
            if not (float(kappa[b]) >= 1.0 or pb >= P):
                scores = torch.zeros(P)
                for g in range(G):
                    qh = q[b, hk * G + g, 0]
                    for p in range(P):
                        page = kh[p * S:(p + 1) * S]
                        scores[p] += torch.maximum(qh * page.max(0).values, qh * page.min(0).values).sum()
                keep = torch.zeros(L, dtype=torch.bool)
                if pb > 0:
                    thr = scores.sort(descending=True).values[pb - 1]
                    for p in range(P):
                        if scores[p] >= thr:
                            keep[p * S:(p + 1) * S] = True
                keep[:sinks] = True
                if window > 0:
                    keep[max(L - window, 0):] = True
                if not keep.any():
                    keep[L - 1] = True
            for g in range(G):
                h = hk * G + g
                logits = (q[b, h] @ kh.T) / math.sqrt(d)
                logits = logits.masked_fill(~keep[None, :], float("-inf"))
                out[b, h] = torch.softmax(logits, -1) @ vh
    return out.numpy()


@pytest.mark.parametrize("via", ["attribute", "provider_option"])
def test_quest_select_per_kv_head(lib, via):
    rng = np.random.default_rng(11)
    B, H, Hkv, L, d, S = 3, 4, 2, 43, 16, 8
    q, k, v, _ = _attn_inputs(rng, B, H, Hkv, 1, L, d, False)
    kappa = np.array([0.6, 0.3, 0.1], np.float32)
    if via == "attribute":
        sess = _session(_quest_model(S, 2, 3, False, select_per_kv_head=1))
    else:
        sess = _session(_quest_model(S, 2, 3, False), select_per_kv_head=True)
    out = sess.run(None, {"q": q, "k": k, "v": v, "kappa": kappa})[0]
    _close(out, _quest_group_ref(q, k, v, kappa, S, 2, 3))
    # it is a different policy from per-query-head selection (the reference) ...
    assert not np.allclose(out, _quest_ref(q, k, v, None, kappa, None, S, 2, 3), atol=1e-3)
    # ... except without GQA, where each group is one head
    q1, k1, v1, _ = _attn_inputs(rng, B, 2, 2, 1, L, d, False)
    out1 = sess.run(None, {"q": q1, "k": k1, "v": v1, "kappa": kappa})[0]
    _close(out1, _quest_ref(q1, k1, v1, None, kappa, None, S, 2, 3))


def test_quest_threads_deterministic(lib):
    rng = np.random.default_rng(5)
    B, H, Hkv, L, d, S = 2, 8, 2, 130, 32, 16
    q, k, v, _ = _attn_inputs(rng, B, H, Hkv, 1, L, d, False)
    feeds = {"q": q, "k": k, "v": v, "kappa": np.array([0.3, 1.0], np.float32)}
    m = _quest_model(S, 4, 8, False)
    one = _session(m, threads=1).run(None, feeds)[0]
    two = _session(m, threads=2).run(None, feeds)[0]
    np.testing.assert_array_equal(one, two)


def test_quest_skip_counters_diagnostic(lib):
    """Diagnostic: the kernel's own work counters report the page budget. The proof that skipped K/V rows are
    not read is test_ep_poison.py (poisoned rows, output checked); this only pins the counters' meaning."""
    rng = np.random.default_rng(9)
    B, H, Hkv, L, d, S = 1, 4, 2, 256, 16, 16
    q, k, v, _ = _attn_inputs(rng, B, H, Hkv, 1, L, d, False)
    sess = _session(_quest_model(S, 0, 0, False))
    before = ep.work_counters()
    sess.run(None, {"q": q, "k": k, "v": v, "kappa": np.array([0.2], np.float32)})
    after = ep.work_counters()
    scored = after["attn_keys_scored"] - before["attn_keys_scored"]
    dense = after["attn_keys_dense"] - before["attn_keys_dense"]
    assert dense == H * L
    # budget ⌈⌈0.2·256⌉/16⌉ = 4 of 16 pages per head (ties could add pages; random data has none)
    assert scored == H * 4 * S


@pytest.mark.parametrize("H,Hkv", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_quest_group_union_counters_diagnostic(lib, H, Hkv, with_mask):
    """Per-query-head selection (the reference): per (row, KV head) the union of its heads' kept tokens is streamed
    once. The output equals the reference (GQA and MHA, mixed kappa per row, masks, a partial last page); the
    counters (a diagnostic: they are the kernel's own bookkeeping) say every head scores exactly its own kept and
    allowed tokens and the K/V rows read are the union's, once per group. That skipped rows are really not read is
    proven without counters by test_ep_poison.py."""
    rng = np.random.default_rng(60 + H + Hkv + with_mask)
    B, L, d, S, sinks, window = 3, 45, 8, 8, 1, 2  # 5 full pages + a partial page of 5
    q, k, v, mask = _attn_inputs(rng, B, H, Hkv, 1, L, d, with_mask)
    kappa = np.array([0.3, 1.0, 0.6], np.float32)
    feeds = {"q": q, "k": k, "v": v, "kappa": kappa}
    if with_mask:
        feeds["mask"] = mask
    sess = _session(_quest_model(S, sinks, window, with_mask))
    before = ep.work_counters()
    out = sess.run(None, feeds)[0]
    after = ep.work_counters()
    _close(out, _quest_ref(q, k, v, mask, kappa, None, S, sinks, window))
    G = H // Hkv
    scored = rows = 0
    for b in range(B):
        allowed = np.ones(L, bool) if mask is None else mask[b, 0, 0]
        for hk in range(Hkv):
            union = np.zeros(L, bool)
            for g in range(G):
                keep = ref.quest_keep_ref(torch.from_numpy(q[b, hk * G + g, 0]), torch.from_numpy(k[b, hk]),
                                          float(kappa[b]), S, sinks, window,
                                          torch.from_numpy(allowed)).numpy() & allowed
                scored += int(keep.sum())
                union |= keep
            rows += int(union.sum())
    assert after["attn_keys_scored"] - before["attn_keys_scored"] == scored
    assert after["attn_kv_rows_read"] - before["attn_kv_rows_read"] == rows
    # the union is read once per group: never more rows than the dense op reads per KV head
    assert rows <= B * Hkv * L


def _page_minmax(k, S):
    """Independent reference of the carried page state: per page of S keys the element-wise min and max,
    [B,Hkv,ceil(L/S),d] each."""
    B, Hkv, L, d = k.shape
    P = -(-L // S)
    pad = np.concatenate([k, np.repeat(k[:, :, -1:], P * S - L, axis=2)], axis=2)   # repeat the last key
    pages = pad.reshape(B, Hkv, P, S, d)
    return pages.min(3), pages.max(3)


def _stateful_quest_model(S, sinks, window, with_mask, **extra):
    ins = [("q", F), ("k", F), ("v", F), ("mask", BOOL) if with_mask else None, ("kappa", F), ("pmin", F),
           ("pmax", F)]
    return _model("QuestAttention", ins, ["out", "pmin_out", "pmax_out"],
                  dict(page_size=S, sinks=sinks, window=window, **extra))


@pytest.mark.parametrize("S,per_kv_head,with_mask", [(1, 0, False), (3, 0, True), (8, 0, False), (8, 1, True)])
def test_quest_page_state_carried_equals_stateless(lib, S, per_kv_head, with_mask):
    """Decode with the page min/max carried from step to step: a 5-token prefill, then single-token steps across
    several page boundaries (GQA 4/2, per-row kappa). Every step equals the stateless kernel bit for bit, reads only
    the new key for the pages, and the carried state equals the page min/max recomputed from all of K."""
    rng = np.random.default_rng(40 + S + per_kv_head)
    B, H, Hkv, d, T0 = 3, 4, 2, 16, 5
    kappa = np.array([1.0, 0.5, 0.2], np.float32)
    stateful = _session(_stateful_quest_model(S, 1, 2, with_mask, select_per_kv_head=per_kv_head))
    stateless = _session(_quest_model(S, 1, 2, with_mask, select_per_kv_head=per_kv_head))
    q, k, v, mask = _attn_inputs(rng, B, H, Hkv, T0, T0, d, with_mask)
    empty = np.zeros((1, Hkv, 0, d), np.float32)        # no state yet: one empty row serves any batch
    feeds = {"q": q, "k": k, "v": v, "kappa": kappa, **({"mask": mask} if with_mask else {})}
    out, pmin, pmax = stateful.run(None, {**feeds, "pmin": empty, "pmax": empty})
    np.testing.assert_array_equal(out, stateless.run(None, feeds)[0])
    for L in range(T0 + 1, T0 + 3 * S + 3):
        want_min, want_max = _page_minmax(k, S)
        np.testing.assert_array_equal(pmin, want_min)
        np.testing.assert_array_equal(pmax, want_max)
        q1, k1, v1, mask = _attn_inputs(rng, B, H, Hkv, 1, L, d, with_mask)
        k = np.concatenate([k, k1[:, :, -1:]], axis=2)                              # the cache with the new key
        v = np.concatenate([v, v1[:, :, -1:]], axis=2)
        feeds = {"q": q1, "k": k, "v": v, "kappa": kappa, **({"mask": mask} if with_mask else {})}
        before = ep.work_counters()
        out, pmin, pmax = stateful.run(None, {**feeds, "pmin": pmin, "pmax": pmax})
        folded = ep.work_counters()["attn_minmax_rows"] - before["attn_minmax_rows"]
        assert folded == B * Hkv, f"L={L}: {folded} key rows folded into the page state, want only the new ones"
        np.testing.assert_array_equal(out, stateless.run(None, feeds)[0], err_msg=f"L={L}")
        if not per_kv_head:
            _close(out, _quest_ref(q1, k, v, mask, kappa, None, S, 1, 2))
    want_min, want_max = _page_minmax(k, S)
    np.testing.assert_array_equal(pmin, want_min)
    np.testing.assert_array_equal(pmax, want_max)


def test_quest_page_state_chunked_prefill_and_errors(lib):
    """A second multi-token call continues the carried pages (merging into the partial last page); a state that
    does not hold ceil(L_past/S) pages is a one-line error."""
    rng = np.random.default_rng(21)
    B, H, Hkv, d, S = 2, 4, 2, 8, 4
    sess = _session(_stateful_quest_model(S, 0, 0, False))
    kappa = np.ones(B, np.float32)
    q, k, v, _ = _attn_inputs(rng, B, H, Hkv, 6, 6, d, False)
    empty = np.zeros((B, Hkv, 0, d), np.float32)
    _, pmin, pmax = sess.run(None, {"q": q, "k": k, "v": v, "kappa": kappa, "pmin": empty, "pmax": empty})
    q2, k2, v2, _ = _attn_inputs(rng, B, H, Hkv, 7, 13, d, False)
    k2[:, :, :6], v2[:, :, :6] = k, v
    _, pmin, pmax = sess.run(None, {"q": q2, "k": k2, "v": v2, "kappa": kappa, "pmin": pmin, "pmax": pmax})
    want_min, want_max = _page_minmax(k2, S)
    np.testing.assert_array_equal(pmin, want_min)
    np.testing.assert_array_equal(pmax, want_max)
    q3, k3, v3, _ = _attn_inputs(rng, B, H, Hkv, 1, 14, d, False)
    stale = {"q": q3, "k": k3, "v": v3, "kappa": kappa, "pmin": pmin[:, :, :2], "pmax": pmax[:, :, :2]}
    with pytest.raises(Exception, match="past_page_min/max .* not the pages of the 13 past keys"):
        sess.run(None, stale)


# ---------------------------------------------------------------------------------------------- SparseMLP

def _mlp_weights(rng, D, I, gated, biases):
    s = 1 / math.sqrt(D)
    w = {"w_up": rng.standard_normal((I, D), dtype=np.float32) * s,
         "w_down": rng.standard_normal((D, I), dtype=np.float32) / math.sqrt(I)}
    if gated:
        w["w_gate"] = rng.standard_normal((I, D), dtype=np.float32) * s
    if biases:
        w["b_up"] = rng.standard_normal(I, dtype=np.float32) * 0.1
        w["b_down"] = rng.standard_normal(D, dtype=np.float32) * 0.1
        if gated:
            w["b_gate"] = rng.standard_normal(I, dtype=np.float32) * 0.1
    return w


_MLP_ORDER = ("x", "w_gate", "b_gate", "w_up", "b_up", "w_down", "b_down", "rho", "bits")


def _mlp_model(weights, act, as_initializers=True):
    ins = [(n, F) if (n in weights or n in ("x", "rho", "bits")) else None for n in _MLP_ORDER]
    inits = [(n, a) for n, a in weights.items()] if as_initializers else ()
    return _model("SparseMLP", ins, ["y"], {"act": act}, inits)


def _close_mlp(y, x, w, rho, bits, act):
    _close_quantized(y, _mlp_ref(x, w, rho, bits, act), _mlp_ref(x, w, rho, np.full_like(bits, 16.0), act), bits)


def _mlp_ref(x, w, rho, bits, act):
    t = lambda n: torch.from_numpy(w[n]) if n in w else None  # noqa: E731
    return ref.sparse_mlp_ref(torch.from_numpy(x), t("w_gate"), t("b_gate"), t("w_up"), t("b_up"), t("w_down"),
                              t("b_down"), torch.from_numpy(rho), torch.from_numpy(bits), act).numpy()


@pytest.mark.parametrize("gated,act", [(True, "silu"), (False, "gelu"), (False, "gelu_tanh"), (True, "relu")])
@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_sparse_mlp_matches_reference(lib, gated, act, biases, T):
    rng = np.random.default_rng(zlib.crc32(repr((gated, act, biases, T)).encode()))  # same data in every process
    B, D, I = 3, 48, 1000  # I spans two gate/up column slices (768 + 232, padded to 256) and four down panels
    w = _mlp_weights(rng, D, I, gated, biases)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    rho = np.array([1.0, 0.5, 0.1], np.float32)
    bits = np.array([16, 8, 4], np.float32)
    sess = _session(_mlp_model(w, act))
    y = sess.run(None, {"x": x, "rho": rho, "bits": bits})[0]
    assert y.shape == (B, T, D)
    _close_mlp(y, x, w, rho, bits, act)


@pytest.mark.parametrize("rho", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("bits", [16.0, 8.0, 4.0])
def test_sparse_mlp_each_rho_bits(lib, rho, bits):
    rng = np.random.default_rng(int(rho * 100 + bits))
    B, T, D, I = 2, 2, 32, 80
    w = _mlp_weights(rng, D, I, True, True)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    r, b = np.full(B, rho, np.float32), np.full(B, bits, np.float32)
    y = _session(_mlp_model(w, "silu")).run(None, {"x": x, "rho": r, "bits": b})[0]
    _close_mlp(y, x, w, r, b, "silu")


def test_sparse_mlp_topk_ties_and_many_tokens(lib):
    """Ties at the threshold are all kept; 20 tokens span three token blocks."""
    rng = np.random.default_rng(2)
    B, T, D, I = 2, 10, 40, 64
    w = _mlp_weights(rng, D, I, True, False)
    x = np.round(rng.standard_normal((B, T, D)) * 2).astype(np.float32) / 2  # many equal magnitudes
    rho, bits = np.array([0.3, 0.25], np.float32), np.array([16, 6], np.float32)
    y = _session(_mlp_model(w, "silu")).run(None, {"x": x, "rho": rho, "bits": bits})[0]
    _close_mlp(y, x, w, rho, bits, "silu")


def test_sparse_mlp_dense_block_equals_token_by_token(lib):
    """A dense multi-token call (prefill) takes the register-tiled multi-token kernel (4 tokens per pass + a
    remainder); every token must come out bit-identical to running it alone."""
    rng = np.random.default_rng(13)
    B, T, D, I = 1, 7, 150, 1000  # D: three 64-row chunks of the multi-token kernel; I: two column slices
    w = _mlp_weights(rng, D, I, True, True)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    rho, bits = np.ones(B, np.float32), np.full(B, 16, np.float32)
    sess = _session(_mlp_model(w, "gelu_tanh"))
    y = sess.run(None, {"x": x, "rho": rho, "bits": bits})[0]
    _close_mlp(y, x, w, rho, bits, "gelu_tanh")
    for t in range(T):
        yt = sess.run(None, {"x": x[:, t:t + 1], "rho": rho, "bits": bits})[0]
        np.testing.assert_array_equal(y[:, t:t + 1], yt)


def test_sparse_mlp_weights_as_graph_inputs(lib):
    rng = np.random.default_rng(4)
    B, T, D, I = 2, 1, 24, 40
    w = _mlp_weights(rng, D, I, True, True)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    rho, bits = np.array([0.5, 1.0], np.float32), np.array([8, 16], np.float32)
    sess = _session(_mlp_model(w, "gelu", as_initializers=False))
    y = sess.run(None, {"x": x, "rho": rho, "bits": bits, **w})[0]
    _close_mlp(y, x, w, rho, bits, "gelu")


def test_sparse_mlp_per_row_equals_separate_runs_and_threads(lib):
    rng = np.random.default_rng(6)
    B, T, D, I = 4, 1, 64, 600
    w = _mlp_weights(rng, D, I, True, False)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    rho, bits = np.array([1.0, 0.5, 0.25, 0.1], np.float32), np.array([16, 8, 4, 6], np.float32)
    m = _mlp_model(w, "silu")
    s1, s2 = _session(m, threads=1), _session(m, threads=2)
    batched = s1.run(None, {"x": x, "rho": rho, "bits": bits})[0]
    np.testing.assert_array_equal(batched, s2.run(None, {"x": x, "rho": rho, "bits": bits})[0])
    for b in range(B):
        single = s1.run(None, {"x": x[b:b + 1], "rho": rho[b:b + 1], "bits": bits[b:b + 1]})[0]
        np.testing.assert_array_equal(batched[b:b + 1], single)


def test_sparse_mlp_skip_counters_diagnostic(lib):
    """Diagnostic: the work counters report ⌈ρD⌉ input rows and the non-zero relu units' down rows. The proof that
    the skipped weight rows are not read is test_ep_poison.py (poisoned rows, output checked)."""
    rng = np.random.default_rng(8)
    B, T, D, I = 1, 1, 100, 64
    w = _mlp_weights(rng, D, I, False, False)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    sess = _session(_mlp_model(w, "relu"))
    before = ep.work_counters()
    y = sess.run(None, {"x": x, "rho": np.array([0.1], np.float32), "bits": np.array([16], np.float32)})[0]
    after = ep.work_counters()
    d = {k: after[k] - before[k] for k in after}
    # k = ⌈ρ·D − 1e-9⌉ with ρ the float32 0.1 (= 0.10000000149): 11 channels of 100, as in the reference
    k = math.ceil(float(np.float32(0.1)) * D - 1e-9)
    assert k == 11 and d["mlp_in_rows_dense"] == D and d["mlp_in_rows"] == k
    want = _mlp_ref(x, w, np.array([0.1], np.float32), np.array([16], np.float32), "relu")
    h = np.maximum(np.where(np.abs(x[0, 0]) >= np.sort(np.abs(x[0, 0]))[-k], x[0, 0], 0) @ w["w_up"].T, 0)
    assert d["mlp_down_rows"] == int((h != 0).sum()) < I  # relu zeros skip their down rows
    _close(y, want)


# ---------------------------------------------------------------------------------------------- GateControls

@pytest.mark.parametrize("T,past,active", [(1, 10, True), (1, 6, False), (4, 10, False)])
def test_gate_controls(lib, T, past, active):
    m = _model("GateControls", [("ids", I64), ("past", F), ("kappa", F), ("rho", F), ("bits", F)],
               ["ke", "re", "be"], {"min_len": 7})
    B = 2
    feeds = {"ids": np.zeros((B, T), np.int64), "past": np.zeros((B, 2, past, 4), np.float32),
             "kappa": np.array([0.3, 0.5], np.float32), "rho": np.array([0.2, 0.9], np.float32),
             "bits": np.array([4, 8], np.float32)}
    got = _session(m).run(None, feeds)
    want = ref.gate_controls_ref(T, past + T, *(torch.from_numpy(feeds[n]) for n in ("kappa", "rho", "bits")),
                                 min_len=7)
    for g, w_ in zip(got, want):
        np.testing.assert_array_equal(g, w_.numpy())
    assert active == (past + T > 7 and T == 1)


@pytest.mark.parametrize("T,past", [(1, 10), (4, 0)])
def test_gate_controls_unconsumed_outputs_and_shared_input(lib, T, past):
    # As in an exported artifact: the prefill gate reads one zeros tensor three times (a single fused-node input)
    # and only its kappa output is used, so onnxruntime gives the fused node one output, not three (SolmEP used to
    # ask for outputs #1 and #2 anyway and crashed). An empty past (P = 0) is the prefill case.
    node = helper.make_node("GateControls", ["ids", "past", "z", "z", "z"], ["ke", "re", "be"], domain="ai.solm",
                            min_len=7)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("ids", I64, None),
                                        helper.make_tensor_value_info("past", F, None),
                                        helper.make_tensor_value_info("z", F, None)],
                          [helper.make_tensor_value_info("ke", F, None)])
    m = helper.make_model(g, ir_version=IR_VERSION,
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.solm", 1)])
    z = np.array([0.25, 0.5], np.float32)
    feeds = {"ids": np.zeros((2, T), np.int64), "past": np.zeros((2, 2, past, 4), np.float32), "z": z}
    (ke,) = _session(m).run(None, feeds)
    np.testing.assert_array_equal(ke, z if T == 1 and past + T > 7 else np.ones(2, np.float32))


# ---------------------------------------------------------------------------------------------- integration

def test_model_without_solm_nodes_runs_unchanged(lib):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 5), dtype=np.float32)
    node = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    g = helper.make_graph(node, "plain", [helper.make_tensor_value_info("x", F, [None, 8])],
                          [helper.make_tensor_value_info("y", F, None)], initializer=[numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 8), dtype=np.float32)
    so = ep.session_options_with_ep(ort=ort)
    with_ep = ort.InferenceSession(m.SerializeToString(), so)
    plain = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert with_ep.get_providers() == ["SolmEP", "CPUExecutionProvider"]
    np.testing.assert_array_equal(with_ep.run(None, {"x": x})[0], plain.run(None, {"x": x})[0])


def test_register_is_idempotent_and_warns_once_when_missing(lib, monkeypatch):
    assert ep.register(ort) and ep.register(ort) and ep.is_registered()
    monkeypatch.setattr(ep, "_registered", None)
    monkeypatch.setattr(ep, "_warned", False)
    monkeypatch.setattr(ep, "library_path", lambda: None)
    with pytest.warns(RuntimeWarning, match="SolmEP is not built"):
        assert ep.register(ort) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ep.register(ort) is False
        so = ep.session_options_with_ep(ort=ort)  # plain options, no EP
        assert isinstance(so, ort.SessionOptions)


# ---------------------------------------------------------------------------------------------- real artifact

@pytest.fixture(scope="module")
def tiny_artifacts(lib, tmp_path_factory):
    """The portable and solm artifacts of a tiny random Llama (2 layers, GQA 4/2 heads, head_dim 16) with a random
    policy inside the graph, exported by ``write_artifact`` (torch.onnx dynamo) as ``solm-compile`` does."""
    from pathlib import Path

    from conftest import tiny_models
    from solm_compile.policy.actions import GRID27
    from solm_compile.artifact.write import write_artifact
    from solm_compile.policy.checkpoint import LoadedPolicy
    from solm_compile.config import GateConfig
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy

    torch.manual_seed(0)
    lm = GatedLM.from_hf(tiny_models()["llama-gqa"]().eval())
    grid = GRID27
    policy = RecurrentActorCriticPolicy(64, grid.num_actions, PolicyConfig(d_model=32, max_steps=32)).eval()
    loaded = LoadedPolicy(policy, grid, GateConfig(), {}, 0, Path("p.pt"))
    out = tmp_path_factory.mktemp("artifacts")
    # the solm artifact with an fp32 KV cache buffer: the exact counterpart of the portable one (fp16: test_kv_cache.py)
    return {kind: write_artifact(lm, out / f"tiny.{kind}.onnx", kind, loaded, kv="fp32")
            for kind in ("portable", "solm")}


@pytest.mark.parametrize("threads,batch", [(1, 1), (2, 2)])
def test_real_artifact_matches_portable(lib, tiny_artifacts, threads, batch):
    # Regression: a real exported graph feeds the EP differently from the one-node tests (GateControls outputs
    # nobody reads, one tensor feeding several inputs, shared initializers, bool expand-output masks, P = 0 pasts);
    # the first dense prefill segfaulted. SolmEP must reproduce the portable artifact step by step.
    from solm_compile.runtime.session import SolmSession

    portable = SolmSession(tiny_artifacts["portable"], tokenizer=False, threads=threads)
    solm = SolmSession(tiny_artifacts["solm"], tokenizer=False, threads=threads)
    assert solm.ep_active and solm.sess.get_providers()[0] == "SolmEP"
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 5, 7, 3, 2, 9, 40, 41, 42, 7]][:batch]
    # the must-show: 64 greedy steps at budgets 1.0, 0.7, 0.5, 0.3 (16 bits; the policy's MLP-keep range
    # starts at its lowest level, 0.5), and one with bits
    for budget in [(1, 1, 16), (0.7, 0.7, 16), (0.5, 0.5, 16), (0.3, 0.5, 16), (0.3, 0.5, 6)]:
        before = ep.work_counters()
        steps = 0
        sparse_mlp = False
        for a, b in zip(portable.steps(prompts, budget=budget, max_new_tokens=64),
                        solm.steps(prompts, budget=budget, max_new_tokens=64)):
            where = f"budget {budget}, step {steps}"
            np.testing.assert_allclose(b["logits"], a["logits"], rtol=0, atol=1e-4, err_msg=where)
            np.testing.assert_array_equal(b["logits"].argmax(-1), a["logits"].argmax(-1), err_msg=where)
            if steps > 0:
                np.testing.assert_array_equal(b["token"], a["token"], err_msg=where)
                np.testing.assert_array_equal(b["action"], a["action"], err_msg=where)
                np.testing.assert_array_equal(b["controls"], a["controls"], err_msg=where)
                sparse_mlp = sparse_mlp or bool((a["controls"][:, 1] < 1).any())
            steps += 1
        assert steps == 65  # prefill + 64 decode steps
        after = ep.work_counters()
        n = {k: after[k] - before[k] for k in after}
        assert n["attn_calls"] == 2 * 65 and n["mlp_calls"] == 2 * 65  # every layer's ops ran on SolmEP
        if sparse_mlp:
            assert n["mlp_in_rows"] < n["mlp_in_rows_dense"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_ten_thousand_decode_steps_hold_resident_memory(lib, tiny_artifacts):
    """10,000 SolmEP decode steps at a sparse budget (50 sequences of 200 steps, so the KV cache is bounded): once
    the first sequence has sized every scratch buffer, resident memory stays flat — nothing per step is leaked."""
    from solm_compile.runtime.session import SolmSession

    solm = SolmSession(tiny_artifacts["solm"], tokenizer=False, threads=1)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]

    def sequence():
        return sum(1 for _ in solm.steps(prompt, budget=(0.4, 0.5, 8), max_new_tokens=200)) - 1

    steps = sequence() + sequence()                 # warm-up: scratch buffers and onnxruntime's arena at full size
    base = _rss_mb()
    samples = []
    while steps < 10_000:
        steps += sequence()
        samples.append(_rss_mb())
    assert steps == 10_000
    assert max(samples) - base < 8.0, (base, samples[::10])          # a leak of 1 KiB per step would be ~10 MB


def test_four_threads_on_one_solm_ep_session(lib, tiny_artifacts):
    """Four Python threads decoding at once through one SolmEP session (2 intra-op threads) get the identical
    steps a lone run gets: the kernels' scratch is per thread and the session keeps no decode state."""
    import threading

    from solm_compile.runtime.session import SolmSession

    s = SolmSession(tiny_artifacts["solm"], tokenizer=False, threads=2)
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]

    def run():
        return [(st["logits"], st["action"]) for st in s.steps(prompt, budget=(0.4, 0.5, 8), max_new_tokens=24)]

    alone = run()
    results = [None] * 4

    def work(i):
        results[i] = run()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for r in results:
        assert len(r) == len(alone)
        for (lg, a), (lg0, a0) in zip(r, alone):
            np.testing.assert_array_equal(lg, lg0)
            assert (a is None and a0 is None) or np.array_equal(a, a0)


def _present_keys(sess, feeds_out, L):
    """Each layer's valid keys [B, Hkv, L, d] as float32 (the buffer's first L rows)."""
    return [feeds_out[f"present_key_{i}"].numpy()[:, :, :L].astype(np.float32) for i in range(sess.n_layers)]


def test_artifact_carries_page_state(lib, tiny_artifacts):
    """The solm artifact keeps each layer's page min/max in buffers like the KV cache (step protocol 2): after every
    step the valid pages of the buffer equal the page min/max of that layer's valid keys, and a decode step folds
    only the new key into them (rows of different lengths: tests/test_batch.py)."""
    import onnx

    from solm_compile.runtime.session import SolmSession

    s = SolmSession(tiny_artifacts["solm"], tokenizer=False, threads=1)
    assert s.meta["page_state"] == s.n_layers == 2 and s.kv.paged and s.page_state == []
    assert s.kv.page_names("past") == ["past_page_min_0", "past_page_max_0", "past_page_min_1", "past_page_max_1"]
    S = {a.name: a.i for n in onnx.load(str(tiny_artifacts["solm"])).graph.node if n.op_type == "QuestAttention"
         for a in n.attribute}["page_size"]
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [11, 5, 7, 3, 2, 9, 40, 41, 42, 7]]
    B, Hkv = 2, s.meta["kv_heads"]
    feeds = {"input_ids": np.asarray(prompts, np.int64), "position_ids": np.tile(np.arange(10), (B, 1)),
             **s._empty_past(B, 10 + 2 * S + 3), **s._policy_start(B, np.zeros((B, s.meta["hidden_size"]), np.float32)),
             "budget": np.tile(np.array([0.3, 0.5, 0.4], np.float32), (B, 1))}
    for t in range(2 * S + 3):
        lengths = feeds["past_length"] + feeds["input_ids"].shape[1]                         # [B] after the step
        before = ep.work_counters()
        out = s._run(feeds)
        folded = ep.work_counters()["attn_minmax_rows"] - before["attn_minmax_rows"]
        assert folded == (10 if t == 0 else 1) * B * Hkv * s.n_layers, t
        for b in range(B):
            L = int(lengths[b])
            for i, k in enumerate(_present_keys(s, out, L)):
                want_min, want_max = _page_minmax(k[b:b + 1], S)
                P = want_min.shape[2]
                np.testing.assert_array_equal(out[f"present_page_min_{i}"].numpy()[b:b + 1, :, :P], want_min)
                np.testing.assert_array_equal(out[f"present_page_max_{i}"].numpy()[b:b + 1, :, :P], want_max)
        tok = out["logits"].numpy()[:, -1].argmax(-1)[:, None]
        s._carry(out, feeds)
        feeds["input_ids"], feeds["position_ids"] = tok, feeds["past_length"][:, None].copy()


def test_artifact_page_state_pass_and_per_kv_head(lib, tiny_artifacts, tmp_path):
    """passes/page_state.py on the written artifacts: a second run changes nothing, the portable artifact has no
    QuestAttention to change, and select_per_kv_head in the artifact decodes exactly as SolmEP's provider option
    select_per_kv_head=1 on the unmodified artifact."""
    from onnxscript import ir

    from solm_compile.passes.carry_page_state import carry_page_state, select_per_kv_head
    from solm_compile.runtime.session import SolmSession

    model = ir.load(str(tiny_artifacts["solm"]))
    again = carry_page_state(model)
    assert not again.modified and not again.counts and not again.skipped
    portable = carry_page_state(ir.load(str(tiny_artifacts["portable"])))
    assert not portable.modified and not portable.counts
    r = select_per_kv_head(model)
    assert r.modified and r.counts["quest_attention"] == 2
    assert not select_per_kv_head(model).modified
    path = tmp_path / "tiny.kvhead.onnx"
    ir.save(model, str(path))
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    attr = SolmSession(path, tokenizer=False, threads=1)
    option = SolmSession(tiny_artifacts["solm"], tokenizer=False, threads=1, ep_options={"select_per_kv_head": "1"})
    per_query = SolmSession(tiny_artifacts["solm"], tokenizer=False, threads=1)
    differs = False
    for a, b, c in zip(*(x.steps(prompt, budget=(0.3, 0.5, 6), max_new_tokens=24) for x in (attr, option, per_query))):
        np.testing.assert_array_equal(a["logits"], b["logits"])
        differs = differs or not np.array_equal(a["logits"], c["logits"])
    assert differs, "per-KV-head selection should change some step of a GQA model at a sparse budget"
