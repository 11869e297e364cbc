"""SolmEP's multi-token (prefill) paths against plain PyTorch written here, independent of the kernels' structure.

QuestAttention with T > 1 is dense attention under the mask (kernels_attention_prefill.cc: query tiles x key blocks,
online softmax); SparseMLP over many tokens runs dense GEMMs over groups of 128 tokens (kernels_mlp.cc). The
attention must match softmax(q·kᵀ·scale + mask)·v for every mask form and shape edge (GQA, partial tiles and
blocks, rows with nothing allowed -> NaN); every MLP token must come out bit-identical to running it alone, and
every ISA variant (SOLM_EP_ISA caps the dispatch) must agree with the reference.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from solm_compile.runtime import ep
from solm_compile.runtime import ep_build

ort = pytest.importorskip("onnxruntime")

F, BOOL = TensorProto.FLOAT, TensorProto.BOOL
EP_DIR = Path(ep_build.__file__).resolve().parent / "ep"


@pytest.fixture(scope="module")
def lib():
    if ep._ort_version(ort) < ep.MIN_ORT:
        pytest.skip(f"SolmEP needs onnxruntime >= 1.24, found {ort.__version__}")
    try:
        path = ep_build.build_cached()
    except ep_build.BuildError as e:
        if os.environ.get("SOLM_REQUIRE_EP"):
            pytest.fail(str(e))
        pytest.skip(f"SolmEP cannot be built here: {e}")
    assert ep.register(ort, path=path)
    return path


def _session(inputs, op, attrs, outputs=("out",)):
    node = helper.make_node(op, [n if n else "" for n, _ in inputs], list(outputs), domain="ai.solm", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, t, None) for n, t in inputs if n],
                              [helper.make_tensor_value_info(o, F, None) for o in outputs])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("ai.solm", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so = ep.session_options_with_ep(so, ort=ort)
    sess = ort.InferenceSession(model.SerializeToString(), so)
    assert sess.get_providers()[0] == "SolmEP"
    return sess


# ---------------------------------------------------------------------------------------------- attention

def dense_attention(q, k, v, mask, causal, scale):
    """softmax(q·kᵀ·scale + mask)·v in float64, GQA by repeating K/V; zeros where a row allows nothing."""
    q, k, v = (torch.from_numpy(a).double() for a in (q, k, v))
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = q @ k.transpose(-1, -2) * scale                       # [B,H,T,L]
    T, L = s.shape[-2:]
    if mask is not None:
        m = torch.from_numpy(mask)
        s = s.masked_fill(~m, -math.inf) if m.dtype == torch.bool else s + m.double()
    if causal:
        s = s.masked_fill(~torch.ones(T, L, dtype=torch.bool).tril(), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(nan=0.0)               # a row of -inf: zeros, as the reference
    return (p @ v).float().numpy()


def prefill_case(rng, B, H, Hkv, T, L, d, kind):
    """q/k/v and a mask of `kind`: none | causal (is_causal) | bool | float | bool_heads (a mask per head)."""
    q = rng.standard_normal((B, H, T, d), dtype=np.float32)
    k = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
    v = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
    allowed = np.arange(L)[None, :] <= (L - T + np.arange(T))[:, None]     # causal over the last T positions
    allowed = np.broadcast_to(allowed, (B, 1, T, L)).copy()
    for b in range(B):
        allowed[b, :, :, :5 * b] = False        # left padding: row 1's first positions see nothing
    if kind == "bool":
        return q, k, v, allowed
    if kind == "float":
        add = (rng.standard_normal((B, 1, T, L)) * 0.5).astype(np.float32)
        return q, k, v, np.where(allowed, add, -np.inf).astype(np.float32)
    if kind == "bool_heads":
        return q, k, v, np.broadcast_to(allowed, (B, H, T, L)) & (rng.random((B, H, T, L)) > 0.2)
    return q, k, v, None


def check_attention(out, q, k, v, mask, causal, scale):
    want = dense_attention(q, k, v, mask, causal, scale)
    assert np.array_equal(np.isnan(out), np.isnan(want))
    fin = ~np.isnan(want)
    np.testing.assert_allclose(out[fin], want[fin], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["none", "causal", "bool", "float", "bool_heads"])
@pytest.mark.parametrize("B,H,Hkv,T,L,d", [(2, 6, 2, 70, 70, 16), (1, 9, 3, 130, 158, 64), (2, 4, 4, 9, 9, 40),
                                           (1, 5, 1, 33, 65, 8)])
def test_prefill_attention_matches_dense(lib, kind, B, H, Hkv, T, L, d):
    """GQA 6/2 and 9/3, MHA; T not a multiple of the query tile, L not a multiple of the 64-key block; past keys
    (L > T); d not a multiple of the vector width; masks broadcast over heads or per head."""
    rng = np.random.default_rng(T * 7 + L + d)
    causal = kind == "causal"
    if causal and L != T:
        pytest.skip("is_causal is top-left aligned: only meaningful with L == T here")
    q, k, v, mask = prefill_case(rng, B, H, Hkv, T, L, d, kind)
    mtype = None if mask is None else (BOOL if mask.dtype == bool else F)
    ins = [("q", F), ("k", F), ("v", F), ("mask", mtype) if mask is not None else (None, None), ("kappa", F)]
    sess = _session(ins, "QuestAttention", dict(page_size=8, sinks=4, window=8, scale=0.3, is_causal=int(causal)))
    feeds = {"q": q, "k": k, "v": v, "kappa": np.full(B, 0.25, np.float32)}  # kappa plays no part for T > 1
    if mask is not None:
        feeds["mask"] = np.ascontiguousarray(mask)
    out = sess.run(None, feeds)[0]
    check_attention(out, q, k, v, mask, causal, 0.3)
    if kind == "bool" and B > 1 and L == T:
        assert not np.isnan(out).any()  # row 1's padded positions allow nothing: zeros, as the reference
        assert (out[1, :, :1] == 0).all()


# ---------------------------------------------------------------------------------------------- MLP

def _mlp_session(w, act):
    names = ("x", "w_gate", "b_gate", "w_up", "b_up", "w_down", "b_down", "rho", "bits")
    return _session([(n, F) if (n in w or n in ("x", "rho", "bits")) else (None, None) for n in names],
                    "SparseMLP", dict(act=act), outputs=("y",))


def mlp_reference(x, w, rho, bits, act):
    """Plain torch, float64: top-k channels per token (ties kept), the MLP, symmetric per-token fake quantisation."""
    fn = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}[act]
    t = {n: torch.from_numpy(a).double() for n, a in w.items()}
    out = []
    for b in range(x.shape[0]):
        xb = torch.from_numpy(x[b]).double()
        D = xb.shape[-1]
        if rho[b] < 1:
            kk = min(max(math.ceil(float(rho[b]) * D - 1e-9), 1), D)
            thr = xb.abs().sort(-1, descending=True).values[:, kk - 1:kk]
            xb = torch.where(xb.abs() >= thr, xb, 0.0)
        up = xb @ t["w_up"].T + t.get("b_up", 0)
        h = fn(xb @ t["w_gate"].T + t.get("b_gate", 0)) * up if "w_gate" in t else fn(up)
        y = h @ t["w_down"].T + t.get("b_down", 0)
        if bits[b] < 16:
            qmax = 2 ** (int(round(float(bits[b]))) - 1) - 1
            s = y.abs().amax(-1, keepdim=True) / qmax
            y = torch.clamp(torch.round(y / s), -qmax, qmax) * s
        out.append(y.float().numpy())
    return np.stack(out)


@pytest.mark.parametrize("gated,act,rho,bits", [(True, "silu", (1.0, 1.0), (16, 16)),
                                                (True, "silu", (0.9, 0.5), (16, 6)),
                                                (False, "gelu", (1.0, 0.95), (8, 16))])
def test_prefill_mlp_tokens_equal_single_token_runs(lib, gated, act, rho, bits):
    """B=2 x T=300 tokens: groups of 128 tokens (the last partial, rows mixed in a group) go through the dense GEMM
    path when they keep >= 3/4 of their union of channels (rho 1, 0.9, 0.95), else per 8-token block (rho 0.5);
    some input channels are zero for every token and some hidden units are dead (zero activation), so the unions are
    proper subsets (gathered coefficients); D = 150 makes the last down-projection panel a partial column tile.
    Every token must equal the single-token run bit for bit, and the plain-torch reference to float tolerance."""
    rng = np.random.default_rng(int(rho[1] * 100) + gated)
    B, T, D, I = 2, 300, 150, 1000
    w = {"w_up": rng.standard_normal((I, D), dtype=np.float32) / math.sqrt(D),
         "w_down": rng.standard_normal((D, I), dtype=np.float32) / math.sqrt(I),
         "b_down": rng.standard_normal(D, dtype=np.float32) * 0.1}
    if gated:
        w["w_gate"] = rng.standard_normal((I, D), dtype=np.float32) / math.sqrt(D)
        w["b_up"] = rng.standard_normal(I, dtype=np.float32) * 0.1
    else:
        w["w_up"][::7] = 0.0                   # gelu(0) = 0: dead hidden units, exactly zero for every token
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    x[:, :, ::10] = 0.0                        # channels no token keeps
    r, bt = np.array(rho, np.float32), np.array(bits, np.float32)
    sess = _mlp_session(w, act)
    y = sess.run(None, {"x": x, "rho": r, "bits": bt, **w})[0]
    want = mlp_reference(x, w, r, bt, act)
    for b in range(B):
        if bt[b] >= 16:
            np.testing.assert_allclose(y[b], want[b], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want[b]).max())))
            continue
        step = np.abs(want[b]).max(-1, keepdims=True) / (2 ** (int(bt[b]) - 1) - 1)
        diff = np.abs(y[b] - want[b])
        assert (diff <= step * 1.001).all()            # a value on a rounding boundary may land one step away
        assert (diff <= step * 1e-3).mean() > 0.999    # every other value is the reference's
    for b in range(B):
        for t in range(T):
            yt = sess.run(None, {"x": x[b:b + 1, t:t + 1], "rho": r[b:b + 1], "bits": bt[b:b + 1], **w})[0]
            assert np.array_equal(yt[0, 0], y[b, t]), (b, t)


def test_ep_sources_are_listed_everywhere():
    """Every C++ file of runtime/ep is compiled by both builds (ep_build.py and CMakeLists.txt) and hashed."""
    cc = sorted(p.name for p in EP_DIR.glob("*.cc"))
    hh = sorted(p.name for p in EP_DIR.glob("*.h"))
    assert sorted(ep_build.SOURCES) == cc and sorted(ep_build.HEADERS) == hh
    cmake = (EP_DIR / "CMakeLists.txt").read_text()
    listed = re.search(r"add_library\(solm_ep SHARED([^)]*)\)", cmake).group(1).split()
    assert sorted(listed) == cc
