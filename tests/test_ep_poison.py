"""Poison tests: SolmEP skips the work it says it skips, proven by the output rather than by its own counters.

The rows the kernel must not read (K/V rows of the pages a decode step does not select; SparseMLP gate/up rows of
the input channels outside the top-⌈ρD⌉ of |x|, and down-projection rows of hidden units whose activation is
exactly zero) are filled with NaN or 1e30. The selection is computed here, independently of the kernel: from keys
built so that the Quest page bounds make the kept pages obvious, from ``reference.quest_keep_ref``, or from |x|
and the weights. The output must stay finite and equal the reference computed on the *unpoisoned* inputs. A
kernel that touched one poisoned row would produce NaN (0·NaN = NaN even at weight zero) or a value off by ~1e30.

(The work counters, ``SolmEpGetStats``, are checked in test_solm_ep.py as diagnostics only. Mutations these tests
catch: AttendKept streaming every K/V row at weight 0 (NaN variants), KeepFromScores keeping every page (both),
SparseMLP gathering every input channel / every down row at coefficient 0 (NaN variants); 1e30 alone misses a
read at weight 0, since 0·1e30 = 0.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from solm_compile.ops import reference as ref
from test_solm_ep import (_close, _mlp_model, _mlp_ref, _page_minmax, _quest_ref, _session,  # noqa: F401
                          _stateful_quest_model, lib)

POISONS = [float("nan"), 1e30]


# ---------------------------------------------------------------------------------------------- decode attention

def _decode_step(q, k, v, mask, kappa, S, sinks, window, past_keys):
    """One decode step on the stateful op, the page min/max of the L-1 past keys (`past_keys`, clean) carried in,
    as a decode loop holds them, so the kernel reads K only for the new key's page bound and the pages it selects."""
    pmin, pmax = _page_minmax(past_keys, S)
    sess = _session(_stateful_quest_model(S, sinks, window, mask is not None))
    feeds = {"q": q, "k": k, "v": v, "kappa": kappa, "pmin": pmin, "pmax": pmax}
    if mask is not None:
        feeds["mask"] = mask
    return sess.run(None, feeds)


def _poisoned(a, rows, value):
    """a [B,Hkv,L,d] with every element of the rows rows[b, hk, j] (bool [B,Hkv,L]) set to value."""
    a = a.copy()
    a[rows] = value
    return a


def _check_decode(q, k, v, mask, kappa, S, sinks, window, skipped, value):
    L = k.shape[2]
    assert not skipped[:, :, L - 1].any(), "the new key is read for its page bound: never a skipped row"
    assert skipped.sum() >= skipped.size // 3, "a poison test that poisons little proves little"
    want = _quest_ref(q, k, v, mask, kappa, None, S, sinks, window)
    out, pmin_out, pmax_out = _decode_step(q, _poisoned(k, skipped, value), _poisoned(v, skipped, value), mask,
                                           kappa, S, sinks, window, k[:, :, :-1])
    assert np.isfinite(out).all(), f"{int((~np.isfinite(out)).sum())} outputs not finite: a skipped row was read"
    _close(out, want)
    want_min, want_max = _page_minmax(k, S)
    np.testing.assert_array_equal(pmin_out, want_min)
    np.testing.assert_array_equal(pmax_out, want_max)


