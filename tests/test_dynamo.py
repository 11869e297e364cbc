"""``torch.compile(model, backend="solm")`` on a tiny random Llama: discovery, exactness, the policy, recompiles."""

import contextlib
import subprocess
import sys
import warnings

import pytest
import torch

from solm_compile.policy import checkpoint
from solm_compile.backend import dynamo, once
from solm_compile.backend import run as runners
from solm_compile.ops import fast_c
from solm_compile.ops import fast as fast_ops
from solm_compile.policy.actions import GRID27
from solm_compile.artifact.step import ArtifactStep, initial_policy_state
from solm_compile.policy.step import PolicyStep
from solm_compile.config import GateConfig
from solm_compile.errors import UserError
from solm_compile.frontend.gated import GatedLM
from solm_compile.frontend.models import hf_model_info
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy

PROMPT_LEN, NEW = 12, 16
HALF = {"attn_keep": 0.5, "mlp_keep": 0.5, "bits": 8}


def tiny_llama(seed=0):
    from conftest import tiny_models

    torch.manual_seed(seed)
    return tiny_models()["llama-gqa"]().eval()


def prompt(batch=1, seed=0):
    return torch.randint(1, 160, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, n=NEW, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              pad_token_id=0, **kw)


def solm_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("solm")]


def test_backend_is_found_by_name_without_importing_solm():
    code = ("import sys, torch\n"
            "assert 'solm' in torch._dynamo.list_backends(), torch._dynamo.list_backends()\n"
            "assert not [m for m in sys.modules if m.startswith('solm_compile')]\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "fn = lookup_backend('solm')\n"
            "print(fn.__module__, fn.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:] + "\n(is the package pip-installed? `pip install -e . --no-deps`)"
    assert r.stdout.split() == ["solm_compile.backend.dynamo", "solm_backend"]


@contextlib.contextmanager
def runner_calls():
    """Count the calls of the two callables the backend hands Dynamo (backend/run.py): ``_Dense`` runs the graph
    inductor compiled from Dynamo's graph unchanged (no solm op in it), ``_Gated`` the gated graph."""
    counts = {"dense": 0, "gated": 0}
    orig = {"dense": runners._Dense.__call__, "gated": runners._Gated.__call__}

    def counting(kind):
        def call(self, *args):
            counts[kind] += 1
            return orig[kind](self, *args)
        return call

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runners._Dense, "__call__", counting("dense"))
        mp.setattr(runners._Gated, "__call__", counting("gated"))
        yield counts


def kernel_stats():
    return {**fast_c.STATS, **fast_ops.STATS}


def pruned_work(before):
    """How many calls of the gathering ops did pruned work since ``before`` (their C kernels or torch versions)."""
    now = kernel_stats()
    return sum(now[k] - before[k] for k in ("attn_c_calls", "mlp_c_calls", "attn_gather_calls", "gather_calls"))


@pytest.fixture(scope="module")
def dense():
    """The tiny Llama compiled at the default (dense) budget, after one greedy generate."""
    torch._dynamo.reset()     # the tests compile the same LlamaForCausalLM.forward code: keep their caches apart
    model = tiny_llama()
    ids = prompt()
    ref = generate(model, ids)
    model.compile(backend="solm")
    before = kernel_stats()
    with runner_calls() as calls, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = generate(model, ids)
    yield {"model": model, "ids": ids, "ref": ref, "out": out, "calls": dict(calls), "pruned": pruned_work(before),
           "warnings": solm_warnings(record)}
    torch._dynamo.reset()


def test_dense_budget_runs_inductor_on_the_ungated_graph(dense):
    """At a dense budget the backend does not gate: every call runs inductor's graph of the original model
    (``_Dense``), which only keeps the controller's books; the output equals eager."""
    assert torch.equal(dense["out"], dense["ref"])
    assert dense["calls"] == {"dense": NEW, "gated": 0}                 # 1 prefill + NEW - 1 decode steps
    assert dense["pruned"] == 0
    ctl = dynamo.controller(dense["model"])
    assert not ctl.active and ctl.calls == {"prefill": 1, "step": NEW - 1}
    assert all(h["action"] is None and bool((h["controls"] == torch.tensor([1.0, 1.0, 16.0])).all())
               for h in ctl.history)
    assert not dense["warnings"]


def test_dense_budget_batch_rows_equal_single_runs(dense):
    """A batch of 3 (Dynamo recompiles with a dynamic batch) gives each row the tokens of that prompt alone."""
    model = dense["model"]
    ids3 = prompt(batch=3, seed=1)
    with runner_calls() as calls:
        out = generate(model, ids3, n=6)
    assert out.shape == (3, PROMPT_LEN + 6) and calls == {"dense": 6, "gated": 0}
    for i in range(3):
        assert torch.equal(out[i:i + 1], generate(model, ids3[i:i + 1], n=6)), i


