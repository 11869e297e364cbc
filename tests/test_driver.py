"""The C++ driver (runtime/driver/solm_driver.cc) against `solm run`: a second, independent host of the step protocol
(docs/protocol.md) that uses onnxruntime's C/C++ API alone must produce the same greedy ids, token for token, on
every artifact kind at the dense and a sparse budget. Under SOLM_REQUIRE_EP=1 (CI) a driver that cannot build fails
these tests instead of skipping them."""

import json
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from require import need_driver, need_ep
from solm_compile.cli import app as cli
from solm_compile.runtime import driver_build, ep
from solm_compile.runtime.session import SolmSession

PROMPT_IDS = np.random.default_rng(7).integers(0, 160, 40).tolist()   # the word tokenizer: "w{i}" is id i
BUDGETS = {"dense": (1.0, 1.0, 16.0), "sparse": (0.5, 0.75, 8.0)}
N = 24


@pytest.fixture(scope="module")
def driver():
    return need_driver()


def text(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def run_driver(exe, artifact, budget, n=N, ids=PROMPT_IDS, check=True, lib=None):
    lib = lib or ep.library_path() or "-"
    r = subprocess.run([str(exe), str(artifact), str(lib), *map(str, budget), str(n), "1"],
                       input=" ".join(map(str, ids)), capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r if not check else [int(x) for x in r.stdout.split()]


def need_kind(kind):
    if kind in ("solm", "fixed"):
        need_ep(ep.library_path() is not None)


@pytest.mark.parametrize("budget", BUDGETS.values(), ids=BUDGETS.keys())
@pytest.mark.parametrize("kind", ["solm", "fixed", "dense", "portable"])
def test_the_driver_matches_the_python_session_token_for_token(driver, step_artifacts, kind, budget):
    need_kind(kind)
    want = SolmSession(step_artifacts[kind], threads=1).generate(text(PROMPT_IDS), N, budget, greedy=True,
                                                                  chat=False).tokens
    assert len(want) == N
    assert run_driver(driver, step_artifacts[kind], budget) == want


def test_the_driver_matches_solm_run(driver, step_artifacts, capsys):
    """`solm run --greedy --json` on the solm kind at a sparse budget (the policy acts): the same ids, and the
    sparse run differs from the dense one (the budget reached the graph)."""
    need_kind("solm")
    budget = BUDGETS["sparse"]
    code = cli.main(["run", str(step_artifacts["solm"]), "--prompt", text(PROMPT_IDS), "--greedy", "--no-chat",
                     "--json", "--threads", "1", "--max-new-tokens", str(N), "--attn-keep", str(budget[0]),
                     "--mlp-keep", str(budget[1]), "--bits", str(budget[2])])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert run_driver(driver, step_artifacts["solm"], budget) == json.loads(out)["tokens"]
    assert json.loads(out)["tokens"] != run_driver(driver, step_artifacts["solm"], BUDGETS["dense"])


def _edited_copy(src, tmp_path, **meta):
    """A copy of the artifact ``src`` (and its tokenizer) with some solm.* metadata replaced."""
    model = onnx.load(str(src))
    for prop in model.metadata_props:
        if prop.key[5:] in meta:
            prop.value = json.dumps(meta[prop.key[5:]])
    out = tmp_path / src.name
    onnx.save(model, str(out))
    tok = json.loads(next(p.value for p in model.metadata_props if p.key == "solm.tokenizer"))
    shutil.copy(src.parent / tok, tmp_path / tok)
    return out


def test_the_driver_stops_at_the_artifacts_eos_id_as_the_session_does(driver, step_artifacts, tmp_path):
    need_kind("solm")
    full = run_driver(driver, step_artifacts["solm"], BUDGETS["sparse"])
    k = next(i for i in range(3, N) if full[i] not in full[:i])          # a token not generated before
    art = _edited_copy(step_artifacts["solm"], tmp_path, eos_token_ids=[full[k]])
    assert run_driver(driver, art, BUDGETS["sparse"]) == full[:k]
    assert SolmSession(art, threads=1).generate(text(PROMPT_IDS), N, BUDGETS["sparse"], greedy=True,
                                                chat=False).tokens == full[:k]


def test_the_driver_refuses_in_one_line(driver, step_artifacts, tmp_path):
    """An unknown protocol version, a budget outside the artifact's range, no ids, a SolmEP artifact without SolmEP's
    library: exit code 2, one line."""
    future = _edited_copy(step_artifacts["dense"], tmp_path, protocol=4)
    cases = [(future, BUDGETS["dense"], PROMPT_IDS, None, "step protocol 4 is not one this driver drives"),
             (step_artifacts["portable"], (0.01, 1.0, 16.0), PROMPT_IDS, None, "ATTN_KEEP 0.01"),
             (step_artifacts["dense"], BUDGETS["dense"], [], None, "no prompt token ids"),
             (step_artifacts["solm"], BUDGETS["dense"], PROMPT_IDS, "-", "cannot load it without SolmEP")]
    for art, budget, ids, lib, why in cases:
        r = run_driver(driver, art, budget, ids=ids, check=False, lib=lib)
        assert r.returncode == 2 and why in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_a_failed_build_is_one_line(driver, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(driver_build.BuildError, match=r"compiling solm_driver.cc with false failed") as e:
        driver_build.build(tmp_path, force=True)
    assert "\n" not in str(e.value)
    assert driver_build.main(["--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: cannot build solm_driver: compiling")


def test_the_soname_without_readelf_is_readelfs(monkeypatch):
    """The driver links the wheel's library through a link named by its soname; without readelf the name is guessed
    from the file name, and the guess must be what readelf reads."""
    if shutil.which("readelf") is None:
        pytest.skip("no readelf here to compare the guess with")
    lib = driver_build.ort_library()
    want = driver_build.soname(lib)
    monkeypatch.setattr(driver_build.shutil, "which", lambda name: None)
    assert driver_build.soname(lib) == want != lib.name
