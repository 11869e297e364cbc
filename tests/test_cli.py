"""User mistakes: one line on stderr naming the file or flag, exit code 2, no traceback."""

import json
import os
import subprocess
import sys

import torch

from solm_compile.cli import app as cli
from test_passes import export_no_blocks


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nope.pt2"))
    assert_one_line_error(code, err, "nope.pt2", "no such file")


def test_truncated_file(capsys, tmp_path):
    path = export_no_blocks(tmp_path / "m.pt2")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(capsys, "verify", str(path))
    assert_one_line_error(code, err, "m.pt2", "truncated or corrupt")


def test_text_file_named_pt(capsys, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert_one_line_error(code, err, "notes.pt", "not a PyTorch file")


def test_pickle_needs_consent(capsys, tmp_path, tiny_llama):
    path = tmp_path / "whole.pt"
    torch.save(tiny_llama, path)
    code, _, err = run_cli(capsys, "inspect", str(path))
    assert_one_line_error(code, err, "whole.pt", "--trust-pickle", "arbitrary code")
    code, out, err = run_cli(capsys, "inspect", str(path), "--trust-pickle", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["gated_attention"] == 2 and report["gated_mlp"] == 2
    assert {"architecture", "num_layers", "gated_attention", "gated_mlp"} <= set(report)


def test_unsupported_architecture(capsys, tmp_path):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "vit"))
    assert_one_line_error(code, err, "vit", "unsupported architecture")


def test_bad_flag_value(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", "smollm2", "--attn-select", "greedy")
    assert_one_line_error(code, err, "--attn-select", "greedy")
    code, _, err = run_cli(capsys, "inspect", "smollm2", "--page-size", "0")
    assert_one_line_error(code, err, "--page-size")


def test_console_script_exit_code(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "solm_compile", "inspect", str(tmp_path / "x.gguf")],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "x.gguf" in p.stderr


def test_compile_checks_its_paths_before_loading(capsys, tmp_path):
    out = tmp_path / "missing-dir" / "m.solm.onnx"
    code, _, err = run_cli(capsys, "compile", "smollm2", "--out", str(out))
    assert_one_line_error(code, err, "--out", "does not exist")
    code, _, err = run_cli(capsys, "compile", "smollm2", "--out", str(tmp_path / "m.onnx"), "--policy",
                           str(tmp_path / "nope.pt"))
    assert_one_line_error(code, err, "--policy", "nope.pt", "no such file")
    assert not (tmp_path / "m.onnx").exists()
