"""The .solm.onnx artifact on a tiny random Llama with a random policy: what ships must be what we tested."""

import json
import logging
import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
import torch

from solm_compile.policy import checkpoint
from solm_compile.cli import app as cli
from solm_compile.frontend import models
from solm_compile.policy.actions import GRID27
from solm_compile.artifact.write import write_artifact
from solm_compile.artifact.step import decode_torch
from solm_compile.frontend.gated import GatedLM
from solm_compile.policy.network import PolicyConfig, RecurrentActorCriticPolicy
from solm_compile.errors import UserError
from solm_compile.runtime import ep
from require import need_ep
from solm_compile.runtime.session import SolmSession

VOCAB = 160


def word_tokenizer():
    from tokenizers import Tokenizer, models as tm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tm.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("artifact")
    loaded = models._from_hf(tiny_llama, word_tokenizer(), name="tiny", source="<test>")
    lm = GatedLM.from_loaded(loaded)
    grid = GRID27
    torch.manual_seed(1)
    policy = RecurrentActorCriticPolicy(64, grid.num_actions, PolicyConfig(d_model=32, max_steps=32)).eval()
    for p in policy.parameters():
        p.data.normal_(0, 0.3)
    path = d / "policy.pt"
    checkpoint.save(path, checkpoint.policy_payload(policy, grid, lm.gate, checkpoint.model_identity(lm.info),
                                                    {"policy": policy.cfg.to_dict()}))
    lp = checkpoint.load_policy(path, lm.info)
    arts = {kind: write_artifact(lm, d / f"tiny.{kind}.onnx", kind, lp, tokenizer=loaded.tokenizer)
            for kind in ("portable", "dense")}
    return {"dir": d, "loaded": loaded, "lm": lm, "policy": lp, "arts": arts}


PROMPT = " ".join(f"w{i}" for i in (5, 17, 3, 99, 42, 7, 8, 120, 64, 33))


def test_dense_budget_equals_hf_generate(built):
    hf = built["loaded"].hf
    ids = built["loaded"].tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    want = hf.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    for kind in ("portable", "dense"):
        r = SolmSession(built["arts"][kind]).generate(PROMPT, 20, budget=(1.0, 1.0, 16), greedy=True)
        assert r.tokens == want, kind
    assert r.usage["attn_keep"] == 1.0


def test_half_budget_artifact_equals_torch_graph(built):
    s = SolmSession(built["arts"]["portable"])
    prompt = s.tokenizer.encode(PROMPT, add_special_tokens=False).ids
    budget = (0.5, 0.75, 8)
    got = [st for st in s.steps([prompt], budget, max_new_tokens=40)][1:]     # crosses 2 episode boundaries
    want = decode_torch(built["lm"], built["policy"], prompt, budget, 40)
    assert [int(g["token"][0]) for g in got] == [w[0] for w in want]
    assert [int(g["action"][0]) for g in got] == [w[1] for w in want]
    assert len({w[1] for w in want}) > 1, "a random policy should vary its actions"
    for g, w in zip(got, want):
        np.testing.assert_allclose(g["logits"][0], w[2], atol=1e-3)