@pytest.fixture(scope="module")
def half(tmp_path_factory):
    """A random policy for the tiny Llama shipped in a temporary policies/ directory, and the model compiled at a
    half budget (policy "shipped": found by identity) after one greedy generate."""
    torch._dynamo.reset()
    model = tiny_llama()
    grid = GRID27
    torch.manual_seed(1)
    policy = RecurrentActorCriticPolicy(64, grid.num_actions, PolicyConfig(d_model=32, max_steps=32)).eval()
    for p in policy.parameters():
        p.data.normal_(0, 0.3)
    ident = checkpoint.model_identity(hf_model_info(model, "tiny"))
    path = tmp_path_factory.mktemp("policies") / "tiny.pt"
    checkpoint.save(path, checkpoint.policy_payload(policy, grid, GateConfig(), ident, {"policy": policy.cfg.to_dict()}))
    ids = prompt()
    dense = generate(model, ids)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "POLICY_DIR", path.parent)   # where shipped policies are looked up
        model.compile(backend="solm", options={**HALF, "policy": "shipped"})
        stats = {**fast_c.STATS, **fast_ops.STATS}
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = generate(model, ids)
        used = {k: v - stats[k] for k, v in {**fast_c.STATS, **fast_ops.STATS}.items()}
    yield {"model": model, "path": path, "ids": ids, "dense": dense, "out": out, "warnings": solm_warnings(record),
           "kernel_calls": used}
    torch._dynamo.reset()


def artifact_step_actions(model, path, ids, tokens):
    """ArtifactStep (the artifact's step) teacher-forced over ``tokens``: its actions and next-token choices."""
    lm = GatedLM.from_hf(model)
    lp = checkpoint.load_policy(path, lm.info)
    step = ArtifactStep(lm.model.gm, PolicyStep.from_loaded(lp), lm._embedding, lm.gate.min_len)
    with torch.no_grad():
        _, hid, cache = lm.prefill(ids)
        state, past = initial_policy_state(step.step, ids.shape[0], hid[:, -1]), cache.tensors
        budget = torch.tensor([[HALF["attn_keep"], HALF["mlp_keep"], HALF["bits"] / 16]])
        actions, nxt = [], []
        for t in range(tokens.shape[1]):
            pos = torch.full((ids.shape[0], 1), ids.shape[1] + t)
            out = step(tokens[:, t:t + 1], pos, past, *state, budget)
            n = len(past)
            past, state = list(out[1:1 + n]), tuple(out[1 + n:1 + n + 7])
            actions.append(out[1 + n + 7])
            nxt.append(out[0][:, -1].argmax(-1))
    return actions, nxt


def test_half_budget_runs_the_shipped_policy_like_the_artifact(half):
    model, path, ids, dense, out = half["model"], half["path"], half["ids"], half["dense"], half["out"]
    assert not half["warnings"]
    ctl = dynamo.controller(model)
    assert ctl.loaded.path == path
    assert ctl.calls == {"prefill": 1, "step": NEW - 1}
    acts = torch.stack(ctl.actions)                       # [steps, B]
    assert acts.shape == (NEW - 1, 1)
    controls = torch.stack([h["controls"] for h in ctl.history])
    assert (controls < torch.tensor([1.0, 1.0, 16.0])).any(), "a half budget should prune somewhere"
    calls = half["kernel_calls"]
    if fast_c.library() is not None:     # SolmEP's C kernels, not the torch fallback, run the pruned steps
        assert calls["attn_c_calls"] + calls["mlp_c_calls"] > 0, calls
        assert calls["attn_gather_calls"] == calls["gather_calls"] == 0, calls
        if calls["attn_c_calls"]:        # the page min/max is carried from step to step (fast_c.PageStates)
            assert calls["attn_state_carried"] > 0, calls
    assert out.shape == dense.shape and out[0, :PROMPT_LEN].equal(ids[0])
    # the same actions and tokens as the artifact's step, teacher-forced over what was generated
    want_actions, want_next = artifact_step_actions(model, path, ids, out[:, PROMPT_LEN:-1])
    assert torch.equal(acts, torch.stack(want_actions))
    assert torch.equal(out[:, PROMPT_LEN + 1:], torch.stack(want_next, 1))
    # a new generate starts a new episode: the same prompt gives the same actions
    ctl.history.clear()
    again = generate(model, ids)
    assert torch.equal(again, out) and torch.equal(torch.stack(ctl.actions), acts)
    # sampling goes through the same path
    torch.manual_seed(0)
    sampled = generate(model, ids, do_sample=True, temperature=1.0)
    assert sampled.shape == out.shape and ctl.calls["step"] == 3 * (NEW - 1)


