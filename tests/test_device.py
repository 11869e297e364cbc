"""--device cpu|cuda (runtime/device.py): the providers list each artifact kind gets, and a one-line error naming the
flag where this onnxruntime has no CUDA EP. No GPU needed, except for the last test, which runs only with one."""

from __future__ import annotations

import types

import numpy as np
import pytest

from require import need_cuda
from solm_compile.errors import UserError
from solm_compile.runtime import device
from test_cli import assert_one_line_error, run_cli

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def fake_ort(*providers):
    return types.SimpleNamespace(get_available_providers=lambda: list(providers))


def test_cuda_providers_put_cuda_first_and_cpu_last():
    ort = fake_ort("TensorrtExecutionProvider", CUDA, CPU)
    for kind in ("portable", "dense"):
        assert device.providers_for(kind, "cuda", ort=ort) == [CUDA, CPU]


def test_cpu_providers_leave_solmep_to_the_session_options():
    ort = fake_ort(CUDA, CPU)                        # onnxruntime-gpu installed, --device cpu asked for
    assert device.providers_for("solm", "cpu", ort=ort) is None
    assert device.providers_for("fixed", "cpu", ort=ort) is None
    assert device.providers_for("portable", "cpu", ort=ort) == [CPU]   # never CUDA unless asked


def test_cuda_refuses_solmep_kinds_in_one_line():
    for kind in ("solm", "fixed"):
        with pytest.raises(UserError, match="SolmEP, which is CPU-only") as e:
            device.providers_for(kind, "cuda", ort=fake_ort(CUDA, CPU))
        assert "\n" not in str(e.value) and "--portable" in str(e.value)


def test_no_cuda_provider_is_one_line_naming_the_flag_and_the_swap():
    with pytest.raises(UserError) as e:
        device.check_device("cuda", ort=fake_ort("AzureExecutionProvider", CPU))
    msg = str(e.value)
    assert msg.startswith("--device cuda:") and "\n" not in msg and "requirements-gpu.txt" in msg


def test_run_and_bench_device_cuda_without_cuda_exit_2(capsys, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])   # as here, whatever the wheel
    code, _, err = run_cli(capsys, "run", str(tmp_path / "m.solm.onnx"), "--prompt", "hi", "--device", "cuda")
    assert_one_line_error(code, err, "--device cuda", "onnxruntime-gpu")
    code, _, err = run_cli(capsys, "bench", "smollm2", "--device", "cuda")       # before any model loads
    assert_one_line_error(code, err, "--device cuda", "onnxruntime-gpu")


def test_bench_cuda_times_only_what_cuda_runs(monkeypatch):
    import onnxruntime as ort

    from solm_compile.bench.decode import BenchConfig

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    assert BenchConfig(device="cuda").variants == ("dense", "portable")
    with pytest.raises(UserError, match="--device cuda: the solm variants"):
        BenchConfig(device="cuda", variants=("dense", "solm"))


def test_dense_artifact_on_cuda_decodes_like_cpu(tmp_path, tiny_llama):
    need_cuda()                                      # skips here (no GPU); runs where onnxruntime-gpu sees one
    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.runtime.session import SolmSession
    from test_artifact import PROMPT, word_tokenizer

    loaded = models._from_hf(tiny_llama, word_tokenizer(), name="tiny", source="<test>")
    art = write_artifact(GatedLM.from_loaded(loaded), tmp_path / "tiny.dense.onnx", "dense",
                         tokenizer=loaded.tokenizer)
    cpu, gpu = SolmSession(art), SolmSession(art, device="cuda")
    assert gpu.sess.get_providers()[0] == CUDA and gpu.sess.get_providers()[-1] == CPU
    a, b = cpu.generate(PROMPT, 16, greedy=True), gpu.generate(PROMPT, 16, greedy=True)
    assert a.tokens == b.tokens
    assert np.isfinite(b.tok_s)
