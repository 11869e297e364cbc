"""Post-process a solm artifact with onnx-graphsurgeon and check it still decodes the same tokens under SolmEP.

    pip install solm-compile[tools]
    python examples/graphsurgeon_edit.py ARTIFACT [--out EDITED.solm.onnx] [--max-new-tokens N]

ARTIFACT is a .solm.onnx written by `solm-compile smollm2 --out smollm2.solm.onnx` (or compile_and_generate.py).
The edit is a typical one: the LM head's input gets a name of its own (`final_hidden`) and becomes an extra
output, then constants are folded and the graph cleaned up. `solm_compile.artifact.surgeon` does the loading and
saving, because a plain gs.import_onnx/export_onnx round trip loses the solm metadata and turns the carried
page-state inputs into constants (docs/interop.md). Both artifacts then answer the same prompt greedily at a
sparse budget; the script exits 1 if their tokens differ.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

import solm_compile as solm
from solm_compile.artifact import surgeon

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("artifact")
parser.add_argument("--out", default=None, help="edited artifact (default: ARTIFACT's name with .edited)")
parser.add_argument("--max-new-tokens", type=int, default=12)
args = parser.parse_args()
src = Path(args.artifact)
out = Path(args.out) if args.out else src.with_name(src.name.replace(".onnx", ".edited.onnx"))

graph = surgeon.load(src)                            # an onnx_graphsurgeon.Graph
logits = next(t for t in graph.outputs if t.name == "logits")
hidden = logits.inputs[0].inputs[0]                  # the LM head's input: the final hidden state
hidden.name, hidden.dtype = "final_hidden", np.float32
graph.outputs.append(hidden)
surgeon.fold(graph)                                  # fold_constants + cleanup + toposort, weights left as written
surgeon.save(graph, out, like=src)                   # metadata, ai.solm opset, page-state defaults, tokenizer

edited = onnx.load(str(out), load_external_data=False)
print(f"wrote {out}: {len(edited.graph.node)} nodes, outputs ... {edited.graph.output[-1].name}; opsets "
      + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in edited.opset_import)
      + f"; {len(edited.metadata_props)} metadata entries")

prompt, budget = "The capital of France is", (0.5, 0.75, 8)
runs = {}
for name, path in (("original", src), ("edited", out)):
    r = solm.load(path, threads=2).generate(prompt, max_new_tokens=args.max_new_tokens, budget=budget, greedy=True,
                                            chat=False)
    runs[name] = r
    print(f"{name:>8}: {r.text!r}")
same = runs["original"].tokens == runs["edited"].tokens
print("greedy tokens: " + ("identical" if same else "DIFFER"))
sys.exit(0 if same else 1)