def test_sparse_budget_runs_the_gated_ops(half):
    """At a half budget every call runs the gated graph, the pruning ops do work, and each decode step's logits are
    those of the gated LM (reference ops) at the controls the controller chose, not the dense ones."""
    model, ids = half["model"], half["ids"]
    ctl = dynamo.controller(model)
    ctl.history.clear()
    before = kernel_stats()
    with runner_calls() as calls, torch.no_grad():
        res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    assert calls == {"dense": 0, "gated": NEW}
    assert pruned_work(before) > 0                       # diagnostic: the gathering ops ran with something pruned
    controls = [h["controls"] for h in ctl.history]      # [B, 3] per decode step
    assert len(controls) == NEW - 1
    lm = GatedLM.from_hf(model)
    toks = res.sequences[:, PROMPT_LEN:]
    dense_ctl = torch.tensor([[1.0, 1.0, 16.0]])
    with torch.no_grad():
        lg, _, cache = lm.prefill(ids)
        _, _, dcache = lm.prefill(ids)
        torch.testing.assert_close(res.logits[0], lg[:, -1], rtol=1e-4, atol=1e-4)
        gap = []
        for t, c in enumerate(controls):
            lg, _, cache = lm.step(toks[:, t:t + 1], cache, c[:, 0], c[:, 1], c[:, 2])
            dlg, _, dcache = lm.step(toks[:, t:t + 1], dcache, *dense_ctl.T)
            torch.testing.assert_close(res.logits[t + 1], lg[:, -1], rtol=1e-4, atol=1e-4)
            gap.append(float((res.logits[t + 1] - dlg[:, -1]).abs().max()))
    assert max(gap) > 1e-2, gap                          # the pruned steps really changed the logits


def test_recompile_with_a_new_batch_size(half):
    """A batch of 3 (Dynamo recompiles with a dynamic batch) gives each row the policy's actions (and tokens) of
    that prompt alone."""
    model = half["model"]
    ctl = dynamo.controller(model)
    calls = dict(ctl.calls)
    ids3 = prompt(batch=3, seed=1)
    ctl.history.clear()
    with runner_calls() as ran, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = generate(model, ids3, n=6)
    assert out.shape == (3, PROMPT_LEN + 6)
    assert not solm_warnings(record)
    assert ctl.state.prev.shape[0] == 3
    assert ctl.calls == {"prefill": calls["prefill"] + 1, "step": calls["step"] + 5}
    assert ran == {"dense": 0, "gated": 6}                # all through the gated graphs
    acts = torch.stack(ctl.actions)                       # [5 steps, 3 rows]
    assert acts.shape == (5, 3)
    for i in range(3):
        ctl.history.clear()
        row = generate(model, ids3[i:i + 1], n=6)
        assert torch.equal(torch.stack(ctl.actions)[:, 0], acts[:, i]), i
        assert torch.equal(row, out[i:i + 1]), i


class _Attention(torch.nn.Module):
    """Not a transformers model: an embedding, one attention, no past."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, 50)

    def forward(self, ids):
        x = self.emb(ids)
        q, k, v = self.qkv(x).view(*ids.shape, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(y.transpose(1, 2).reshape(*ids.shape, 16))


def test_graph_with_nothing_to_gate_runs_unchanged():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(2, 8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = torch.compile(mlp, backend="solm", options={"inductor": False})(x)
    assert torch.allclose(y, mlp(x)) and not solm_warnings(record)


def test_a_graph_that_cannot_be_lowered_falls_back_with_one_warning(monkeypatch):
    def broken(prep):
        raise RuntimeError("export says no")

    monkeypatch.setattr(dynamo, "_export", broken)
    monkeypatch.setattr(once, "_WARNED", set())
    m = _Attention().eval()
    fn = torch.compile(m, backend="solm")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for T in (3, 5, 7):                                 # recompiles (then a dynamic T): still one warning
            ids = torch.randint(0, 50, (2, T))
            assert torch.allclose(fn(ids), m(ids), atol=1e-6)
    assert len(solm_warnings(record)) == 1 and "export says no" in solm_warnings(record)[0]


def test_options_are_checked(half):
    model, path = half["model"], half["path"]
    with pytest.raises(UserError, match="unknown option"):
        dynamo.Options.parse({"attn_kep": 0.5})
    with pytest.raises(UserError, match="runtime"):
        dynamo.Options.parse({"runtime": "tensorrt"})
    with pytest.raises(UserError, match="attn-keep"):
        dynamo.Options.parse({"attn_keep": 2})
    with pytest.raises(UserError, match="no such file"):
        dynamo._controller_for(model, dynamo.Options.parse({"policy": str(path) + ".missing", **HALF}))
    other = tiny_llama(seed=5)
    with pytest.raises(UserError, match="trained for"):
        dynamo._controller_for(other, dynamo.Options.parse({"policy": str(path), **HALF}))
    ctl = dynamo._controller_for(model, dynamo.Options.parse({"policy": str(path), **HALF}))
    assert ctl.active and ctl.loaded.path == path
    # the gathering kernels: both on by default; fast_mlp=False alone gives the reference ops
    assert dynamo.Options.parse({}).fast_attention and dynamo.Options.parse({}).fast_mlp
    assert not dynamo.Options.parse({"fast_mlp": False}).fast_attention
    assert dynamo.Options.parse({"fast_mlp": False, "fast_attention": True}).fast_attention
