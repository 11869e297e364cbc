"""solm-compile --emit mlir (solm_compile/artifact/mlir.py): without torch-mlir one line saying how to install it;
with it, the dense step lowers to linalg-on-tensors with no gating op, and the gated step keeps the budget as
function arguments and its solm ops as torch.operator, each module verified by the wheel's torch-mlir-opt."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from require import need_mlir
from test_cli import assert_one_line_error, run_cli


def test_emit_mlir_without_torch_mlir_is_one_line_before_the_model_loads(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_mlir", None)          # import torch_mlir raises ImportError
    code, _, err = run_cli(capsys, "compile", "no-such-model", "--out", str(tmp_path / "m.mlir"), "--emit", "mlir")
    assert_one_line_error(code, err, "--emit mlir", "pip install 'solm-compile[mlir]'")


def test_emit_mlir_refuses_onnx_kinds_and_unlowerable_dialects(capsys, tmp_path):
    need_mlir()
    code, _, err = run_cli(capsys, "compile", "m", "--out", str(tmp_path / "m.mlir"), "--emit", "mlir", "--portable")
    assert_one_line_error(code, err, "--emit mlir", "'portable'")
    code, _, err = run_cli(capsys, "compile", "m", "--out", str(tmp_path / "m.mlir"), "--emit", "mlir",
                           "--mlir-dialect", "stablehlo")
    assert_one_line_error(code, err, "--mlir-dialect stablehlo", "--dense")


def _opt_verifies(path: Path) -> None:
    opt = shutil.which("torch-mlir-opt") or str(Path(sys.executable).parent / "torch-mlir-opt")
    if not Path(opt).is_file():
        pytest.skip("torch-mlir-opt (the torch-mlir wheel's tool) is not on PATH")
    r = subprocess.run([opt, str(path), "-o", "/dev/null"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def lm(tiny_llama):
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from test_artifact import word_tokenizer

    return GatedLM.from_loaded(models._from_hf(tiny_llama, word_tokenizer(), name="tiny", source="<test>"))


def test_dense_step_lowers_to_linalg_without_gating_ops(lm, tmp_path):
    need_mlir()
    from solm_compile.artifact.mlir import emit_mlir

    text = emit_mlir(lm, tmp_path / "dense.mlir", dense=True).read_text()
    assert "linalg.generic" in text and "func.func @decode_step" in text
    assert "torch.operator" not in text and "solm" not in text      # no gate, no custom op
    _opt_verifies(tmp_path / "dense.mlir")


def test_gated_step_takes_the_budget_as_arguments_and_keeps_solm_ops(lm, tmp_path):
    need_mlir()
    from solm_compile.artifact.mlir import GATED_OPS, emit_mlir

    text = emit_mlir(lm, tmp_path / "gated.mlir").read_text()
    for op in GATED_OPS:
        assert f'torch.operator "{op}"' in text, op
    sig = re.search(r"func\.func @decode_step\((.*?)\) ->", text).group(1)
    n_args = len(re.findall(r"%arg\d+:", sig))
    assert n_args == 2 + 2 * lm.info.num_layers + 3                 # ids, positions, past k/v, κ ρ bits
    assert sig.count("!torch.vtensor<[?],f32>") == 3                 # the budget: one value per row, not constants
    _opt_verifies(tmp_path / "gated.mlir")
