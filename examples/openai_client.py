"""solm as a service: `solm serve` in this process, asked by the official `openai` client at two budgets.

    pip install "solm-compile[serve]" openai
    python examples/openai_client.py ARTIFACT [--max-new-tokens N]

ARTIFACT is a .solm.onnx written by `solm-compile smollm2 --out smollm2.solm.onnx` (or compile_and_generate.py).
The server listens on an ephemeral loopback port for as long as the script runs (`solm serve ARTIFACT` is the same
server in the foreground, on 127.0.0.1:8000). The budget rides in the client's `extra_body`; the answer streams,
and each token's chunk carries solm's per-token record (controls, action, compute) that OpenAI clients ignore.
"""

import argparse

from openai import OpenAI

import solm_compile as solm
from solm_compile.serve import ServeConfig, background, create_app

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("artifact")
parser.add_argument("--max-new-tokens", type=int, default=24)
args = parser.parse_args()

app = create_app(solm.load(args.artifact, threads=2), ServeConfig())
with background(app) as url:
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    question = [{"role": "user", "content": "Name the capital of France."}]
    for budget in ({"attn_keep": 1.0, "mlp_keep": 1.0}, {"attn_keep": 0.5, "mlp_keep": 0.75, "bits": 8}):
        text, costs = "", []
        for chunk in client.chat.completions.create(model=model, messages=question, max_tokens=args.max_new_tokens,
                                                    temperature=0, stream=True, extra_body=budget):
            text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            record = (chunk.model_extra or {}).get("solm") or {}
            if record.get("token_cost") is not None:
                costs.append(record["token_cost"])
        mean = sum(costs) / len(costs) if costs else float("nan")
        print(f"{budget} | mean compute {mean:.2f} of dense over {len(costs)} tokens | {text!r}")
