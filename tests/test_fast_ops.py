"""The torch.compile path's work-skipping kernels (``fast_ops``) against the plain references."""

import itertools

import pytest
import torch

from solm_compile import fast_ops, ops, reference as ref


def gather_attn(q, k, v, kappa, S, sinks, window, mask=None):
    return fast_ops.quest_attention_gather(q, k, v, mask, torch.as_tensor(kappa, dtype=torch.float32), None, False,
                                           S, sinks, window)


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
def test_gather_attention_matches_reference(H, Hkv, L, ties, sinks, window, mask):
    torch.manual_seed(L * 7 + H + sinks + window)
    kappa = torch.tensor([1.0, 0.5, 0.3, 0.02, 0.0])        # dense, half, a third, a single page, none
    q, k, v, m = inputs(5, H, Hkv, L, 16, ties, mask)
    got = gather_attn(q, k, v, kappa, 8, sinks, window, m)
    want = ref.quest_attention_ref(q, k, v, m, kappa, None, 8, sinks, window)
    assert torch.allclose(got, want, atol=1e-5)
    masked = ops.quest_attention(q, k, v, m, kappa, None, False, 8, sinks, window)
    assert torch.allclose(got, masked, atol=1e-5)


@pytest.mark.parametrize("L", [400, 403])
def test_ties_at_the_threshold_keep_more_pages(L):
    torch.manual_seed(L)
    q, k, v, _ = inputs(1, 9, 3, L, 16, ties=True, mask=None, patterns=8)
    kappa = torch.tensor([0.2])
    pb = ref.page_budget(0.2, L, 8)
    kept = [int(ref.quest_keep_ref(q[0, h, 0], k[0, h // 3], 0.2, 8, 0, 0).sum()) for h in range(9)]
    assert max(kept) > pb * 8 and max(kept) < L               # ties kept beyond the budget, not everything
    before = fast_ops.STATS["attn_gather_calls"]
    got = gather_attn(q, k, v, kappa, 8, 0, 0)
    assert fast_ops.STATS["attn_gather_calls"] == before + 1   # (it gathered rather than masked)
    want = ref.quest_attention_ref(q, k, v, None, kappa, None, 8, 0, 0)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kappa", [0.5, 0.3, 0.1])
def test_smollm2_shapes_gather(kappa):
    """SmolLM2's attention (9 query heads over 3 KV heads, d 64, pages of 8, 4 sinks, window 8) takes the
    gathering path and equals the reference."""
    torch.manual_seed(int(kappa * 10))
    q, k, v, _ = inputs(1, 9, 3, 1027, 64, ties=False, mask=None)
    kap = torch.tensor([kappa])
    before = fast_ops.STATS["attn_gather_calls"]
    got = gather_attn(q, k, v, kap, 8, 4, 8)
    assert fast_ops.STATS["attn_gather_calls"] == before + 1
    assert torch.allclose(got, ref.quest_attention_ref(q, k, v, None, kap, None, 8, 4, 8), atol=1e-5)


def test_single_row_per_kappa_equals_the_batch():
    torch.manual_seed(3)
    q, k, v, _ = inputs(4, 9, 3, 300, 64, ties=False, mask=None)
    kappa = torch.tensor([0.3, 1.0, 0.5, 0.05])
    batch = gather_attn(q, k, v, kappa, 8, 4, 8)
    for b in range(4):
        row = gather_attn(q[b:b + 1], k[b:b + 1], v[b:b + 1], kappa[b:b + 1], 8, 4, 8)
        assert torch.allclose(batch[b:b + 1], row, atol=1e-6)


def test_prefill_dense_and_noncontiguous_inputs_take_the_reference_semantics():
    torch.manual_seed(4)
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    qp = torch.randn(1, 4, 5, 8)
    mask = torch.ones(5, 40, dtype=torch.bool).tril(35)
    dense = torch.nn.functional.scaled_dot_product_attention(qp, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.allclose(gather_attn(qp, k, v, [0.2], 8, 0, 0, mask), dense)
    q = torch.randn(1, 4, 1, 8)
    assert torch.allclose(gather_attn(q, k, v, [1.0], 8, 4, 8),
                          torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    kt = torch.randn(1, 40, 2, 8).transpose(1, 2)             # a strided cache view
    want = ref.quest_attention_ref(q, kt, v, None, torch.tensor([0.3]), None, 8, 0, 2)
    assert torch.allclose(gather_attn(q, kt, v, [0.3], 8, 0, 2), want, atol=1e-5)


@pytest.mark.parametrize("L", [5, 8, 9, 17])
def test_short_caches(L):
    torch.manual_seed(L)
    for (sinks, window), kappa in itertools.product([(0, 0), (4, 8), (1, 1)], [[0.0], [0.2], [0.6]]):
        q, k, v, _ = inputs(1, 4, 2, L, 8, ties=False, mask=None)
        want = ref.quest_attention_ref(q, k, v, None, torch.tensor(kappa), None, 4, sinks, window)
        assert torch.allclose(gather_attn(q, k, v, kappa, 4, sinks, window), want, atol=1e-5)


def test_use_gather_attention_rewrites_the_graph():
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
    assert torch.allclose(gm(q, k, v, kappa), ref.quest_attention_ref(q, k, v, None, kappa, None, 8, 4, 8),
                          atol=1e-5)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_high_coverage_masks_from_the_same_selection(mask):
    """When the union of a KV head's pages is nearly everything the op masks instead of gathering."""
    torch.manual_seed(6)
    q, k, v, m = inputs(2, 6, 2, 203, 16, ties=False, mask=mask)
    for kappa in ([0.8, 0.9], [0.0, 0.9]):
        kap = torch.tensor(kappa)
        want = ref.quest_attention_ref(q, k, v, m, kap, None, 8, 4, 8)
        assert torch.allclose(gather_attn(q, k, v, kap, 8, 4, 8, m), want, atol=1e-5)
