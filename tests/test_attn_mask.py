"""Quest page selection under an attention mask (issue 15), in every implementation of ``solm.quest_attention``.

The convention (``ops/reference.py``): selection sees only a query row's unmasked keys (a page with none is never
kept; "keep κ" is κ of the unmasked keys, in pages, among the pages holding one), and a row whose keys are all
masked outputs zeros. Implementations: the reference, the torch op, the gather op (torch fallback and SolmEP's C
kernels through ``fast_c``), the portable ONNX decomposition on stock onnxruntime, and SolmEP in onnxruntime
(decode and prefill kernels). With SOLM_REQUIRE_EP=1 the SolmEP runs fail, not skip, when the library is missing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.fx import Interpreter

from conftest import tiny_models
from test_onnx_ops import B as DB, L as DL, T as DT, Attn, _one_thread, export, run, session  # noqa: F401
from test_solm_ep import BOOL, F, _model, _session, lib  # noqa: F401
from test_fast_ops import c_lib  # noqa: F401
from solm_compile.config import GateConfig
from solm_compile.frontend import models
from solm_compile.frontend.gated import compile_gated
from solm_compile.ops import fast, fast_c
from solm_compile.ops import reference as ref
from solm_compile.ops import torch_ops as ops

QUEST = torch.ops.solm.quest_attention.default
WINDOW = 16        # conftest's gemma3: sliding_window=16


# ---------------------------------------------------------------------------------------------- (a) Gemma-3
@pytest.fixture(scope="module")
def gemma_calls():
    """Per attn_select: the quest_attention calls (args) of one gated decode step at position 40 (L = 41)."""
    torch.manual_seed(0)
    # the real export: every layer is handed the whole cache and the sliding-window mask hides the old keys (before,
    # the export let transformers' sliding-window cache slice it, and decode past the window went wrong)
    loaded = models._from_hf(tiny_models()["gemma3"]().eval(), None, name="gemma3", source="<test>")
    ids = torch.randint(0, 160, (1, 41))
    one = torch.ones(1)
    out = {}
    for select in ("sol", "solm"):
        torch.set_grad_enabled(False)
        gated = compile_gated(loaded, GateConfig(attn_select=select))
        past = gated(ids[:, :40], torch.arange(40)[None], [torch.zeros(1, 1, 0, 16)] * 4, one, one, one * 16)[2]
        calls = []

        class Spy(Interpreter):
            def call_function(self, target, args, kwargs):
                if target is QUEST:
                    calls.append(args)
                return super().call_function(target, args, kwargs)

        res = Spy(gated.gm).run(ids[:, 40:], torch.full((1, 1), 40), *past, one * 0.3, one, one * 16)
        assert torch.isfinite(res[0]).all()
        out[select] = calls
    torch.set_grad_enabled(True)
    return out


@pytest.mark.parametrize("select", ["sol", "solm"])
def test_gemma3_sliding_window_selects_only_pages_in_the_window(gemma_calls, select):
    calls = gemma_calls[select]
    assert len(calls) == 2
    for q, k, v, mask, kappa, scale, _, S, sinks, window in calls:
        Bq, H, _, d = q.shape
        L = k.shape[2]
        assert L == 41 and abs(float(kappa) - 0.3) < 1e-6
        # the scenario: the test's own window (keys j with 40 − 16 < j ≤ 40) is what the graph's mask allows
        pos = torch.arange(L)
        in_window = pos > 40 - WINDOW                                             # keys 25..40
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
        assert torch.equal(allowed.expand(1, H, 1, L)[0, :, 0], in_window.expand(H, L))
        P = -(-L // S)
        window_pages = {p for p in range(P) if in_window[p * S:(p + 1) * S].any()}  # pages 3, 4, 5
        assert window_pages == {3, 4, 5}
        # which pages the op attends: V = the one-hot of each key's page, so out[h] is head h's mass per page
        v_page = torch.nn.functional.one_hot(pos // S, P).float().expand(1, 1, L, P).contiguous()
        mass = QUEST(q, k, v_page, mask, kappa, scale, False, S, sinks, window)[0, :, 0]  # [H, P]
        # the pages this test expects: Quest's bound over the keys, the best ⌈⌈κ·16⌉/S⌉ of the window's pages
        budget = math.ceil(math.ceil(0.3 * WINDOW) / S)                           # 1 page of the 3
        forced = {p for p in window_pages if p * S < sinks or (window > 0 and (p + 1) * S > L - window)}
        for h in range(H):
            kh = k[0, 0]
            bound = {p: float(torch.maximum(q[0, h, 0] * kh[p * S:(p + 1) * S].amax(0),
                                            q[0, h, 0] * kh[p * S:(p + 1) * S].amin(0)).sum())
                     for p in window_pages}
            best = set(sorted(window_pages, key=lambda p: -bound[p])[:budget])
            attended = {p for p in range(P) if mass[h, p] > 0}
            assert attended <= window_pages, (select, h, attended)
            assert attended == best | forced, (select, h, attended, best, forced)


# ---------------------------------------------------------------------------------------------- inputs
def masked_case(seed, B=3, H=4, Hkv=2, L=45, d=16, kind="bool"):
    """q/k/v and a [B,H|1,1,L] mask: row 0 a sliding window (pages wholly outside it), row 1 a random per-head mask,
    row 2 nothing allowed at all. kind: bool | float (−inf) | finfo (HF's additive finfo.min)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, H, 1, d), (B, Hkv, L, d), (B, Hkv, L, d)))
    ok = torch.zeros(B, H, 1, L, dtype=torch.bool)
    ok[0, ..., L - 13:] = True
    ok[1] = torch.rand(H, 1, L, generator=g) > 0.6
    ok[1, ..., :20] = False
    if kind == "bool":
        return q, k, v, ok
    low = float("-inf") if kind == "float" else torch.finfo(torch.float32).min
    add = torch.where(ok, torch.randn(B, H, 1, L, generator=g) * 0.5, torch.full((), low))
    return q, k, v, add


KAPPAS = torch.tensor([0.3, 0.5, 0.2])


def want(q, k, v, mask, kappa, sinks, window, S=8):
    return ref.quest_attention_ref(q, k, v, mask, kappa, 0.25, S, sinks, window)


# ---------------------------------------------------------------------------------------------- (b)+(c) torch
@pytest.mark.parametrize("kind", ["bool", "float", "finfo"])
@pytest.mark.parametrize("sinks,window", [(0, 0), (2, 4)])
def test_reference_selection_ignores_masked_pages(kind, sinks, window):
    q, k, v, mask = masked_case(1, kind=kind)
    out = want(q, k, v, mask, KAPPAS, sinks, window)
    assert torch.isfinite(out).all() and (out[2] == 0).all()                  # the fully masked row: zeros
    valid = ref.valid_keys(mask)
    for b, h in ((0, 0), (1, 1)):
        keep = ref.quest_keep_ref(q[b, h, 0], k[b, h // 2], float(KAPPAS[b]), 8, sinks, window, valid[b, h, 0])
        pages = {j // 8 for j in range(45) if keep[j] and 8 * (j // 8) >= sinks and j < 45 - window}
        assert all(valid[b, h, 0, p * 8:(p + 1) * 8].any() for p in pages), (b, h, pages)


@pytest.mark.parametrize("kind", ["bool", "float", "finfo"])
@pytest.mark.parametrize("impl", ["op", "gather-torch", "gather-c", "c-api"])
@pytest.mark.parametrize("sinks,window", [(0, 0), (2, 4)])
def test_torch_and_c_paths_equal_reference(kind, impl, sinks, window, c_lib):  # noqa: F811
    q, k, v, mask = masked_case(2, kind=kind)
    saved = dict(fast_c._state)
    fast_c._state["lib"] = c_lib if impl in ("gather-c", "c-api") else None
    try:
        if impl == "op":
            got = ops.quest_attention(q, k, v, mask, KAPPAS, 0.25, False, 8, sinks, window)
        elif impl == "c-api":
            got = fast_c.quest_attention(q, k, v, mask, KAPPAS, 0.25, 8, sinks, window)
            assert got is not None, "SolmEP's C kernel did not run"
        else:
            got = fast.quest_attention_gather(q, k, v, mask, KAPPAS, 0.25, False, 8, sinks, window)
    finally:
        fast_c._state.clear()
        fast_c._state.update(saved)
    assert torch.isfinite(got).all() and (got[2] == 0).all()
    torch.testing.assert_close(got, want(q, k, v, mask, KAPPAS, sinks, window), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 4])
def test_torch_op_fully_masked_rows_dense_and_prefill(T):
    q, k, v, mask = masked_case(3, kind="bool")
    q = q.expand(3, 4, T, 16).contiguous()
    mask = mask.expand(3, 4, T, 45)
    for kappa in (torch.ones(3), KAPPAS):
        got = ops.quest_attention(q, k, v, mask, kappa, 0.25, False, 8, 0, 0)
        assert torch.isfinite(got).all() and (got[2] == 0).all()
        torch.testing.assert_close(got, want(q, k, v, mask, kappa, 0, 0), atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- (b)+(c) ONNX
@pytest.mark.parametrize("kind", ["bool", "finfo"])
def test_portable_onnx_equals_reference(kind):
    q, k, v, mask = masked_case(4, kind=kind)
    mod = Attn(8, 2, 4, scale=0.25)
    dyn = ({0: DB, 2: DT}, {0: DB, 2: DL}, {0: DB, 2: DL}, {0: DB}, {0: DB, 2: DT, 3: DL})
    sess = session(export(mod, (q, k, v, KAPPAS, mask), dyn, portable=True))
    for T in (1, 3):
        qt, mt = q.expand(3, 4, T, 16).contiguous(), mask.expand(3, 4, T, 45).contiguous()
        got = run(sess, qt, k, v, KAPPAS, mt)[0]
        assert torch.isfinite(got).all() and (got[2] == 0).all(), T
        torch.testing.assert_close(got, want(qt, k, v, mt, KAPPAS, 2, 4), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bool", "float", "finfo"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("per_head_mask", [False, True])
def test_solm_ep_equals_reference(lib, kind, T, per_head_mask):  # noqa: F811
    q, k, v, mask = masked_case(5, kind=kind)
    if not per_head_mask:
        mask = mask[:, :1]                                                    # one mask for every head
    q, mask = q.expand(3, 4, T, 16).contiguous(), mask.expand(3, mask.shape[1], T, 45).contiguous()
    ins = [("q", F), ("k", F), ("v", F), ("mask", BOOL if kind == "bool" else F), ("kappa", F)]
    sess = _session(_model("QuestAttention", ins, ["out"], dict(page_size=8, sinks=2, window=4, scale=0.25)))
    got = torch.from_numpy(sess.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "mask": mask.numpy(),
                                           "kappa": KAPPAS.numpy()})[0])
    assert torch.isfinite(got).all() and (got[2] == 0).all()
    torch.testing.assert_close(got, want(q, k, v, mask, KAPPAS, 2, 4), atol=1e-5, rtol=1e-4)


def test_masks_change_nothing_where_nothing_is_masked():
    q, k, v, _ = masked_case(6)
    everything = torch.ones(3, 1, 1, 45, dtype=torch.bool)
    for sinks, window in ((0, 0), (2, 4)):
        torch.testing.assert_close(want(q, k, v, everything, KAPPAS, sinks, window),
                                   want(q, k, v, None, KAPPAS, sinks, window), atol=0, rtol=0)
    np.testing.assert_array_equal(ops.quest_keep(q, k, KAPPAS, 8, 2, 4, everything).numpy(),
                                  ops.quest_keep(q, k, KAPPAS, 8, 2, 4).numpy())
