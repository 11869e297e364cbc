"""The torch.compile path's work-skipping kernels (``fast_ops``) against the plain references.

Each check runs both implementations of the ops: SolmEP's C kernels (``fast_c``; the library is built into solm's
cache if needed, else those runs skip, or fail with SOLM_REQUIRE_EP=1) and the torch fallback.
"""

import contextlib
import itertools
import os

import pytest
import torch

from solm_compile.ops import fast_c
from solm_compile.ops import fast as fast_ops
from solm_compile.ops import torch_ops as ops
from solm_compile.ops import reference as ref
from solm_compile.runtime import ep
from require import need_ep
from solm_compile.runtime import ep_build


@pytest.fixture(scope="module")
def c_lib():
    """The C API library, or None if it cannot be had here."""
    path = ep.library_path()
    if path is None:
        try:
            path = ep_build.build_cached()
        except ep_build.BuildError:
            path = None
    lib = fast_c._load(path) if path is not None else None
    if lib is None and os.environ.get("SOLM_REQUIRE_EP"):
        pytest.fail("SolmEP's C API library is not available")
    return lib


@pytest.fixture(autouse=True)
def _restore_kernels():
    saved = dict(fast_c._state)
    yield
    fast_c._state.clear()
    fast_c._state.update(saved)


@contextlib.contextmanager
def kernels(impl, lib):
    """Run the ops with the C kernels ("c") or the torch fallback ("torch")."""
    saved = dict(fast_c._state)
    fast_c._state["lib"] = lib if impl == "c" else None
    try:
        yield
    finally:
        fast_c._state.clear()
        fast_c._state.update(saved)


def impls(lib):
    return ("torch", "c") if lib is not None else ("torch",)


def gather_attn(q, k, v, kappa, S, sinks, window, mask=None):
    return fast_ops.quest_attention_gather(q, k, v, mask, torch.as_tensor(kappa, dtype=torch.float32), None, False,
                                           S, sinks, window)


def each_impl(lib, fn):
    """fn() under every available implementation: {impl: result}; the C runs must really call the kernel."""
    out = {}
    for impl in impls(lib):
        before = dict(fast_c.STATS)
        with kernels(impl, lib):
            out[impl] = fn()
        used = any(fast_c.STATS[c] > before[c] for c in ("attn_c_calls", "mlp_c_calls"))
        assert used == (impl == "c"), impl
    return out


def dyadic(*shape):
    """Values in {-2, -1.5, …, 2}: every product and sum of a page score is exact in float, so equal pages tie
    exactly whatever the summation order."""
    return torch.randint(-4, 5, shape).float() / 2


