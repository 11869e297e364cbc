"""Peak resident memory of a decoding process, per engine: a child loads one engine, prefills ``context`` ids and
decodes 8 steps, then reports its VmHWM (peak RSS, loading included), its VmRSS then, and its VmRSS right after
importing the engine's module.

    python -m solm_compile.bench.engines_rss SPEC_JSON THREADS CONTEXT IDS.npy    (prints one JSON line)
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

STEPS = 8
log = logging.getLogger(__name__)


def status_mb(field: str) -> float | None:
    """A /proc/self/status field (VmRSS, VmHWM) in MB; None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(spec_json: str, threads: int, context: int, ids_path: str) -> dict:
    from solm_compile.bench.engines import ENGINES, EngineSpec, make_engine

    spec = EngineSpec.from_json(spec_json)
    importlib.import_module(ENGINES[spec.engine].module)
    after_imports = status_mb("VmRSS")
    ids = np.load(ids_path).tolist()
    e = make_engine(spec, threads, context + STEPS + 16)
    e.prefill(ids[:context])
    for tok in ids[context:context + STEPS]:
        e.step(tok)
    rss = status_mb("VmRSS")
    # the kernel updates VmHWM lazily (per-thread RSS counters), so it can trail VmRSS by a few pages
    return {"after_imports_mb": after_imports, "peak_mb": max(status_mb("VmHWM") or 0.0, rss or 0.0), "rss_mb": rss}


def measure_child(spec, ids: list[int], context: int, threads: int, timeout: float = 900) -> dict | None:
    """{peak_mb, rss_mb, after_imports_mb} of a child decoding with ``spec`` at ``context``; None (and a warning)
    if it failed."""
    with tempfile.TemporaryDirectory(prefix="solm-rss-") as tmp:
        path = os.path.join(tmp, "ids.npy")
        np.save(path, np.asarray(ids[:context + STEPS], dtype=np.int64))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "solm_compile.bench.engines_rss", spec.to_json(), str(threads), str(context),
               path]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            log.warning("peak memory of %s: the child ran past %.0f s", spec.label, timeout)
            return None
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        float(out["peak_mb"])
        return out
    except (IndexError, ValueError, KeyError, TypeError):
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        log.warning("peak memory of %s: the child failed (%s)", spec.label, tail[0][:200])
        return None


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
