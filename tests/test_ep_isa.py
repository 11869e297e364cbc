"""Every SIMD variant of every SolmEP kernel family runs, on this machine, and matches the reference.

The families (decode QuestAttention, prefill QuestAttention, SparseMLP with its gemv/gemm tiles) are each compiled
as baseline x86-64, x86-64-v3 (AVX2+FMA) and x86-64-v4 (AVX-512) and dispatched once per process from the CPU,
capped by SOLM_EP_ISA. For each cap the host supports, a fresh process runs every family through the C API, compares
with the reference, and reads back ``solm_ep_isa_report`` (``ep.isa_report``): every family must report that it ran
exactly the capped variant, so a family that ignored the cap (as GCC's target_clones did for decode) fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from solm_compile.runtime import ep
from solm_compile.runtime import ep_build

FAMILIES = ("decode_attention", "prefill_attention", "sparse_mlp")
_V3 = {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


def host_isa() -> str:
    """The widest variant this CPU runs, from /proc/cpuinfo (independent of the library's own CPU test)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "baseline"
    return "x86-64-v4" if _V4 <= flags else "x86-64-v3" if _V3 <= flags else "baseline"


RANK = {"baseline": 0, "x86-64-v3": 1, "x86-64-v4": 2, "x86-64-v4-vnni": 2}


def report_under_cap(cap: str, script: str, lib: str, tests_dir: Path) -> dict:
    """Run ``script`` (argv: the library path, the tests folder) in a fresh process under ``SOLM_EP_ISA=cap`` and
    return the JSON it prints after ``REPORT ``; skips a cap wider than this CPU."""
    if RANK[cap] > RANK[host_isa()]:
        pytest.skip(f"this CPU runs at most {host_isa()}")
    env = {**os.environ, "SOLM_EP_ISA": cap}
    r = subprocess.run([sys.executable, "-c", script, lib, str(tests_dir)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("REPORT ", 1)[1])


@pytest.fixture(scope="module")
def lib_path():
    try:
        return ep_build.build_cached()
    except ep_build.BuildError as e:
        if os.environ.get("SOLM_REQUIRE_EP"):
            pytest.fail(str(e))
        pytest.skip(f"SolmEP cannot be built here: {e}")


_SCRIPT = r"""
import ctypes, json, math, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[2])
import test_ep_prefill as t
from solm_compile.ops import reference as ref
from solm_compile.runtime import ep
path = sys.argv[1]
lib = ctypes.CDLL(path)
P, I64, FL = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
ptr = lambda a: P(None if a is None else a.ctypes.data)
report = lambda: ep.isa_report(path)
assert all(report()[f] is None for f in ("decode_attention", "prefill_attention", "sparse_mlp")), report()
rng = np.random.default_rng(0)

# decode (T = 1): GQA 6/2, page state of the past keys carried in; K/V rows no head of the group keeps are NaN
B, H, Hkv, L, d, S, sinks, window = 2, 6, 2, 61, 24, 8, 1, 2
q = rng.standard_normal((B, H, 1, d), dtype=np.float32)
k = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
v = rng.standard_normal((B, Hkv, L, d), dtype=np.float32)
kappa = np.array([0.15, 0.3], np.float32)
union = np.zeros((B, Hkv, L), bool)
for b in range(B):
    for h in range(H):
        union[b, h // 3] |= ref.quest_keep_ref(torch.from_numpy(q[b, h, 0]), torch.from_numpy(k[b, h // 3]),
                                               float(kappa[b]), S, sinks, window).numpy()
past = k[:, :, :L - 1]
Pp = -(-(L - 1) // S)
pad = np.concatenate([past, np.repeat(past[:, :, -1:], Pp * S - (L - 1), axis=2)], axis=2).reshape(B, Hkv, Pp, S, d)
pmin, pmax = np.ascontiguousarray(pad.min(3)), np.ascontiguousarray(pad.max(3))
kp, vp = k.copy(), v.copy()
kp[~union] = np.nan
vp[~union] = np.nan
out = np.empty_like(q)
rc = lib.solm_quest_attention_state(ptr(q), ptr(kp), ptr(vp), P(None), 1, I64(0), I64(0), I64(0), I64(0), ptr(kappa),
                                    *[I64(a) for a in (B, H, Hkv, 1, L, d, d)], FL(0.0), I64(S), I64(sinks),
                                    I64(window), 0, 0, ptr(pmin), ptr(pmax), I64(Pp), P(None), P(None), P(None),
                                    P(None), ptr(out))
assert rc == 0, rc
want = ref.quest_attention_ref(*(torch.from_numpy(a) for a in (q, k, v)), None, torch.from_numpy(kappa), None, S,
                               sinks, window).numpy()
assert np.isfinite(out).all()
np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
r = report()
assert r["decode_attention"] is not None and r["prefill_attention"] is None and r["sparse_mlp"] is None, r

# prefill (T > 1): dense attention under each mask form
for (B, H, Hkv, T, L, d) in [(2, 6, 2, 70, 70, 20), (1, 9, 3, 67, 67, 64)]:
    for kind in ("none", "bool", "float"):
        q, k, v, mask = t.prefill_case(rng, B, H, Hkv, T, L, d, kind)
        out = np.empty_like(q)
        m = None if mask is None else np.ascontiguousarray(np.broadcast_to(mask, (B, H, T, L)))
        st = [0, 0, 0, 0] if m is None else [s // m.itemsize for s in m.strides]
        args = [ptr(q), ptr(k), ptr(v), ptr(m), ctypes.c_int(int(m is None or m.dtype == bool))]
        args += [I64(s) for s in st] + [ptr(np.ones(B, np.float32))] + [I64(a) for a in (B, H, Hkv, T, L, d, d)]
        args += [FL(0.3), I64(8), I64(0), I64(0), ctypes.c_int(0), ctypes.c_int(0), ptr(out)]
        assert lib.solm_quest_attention(*args) == 0
        t.check_attention(out, q, k, v, m, False, 0.3)

# SparseMLP: one token (gemv tiles) and 2 x 150 tokens (gemm tiles, dense groups), gated and not
lib.solm_mlp_create.restype = P
for gated, act, T, rho in [(True, "silu", 1, 0.3), (False, "gelu", 150, 0.9), (True, "silu", 150, 0.5)]:
    B, D, I = 2, 150, 300
    w = {"w_up": rng.standard_normal((I, D), dtype=np.float32) / math.sqrt(D),
         "w_down": rng.standard_normal((D, I), dtype=np.float32) / math.sqrt(I)}
    if gated:
        w["w_gate"] = rng.standard_normal((I, D), dtype=np.float32) / math.sqrt(D)
    x = rng.standard_normal((B, T, D), dtype=np.float32)
    r_, bits = np.full(B, rho, np.float32), np.full(B, 16.0, np.float32)
    h = lib.solm_mlp_create(ptr(w.get("w_gate")), P(None), ptr(w["w_up"]), P(None), ptr(w["w_down"]), P(None),
                            I64(D), I64(I), I64(D))
    assert h
    y = np.empty((B, T, D), np.float32)
    assert lib.solm_mlp_run(P(h), ptr(x), I64(B), I64(T), ptr(r_), ptr(bits), act.encode(), ptr(y)) == 0
    lib.solm_mlp_free(P(h))
    want = t.mlp_reference(x, w, r_, bits, act)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))
print("REPORT " + json.dumps(report()))
"""


@pytest.mark.parametrize("cap", ["baseline", "x86-64-v3", "x86-64-v4", None])
def test_every_family_runs_the_capped_variant(lib_path, cap):
    """cap None: no SOLM_EP_ISA, the host's widest variant. A cap above what the host runs is skipped (never
    xfailed): the variant cannot run here."""
    rank = {"baseline": 0, "x86-64-v3": 1, "x86-64-v4": 2}
    host = host_isa()
    if cap is not None and rank[cap] > rank[host]:
        pytest.skip(f"this CPU runs at most {host}")
    want = host if cap is None else cap
    env = dict(os.environ)
    env.pop("SOLM_EP_ISA", None)
    if cap is not None:
        env["SOLM_EP_ISA"] = cap
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(lib_path), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1])
    assert report["selected"] == want and report["cap"] == cap
    assert {f: report[f] for f in FAMILIES} == {f: want for f in FAMILIES}


def test_isa_report_in_process(lib_path):
    """ep.isa_report reads the library: the selected variant is one of the three, families not yet run are None
    (a fresh process: the library loaded here has run nothing)."""
    r = subprocess.run([sys.executable, "-c", "import json, sys; from solm_compile.runtime import ep; "
                        "print(json.dumps(ep.isa_report(sys.argv[1])))", str(lib_path)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "SOLM_EP_ISA": "baseline"})
    assert r.returncode == 0, r.stderr[-2000:]
    # sparse_mlp_blocks: its variants are checked per cap by test_solm_ep_blocks.py (through onnxruntime)
    assert json.loads(r.stdout) == {"selected": "baseline", "cap": "baseline",
                                    **{f: None for f in FAMILIES + ("sparse_mlp_blocks", "sparse_mlp_blocks_int8")}}
