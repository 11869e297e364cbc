"""Each solm op against its plain reference and against cases small enough to check by hand."""

import math
import os

import pytest
import torch

from solm_compile.ops import registry
from solm_compile.ops import torch_ops as ops
from solm_compile.ops import reference as ref
from solm_compile.runtime import ep, ep_build


def attn(q, k, v, kappa, S=4, sinks=0, window=0, mask=None):
    return ops.quest_attention(q, k, v, mask, torch.as_tensor(kappa, dtype=torch.float32), None, False, S, sinks,
                               window)


# ---------------------------------------------------------------------------------------------- page selection
def test_page_scores_pick_the_page_the_query_points_at():
    # d=1, S=2, L=6: pages {0,1} {2,3} {4,5}. q=+1 ⇒ score = max key in page.
    k = torch.tensor([0.0, 0.1, 5.0, 0.2, 0.3, 0.4]).view(6, 1)
    keep = ref.quest_keep_ref(torch.tensor([1.0]), k, kappa=2 / 6, S=2, sinks=0, window=0)
    assert keep.tolist() == [False, False, True, True, False, False]
    # q=-1 ⇒ score = -(min key): page 0 holds the smallest key
    keep = ref.quest_keep_ref(torch.tensor([-1.0]), k, kappa=2 / 6, S=2, sinks=0, window=0)
    assert keep.tolist() == [True, True, False, False, False, False]


def test_ties_keep_every_page_at_the_threshold():
    k = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]).view(6, 1)
    keep = ref.quest_keep_ref(torch.tensor([1.0]), k, kappa=1 / 6, S=2, sinks=0, window=0)
    assert keep.tolist() == [True, True, True, True, False, False]


def test_partial_last_page_and_budget_rounding():
    # L=7, S=4: pages {0..3} {4..6}; κ=0.5 ⇒ ⌈3.5⌉=4 tokens ⇒ 1 page. The partial page wins on its max.
    k = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]).view(7, 1)
    keep = ref.quest_keep_ref(torch.tensor([1.0]), k, kappa=0.5, S=4, sinks=0, window=0)
    assert keep.tolist() == [False] * 4 + [True] * 3
    assert ref.page_budget(0.5, 7, 4) == 1 and ref.page_budget(0.6, 7, 4) == 2 and ref.page_budget(0.05, 7, 4) == 1


def test_budget_covering_all_pages_is_dense():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attn(q, k, v, [0.9], S=4), dense)   # ⌈⌈8.1⌉/4⌉ = 3 pages = all
    assert torch.allclose(attn(q, k, v, [1.0], S=4), dense)


def test_sinks_and_window_are_forced():
    k = torch.tensor([-1.0] * 4 + [0.0] * 8 + [9.0] * 4).view(16, 1)   # q=+1 wants page 3, q=-1 page 0
    keep = ref.quest_keep_ref(torch.tensor([1.0]), k, kappa=0.25, S=4, sinks=2, window=3)
    assert keep.nonzero().flatten().tolist() == [0, 1, 12, 13, 14, 15]
    keep = ref.quest_keep_ref(torch.tensor([-1.0]), k, kappa=0.25, S=4, sinks=2, window=3)
    assert keep.nonzero().flatten().tolist() == [0, 1, 2, 3, 13, 14, 15]


def test_sol_mode_drops_a_lone_current_token():
    # SOL (no window): a 1-token last page scoring below the full pages is dropped; solm keeps it.
    k = torch.cat([torch.full((8, 1), 2.0), torch.tensor([[0.5]])])
    assert not ref.quest_keep_ref(torch.tensor([1.0]), k, 0.5, 4, 0, 0)[-1]
    assert ref.quest_keep_ref(torch.tensor([1.0]), k, 0.5, 4, 4, 8)[-1]


@pytest.mark.parametrize("sinks,window", [(0, 0), (4, 8)])
@pytest.mark.parametrize("L", [5, 37, 64])
def test_quest_attention_matches_reference_gqa(L, sinks, window):
    torch.manual_seed(L)
    q, k, v = torch.randn(3, 6, 1, 16), torch.randn(3, 2, L, 16), torch.randn(3, 2, L, 16)
    kappa = torch.tensor([1.0, 0.5, 0.2])
    got = attn(q, k, v, kappa, S=8, sinks=sinks, window=window)
    want = ref.quest_attention_ref(q, k, v, None, kappa, None, 8, sinks, window)
    assert torch.allclose(got, want, atol=1e-5)


