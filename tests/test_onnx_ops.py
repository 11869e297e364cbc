"""ONNX translations of the solm ops (``onnx_ops.py``): the portable flavour runs on stock onnxruntime and matches
``reference.py``; the custom flavour emits exactly one ``ai.solm`` node per op with the expected attributes."""

import math

import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from solm_compile.ops import to_onnx as onnx_ops
from solm_compile.ops import torch_ops as ops
from solm_compile.ops import reference as ref

ATOL = 1e-5
B, T, L, PAST = Dim("batch"), Dim("T"), Dim("L"), Dim("past")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the references are loops of tiny torch ops: with 2 OpenMP threads on a busy 2-core box they spin-wait
    # (~1.5 s per call instead of ~5 ms)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Gate(torch.nn.Module):
    def __init__(self, min_len):
        super().__init__()
        self.min_len = min_len

    def forward(self, ids, past_key, kappa, rho, bits):
        return torch.ops.solm.gate_controls(ids, past_key, kappa, rho, bits, self.min_len)


class Attn(torch.nn.Module):
    def __init__(self, page_size, sinks, window, scale=None):
        super().__init__()
        self.cfg = (page_size, sinks, window)
        self.scale = scale

    def forward(self, q, k, v, kappa, mask=None):
        return torch.ops.solm.quest_attention(q, k, v, mask, kappa, self.scale, False, *self.cfg)


class MLP(torch.nn.Module):
    def __init__(self, D, I, gated, bias, act):
        super().__init__()
        p = lambda *s: torch.nn.Parameter(torch.randn(*s) / math.sqrt(s[-1]))
        self.w_gate = p(I, D) if gated else None
        self.b_gate = torch.nn.Parameter(torch.randn(I)) if gated and bias else None
        self.w_up, self.w_down = p(I, D), p(D, I)
        self.b_up = torch.nn.Parameter(torch.randn(I)) if bias else None
        self.b_down = torch.nn.Parameter(torch.randn(D)) if bias else None
        self.act = act

    def forward(self, x, rho, bits):
        return torch.ops.solm.sparse_mlp(x, self.w_gate, self.b_gate, self.w_up, self.b_up, self.w_down,
                                         self.b_down, rho, bits, self.act)


def export(module, args, dynamic_shapes, portable, optimize=True):
    prog = torch.onnx.export(module.eval(), args, dynamo=True, optimize=optimize, dynamic_shapes=dynamic_shapes,
                             custom_translation_table=onnx_ops.translation_table(portable))
    model = prog.model_proto
    onnx.checker.check_model(model)
    return model


def session(model):
    assert {n.domain for n in model.graph.node} <= {""}, "portable model must use standard ONNX ops only"
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(sess, *inputs):
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in sess.run(None, feeds)]


# ---------------------------------------------------------------------------------------------- portable
def test_gate_controls_portable():
    kappa, rho, bits = torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.9]), torch.tensor([4.0, 8.0])
    model = export(Gate(7), (torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 2, 8, 4), kappa, rho, bits),
                   ({0: B, 1: T}, {0: B, 2: PAST}, {0: B}, {0: B}, {0: B}), portable=True)
    sess = session(model)
    for t, past in [(1, 7), (1, 6), (1, 100), (1, 0), (3, 5), (3, 4), (3, 100), (2, 6)]:
        for b in (2, 3):
            k, r, bb = torch.rand(b), torch.rand(b), torch.tensor([4.0, 8.0, 6.0][:b])
            got = run(sess, torch.zeros(b, t, dtype=torch.long), torch.zeros(b, 2, past, 4), k, r, bb)
            want = ref.gate_controls_ref(t, past + t, k, r, bb, 7)
            for g, w in zip(got, want):
                assert torch.equal(g, w), (t, past, b)


