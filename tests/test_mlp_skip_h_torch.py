"""ρ on h in the torch gated graph (issue 17): ``solm.sparse_mlp(..., skip="h")`` and everything that runs it.

The references are written here, not taken from the code under test: a case small enough that the kept units are
worked out by hand (integer weights and relu, so every number is exact), and a plain Python loop over tokens and
units for random tiny MLPs. The torch op, ``ops/reference.py``, torch.compile's fast path
(``fast.sparse_mlp_gather``) and the portable ONNX decomposition on stock onnxruntime are each checked against
them; then the low-bit SparseMLPBlocks(skip="h") artifact against the torch gated graph at the same ρ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from solm_compile.errors import UserError
from solm_compile.ops import fast
from solm_compile.ops import reference as ref
from solm_compile.ops import torch_ops as ops

# ---------------------------------------------------------------------------------------------- by hand
# x = [1, 2, -1]; gate = W_g x = [1, 2, -1, 3] -> relu [1, 2, 0, 3]; up = W_u x = [3, -1, -5, 1];
# h = relu(gate)·up = [3, -2, 0, 3], |h| = [3, 2, 0, 3].
#   ρ 0.75 -> k = 3, the 3rd largest |h| is 2: units {0, 1, 3}.               (|gate| would keep all four)
#   ρ 0.25 -> k = 1, the largest |h| is 3, ties kept: units {0, 3}.           (|gate| would keep {3})
# ρ on x at 0.25 keeps channel 1 only (|x| = [1, 2, 1]): h = [0, -4, 0, 0], y = [-40, 0].
HX = torch.tensor([[[1.0, 2.0, -1.0]]])
HWG = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
HWU = torch.tensor([[3.0, 0, 0], [1, -1, 0], [0, 0, 5], [0, 0, -1]])
HWD = torch.tensor([[1.0, 10, 100, 1000], [2, 0, -1, 1]])          # [D_out 2, I 4]: y reads off the kept units
H = [3.0, -2.0, 0.0, 3.0]
KEPT = {0.75: {0, 1, 3}, 0.25: {0, 3}}


def _by_hand(rho: float) -> torch.Tensor:
    return torch.tensor([[[sum(H[j] * float(HWD[o, j]) for j in KEPT[rho]) for o in range(2)]]])


@pytest.mark.parametrize("rho", [0.75, 0.25])
def test_h_skip_keeps_the_units_worked_out_by_hand(rho):
    r, b = torch.tensor([rho]), torch.tensor([16.0])
    want = _by_hand(rho)                                   # ρ 0.25: [3+3000, 6+3] = [3003, 9]
    assert torch.equal(ops.sparse_mlp(HX, HWG, None, HWU, None, HWD, None, r, b, "relu", "h"), want)
    assert torch.equal(ref.sparse_mlp_ref(HX, HWG, None, HWU, None, HWD, None, r, b, "relu", "h"), want)
    assert torch.equal(fast.sparse_mlp_gather(HX, HWG, None, HWU, None, HWD, None, r, b, "relu", "h"), want)
    if rho == 0.25:          # x is still the default: the same call without skip ranks the input channels
        x_skip = ops.sparse_mlp(HX, HWG, None, HWU, None, HWD, None, r, b, "relu")
        assert torch.equal(x_skip, torch.tensor([[[-40.0, 0.0]]]))


# ---------------------------------------------------------------------------------------------- by loop
def _silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def loop_h_mlp(x, wg, bg, wu, bu, wd, bd, rho, act=_silu):
    """Per token, in float64: h_j = act(g_j)·u_j, keep every unit with |h_j| ≥ the k-th largest |h|
    (k = ⌈ρ·I⌉, at least 1; ρ ≥ 1 keeps all), y_o = Σ_kept h_j·W_down[o, j] + b_down[o]. No fake quantisation.
    ``rho``: the float32 values the op is given (0.15 in float32 is a hair above 0.15: ⌈0.15f·20⌉ = 4, not 3)."""
    rho = torch.as_tensor(rho, dtype=torch.float32).tolist()
    x, wg, wu, wd = (t.double().tolist() for t in (x, wg, wu, wd))
    bg, bu, bd = (None if t is None else t.double().tolist() for t in (bg, bu, bd))
    I, Do = len(wu), len(wd)
    out = []
    for b, rows in enumerate(x):
        out.append([])
        for xt in rows:
            h = []
            for j in range(I):
                g = sum(w * v for w, v in zip(wg[j], xt)) + (bg[j] if bg else 0.0)
                u = sum(w * v for w, v in zip(wu[j], xt)) + (bu[j] if bu else 0.0)
                h.append(act(g) * u)
            k = I if rho[b] >= 1 else min(max(math.ceil(rho[b] * I - 1e-9), 1), I)
            thr = sorted((abs(v) for v in h), reverse=True)[k - 1]
            kept = [j for j in range(I) if abs(h[j]) >= thr]
            out[-1].append([sum(h[j] * wd[o][j] for j in kept) + (bd[o] if bd else 0.0) for o in range(Do)])
    return torch.tensor(out, dtype=torch.float64)


def _random_mlp(seed: int, D=12, I=20, bias=True):
    g = torch.Generator().manual_seed(seed)
    p = lambda *s: torch.randn(*s, generator=g) / math.sqrt(s[-1])  # noqa: E731
    params = (p(I, D), torch.randn(I, generator=g) * 0.1 if bias else None, p(I, D),
              torch.randn(I, generator=g) * 0.1 if bias else None, p(D, I), torch.randn(D, generator=g) * 0.1 if bias
              else None)
    return torch.randn(3, 4, D, generator=g), params


RHOS = [1.0, 0.5, 0.15]


@pytest.mark.parametrize("seed,bias", [(0, True), (1, False)])
def test_torch_op_reference_and_fast_path_equal_the_loop(seed, bias):
    x, params = _random_mlp(seed, bias=bias)
    rho, bits = torch.tensor(RHOS), torch.full((3,), 16.0)
    want = loop_h_mlp(x, *params, RHOS).float()
    for name, fn in (("op", ops.sparse_mlp), ("ref", ref.sparse_mlp_ref), ("fast", fast.sparse_mlp_gather),
                     ("dispatched", torch.ops.solm.sparse_mlp)):
        got = fn(x, *params, rho, bits, "silu", "h")
        assert (got - want).abs().max() < 1e-5, name
    # a graph with the ops swapped to the fast path gives the same: one token (the gather's own range) and four
    one = x[:, :1]
    assert (fast.sparse_mlp_gather(one, *params, rho, bits, "silu", "h")
            - loop_h_mlp(one, *params, RHOS).float()).abs().max() < 1e-5


def test_h_skip_fake_quantises_like_x():
    """bits < 16 applies the same per-token fake quantisation to y (reference.fake_quant_ref on the loop's y)."""
    x, params = _random_mlp(2)
    rho, bits = torch.tensor([0.5, 0.5, 1.0]), torch.tensor([4.0, 16.0, 6.0])
    y = loop_h_mlp(x, *params, [0.5, 0.5, 1.0]).float()
    want = torch.stack([torch.stack([ref.fake_quant_ref(y[b, t], float(bits[b])) for t in range(4)])
                        for b in range(3)])
    assert (ops.sparse_mlp(x, *params, rho, bits, "silu", "h") - want).abs().max() < 1e-4


def test_a_bad_skip_is_refused():
    x, params = _random_mlp(3)
    with pytest.raises(ValueError, match="skip must be one of"):
        ops.sparse_mlp(x, *params, torch.ones(3), torch.full((3,), 16.0), "silu", "z")


def test_portable_onnx_h_on_stock_onnxruntime():
    from test_onnx_ops import B, T, export, run, session

    class MLPh(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.p = [torch.nn.Parameter(t) if t is not None else None for t in params]
            for i, t in enumerate(self.p):
                if t is not None:
                    self.register_parameter(f"w{i}", t)

        def forward(self, x, rho, bits):
            return torch.ops.solm.sparse_mlp(x, *self.p, rho, bits, "silu", "h")

    x, params = _random_mlp(4)
    rho, bits = torch.tensor(RHOS), torch.full((3,), 16.0)
    proto = export(MLPh(params), (x, rho, bits), ({0: B, 1: T}, {0: B}, {0: B}), portable=True)
    assert "TopK" in {n.op_type for n in proto.graph.node}
    sess = session(proto)
    for t in (1, 3):
        xt = torch.randn(3, t, 12)
        got = run(sess, xt, rho, bits)[0]
        assert (got - loop_h_mlp(xt, *params, RHOS).float()).abs().max() < 1e-5, t


# ---------------------------------------------------------------------------------------------- gate config
def test_gate_config_carries_h_into_the_graph_and_policies_refuse_the_other_skip(tmp_path):
    from test_loading import tiny_hf_llama

    from solm_compile.config import GateConfig
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy.checkpoint import LoadedPolicy, check_mlp_skip

    lm = GatedLM.from_hf(tiny_hf_llama(), GateConfig(mlp_skip="h"))
    calls = [n for n in lm.model.gm.graph.nodes if n.target is torch.ops.solm.sparse_mlp.default]
    assert calls and all(n.args[10] == "h" for n in calls)
    assert GateConfig.from_dict({"page_size": 8}).mlp_skip == "x"          # a checkpoint from before: x
    lp = LoadedPolicy(None, None, GateConfig(), {}, 0, tmp_path / "p.pt")
    with pytest.raises(UserError, match="--mlp-skip h: .*trained with ρ on x"):
        check_mlp_skip(lp, GateConfig(mlp_skip="h"))
    check_mlp_skip(lp, GateConfig())


def _step_inputs(sess, ids, past, past_len, rho):
    feeds = {"input_ids": ids, "position_ids": np.arange(past_len, past_len + ids.shape[1])[None]}
    for i in sess.get_inputs()[2:]:
        if i.name in past:
            feeds[i.name] = past[i.name]
        elif i.name == "past_length":
            feeds[i.name] = np.array([past_len], np.int64)
        else:
            fill = {"bits": 16.0, "attn_keep": 1.0, "mlp_keep": rho}.get(i.name, 0.0)
            shape = [1 if not isinstance(s, int) else s for s in i.shape]
            feeds[i.name] = np.full(shape, fill, np.float32)
    return feeds


def test_h_artifact_equals_the_torch_gated_graph_at_the_same_rho(tmp_path):
    """kind fixed, int4 weights, fp32 activations and KV, --mlp-skip h: a decode step at ρ 0.5 (past the warm-up)
    against GatedLM with the same GateConfig on the same int4 weights. gate/up are the same int4 blocks, so h and
    its kept set agree (fp32 rounding aside); down is re-quantised to 8-bit blocks of W_downᵀ, which is the only
    difference (not exact: a W_down value of the int4 blocks need not be a code of the transposed 8-bit blocks):
    within 0.2 % of the logits' scale, while ρ on x at the same budget is off by more than five times that."""
    import onnxruntime as ort
    from require import need_ep
    from test_quant import _tiny_dir

    from solm_compile.api import SolmConfig, compile
    from solm_compile.config import GateConfig
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.frontend.models import load
    from solm_compile.runtime import ep

    _, d = _tiny_dir(tmp_path)
    art = compile(str(d), SolmConfig(kind="fixed", weights="int4", gate=GateConfig(mlp_skip="h"), activations="fp32",
                                     kv="fp32"), tmp_path / "tiny.onnx")
    need_ep(ep.register(ort))
    sess = ort.InferenceSession(str(art), ep.session_options_with_ep(ort.SessionOptions(), ort=ort))
    ids = np.array([[5, 17, 99, 3, 250, 42, 7, 11, 64, 2]])
    P = ids.shape[1] - 1
    caps = {i.name: i for i in sess.get_inputs() if i.name.startswith("past_") and i.name != "past_length"}
    empty = {n: np.zeros([1 if not isinstance(s, int) and k == 0 else
                          ((2 if n.startswith("past_page_") else 16) if not isinstance(s, int) else s)
                          for k, s in enumerate(i.shape)], np.float32) for n, i in caps.items()}   # 16 rows: 2 pages
    outs = [o.name for o in sess.get_outputs()]
    pre = dict(zip(outs, sess.run(None, _step_inputs(sess, ids[:, :P], empty, 0, 1.0))))
    past = {n: pre[n.replace("past_", "present_")] for n in caps}
    got = sess.run(["logits"], _step_inputs(sess, ids[:, P:], past, P, 0.5))[0][0, -1]

    def torch_logits(skip):
        lm = GatedLM.from_loaded(load(str(d), weights="int4"), GateConfig(mlp_skip=skip))
        _, _, cache = lm.prefill(torch.tensor(ids[:, :P]))
        one = torch.ones(1)
        return lm.step(torch.tensor(ids[:, P:]), cache, one, one * 0.5, one * 16)[0][0, -1].numpy()

    want, x_skip = torch_logits("h"), torch_logits("x")
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 0.002 * scale           # measured: 9e-5 of a 0.38 scale
    assert np.abs(x_skip - want).max() > 5 * np.abs(got - want).max()


def test_bench_uniform_nll_is_hf_eager_at_rho_1_and_h_differs_below():
    """bench/hskip_torch.uniform_nll at ρ 1 is the teacher-forced NLL of HF eager on the same tokens (either skip:
    ρ 1 keeps every unit); at ρ 0.3 the two skips give different numbers."""
    from test_loading import tiny_hf_llama

    from solm_compile.bench.hskip_torch import uniform_nll
    from solm_compile.config import GateConfig
    from solm_compile.frontend.gated import GatedLM

    hf = tiny_hf_llama()
    blocks = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 11, 64, 2, 9, 30, 31, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,
                                                                               12, 13, 14]])
    with torch.no_grad():
        lp = torch.log_softmax(hf(blocks).logits.double(), -1)
    want = -lp[:, 9:-1].gather(2, blocks[:, 10:, None]).squeeze(2)                      # tokens 10..13 given 0..
    lms = {s: GatedLM.from_hf(tiny_hf_llama(), GateConfig(mlp_skip=s)) for s in ("x", "h")}
    for lm in lms.values():
        assert (uniform_nll(lm, blocks, 9, 1.0) - want).abs().max() < 1e-4
    assert (uniform_nll(lms["x"], blocks, 9, 0.3) - uniform_nll(lms["h"], blocks, 9, 0.3)).abs().max() > 1e-3
