"""The files the peer engines run, found or built once: the GGUF llama.cpp reads and onnxruntime-genai's int4 model.

- llama.cpp reads the very GGUF file the alias (or a ``.gguf`` MODEL) was loaded from: the same bytes solm starts from.
- onnxruntime-genai's model builder (``-p int4 -e cpu``: MatMulNBits, 4-bit round-to-nearest in blocks of 32, on
  every linear layer and the LM head) runs on the fp32 Hugging Face directory solm writes for the alias (or the HF
  directory given as MODEL), copied without its ``quantization_config`` (the builder refuses a GGUF-derived
  config). The result is cached at ``<solm cache>/bench/<model>-<weights hash>/genai-int4-<key>``, the key hashing
  the builder's, transformers' and torch's versions; it is built once (about 20 s here), with a progress line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from solm_compile.errors import UserError

GENAI_WEIGHTS = "int4 RTN block 32"
GGUF_WEIGHTS = "{} GGUF"


def gguf_for(model: str) -> Path | None:
    """The GGUF file MODEL comes from, or None (an HF directory, an ExportedProgram)."""
    from solm_compile.data import assets

    if model == "smollm2":
        return assets.smollm2_gguf()
    if model == "gemma3-270m":
        return assets.gemma3_270m_gguf()
    return Path(model) if model.endswith(".gguf") and Path(model).is_file() else None


def hf_dir_for(model: str) -> Path | None:
    """The Hugging Face directory of MODEL's weights: the alias's fp32 copy beside its GGUF, or MODEL itself."""
    if model in ("smollm2", "gemma3-270m"):
        d = gguf_for(model).parent / "hf-fp32"          # written when the alias was first loaded
        return d if (d / "config.json").is_file() else None
    p = Path(model)
    return p if p.is_dir() and (p / "config.json").is_file() else None


def gguf_type(path: Path) -> str:
    """The dominant block format of a GGUF's 2-D weight tensors ("Q4_1", "Q4_K", ...), by element count."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + int(t.n_elements)
    return max(counts, key=counts.get) if counts else "?"


def _versions_key(precision: str) -> str:
    import onnxruntime_genai as og
    import torch
    import transformers

    payload = {"onnxruntime_genai": og.__version__, "transformers": transformers.__version__,
               "torch": torch.__version__, "precision": precision, "ep": "cpu"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def genai_model(hf_dir: Path, cache: Path, say: Callable[[str], None] = lambda s: None,
                precision: str = "int4") -> Path:
    """onnxruntime-genai's CPU model of ``hf_dir`` at ``precision`` (int4; fp32 for tests), built into ``cache``
    once (atomically) and reused."""
    from solm_compile.io import atomic_path

    final = cache / f"genai-{precision}-{_versions_key(precision)}"
    if (final / "genai_config.json").is_file():
        return final
    say(f"building onnxruntime-genai's {precision} model from {hf_dir} (once) -> {final}")
    t0 = time.perf_counter()
    with atomic_path(final) as out:
        src = out.parent / "hf"
        shutil.copytree(hf_dir, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg.pop("quantization_config", None)       # "gguf quantized model is not currently supported"
        (src / "config.json").write_text(json.dumps(cfg, indent=1))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not (out / "genai_config.json").is_file():
            last = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:] or ["no output"]
            raise UserError(f"onnxruntime-genai's model builder failed on {hf_dir}: {last[0][:200]}")
    say(f"  onnxruntime-genai {precision}: {time.perf_counter() - t0:.0f} s")
    return final