@pytest.mark.parametrize("sinks,window", [(4, 8), (0, 0)])
@pytest.mark.parametrize("mask_kind", [None, "bool"])
def test_quest_attention_portable(sinks, window, mask_kind):
    torch.manual_seed(10 + sinks)
    S, H, Hkv, d = 8, 6, 2, 16
    kappa = torch.tensor([1.0, 0.5, 0.2])
    mod = Attn(S, sinks, window)
    q, k, v = torch.randn(3, H, 1, d), torch.randn(3, Hkv, 37, d), torch.randn(3, Hkv, 37, d)
    args, dyn = (q, k, v, kappa), ({0: B, 2: T}, {0: B, 2: L}, {0: B, 2: L}, {0: B})
    if mask_kind:
        args, dyn = args + (torch.ones(3, 1, 1, 37, dtype=torch.bool),), dyn + ({0: B, 2: T, 3: L},)
    sess = session(export(mod, args, dyn, portable=True))
    for Ln in (37, 64):
        for t in (1, 5):
            q, k, v = torch.randn(3, H, t, d), torch.randn(3, Hkv, Ln, d), torch.randn(3, Hkv, Ln, d)
            mask = None
            if mask_kind:   # left padding on row 2, causal over the new tokens
                mask = torch.ones(3, 1, t, Ln, dtype=torch.bool).tril(Ln - t)
                mask[2, ..., :3] = False
            got = run(sess, q, k, v, kappa, *([mask] if mask_kind else []))[0]
            want = ref.quest_attention_ref(q, k, v, mask, kappa, None, S, sinks, window)
            assert (got - want).abs().max() <= ATOL, (Ln, t)
            dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            if t == 1:   # selection is really on for κ < 1 and off for κ = 1
                assert torch.allclose(got[0], dense[0], atol=ATOL) and not torch.allclose(got[2], dense[2])
            else:        # prefill is dense
                assert (got - dense).abs().max() <= ATOL


def test_quest_attention_portable_float_mask_and_scale():
    torch.manual_seed(3)
    S, H, Hkv, d, Ln = 4, 4, 4, 8, 23   # MHA, explicit scale, additive mask
    kappa = torch.tensor([0.3, 0.0, 0.6])   # κ = 0 keeps only the last token (no sinks / window)
    q, k, v = torch.randn(3, H, 1, d), torch.randn(3, Hkv, Ln, d), torch.randn(3, Hkv, Ln, d)
    mask = torch.zeros(3, 1, 1, Ln)
    mask[1, ..., 3:6] = float("-inf")
    mask[0] = torch.randn(Ln) * 0.5
    mod = Attn(S, 0, 0, scale=0.3)   # T static (= 1 here): the decode-graph path without the T ≠ 1 check
    sess = session(export(mod, (q, k, v, kappa, mask),
                          ({0: B}, {0: B, 2: L}, {0: B, 2: L}, {0: B}, {0: B, 3: L}), portable=True))
    got = run(sess, q, k, v, kappa, mask)[0]
    want = ref.quest_attention_ref(q, k, v, mask, kappa, 0.3, S, 0, 0)
    assert (got - want).abs().max() <= ATOL
    assert torch.allclose(got[1, :, 0], v[1, :, -1], atol=ATOL)


@pytest.mark.parametrize("gated,bias,act", [(True, False, "silu"), (True, True, "gelu"),
                                            (False, True, "gelu_tanh"), (False, False, "relu")])
def test_sparse_mlp_portable(gated, bias, act):
    torch.manual_seed(20 + 2 * gated + bias)
    D, I = 24, 40
    mod = MLP(D, I, gated, bias, act)
    rho, bits = torch.tensor([1.0, 0.5, 0.1]), torch.tensor([16.0, 8.0, 4.0])
    sess = session(export(mod, (torch.randn(3, 2, D), rho, bits), ({0: B, 1: T}, {0: B}, {0: B}),
                          portable=True))
    params = (mod.w_gate, mod.b_gate, mod.w_up, mod.b_up, mod.w_down, mod.b_down)
    for t in (1, 2, 5):
        x = torch.randn(3, t, D)
        x[2, 0] = 0.0   # y == 0 without biases: s == 0 must stay untouched (no NaN)
        got = run(sess, x, rho, bits)[0]
        with torch.no_grad():
            want = ref.sparse_mlp_ref(x, *params, rho, bits, act)
        assert not got.isnan().any()
        assert (got - want).abs().max() <= ATOL, t
    # another batch: dense controls on every row are exactly the MLP
    x, rho2, bits2 = torch.randn(2, 3, D), torch.tensor([0.25, 1.0]), torch.tensor([6.0, 16.0])
    with torch.no_grad():
        want = ref.sparse_mlp_ref(x, *params, rho2, bits2, act)
    assert (run(sess, x, rho2, bits2)[0] - want).abs().max() <= ATOL