def test_quest_attention_rows_are_independent_and_prefill_is_dense():
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 4, 1, 8), torch.randn(4, 2, 40, 8), torch.randn(4, 2, 40, 8)
    kappa = torch.tensor([0.2, 1.0, 0.5, 0.3])
    batch = attn(q, k, v, kappa, S=8)
    for b in range(4):
        assert torch.allclose(batch[b:b + 1], attn(q[b:b + 1], k[b:b + 1], v[b:b + 1], kappa[b:b + 1], S=8),
                              atol=1e-6)
    qp = torch.randn(1, 4, 5, 8)
    mask = torch.ones(5, 40, dtype=torch.bool).tril(35)
    dense = torch.nn.functional.scaled_dot_product_attention(qp, k[:1], v[:1], attn_mask=mask, enable_gqa=True)
    assert torch.allclose(attn(qp, k[:1], v[:1], [0.2], mask=mask), dense)


def test_attention_mask_is_respected_under_selection():
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8)
    mask = torch.ones(2, 1, 1, 24, dtype=torch.bool)
    mask[0, ..., :5] = False   # padding on row 0
    got = attn(q, k, v, [0.5, 0.5], S=4, sinks=2, window=2, mask=mask)
    want = ref.quest_attention_ref(q, k, v, mask, torch.tensor([0.5, 0.5]), None, 4, 2, 2)
    assert torch.allclose(got, want, atol=1e-5)


# ---------------------------------------------------------------------------------------------- MLP
def test_topk_channels_by_hand():
    x = torch.tensor([0.1, -3.0, 2.0, -0.5, 2.0])
    assert ref.topk_channels_ref(x, 0.4).tolist() == [0.0, -3.0, 2.0, 0.0, 2.0]   # k=2, tie at 2.0 keeps 3
    assert ref.topk_channels_ref(x, 0.01).tolist() == [0.0, -3.0, 0.0, 0.0, 0.0]  # at least one channel
    got = ops.topk_channels(x.view(1, 1, 5), torch.tensor([0.4]))
    assert got.flatten().tolist() == [0.0, -3.0, 2.0, 0.0, 2.0]


def test_fake_quant_identity_and_error_bound():
    torch.manual_seed(3)
    y = torch.randn(4, 3, 64) * 5
    assert torch.equal(ops.fake_quant(y, torch.full((4,), 16.0)), y)
    q8 = ops.fake_quant(y, torch.full((4,), 8.0))
    step = y.abs().amax(-1, keepdim=True) / 127
    assert ((q8 - y).abs() <= step / 2 + 1e-6).all()
    assert ((q8 / step).round() - q8 / step).abs().max() < 1e-3       # on the 8-bit grid
    q2 = ref.fake_quant_ref(torch.tensor([1.0, -0.2, 0.6]), 2)          # q_max = 1: {-1, 0, 1}·s, s = 1
    assert q2.tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (False, True, "gelu_tanh"), (True, False, "gelu_tanh")])
def test_sparse_mlp_matches_reference(gated, bias, act):
    torch.manual_seed(4)
    D, I = 24, 40
    x = torch.randn(4, 2, D)
    w = lambda *s: torch.randn(*s) / math.sqrt(s[-1])
    wg, wu, wd = (w(I, D) if gated else None), w(I, D), w(D, I)
    bg = torch.randn(I) if gated and bias else None
    bu, bd = (torch.randn(I), torch.randn(D)) if bias else (None, None)
    rho, bits = torch.tensor([1.0, 0.5, 0.1, 0.75]), torch.tensor([16.0, 8.0, 4.0, 6.0])
    got = ops.sparse_mlp(x, wg, bg, wu, bu, wd, bd, rho, bits, act)
    want = ref.sparse_mlp_ref(x, wg, bg, wu, bu, wd, bd, rho, bits, act)
    assert torch.allclose(got, want, atol=1e-5)
    dense = ops.sparse_mlp(x, wg, bg, wu, bu, wd, bd, torch.ones(4), torch.full((4,), 16.0), act)
    up = torch.nn.functional.linear(x, wu, bu)
    fn = ref.ACTIVATIONS[act]
    h = fn(torch.nn.functional.linear(x, wg, bg)) * up if gated else fn(up)
    assert torch.equal(dense, torch.nn.functional.linear(h, wd, bd))


