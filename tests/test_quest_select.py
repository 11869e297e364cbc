"""QuestAttention decode's page selection on SolmEP (kernels_attention.cc) against the plain PyTorch reference
(``reference.quest_attention_ref``) where the issue-17 speed-ups could go wrong: a GQA group whose heads have
*different* mask rows (the unmasked pages are counted once only for heads whose rows are the same), many pages with
tied scores (the radix select's threshold and ties kept), page counts that are not a multiple of the 8-page
scoring blocks, head_dim 64 (softmax·v in registers) and groups of 3 heads (q·k of 3 heads at once at AVX-512),
each case with a dense row (κ = 1) beside sparse ones, at each ISA cap (the decode family's variants; SOLM_EP_ISA
is read once per process, so each cap runs in a subprocess, as tests/test_ep_isa.py does).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from require import registered_ep
from solm_compile.ops import reference as ref
from solm_compile.runtime import ep

ort = pytest.importorskip("onnxruntime")
F, BOOL = TensorProto.FLOAT, TensorProto.BOOL
RTOL = 1e-4


def _model(S, sinks, window):
    ins = [helper.make_tensor_value_info(n, t, None) for n, t in
           (("q", F), ("k", F), ("v", F), ("mask", BOOL), ("kappa", F))]
    node = helper.make_node("QuestAttention", [i.name for i in ins], ["out"], domain="ai.solm", page_size=S,
                            sinks=sinks, window=window, scale=0.25)
    graph = helper.make_graph([node], "g", ins, [helper.make_tensor_value_info("out", F, None)])
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.solm", 1)])


def _run(feeds, S, sinks, window):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so = ep.session_options_with_ep(so, ort=ort)
    sess = ort.InferenceSession(_model(S, sinks, window).SerializeToString(), so)
    assert sess.get_providers()[0] == "SolmEP"
    return sess.run(None, feeds)[0]


def _ref(feeds, S, sinks, window):
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    return ref.quest_attention_ref(t["q"], t["k"], t["v"], t["mask"], t["kappa"], 0.25, S, sinks, window).numpy()


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * max(1.0, float(np.abs(want).max())))


def _case(seed, B, H, Hkv, L, d, per_head_mask, ties):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, 1, d), dtype=np.float32)                    # [B, H, 1, d]
    k = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)                  # [B, Hkv, L, d]
    v = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)                  # [B, Hkv, L, d]
    if ties:  # keys in a few repeated values: many pages share a page min/max, hence a score
        k = np.round(k).clip(-1, 1).astype(np.float32)
    mask = rng.random((B, H if per_head_mask else 1, 1, L)) > 0.3              # [B, H or 1, 1, L]
    if per_head_mask:  # whole pages masked for some heads only: their page counts and budgets differ
        for h in range(H):
            mask[:, h, :, 8 * h: 8 * h + 24 * (h % 3)] = False
    mask[..., -1] = True
    kappa = np.array([0.5, 1.0, 0.3, 0.15][:B], np.float32)
    return {"q": q, "k": k, "v": v, "mask": mask, "kappa": kappa}


CASES = {  # name: (seed, B, H, Hkv, L, d, per_head_mask, ties, S, sinks, window)
    "per_head_masks": (1, 3, 6, 2, 203, 16, True, False, 4, 2, 3),
    "tied_scores": (2, 2, 6, 2, 301, 24, False, True, 4, 0, 0),
    "pages_not_multiple_of_8": (3, 3, 3, 1, 77, 8, True, True, 2, 1, 1),
    # head_dim 64 with 1-3 heads per group: softmax·v accumulates in registers (SoftmaxV64)
    "d64_gqa3": (4, 4, 9, 3, 150, 64, False, False, 8, 4, 8),
    "d64_gqa2_per_head_masks": (5, 3, 4, 2, 99, 64, True, False, 4, 1, 2),
    "d64_mha": (6, 2, 2, 2, 64, 64, True, False, 8, 0, 0),
}


def _check(name):
    seed, B, H, Hkv, L, d, per_head_mask, ties, S, sinks, window = CASES[name]
    feeds = _case(seed, B, H, Hkv, L, d, per_head_mask, ties)
    _close(_run(feeds, S, sinks, window), _ref(feeds, S, sinks, window))


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_selection_matches_reference(name):
    path = registered_ep()
    assert path
    _check(name)


LEVELS = ["baseline", "x86-64-v3", "x86-64-v4"]


@pytest.mark.parametrize("isa", LEVELS)
def test_decode_selection_each_isa(isa):
    """Every case again under SOLM_EP_ISA=isa, in a fresh process: it must pass and report that the decode family
    ran that variant (or the host's widest, for a cap above what this CPU runs)."""
    registered_ep()
    code = ("import sys; sys.path.insert(0, 'tests'); import test_quest_select as t; "
            "from solm_compile.runtime import ep; from require import registered_ep; registered_ep(); "
            "[t._check(n) for n in sorted(t.CASES)]; r = ep.isa_report(); "
            "print(r['selected'], r['decode_attention'])")
    env = {**os.environ, "SOLM_EP_ISA": isa}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    selected, ran = r.stdout.split()[-2:]
    assert ran == selected and LEVELS.index(selected) <= LEVELS.index(isa), (isa, selected, ran)
    host = os.environ.get("SOLM_EP_ISA") is None and ep.isa_report()["selected"]
    if host and LEVELS.index(host) >= LEVELS.index(isa):  # the host runs this cap: it must be the one that ran
        assert ran == isa, (isa, ran)
