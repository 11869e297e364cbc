"""``torch.compile(model, backend="solm", options={"runtime": "onnxruntime"})`` on a tiny random Llama: the same
tokens, actions and logits as the torch runtime's reference ops, and a fallback to torch when export fails."""

import warnings
from collections import OrderedDict

import pytest
import torch

from solm_compile.policy import checkpoint
from solm_compile.backend import dynamo, once
from solm_compile.backend import ort as dynamo_ort
from solm_compile.policy.actions import GRID27
from solm_compile.config import GateConfig
from solm_compile.frontend.models import hf_model_info
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from test_dynamo import HALF, NEW, prompt, solm_warnings, tiny_llama

REFERENCE = {"fast_mlp": False, "inductor": False}      # the torch runtime with the reference ops, no inductor


def _generate(model, ids):
    with torch.no_grad():
        r = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return r.sequences, torch.stack(r.logits, 1)


def _run(options, model=None):
    """A (fresh) tiny Llama compiled with ``options``: (tokens, logits [B, NEW, V], controller, solm warnings)."""
    torch._dynamo.reset()
    model = tiny_llama() if model is None else model
    model.compile(backend="solm", options=options)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        tokens, logits = _generate(model, prompt())
    return tokens, logits, dynamo.controller(model), solm_warnings(record)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    grid = GRID27
    torch.manual_seed(1)
    policy = RecurrentActorCriticPolicy(64, grid.num_actions, PolicyConfig(d_model=32, max_steps=32)).eval()
    for p in policy.parameters():
        p.data.normal_(0, 0.3)
    ident = checkpoint.model_identity(hf_model_info(tiny_llama(), "tiny"))
    path = tmp_path_factory.mktemp("policies") / "tiny.pt"
    checkpoint.save(path, checkpoint.policy_payload(policy, grid, GateConfig(), ident, {"policy": policy.cfg.to_dict()}))
    options = {"policy": str(path), **HALF, **REFERENCE}
    tokens, logits, ctl, warned = _run(options)
    assert not warned
    yield {"options": options, "tokens": tokens, "logits": logits, "actions": torch.stack(ctl.actions)}
    torch._dynamo.reset()


def test_onnxruntime_generates_like_the_torch_runtime(reference, monkeypatch):
    monkeypatch.setattr(dynamo_ort, "_CACHE", OrderedDict())
    model = tiny_llama()
    tokens, logits, ctl, warned = _run({**reference["options"], "runtime": "onnxruntime"}, model)
    with_ep = dynamo_ort._use_portable()[0] is False
    assert not warned if with_ep else all("portable" in w for w in warned)
    graphs = list(dynamo_ort._CACHE.values())
    assert graphs and sum(g.runs for g in graphs) == ctl.calls["prefill"] + ctl.calls["step"] == NEW
    if with_ep:                                           # runtime/libsolm_ep.so is built in a checkout
        assert all(g.providers[0] == "SolmEP" and not g.portable for g in graphs)
    assert torch.equal(tokens, reference["tokens"])
    assert torch.equal(torch.stack(ctl.actions), reference["actions"])
    assert (torch.stack([h["controls"] for h in ctl.history]) < torch.tensor([1.0, 1.0, 16.0])).any()
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)
    # recompiling the same model (same graphs, same weights) reuses the exported models and their sessions
    monkeypatch.setattr(dynamo_ort, "export_graph", None)       # (an export would now fail, and warn)
    again, _, ctl, warned = _run({**reference["options"], "runtime": "onnxruntime"}, model)
    assert not warned and torch.equal(again, tokens)
    assert list(dynamo_ort._CACHE.values()) == graphs and sum(g.runs for g in graphs) == 2 * NEW


def test_a_failed_export_runs_the_torch_runtime_with_one_warning(reference, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("onnx export says no")

    monkeypatch.setattr(dynamo_ort, "export_graph", broken)
    monkeypatch.setattr(dynamo_ort, "_CACHE", OrderedDict())
    monkeypatch.setattr(once, "_WARNED", set())
    tokens, logits, ctl, warned = _run({**reference["options"], "runtime": "onnxruntime"})
    failed = [w for w in warned if "onnx export says no" in w]
    assert len(failed) == 1 and "torch runtime" in failed[0]
    assert len(warned) == 1 or all("portable" in w for w in warned if w not in failed)
    assert not dynamo_ort._CACHE
    assert torch.equal(tokens, reference["tokens"])
    assert torch.equal(torch.stack(ctl.actions), reference["actions"])
    assert torch.allclose(logits, reference["logits"], atol=1e-5, rtol=0)


def test_without_solm_ep_the_portable_form_runs_with_one_warning(reference, monkeypatch):
    monkeypatch.setattr(dynamo_ort, "_use_portable", lambda: (True, "SolmEP is not built (test)"))
    monkeypatch.setattr(dynamo_ort, "_CACHE", OrderedDict())
    monkeypatch.setattr(once, "_WARNED", set())
    tokens, logits, ctl, warned = _run({**reference["options"], "runtime": "onnxruntime"})
    assert len(warned) == 1 and "SolmEP is not built (test)" in warned[0] and "portable" in warned[0]
    graphs = list(dynamo_ort._CACHE.values())
    assert graphs and all(g.portable and "SolmEP" not in g.providers for g in graphs)
    assert sum(g.runs for g in graphs) == NEW
    assert torch.equal(tokens, reference["tokens"])
    assert torch.equal(torch.stack(ctl.actions), reference["actions"])
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)


def test_a_dense_budget_is_not_exported(monkeypatch):
    monkeypatch.setattr(dynamo_ort, "_CACHE", OrderedDict())
    torch._dynamo.reset()
    model = tiny_llama()
    ref = _generate(model, prompt())[0]
    tokens, _, ctl, warned = _run({"runtime": "onnxruntime", "inductor": False}, model)
    assert torch.equal(tokens, ref) and not warned
    assert not dynamo_ort._CACHE and ctl.calls == {"prefill": 1, "step": NEW - 1}   # dynamo_run._Dense's books