# ---------------------------------------------------------------------------------------------- gate
@pytest.mark.parametrize("T,past,applies", [(1, 7, True), (1, 6, False), (4, 100, False), (1, 0, False)])
def test_gate_controls_ts_tw(T, past, applies):
    ids, pk = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, 1, past, 4)
    k, r, b = torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.9]), torch.tensor([4.0, 8.0])
    ke, re, be = ops.gate_controls(ids, pk, k, r, b, 7)      # min_len = ts + tw + 1 = 7
    if applies:
        assert torch.equal(ke, k) and torch.equal(re, r) and torch.equal(be, b)
    else:
        assert ke.tolist() == [1, 1] and re.tolist() == [1, 1] and be.tolist() == [16, 16]


# ---------------------------------------------------------------------------------------------- the list
def test_op_list_is_complete():
    registered = {name for name in dir(torch.ops.solm) if not name.startswith("_")} - {"name"}
    listed = {op.name for op in ops.OPS}
    assert [op.sig for op in ops.OPS] == list(registry.OPS)      # one torch op per registry entry, same order
    assert set(ops.ALTERNATE_IMPLS.values()) <= listed
    extra = registered - listed - set(ops.ALTERNATE_IMPLS) - {"_dir"}
    assert not extra, f"ops registered but not listed in ops.OPS: {extra}"
    for op in ops.OPS:
        assert getattr(torch.ops.solm, op.name).default is not None
        assert callable(op.reference) and op.reference.__module__ == "solm_compile.ops.reference"
        assert op.onnx_name[0].isupper()
    from solm_compile.ops import to_onnx as onnx_ops

    for portable in (False, True):
        table = onnx_ops.translation_table(portable)
        assert {getattr(torch.ops.solm, op.name).default for op in ops.OPS} <= set(table)


def _is_tensor(t) -> bool:
    """A torch schema type that is ``Tensor`` or ``Tensor?``."""
    return isinstance(t.getElementType() if isinstance(t, torch.OptionalType) else t, torch.TensorType)


@pytest.mark.parametrize("sig", registry.OPS, ids=lambda s: s.name)
def test_torch_schema_is_the_registry_entry(sig):
    """The torch op's tensor arguments are the entry's exported inputs (same names, order, optional = Tensor?), its
    other arguments the entry's torch attributes, and it returns one tensor per exported output."""
    schema = getattr(torch.ops.solm, sig.name).default._schema
    tensors = [(a.name, isinstance(a.type, torch.OptionalType)) for a in schema.arguments if _is_tensor(a.type)]
    scalars = [a.name for a in schema.arguments if not _is_tensor(a.type)]
    assert tensors == [(p.name, p.optional) for p in sig.export_inputs()]
    assert scalars == [a.name for a in sig.torch_attributes()]
    assert len(schema.returns) == len(sig.export_outputs()) and all(_is_tensor(r.type) for r in schema.returns)


def test_onnx_schemas_are_the_registry_entries():
    """The local ai.solm schemas the exporter records against are the export forms of the registry entries."""
    from solm_compile.ops import to_onnx as onnx_ops

    for sig, op in [(registry.GATE_CONTROLS, onnx_ops._GATE), (registry.QUEST_ATTENTION, onnx_ops._QUEST),
                    (registry.SPARSE_MLP, onnx_ops._SPARSE_MLP),
                    (registry.SPARSE_MLP_BLOCKS, onnx_ops._SPARSE_MLP_BLOCKS),
                    (registry.QUEST_ATTENTION_ROPE, onnx_ops._QUEST_ROPE)]:
        schema = op.op_schema
        assert (schema.name, schema.domain, schema.since_version) == (sig.onnx_name, registry.DOMAIN,
                                                                      registry.VERSION)
        assert [p.name for p in schema.inputs] == [p.name for p in sig.export_inputs()]
        assert [p.name for p in schema.outputs] == [p.name for p in sig.export_outputs()]
        assert sorted(schema.attributes) == sorted(a.name for a in sig.export_attributes())


def test_built_solm_ep_registers_exactly_the_registry():
    """What the built SolmEP registers (its own op table, reported by the library) is the registry's artifact form:
    the same op types, domain and version, input and output counts, optional positions and attribute names."""
    try:
        path = ep_build.build_cached()
    except ep_build.BuildError as e:
        if os.environ.get("SOLM_REQUIRE_EP"):
            pytest.fail(f"SOLM_REQUIRE_EP is set but SolmEP cannot be built: {e}")
        pytest.skip(f"SolmEP cannot be built here: {e}")
    got = {o["op_type"]: {**o, "attributes": sorted(o["attributes"])} for o in ep.registered_ops(path)}
    want = {sig.onnx_name: registry.ep_view(sig) for sig in registry.OPS}
    assert got == want