# ---------------------------------------------------------------------------------------------- custom
class Layer(torch.nn.Module):
    """gate → attention → MLP, the way a rewritten decoder layer calls the ops."""

    def __init__(self, with_optionals):
        super().__init__()
        self.attn = Attn(16, 4, 8, scale=0.125 if with_optionals else None)
        self.mlp = MLP(16, 32, gated=with_optionals, bias=with_optionals, act="gelu_tanh")

    def forward(self, ids, q, k, v, kappa, rho, bits, mask=None):
        kappa, rho, bits = torch.ops.solm.gate_controls(ids, k, kappa, rho, bits, 13)
        a = self.attn(q, k, v, kappa, mask)                            # [B,H,T,d]
        x = a.transpose(1, 2).reshape(a.shape[0], a.shape[2], -1)       # [B,T,H*d]
        return self.mlp(x, rho, bits)


@pytest.mark.parametrize("with_optionals", [False, True])
def test_custom_flavour_one_node_per_op(with_optionals):
    Bn, Tn, Ln, H, Hkv, d = 2, 1, 20, 4, 2, 4
    args = (torch.zeros(Bn, Tn, dtype=torch.long), torch.randn(Bn, H, Tn, d), torch.randn(Bn, Hkv, Ln, d),
            torch.randn(Bn, Hkv, Ln, d), torch.full((Bn,), 0.5), torch.full((Bn,), 0.5), torch.full((Bn,), 8.0))
    dyn = ({0: B, 1: T}, {0: B, 2: T}, {0: B, 2: L}, {0: B, 2: L}, {0: B}, {0: B}, {0: B})
    if with_optionals:
        args, dyn = args + (torch.ones(Bn, 1, Tn, Ln, dtype=torch.bool),), dyn + ({0: B, 2: T, 3: L},)
    model = export(Layer(with_optionals), args, dyn, portable=False)
    assert {o.domain: o.version for o in model.opset_import}.get(onnx_ops.DOMAIN) == 1
    solm = [n for n in model.graph.node if n.domain == onnx_ops.DOMAIN]
    assert sorted(n.op_type for n in solm) == ["GateControls", "QuestAttention", "SparseMLP"]
    assert {n.op_type for n in solm} == {op.onnx_name for op in ops.OPS if not op.sig.from_pass}
    by = {n.op_type: n for n in solm}
    attrs = {t: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for t, n in by.items()}
    assert attrs["GateControls"] == {"min_len": 13}
    assert attrs["QuestAttention"]["page_size"] == 16 and attrs["QuestAttention"]["sinks"] == 4
    assert attrs["QuestAttention"]["window"] == 8
    assert attrs["QuestAttention"]["scale"] == pytest.approx(0.125 if with_optionals else 1 / math.sqrt(d))
    assert attrs["SparseMLP"] == {"act": b"gelu_tanh", "skip": b"x"}      # skip: the default, ρ on x
    graph_inputs = [i.name for i in model.graph.input]
    gate, quest, mlp = by["GateControls"], by["QuestAttention"], by["SparseMLP"]
    assert list(gate.input) == graph_inputs[:1] + [graph_inputs[2]] + graph_inputs[4:7]
    assert len(gate.output) == 3
    assert list(quest.input[:3]) == graph_inputs[1:4] and quest.input[4] == gate.output[0]
    assert (quest.input[3] == graph_inputs[7]) if with_optionals else (quest.input[3] == "")
    assert len(mlp.input) == 9 and list(mlp.input[7:]) == list(gate.output[1:])
    present = [bool(name) for name in mlp.input]
    assert present == ([True] * 9 if with_optionals else [True, False, False, True, False, True, False, True, True])


def test_rejects_is_causal_and_unknown_activation():
    # both checks run before any node is recorded, so the translation functions can be called directly
    for portable in (False, True):
        table = onnx_ops.translation_table(portable)
        with pytest.raises(NotImplementedError, match="is_causal"):
            table[torch.ops.solm.quest_attention.default](None, None, None, None, None, None, True, 4, 0, 0)
        with pytest.raises(ValueError, match="unknown activation"):
            table[torch.ops.solm.sparse_mlp.default](*[None] * 9, "tanh")


def test_translation_table_covers_every_op():
    for portable in (False, True):
        table = onnx_ops.translation_table(portable)
        assert set(table) == {getattr(torch.ops.solm, op.name).default for op in ops.OPS}
        assert table is not onnx_ops.translation_table(portable)   # a fresh dict each time
