"""torch.compile(model, backend="solm") with Hugging Face `generate`: the same passes and policy inside PyTorch.

    python examples/torch_compile_generate.py [--max-new-tokens N] [--no-inductor]

`backend="solm"` is found by name once solm is pip-installed. Compile the model's forward (`model.compile`), not
the module returned by `torch.compile(model)`: that one forwards `generate` to the uncompiled model. Without a
"policy" option the backend runs the static floor (every decode step at the budget, the default since no learned
policy has beaten it on held-out text); this example asks for the learned policy shipped for SmolLM2
(options={"policy": "shipped"}, found by the model's identity) to show its per-step actions; PATH picks another.
"""

import argparse

import torch

from solm_compile.backend.dynamo import controller
from solm_compile.frontend.models import load

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--max-new-tokens", type=int, default=16)
parser.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=True,
                    help="compile the gated graph with inductor (default; about a minute on 2 cores) or run it as "
                         "the FX graph (--no-inductor: starts in seconds, same policy and tokens)")
args = parser.parse_args()

loaded = load("smollm2")                     # the transformers model and tokenizer, from the solm cache
model, tok = loaded.hf.eval(), loaded.tokenizer
ids = tok.apply_chat_template([{"role": "user", "content": "Name the capital of France."}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]

model.compile(backend="solm", options={"attn_keep": 0.5, "mlp_keep": 0.75, "bits": 8, "inductor": args.inductor,
                                      "policy": "shipped"})          # default "static": every step at the budget
with torch.no_grad():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         do_sample=False)
print(repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
ctl = controller(model)
print(f"{ctl.calls['step']} decode steps under the policy; actions per step: "
      f"{[int(a[0]) for a in ctl.actions][:12]} ...")