@pytest.mark.parametrize("value", POISONS)
def test_decode_reads_only_obviously_selected_pages(lib, value):
    """Keys built so the selection is obvious without running Quest: every query is positive, so a page's score is
    q·(page max); two "hot" pages per (row, KV head) hold keys ~3, the rest ~N(0, 0.1). With κ = 0.25 of L = 64 and
    S = 8 the budget is 2 pages: exactly the hot ones, plus the window (the last key). Every other K/V row is
    poisoned."""
    rng = np.random.default_rng(1)
    B, H, Hkv, L, d, S, sinks, window = 2, 4, 2, 64, 16, 8, 0, 1
    q = np.abs(rng.standard_normal((B, H, 1, d))).astype(np.float32) + 0.1
    k = (rng.standard_normal((B, Hkv, L, d)) * 0.1).astype(np.float32)
    v = rng.standard_normal((B, Hkv, L, d)).astype(np.float32)
    kept = np.zeros((B, Hkv, L), bool)
    for b in range(B):
        for hk in range(Hkv):
            for p in rng.choice(L // S - 1, size=2, replace=False):   # never the last page (it holds the new key)
                k[b, hk, p * S:(p + 1) * S] += 3.0
                kept[b, hk, p * S:(p + 1) * S] = True
    kept[:, :, L - window:] = True
    kappa = np.full(B, 0.25, np.float32)
    assert ref.page_budget(0.25, L, S) == 2
    for b in range(B):  # the obvious selection is the reference's, for every query head
        for h in range(H):
            keep = ref.quest_keep_ref(torch.from_numpy(q[b, h, 0]), torch.from_numpy(k[b, h // (H // Hkv)]), 0.25,
                                      S, sinks, window).numpy()
            np.testing.assert_array_equal(keep, kept[b, h // (H // Hkv)])
    _check_decode(q, k, v, None, kappa, S, sinks, window, ~kept, value)


@pytest.mark.parametrize("value", POISONS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_decode_reads_only_reference_selected_pages(lib, value, with_mask):
    """Random keys, per-query-head selection under GQA 6/2, a sink, a window, a partial last page, per-row κ and
    (optionally) a mask: the pages kept are the reference's (quest_keep_ref per query head, on the clean keys);
    a K/V row no head of its group keeps is poisoned."""
    rng = np.random.default_rng(2 + with_mask)
    B, H, Hkv, L, d, S, sinks, window = 2, 6, 2, 61, 16, 8, 1, 2
    G = H // Hkv
    q = rng.standard_normal((B, H, 1, d), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
    mask = None
    if with_mask:
        mask = rng.random((B, 1, 1, L)) > 0.2
        mask[..., -1] = True
    kappa = np.array([0.15, 0.3], np.float32)
    union = np.zeros((B, Hkv, L), bool)
    for b in range(B):
        valid = None if mask is None else torch.from_numpy(mask[b, 0, 0])
        for h in range(H):
            union[b, h // G] |= ref.quest_keep_ref(torch.from_numpy(q[b, h, 0]), torch.from_numpy(k[b, h // G]),
                                                   float(kappa[b]), S, sinks, window, valid).numpy()
    _check_decode(q, k, v, mask, kappa, S, sinks, window, ~union, value)


# ---------------------------------------------------------------------------------------------- SparseMLP

def _topk(x, rho):
    """Kept channels [..., D] of each token: the ⌈ρD⌉ largest |x| (ties kept), computed here."""
    D = x.shape[-1]
    kk = min(max(math.ceil(float(np.float32(rho)) * D - 1e-9), 1), D)
    thr = np.sort(np.abs(x), -1)[..., -kk][..., None]
    return np.abs(x) >= thr


def _check_mlp(x, w, act, rho, value, dropped, zero_units):
    """Poison w_gate/w_up at the input channels `dropped` (no token keeps them) and w_down at the hidden units
    `zero_units` (activation exactly zero for every token); the output must equal the clean reference."""
    assert dropped.sum() >= x.shape[-1] // 2 and zero_units.sum() > 0
    B = x.shape[0]
    r, bits = np.full(B, rho, np.float32), np.full(B, 16.0, np.float32)
    want = _mlp_ref(x, w, r, bits, act)
    wp = {n: a.copy() for n, a in w.items()}
    for n in ("w_gate", "w_up"):
        if n in wp:
            wp[n][:, dropped] = value          # nn.Linear layout [I, D]: column c is input channel c's row
    wp["w_down"][:, zero_units] = value        # [Dout, I]: column i is hidden unit i's down row
    y = _session(_mlp_model(wp, act)).run(None, {"x": x, "rho": r, "bits": bits})[0]
    assert np.isfinite(y).all(), f"{int((~np.isfinite(y)).sum())} outputs not finite: a skipped row was read"
    _close(y, want)


@pytest.mark.parametrize("value", POISONS)
def test_mlp_single_token_reads_only_topk_channels_and_live_units(lib, value):
    """One token, relu: the dropped channels are those outside the top-⌈0.1·100⌉ = 11 of |x|; the hidden units
    with relu(pre-activation) == 0 (computed here in float64 from the kept channels) have their down rows
    poisoned."""
    rng = np.random.default_rng(3)
    D, I = 100, 300
    w = {"w_up": rng.standard_normal((I, D), dtype=np.float32) / math.sqrt(D),
         "w_down": rng.standard_normal((D, I), dtype=np.float32) / math.sqrt(I)}
    x = rng.standard_normal((1, 1, D), dtype=np.float32)
    kept = _topk(x[0, 0], 0.1)
    assert kept.sum() == 11
    pre = np.where(kept, x[0, 0], 0).astype(np.float64) @ w["w_up"].T.astype(np.float64)
    zero = pre < -1e-6                         # well clear of 0: float32 rounding cannot flip the sign
    _check_mlp(x, w, "relu", 0.1, value, ~kept, zero)


@pytest.mark.parametrize("value", POISONS)
@pytest.mark.parametrize("gated,act,T", [(False, "gelu", 5), (True, "silu", 5), (False, "relu", 200),
                                         (True, "silu", 200)])
def test_mlp_many_tokens_read_only_kept_channels_and_live_units(lib, value, gated, act, T):
    """B=2 rows x T tokens (T = 5: the per-block path; T = 200: groups of 128 tokens): half the channels, |x| < 0.01
    against >= 0.5 for the others, are outside every token's top-⌈0.5·D⌉; hidden units whose up row (and bias) is
    zero have activation exactly 0 for every token (gelu(0) = relu(0) = 0, silu(g)·0 = 0): their down rows are
    skipped."""
    rng = np.random.default_rng(4 + T + gated)
    B, D, I = 2, 96, 260
    w = {"w_up": rng.standard_normal((I, D), dtype=np.float32) / math.sqrt(D),
         "b_up": rng.standard_normal(I, dtype=np.float32) * 0.1,
         "w_down": rng.standard_normal((D, I), dtype=np.float32) / math.sqrt(I),
         "b_down": rng.standard_normal(D, dtype=np.float32) * 0.1}
    if gated:
        w["w_gate"] = rng.standard_normal((I, D), dtype=np.float32) / math.sqrt(D)
    dead = np.zeros(I, bool)
    dead[rng.choice(I, size=I // 5, replace=False)] = True
    w["w_up"][dead] = 0.0
    w["b_up"][dead] = 0.0
    g = rng.standard_normal((B, T, D), dtype=np.float32)
    x = np.sign(g) * (0.5 + np.abs(g))        # |x| >= 0.5 ...
    dropped = np.zeros(D, bool)
    dropped[rng.choice(D, size=D // 2, replace=False)] = True
    x[..., dropped] *= 1e-3                   # ... but < 0.01 in the dropped channels
    assert not (_topk(x, 0.5) & dropped).any()  # no token keeps a dropped channel
    _check_mlp(x, w, act, 0.5, value, dropped, dead)