def inputs(B, H, Hkv, L, d, ties, mask, S=8, patterns=3):
    if ties:   # every page one of a few dyadic patterns: page scores take few values, so thresholds tie
        P = -(-L // S)
        pat = dyadic(B, Hkv, patterns, S, d)
        q, k = dyadic(B, H, 1, d), pat[:, :, torch.randint(0, patterns, (P,))].reshape(B, Hkv, P * S, d)[:, :, :L]
        k = k.contiguous()
    else:
        q, k = torch.randn(B, H, 1, d), torch.randn(B, Hkv, L, d)
    v = torch.randn(B, Hkv, L, d)
    if mask == "bool":
        m = torch.rand(B, 1, 1, L) > 0.3
        m[..., :4] = m[..., -1:] = True     # (a head whose kept tokens are all masked is NaN in the reference)
    elif mask == "float":
        m = torch.randn(B, H, 1, L).masked_fill(torch.rand(B, H, 1, L) < 0.2, float("-inf"))
        m[..., :4] = m[..., -1:] = 0.0
    else:
        m = None
    return q, k, v, m


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("sinks,window", [(0, 0), (4, 8), (3, 0), (0, 5)])
@pytest.mark.parametrize("L,ties", [(37, False), (64, False), (203, False), (203, True), (96, True)])
@pytest.mark.parametrize("H,Hkv", [(6, 2), (4, 4)])
def test_gather_attention_matches_reference(H, Hkv, L, ties, sinks, window, mask, c_lib):
    torch.manual_seed(L * 7 + H + sinks + window)
    kappa = torch.tensor([1.0, 0.5, 0.3, 0.02, 0.0])        # dense, half, a third, a single page, none
    q, k, v, m = inputs(5, H, Hkv, L, 16, ties, mask)
    want = ref.quest_attention_ref(q, k, v, m, kappa, None, 8, sinks, window)
    masked = ops.quest_attention(q, k, v, m, kappa, None, False, 8, sinks, window)
    for impl, got in each_impl(c_lib, lambda: gather_attn(q, k, v, kappa, 8, sinks, window, m)).items():
        assert torch.allclose(got, want, atol=1e-5), impl
        assert torch.allclose(got, masked, atol=1e-5), impl


def ep_stats(lib):
    """SolmEP's work counters (SolmEpGetStats): attn_calls, attn_keys_scored, attn_keys_dense, …, mlp_calls, …"""
    import ctypes
    names = ("attn_calls", "attn_keys_scored", "attn_keys_dense", "attn_kv_rows_read", "mlp_calls", "mlp_in_rows",
             "mlp_in_rows_dense", "mlp_down_rows", "mlp_down_rows_dense", "attn_minmax_rows")
    buf = (ctypes.c_uint64 * len(names))()
    lib.SolmEpGetStats(buf, len(names))
    return dict(zip(names, buf))


def delta(after, before):
    return {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("L", [400, 403])
def test_ties_at_the_threshold_keep_more_pages(L, c_lib):
    torch.manual_seed(L)
    q, k, v, _ = inputs(1, 9, 3, L, 16, ties=True, mask=None, patterns=8)
    kappa = torch.tensor([0.2])
    pb = ref.page_budget(0.2, L, 8)
    kept = [int(ref.quest_keep_ref(q[0, h, 0], k[0, h // 3], 0.2, 8, 0, 0).sum()) for h in range(9)]
    assert max(kept) > pb * 8 and max(kept) < L               # ties kept beyond the budget, not everything
    want = ref.quest_attention_ref(q, k, v, None, kappa, None, 8, 0, 0)
    before = fast_ops.STATS["attn_gather_calls"]
    for impl, got in each_impl(c_lib, lambda: gather_attn(q, k, v, kappa, 8, 0, 0)).items():
        assert torch.allclose(got, want, atol=1e-5), impl
    assert fast_ops.STATS["attn_gather_calls"] == before + 1   # (the torch run gathered rather than masked)


@pytest.mark.parametrize("kappa", [0.5, 0.3, 0.1])
def test_smollm2_shapes_gather(kappa, c_lib):
    """SmolLM2's attention (9 query heads over 3 KV heads, d 64, pages of 8, 4 sinks, window 8) takes the
    gathering path (torch) / skips the unkept keys (C) and equals the reference."""
    torch.manual_seed(int(kappa * 10))
    q, k, v, _ = inputs(1, 9, 3, 1027, 64, ties=False, mask=None)
    kap = torch.tensor([kappa])
    want = ref.quest_attention_ref(q, k, v, None, kap, None, 8, 4, 8)
    before, ep0 = fast_ops.STATS["attn_gather_calls"], c_lib and ep_stats(c_lib)
    for impl, got in each_impl(c_lib, lambda: gather_attn(q, k, v, kap, 8, 4, 8)).items():
        assert torch.allclose(got, want, atol=1e-5), impl
    assert fast_ops.STATS["attn_gather_calls"] == before + 1
    if c_lib is not None:
        d = delta(ep_stats(c_lib), ep0)
        assert d["attn_calls"] == 1 and d["attn_keys_dense"] == 9 * 1027
        assert 0 < d["attn_keys_scored"] <= (kappa + 0.1) * d["attn_keys_dense"]   # budget + sinks/window/ties


def test_single_row_per_kappa_equals_the_batch(c_lib):
    torch.manual_seed(3)
    q, k, v, _ = inputs(4, 9, 3, 300, 64, ties=False, mask=None)
    kappa = torch.tensor([0.3, 1.0, 0.5, 0.05])
    for impl in impls(c_lib):
        with kernels(impl, c_lib):
            batch = gather_attn(q, k, v, kappa, 8, 4, 8)
            for b in range(4):
                row = gather_attn(q[b:b + 1], k[b:b + 1], v[b:b + 1], kappa[b:b + 1], 8, 4, 8)
                assert torch.allclose(batch[b:b + 1], row, atol=1e-6), impl


@pytest.mark.parametrize("impl", ["torch", "c"])
def test_prefill_dense_and_noncontiguous_inputs_take_the_reference_semantics(impl, c_lib):
    if impl == "c":
        need_ep(c_lib is not None, "no C API library")
    torch.manual_seed(4)
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    qp = torch.randn(1, 4, 5, 8)
    mask = torch.ones(5, 40, dtype=torch.bool).tril(35)
    dense = torch.nn.functional.scaled_dot_product_attention(qp, k, v, attn_mask=mask, enable_gqa=True)
    q = torch.randn(1, 4, 1, 8)
    kt = torch.randn(1, 40, 2, 8).transpose(1, 2)             # a strided cache view
    want = ref.quest_attention_ref(q, kt, v, None, torch.tensor([0.3]), None, 8, 0, 2)
    before = fast_c.STATS["attn_c_calls"]
    with kernels(impl, c_lib):
        assert torch.allclose(gather_attn(qp, k, v, [0.2], 8, 0, 0, mask), dense)
        assert torch.equal(gather_attn(q, k, v, [1.0], 8, 4, 8),
                           torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        assert torch.allclose(gather_attn(q, kt, v, [0.3], 8, 0, 2), want, atol=1e-5)
    assert fast_c.STATS["attn_c_calls"] == before            # prefill, all-dense and strided: torch's ops


@pytest.mark.parametrize("L", [5, 8, 9, 17])
def test_short_caches(L, c_lib):
    torch.manual_seed(L)
    for (sinks, window), kappa in itertools.product([(0, 0), (4, 8), (1, 1)], [[0.0], [0.2], [0.6]]):
        q, k, v, _ = inputs(1, 4, 2, L, 8, ties=False, mask=None)
        want = ref.quest_attention_ref(q, k, v, None, torch.tensor(kappa), None, 4, sinks, window)
        for impl, got in each_impl(c_lib, lambda: gather_attn(q, k, v, kappa, 4, sinks, window)).items():
            assert torch.allclose(got, want, atol=1e-5), impl


def test_use_gather_attention_rewrites_the_graph(c_lib):
    class M(torch.nn.Module):
        def forward(self, q, k, v, kappa):
            return torch.ops.solm.quest_attention.default(q, k, v, None, kappa, None, False, 8, 4, 8)

    gm = torch.fx.symbolic_trace(M())
    assert fast_ops.use_gather_attention(gm) == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.solm.quest_attention_gather.default]
    torch.manual_seed(5)
    q, k, v, _ = inputs(1, 6, 2, 120, 16, ties=False, mask=None)
    kappa = torch.tensor([0.4])
    want = ref.quest_attention_ref(q, k, v, None, kappa, None, 8, 4, 8)
    for impl, got in each_impl(c_lib, lambda: gm(q, k, v, kappa)).items():
        assert torch.allclose(got, want, atol=1e-5), impl


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_high_coverage_masks_from_the_same_selection(mask, c_lib):
    """When the union of a KV head's pages is nearly everything the op masks instead of gathering."""
    torch.manual_seed(6)
    q, k, v, m = inputs(2, 6, 2, 203, 16, ties=False, mask=mask)
    for kappa in ([0.8, 0.9], [0.0, 0.9]):
        kap = torch.tensor(kappa)
        want = ref.quest_attention_ref(q, k, v, m, kap, None, 8, 4, 8)
        for impl, got in each_impl(c_lib, lambda: gather_attn(q, k, v, kap, 8, 4, 8, m)).items():
            assert torch.allclose(got, want, atol=1e-5), impl


# ---------------------------------------------------------------------------------------------- sparse_mlp_gather
def mlp_weights(D, I, Dout, gated, biases):
    w = lambda *s: torch.randn(*s) / s[-1] ** 0.5  # noqa: E731
    b = lambda n: torch.randn(n) * 0.1 if biases else None  # noqa: E731
    return (w(I, D) if gated else None, b(I) if gated else None, w(I, D), b(I), w(Dout, I), b(Dout))


def gather_mlp(x, ws, rho, bits, act):
    return fast_ops.sparse_mlp_gather(x, *ws, torch.tensor(rho), torch.tensor(bits), act)


NOISE = 1e-5      # float noise of the MLP's output (summation order): measured ≤ 1.4e-6 on these shapes


def check_quantized(got, pre, want, bits):
    """``got`` has the reference's quantisation level s·round(pre/s) in every element but those whose pre/s sits
    within float noise of a rounding boundary k + ½ (distance < 2·NOISE in output units: the output's own noise
    plus the scale's, |pre/s|·δs ≤ NOISE), which may take either neighbour; values to 3·NOISE ≪ one step s."""
    bits = torch.tensor(bits).view(-1, 1, 1)
    quant = (bits < 16).expand_as(pre)                                                          # [B,T,Dout]
    s = torch.where(quant[..., :1], pre.abs().amax(-1, keepdim=True) / (2.0 ** (bits.round() - 1) - 1), 1.0)  # step
    z = pre / s
    near = quant & (((z.abs() - z.abs().floor()) - 0.5).abs() * s < 2 * NOISE)
    assert 3 * NOISE < 0.01 * float(s[quant[..., :1]].min()) and int(near.sum()) <= 0.02 * int(quant.sum()) + 1
    err, far = (got - want).abs(), ~near
    assert bool((err[far] <= 3 * NOISE).all()), float(err[far].max())
    levels = torch.round(got / s) - torch.round(want / s)
    assert not levels[quant & far].any() and bool((levels[near].abs() <= 1).all())


@pytest.mark.parametrize("gated,act,biases", [(True, "silu", False), (False, "gelu_tanh", True),
                                              (True, "gelu", True), (False, "relu", False)])
@pytest.mark.parametrize("T", [1, 3])
def test_gather_mlp_matches_reference(gated, act, biases, T, c_lib):
    torch.manual_seed(T * 10 + len(act))
    ws = mlp_weights(48, 300, 40, gated, biases)              # I not a multiple of the kernels' 256-column panels
    x = torch.randn(4, T, 48)
    rho, bits = [1.0, 0.5, 0.1, 0.75], [16.0, 8.0, 5.0, 16.0]
    pre = ref.sparse_mlp_ref(x, *ws, torch.tensor(rho), torch.full((4,), 16.0), act)
    # before quantisation: float tolerance
    for impl, got in each_impl(c_lib, lambda: gather_mlp(x, ws, rho, [16.0] * 4, act)).items():
        assert torch.allclose(got, pre, rtol=0, atol=NOISE), impl
    # after: the reference's quantisation levels exactly, but within float noise of a rounding boundary
    want = ref.sparse_mlp_ref(x, *ws, torch.tensor(rho), torch.tensor(bits), act)
    for impl, got in each_impl(c_lib, lambda: gather_mlp(x, ws, rho, bits, act)).items():
        check_quantized(got, pre, want, bits)


def test_gather_mlp_skips_input_channels(c_lib):
    need_ep(c_lib is not None, "no C API library")
    torch.manual_seed(7)
    ws = mlp_weights(576, 1536, 576, True, False)             # SmolLM2's MLP
    x = torch.randn(1, 1, 576)
    ep0 = ep_stats(c_lib)
    got = each_impl(c_lib, lambda: gather_mlp(x, ws, [0.5], [16.0], "silu"))["c"]
    d = delta(ep_stats(c_lib), ep0)
    assert d["mlp_calls"] == 1 and d["mlp_in_rows"] == 288 and d["mlp_in_rows_dense"] == 576
    assert torch.allclose(got, ref.sparse_mlp_ref(x, *ws, torch.tensor([0.5]), torch.tensor([16.0]), "silu"),
                          atol=1e-4)


def test_mlp_handles_are_cached_refreshed_and_freed(c_lib):
    need_ep(c_lib is not None, "no C API library")
    torch.manual_seed(8)
    ws = mlp_weights(32, 64, 32, True, True)
    x, rho, bits = torch.randn(2, 1, 32), [0.5, 0.25], [16.0, 16.0]
    with kernels("c", c_lib):
        n0, live0 = fast_c.STATS["mlp_handles"], len(fast_c._HANDLES)
        gather_mlp(x, ws, rho, bits, "silu")
        gather_mlp(x, ws, rho, bits, "silu")
        assert fast_c.STATS["mlp_handles"] == n0 + 1             # one re-layout per weight set
        ws[2].mul_(2)                                            # modified in place: a fresh copy, the stale one freed
        got = gather_mlp(x, ws, rho, bits, "silu")
        assert fast_c.STATS["mlp_handles"] == n0 + 2 and len(fast_c._HANDLES) == live0 + 1
        want = ref.sparse_mlp_ref(x, *ws, torch.tensor(rho), torch.tensor(bits), "silu")
        assert torch.allclose(got, want, atol=1e-5)
        del ws
        assert len(fast_c._HANDLES) == live0                     # freed with the weights


def test_default_loader_uses_the_library_when_it_exists(c_lib):
    """If ``ep.library_path()`` finds a library, the ops must really run SolmEP's kernels (its work counters)."""
    need_ep(ep.library_path() is not None, "no library where ep.library_path() looks")
    fast_c.reset()
    lib = fast_c.library()
    assert lib is not None, "libsolm_ep.so exists but fast_c did not load its C API"
    torch.manual_seed(9)
    q, k, v, _ = inputs(1, 9, 3, 300, 64, ties=False, mask=None)
    ws = mlp_weights(64, 128, 64, True, False)
    ep0 = ep_stats(lib)
    gather_attn(q, k, v, [0.3], 8, 4, 8)
    gather_mlp(torch.randn(1, 1, 64), ws, [0.5], [8.0], "silu")
    d = delta(ep_stats(lib), ep0)
    assert d["attn_calls"] == 1 and d["mlp_calls"] == 1


def test_without_the_library_the_torch_ops_run(monkeypatch, caplog):
    monkeypatch.setattr(ep, "library_path", lambda: None)
    fast_c.reset()
    torch.manual_seed(10)
    q, k, v, _ = inputs(1, 9, 3, 300, 64, ties=False, mask=None)
    ws = mlp_weights(64, 128, 64, True, False)
    x, kap = torch.randn(1, 1, 64), torch.tensor([0.3])
    before = dict(fast_ops.STATS)
    with caplog.at_level("DEBUG", logger="solm_compile.ops.fast_c"):
        for _ in range(3):
            attn = gather_attn(q, k, v, kap, 8, 4, 8)
            mlp = gather_mlp(x, ws, [0.5], [16.0], "silu")
    assert fast_c.library() is None
    assert len([r for r in caplog.records if r.name == "solm_compile.ops.fast_c"]) == 1   # one debug line, no more
    assert fast_ops.STATS["attn_gather_calls"] == before["attn_gather_calls"] + 3
    assert fast_ops.STATS["gather_calls"] == before["gather_calls"] + 3
    assert torch.allclose(attn, ref.quest_attention_ref(q, k, v, None, kap, None, 8, 4, 8), atol=1e-5)
    assert torch.allclose(mlp, ref.sparse_mlp_ref(x, *ws, torch.tensor([0.5]), torch.tensor([16.0]), "silu"),
                          atol=1e-5)


def test_page_state_carried_across_decode_steps(c_lib):
    """Inside a gated call (``fast_c.carrying``) the page min/max is carried: each step folds only its new key,
    the output equals the reference at every step (across page boundaries, GQA, mixed κ per row), and the state
    is really what selection reads (a corrupted state changes the pages chosen)."""
    need_ep(c_lib is not None, "SolmEP's C API library is not built here")
    torch.manual_seed(3)
    B, H, Hkv, d, S = 3, 6, 2, 16, 8
    kappa = torch.tensor([0.5, 0.25, 1.0])
    k_all, v_all = torch.randn(B, Hkv, 60, d), torch.randn(B, Hkv, 60, d)     # [B,Hkv,60,d]
    states = fast_c.PageStates()
    with kernels("c", c_lib):
        for L in range(30, 60):                                  # 30 steps: pages 4 → 8 start on the way
            q = torch.randn(B, H, 1, d)
            k, v = k_all[:, :, :L].contiguous(), v_all[:, :, :L].contiguous()
            dense = L in (33, 40, 41, 47)                        # all-dense steps (SDPA) fold the key in torch
            kap = torch.ones(B) if dense else kappa
            before, rows0 = dict(fast_c.STATS), ep_stats(c_lib)["attn_minmax_rows"]
            with fast_c.carrying(states, "graph"):
                got = gather_attn(q, k, v, kap, S, 0, 0)
            want = ref.quest_attention_ref(q, k, v, None, kap, None, S, 0, 0)
            assert torch.allclose(got, want, atol=1e-5), L
            carried = fast_c.STATS["attn_state_carried"] - before["attn_state_carried"]
            folded = ep_stats(c_lib)["attn_minmax_rows"] - rows0
            expect = (0, 0) if dense else (0, B * Hkv * L) if L == 30 else (1, B * Hkv)
            assert (carried, folded) == expect, L
            pages = k.view(B, Hkv, -1, S, d) if L % S == 0 else None
            if pages is not None:                                # the carried state is K's exact page min/max
                slot = states.slots[("graph", 0)]
                assert torch.equal(slot["min"], pages.amin(3)) and torch.equal(slot["max"], pages.amax(3)), L
        # a foreign cache of the next length (its key at L-2 differs): every page is recomputed, still exact
        k2, v2 = torch.randn(B, Hkv, 60, d), torch.randn(B, Hkv, 60, d)
        before = fast_c.STATS["attn_state_carried"]
        with fast_c.carrying(states, "graph"):
            got = gather_attn(q, k2, v2, kappa, S, 0, 0)
        assert fast_c.STATS["attn_state_carried"] == before
        assert torch.allclose(got, ref.quest_attention_ref(q, k2, v2, None, kappa, None, S, 0, 0), atol=1e-5)
        # the carried state is what selection reads: swap in the state of other keys and the output moves
        L = 60
        k, v = k2[:, :, :L].clone(), v2[:, :, :L].clone()
        k[:, :, -1] = torch.randn(B, Hkv, d)                     # another sequence whose slot check passes:
        k = torch.cat([k, torch.randn(B, Hkv, 1, d)], 2)
        v = torch.cat([v, torch.randn(B, Hkv, 1, d)], 2)
        q = torch.randn(B, H, 1, d)
        slot = states.slots[("graph", 0)]
        slot["last"] = k[:, :, L - 2 + 1].clone()                # (the key at L-1 of the new length L+1)
        slot["min"].fill_(-1e3)                                  # every page looks equally large
        slot["max"].fill_(1e3)
        with fast_c.carrying(states, "graph"):
            bad = gather_attn(q, k, v, kappa, S, 0, 0)
        want = ref.quest_attention_ref(q, k, v, None, kappa, None, S, 0, 0)
        assert not torch.allclose(bad[:2], want[:2], atol=1e-3)  # the sparse rows chose other pages
        assert torch.allclose(bad[2], want[2], atol=1e-5)        # the dense row does not select
    states.reset()
    assert not states.slots
