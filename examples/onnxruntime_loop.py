"""Drive a solm artifact with plain onnxruntime: register SolmEP by hand, then prefill and greedy-decode.

    python examples/onnxruntime_loop.py ARTIFACT [--max-new-tokens N]

This is what a service in any onnxruntime language binding does; no solm code runs in the loop (solm is
only asked where its SolmEP library is). The step protocol (docs/protocol.md has every input and output; its version
is the metadata's solm.protocol; runtime/driver/solm_driver.cc is the same loop in C++):
inputs input_ids, position_ids, past_key_i/past_value_i and the budget; outputs logits and present_key_i/
present_value_i. The default artifact (the static floor, kind "fixed") takes the budget as attn_keep, mlp_keep and
bits, the controls every layer runs at; a policy artifact (kind "solm", `--policy shipped`) takes it as budget plus
the policy state policy_*, and returns policy_*_out, fed back as the next step's inputs unchanged (the artifact
restarts the policy's episodes itself), plus action and controls for the caller's information.

The SolmEP artifacts keep the KV cache in buffers (metadata kv_cache = {"layout": "buffer", "dtype": ...}):
past_key_i/past_value_i [1, Hkv, C, d] allocated once with room for the whole generation, plus past_length [1];
present_key_i/present_value_i are bound (IO binding) to the same OrtValues, so each step writes its new rows in
place, and the caller only advances past_length. In step protocols 2 and 3 (metadata protocol) the Quest page state
past_page_min_i/past_page_max_i [1, Hkv, C/S, d] is such a buffer too: float32 in 2, the cache's dtype in 3.
Portable and dense artifacts grow float32 caches instead.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tokenizers import Tokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("artifact")
parser.add_argument("--max-new-tokens", type=int, default=16)
args = parser.parse_args()

meta = {p.key.removeprefix("solm."): json.loads(p.value)
        for p in onnx.load(args.artifact, load_external_data=False).metadata_props if p.key.startswith("solm.")}
so = ort.SessionOptions()
so.intra_op_num_threads = 2
so.log_severity_level = 3                        # errors only
if meta["kind"] in ("solm", "fixed"):            # ai.solm nodes: register SolmEP and put it first
    from solm_compile.runtime.ep import library_path

    ort.register_execution_provider_library("SolmEP", str(library_path()))
    devices = [d for d in ort.get_ep_devices() if d.ep_name == "SolmEP"]
    so.add_provider_for_devices(devices, {})
sess = ort.InferenceSession(args.artifact, so)

tok = Tokenizer.from_file(str(Path(args.artifact).parent / meta["tokenizer"]))
ids = tok.encode("The capital of France is", add_special_tokens=False).ids   # plain text, no chat template
L, kvh, hd = meta["num_layers"], meta["kv_heads"], meta["head_dim"]
feeds = {"input_ids": np.array([ids], np.int64), "position_ids": np.arange(len(ids), dtype=np.int64)[None]}
kv = meta.get("kv_cache", {"layout": "concat"})
buffer = kv["layout"] == "buffer"
S = meta["gate"]["page_size"]
C = -(-(len(ids) + args.max_new_tokens + 1) // S) * S                 # the cache's capacity: every position, in pages
paged = buffer and meta.get("protocol", 1) >= 2                         # the page state is a buffer too
page_dtype = kv.get("dtype") if meta.get("protocol", 1) >= 3 else np.float32   # protocol 3: the cache's dtype
for i in range(L):
    for k in ("key", "value"):                                          # [1, Hkv, C, d] buffer, or [1, Hkv, 0, d]
        feeds[f"past_{k}_{i}"] = (ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kvh, C, hd), kv["dtype"])) if buffer
                                  else np.zeros((1, kvh, 0, hd), np.float32))
    for m in ("min", "max") if paged else ():                           # [1, Hkv, C/S, d]
        feeds[f"past_page_{m}_{i}"] = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kvh, C // S, hd), page_dtype))
if buffer:
    feeds["past_length"] = np.zeros(1, np.int64)
state = []                                       # the policy's state, fed back each step (a policy artifact)
if meta["kind"] == "fixed":                      # the static floor: the budget is the controls themselves
    feeds.update(attn_keep=np.array([0.5], np.float32), mlp_keep=np.array([0.75], np.float32),
                 bits=np.array([8.0], np.float32))
else:
    state = ["policy_key", "policy_value", "policy_prev_action", "policy_usage", "policy_count", "policy_step",
             "policy_hidden"]
    H, phd, T = meta["policy_heads"], meta["policy_head_dim"], meta["episode_len"]
    feeds.update(policy_key=np.zeros((1, H, T, phd), np.float32), policy_value=np.zeros((1, H, T, phd), np.float32),
                 policy_prev_action=np.array([meta["num_actions"]], np.int64),
                 policy_usage=np.zeros((1, 3), np.float32), policy_count=np.zeros(1, np.float32),
                 policy_step=np.zeros(1, np.int64), policy_hidden=np.zeros((1, meta["hidden_size"]), np.float32),
                 budget=np.array([[0.5, 0.75, 8 / 16]], np.float32))   # κ̄, ρ̄, b̄/16
names = [o.name for o in sess.get_outputs()]
out, new = None, []
for t in range(args.max_new_tokens + 1):
    binding = sess.io_binding()
    for name in [i.name for i in sess.get_inputs()]:
        v = feeds[name]
        binding.bind_ortvalue_input(name, v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v))
    for name in names:                                                  # a buffer's present is its past: in place
        if buffer and name.startswith("present_") and name.replace("present_", "past_") in feeds:
            binding.bind_ortvalue_output(name, feeds[name.replace("present_", "past_")])
        else:
            binding.bind_output(name, "cpu")
    sess.run_with_iobinding(binding)
    out = {n: v.numpy() for n, v in zip(names, binding.get_outputs())
           if not (buffer and n.startswith(("present_key", "present_value", "present_page")))}   # (bound buffers)
    if buffer:
        feeds["past_length"] = feeds["past_length"] + feeds["input_ids"].shape[1]
    else:
        for i in range(L):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = out[f"present_key_{i}"], out[f"present_value_{i}"]
    for name in state:
        feeds[name] = out[f"{name}_out"]
    nxt = int(out["logits"][0, -1].argmax())
    if t == args.max_new_tokens or nxt in meta.get("eos_token_ids", []):
        break
    new.append(nxt)
    feeds["input_ids"] = np.array([[nxt]], np.int64)
    feeds["position_ids"] = np.array([[len(ids) + t]], np.int64)
print(repr(tok.decode(new)), *(("| last action", int(out["action"][0]), "controls", out["controls"][0].tolist())
                               if "action" in out else ("| static floor: controls 0.5, 0.75, 8",)))