def test_portable_needs_no_solm(built, tmp_path):
    script = f"""
import numpy as np, onnxruntime as ort, sys
s = ort.InferenceSession({str(built['arts']['portable'])!r})
feeds = {{}}
for i in s.get_inputs():
    shape = [d if isinstance(d, int) else 1 for d in i.shape]
    if i.name.startswith("past_"): shape[2] = 0
    dt = np.int64 if "int64" in i.type else np.float32
    feeds[i.name] = np.zeros(shape, dt) if i.name != "input_ids" else np.array([[1, 2, 3]], np.int64)
feeds["position_ids"] = np.array([[0, 1, 2]], np.int64)
feeds["budget"] = np.array([[0.5, 0.75, 0.5]], np.float32)
out = s.run(None, feeds)
assert out[0].shape == (1, 3, {VOCAB}) and "solm_compile" not in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert p.stdout.strip() == "ok", p.stderr[-2000:]


def test_metadata_and_checker(built):
    model = onnx.load(str(built["arts"]["portable"]))
    onnx.checker.check_model(model)
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["solm.kind"] == "portable" and meta["solm.action_grid"]["kappa_levels"] == [0.25, 0.5, 1.0]
    assert meta["solm.model"]["weights_hash"] == built["lm"].info.weights_hash
    assert meta["solm.budget_ranges"] == [[0.25, 1.0], [0.5, 1.0], [5, 16]]
    assert (built["dir"] / meta["solm.tokenizer"]).is_file()
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)


@pytest.mark.parametrize("kind", ["dense", "portable", "solm", "fixed"])
def test_compiling_twice_is_byte_identical(built, tmp_path, kind):
    policy = None if kind in ("dense", "fixed") else built["policy"]
    first = write_artifact(built["lm"], tmp_path / f"a.{kind}.onnx", kind, policy, tokenizer=built["loaded"].tokenizer)
    (tmp_path / "b").mkdir()
    again = write_artifact(built["lm"], tmp_path / "b" / f"a.{kind}.onnx", kind, policy,
                           tokenizer=built["loaded"].tokenizer)
    assert again.read_bytes() == first.read_bytes()


def test_threads_share_one_session(built):
    s = SolmSession(built["arts"]["portable"])
    results = [None] * 4

    def work(i):
        results[i] = s.generate(PROMPT, 12, budget=(0.5, 0.75, 8), greedy=True).tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(r == results[0] for r in results)


def test_run_cli_json(built, capsys):
    code = cli.main(["run", str(built["arts"]["portable"]), "--prompt", PROMPT, "--max-new-tokens", "6",
                     "--attn-keep", "0.5", "--mlp-keep", "0.75", "--bits", "8", "--greedy", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert len(r["tokens"]) == 6 and r["tok_s"] > 0 and set(r["usage"]) == {"attn_keep", "mlp_keep", "bits"}
    assert r["text"].split()[0].startswith("w")


def one_line_error(capsys, argv, *needles):
    code = cli.main(argv)
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_run_errors(built, capsys, tmp_path):
    art = built["arts"]["portable"]
    one_line_error(capsys, ["run", str(art), "--prompt", "w1", "--attn-keep", "0.1"], "--attn-keep", "range")
    one_line_error(capsys, ["run", str(art), "--prompt", "w1", "--bits", "17"], "--bits")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(art.read_bytes()[:5000])
    one_line_error(capsys, ["run", str(bad), "--prompt", "w1"], "bad.onnx")
    txt = tmp_path / "text.onnx"
    txt.write_text("hello")
    one_line_error(capsys, ["run", str(txt), "--prompt", "w1"], "text.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(art.read_bytes())
    one_line_error(capsys, ["run", str(lonely), "--prompt", "w1"], "tokenizer")


def test_solm_artifact_on_solm_ep_equals_portable(built, tmp_path):
    need_ep(ep.library_path() is not None)
    art = write_artifact(built["lm"], built["dir"] / "tiny.solm.onnx", "solm", built["policy"],
                         tokenizer=built["loaded"].tokenizer)
    s = SolmSession(art)
    assert s.sess.get_providers()[0] == "SolmEP"
    for budget in ((1.0, 1.0, 16), (0.5, 0.75, 8), (0.25, 0.5, 5)):
        a = s.generate(PROMPT, 20, budget=budget, greedy=True)
        b = SolmSession(built["arts"]["portable"]).generate(PROMPT, 20, budget=budget, greedy=True)
        assert a.tokens == b.tokens and a.actions == b.actions, budget


def _word_text(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{int(i)}" for i in rng.integers(1, VOCAB, n))


def test_eval_artifact_equals_torch_evaluator(built, capsys, tmp_path):
    """`solm eval ARTIFACT`: the artifact's policy perplexity and usage equal the torch evaluator's on the same
    blocks (same policy, same gated graph), and its dense number equals the dense method's."""
    from solm_compile.data import corpora as data
    from solm_compile.eval.evaluate import PPLEvaluator

    text = tmp_path / "words.txt"
    text.write_text(_word_text(3000, 3))
    ctx, T, n = 24, 16, 6      # T = the artifact's episode, so the policy's step-fraction feature is the same
    code = cli.main(["eval", str(built["arts"]["portable"]), "--data", str(text), "--attn-keep", "0.5",
                     "--mlp-keep", "0.75", "--bits", "8", "--ctx", str(ctx), "--T", str(T), "--blocks", str(n),
                     "--batch-rows", "4", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    blocks = data.token_blocks(built["loaded"].tokenizer, [text.read_text()], ctx + T + 1, n, seed=0)
    lp = built["policy"]
    ev = PPLEvaluator(built["lm"], lp.policy, lp.grid, blocks, ctx=ctx, T=T, methods=("dense", "policy"))
    want = ev.run((0.5, 0.75, 8 / 16))["methods"]
    assert r["blocks"] == n and r["tokens"] == n * T
    assert r["nll"] == pytest.approx(want["policy"]["nll"], abs=1e-4)
    assert r["dense"]["nll"] == pytest.approx(want["dense"]["nll"], abs=1e-4)
    assert r["nll"] != pytest.approx(r["dense"]["nll"], abs=1e-4)      # the budget really changed the work
    assert sum(r["actions"].values()) == n * T
    for k in ("attn_keep", "mlp_keep", "bits"):
        assert r["usage"][k] == pytest.approx(want["policy"]["usage"][k], abs=1e-6), k


def test_eval_artifact_errors(built, capsys, tmp_path):
    art = str(built["arts"]["portable"])
    one_line_error(capsys, ["eval", art, "--sweep", "--out", str(tmp_path / "x")], "--sweep", "artifact")
    one_line_error(capsys, ["eval", art, "--policy", "p.pt"], "--policy")
    one_line_error(capsys, ["eval", art, "--attn-keep", "0.5"], "--mlp-keep")
    one_line_error(capsys, ["eval", art, "--attn-keep", "0.5", "--mlp-keep", "0.5", "--bits", "40"], "--bits")
    one_line_error(capsys, ["eval", art, "--data", str(tmp_path / "missing.txt")], "--data")
    one_line_error(capsys, ["eval", str(built["arts"]["dense"]), "--attn-keep", "0.5", "--mlp-keep", "0.5",
                            "--bits", "8", "--data", __file__], "dense artifact")


def test_without_solm_ep(capsys, caplog, tmp_path, monkeypatch):
    """No SolmEP here: `solm compile` writes the portable artifact with one warning saying why and how to get the
    provider; --custom-ops still writes the ai.solm artifact, and running that one is a one-line error."""
    from test_evaluate import _tiny_model_dir

    from solm_compile.config import GateConfig

    model_dir = _tiny_model_dir(tmp_path)
    info = models.load(str(model_dir)).info
    grid = GRID27
    policy = RecurrentActorCriticPolicy(info.hidden_size, grid.num_actions, PolicyConfig(d_model=32, max_steps=32))
    checkpoint.save(tmp_path / "p.pt", checkpoint.policy_payload(policy.eval(), grid, GateConfig(),
                                                                 checkpoint.model_identity(info),
                                                                 {"policy": policy.cfg.to_dict()}))
    monkeypatch.setattr(ep, "_registered", None)
    monkeypatch.setattr(ep, "_warned", False)
    monkeypatch.setattr(ep, "library_path", lambda: None)
    out = tmp_path / "m.solm.onnx"
    capsys.readouterr()
    code = cli.main(["compile", str(model_dir), "--out", str(out), "--policy", str(tmp_path / "p.pt")])
    _, err = capsys.readouterr()
    assert code == 0, err
    said = err.strip().splitlines() + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "SolmEP is not built" in said[0] and "ep_build" in said[0] \
        and "portable" in said[0], said
    s = SolmSession(out)
    assert s.kind == "portable" and len(s.generate("abc", 3, budget=(0.5, 0.75, 8)).tokens) == 3
    custom = tmp_path / "c.solm.onnx"
    assert cli.main(["compile", str(model_dir), "--out", str(custom), "--policy", str(tmp_path / "p.pt"),
                     "--custom-ops"]) == 0
    capsys.readouterr()
    one_line_error(capsys, ["run", str(custom), "--prompt", "abc"], "c.solm.onnx", "SolmEP", "--portable")
    one_line_error(capsys, ["compile", str(model_dir), "--out", str(tmp_path / "k.onnx"), "--policy",
                            str(tmp_path / "p.pt"), "--dense", "--per-kv-head"], "--per-kv-head", "dense")
    assert not (tmp_path / "k.onnx").exists()
    assert cli.main(["compile", str(model_dir), "--out", str(custom), "--policy", str(tmp_path / "p.pt"),
                     "--custom-ops", "--per-kv-head"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(custom), load_external_data=False).metadata_props}
    assert meta["solm.select_per_kv_head"] in ("1", "true", "True"), meta
    nodes = [n for n in onnx.load(str(custom), load_external_data=False).graph.node if n.op_type == "QuestAttention"]
    assert nodes and all(any(a.name == "select_per_kv_head" and a.i == 1 for a in n.attribute) for n in nodes)


def test_an_artifact_from_before_the_policy_protocol_change_is_refused(built, tmp_path):
    old = onnx.load(str(built["arts"]["portable"]))
    for prop in old.metadata_props:
        if prop.key == "solm.version":
            prop.value = '"0.1.0"'
    path = tmp_path / "old.onnx"
    onnx.save(old, str(path))
    with pytest.raises(UserError, match="compile it again"):
        SolmSession(path, tokenizer=False)
