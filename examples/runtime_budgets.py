"""Budgets are inputs, not constants: one artifact, one session, any target, changed between requests.

    python examples/runtime_budgets.py ARTIFACT [--max-new-tokens N]

ARTIFACT is a .solm.onnx written by `solm-compile smollm2 --out smollm2.solm.onnx` (or compile_and_generate.py).
The same prompt is answered at three budgets (attention keep κ̄, MLP keep ρ̄, bits b̄): the default artifact (the
static floor) runs every layer at the target, so the realised usage is the target; a policy artifact decides per
token how to spend it, and the realised usage lands near the target.
"""

import argparse

import solm_compile as solm

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("artifact")
parser.add_argument("--max-new-tokens", type=int, default=16)
args = parser.parse_args()

session = solm.load(args.artifact, threads=2)
prompt = "Write one sentence about the sea."
for budget in [(1.0, 1.0, 16), (0.7, 0.9, 16), (0.5, 0.75, 8)]:
    r = session.generate(prompt, max_new_tokens=args.max_new_tokens, budget=budget)
    u = r.usage
    print(f"target κ̄={budget[0]:.2f} ρ̄={budget[1]:.2f} b̄={budget[2]:>4.1f} | realised κ {u['attn_keep']:.2f} "
          f"ρ {u['mlp_keep']:.2f} b {u['bits']:4.1f} | {r.text!r}")
