"""``solm-compile`` / ``solm compile`` (write the artifact) and ``solm run`` (generate with it)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_artifact_parsers(sub, common) -> None:
    from solm_compile.api import SolmConfig       # light (no torch): the CLI's defaults are the API's

    p = sub.add_parser("compile", help="write the .solm.onnx artifact (same as solm-compile)")
    common(p)
    p.add_argument("--out", required=True, help="output path, e.g. model.solm.onnx")
    p.add_argument("--policy", help="'static' (the default on SolmEP: no learned policy, every layer at the "
                   "requested budget, i.e. the --fixed artifact; no learned policy has beaten it on held-out text, "
                   "docs/policy.md), 'shipped' (the model's learned policy; the portable artifact's default) or a "
                   "policy checkpoint file")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--portable", action="store_true", help="standard ONNX ops only (runs on stock onnxruntime)")
    kind.add_argument("--dense", action="store_true", help="the original model, ungated (the benchmark baseline)")
    kind.add_argument("--fixed", action="store_true",
                      help="no policy: the gated graph with attn_keep/mlp_keep/bits as inputs (what --policy "
                      "static writes)")
    kind.add_argument("--custom-ops", action="store_true",
                      help="the ai.solm artifact even where SolmEP is not available (to deploy elsewhere); by "
                      "default a machine without SolmEP gets the portable artifact, with a warning")
    p.add_argument("--per-kv-head", action="store_true",
                   help="Quest pages chosen once per KV head (scores summed over its query heads), so each kept "
                   "page is read once per GQA group; coarser than SOL's per-query-head choice (ai.solm artifacts)")
    p.add_argument("--activations", choices=("int8", "fp32"), default="int8",
                   help="low-bit matmuls: activations quantized to int8 per block of 32 (default; llama.cpp's trade, "
                   "+0.2 %% perplexity on SmolLM2) or kept fp32 (exact, slower)")
    p.add_argument("--mlp-down-bits", type=int, choices=(8, 4), default=SolmConfig.mlp_down_bits,
                   help="with --mlp-skip h on low-bit weights: the bits SolmEP's transposed down projection is "
                   "re-quantised to (default 8: +0.1 %% PPL on SmolLM2, twice a Q4 down's bytes; 4: a Q4 down's "
                   "bytes, so rho saves them; docs/measurements.md session 12)")
    p.add_argument("--head-bits", type=int, choices=(8, 4), default=SolmConfig.head_bits,
                   help="with --weights int4: the embedding / LM head's bits (default 8, as GGUF's Q4 files; 4, as "
                   "onnxruntime-genai's int4 model: 14.6 MB/token less on SmolLM2, docs/measurements.md session 14)")
    p.add_argument("--emit", choices=("onnx", "mlir"), default="onnx",
                   help="onnx: the artifact (default); mlir: the decode step as MLIR text through torch-mlir "
                   "(pip install solm-compile[mlir]): the gated step with the budget as arguments, or with --dense "
                   "the original (docs/cli.md)")
    p.add_argument("--mlir-dialect", choices=("linalg-on-tensors", "stablehlo", "raw"), default=None,
                   help="--emit mlir's dialect (default linalg-on-tensors with --dense, raw for the gated step, whose "
                   "solm ops stay torch.operator)")
    p.set_defaults(fn=cmd_compile)

    p = sub.add_parser("run", help="generate with an artifact")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--attn-keep", type=float, default=1.0, help="attention keep target κ̄ (default 1)")
    p.add_argument("--mlp-keep", type=float, default=1.0, help="MLP keep target ρ̄ (default 1)")
    p.add_argument("--bits", type=float, default=16, help="bits target (default 16)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    p.add_argument("--no-chat", dest="chat", action="store_false", default=None,
                   help="feed the prompt as plain text (default: an instruct model's chat template wraps it as a "
                   "user turn, and generation stops at its end-of-sequence token)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--prefill-chunk", type=int, default=None,
                   help="most prompt tokens one prefill run of a solm/fixed artifact feeds: bounds the prefill's "
                   "memory (default: runtime/session.py's PREFILL_CHUNK, 128; 0: the whole prompt in one run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda: a portable or dense artifact on onnxruntime-gpu's CUDA EP (SolmEP "
                   "is CPU-only; docs/cli.md has the install swap)")
    p.add_argument("--json", action="store_true", help="print one JSON object (per_token: each token's text, "
                   "action, controls and cost_fraction)")
    p.add_argument("--show", action="store_true", help="colour each token by the compute it received (bytes read "
                   "over the dense budget's), then a legend and the per-token sparkline; plain text through a pipe "
                   "or with NO_COLOR")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(fn=cmd_run)


def cmd_compile(args: argparse.Namespace) -> int:
    from solm_compile.api import SolmConfig, compile
    from solm_compile.cli.common import dataclass_from_args
    from solm_compile.config import GateConfig
    from solm_compile.runtime.session import read_metadata

    kind = ("dense" if args.dense else "fixed" if args.fixed else "portable" if args.portable else
            "solm" if args.custom_ops else "auto")
    config = SolmConfig(kind=kind, policy=args.policy, gate=dataclass_from_args(GateConfig, args),
                        per_kv_head=args.per_kv_head, trust_pickle=args.trust_pickle, weights=args.weights,
                        activations=args.activations, emit=args.emit, mlir_dialect=args.mlir_dialect,
                        kv=args.kv, mlp_down_bits=args.mlp_down_bits, head_bits=args.head_bits)
    path = compile(args.model, config, out=args.out)
    if args.emit == "mlir":
        print(f"wrote {path} (MLIR, {config.mlir_dialect or ('linalg-on-tensors' if args.dense else 'raw')}, "
              f"{'dense' if args.dense else 'gated: budget as arguments'}; {path.stat().st_size / 1e6:.1f} MB)")
        return 0
    meta = read_metadata(path)
    fmts = ", ".join(f"{k} ×{v}" for k, v in (meta.get("weights") or {}).get("packed", {}).items())
    print(f"wrote {path} ({meta['kind']}, {path.stat().st_size / 1e6:.1f} MB; weights {args.weights}"
          + (f": {fmts}" if fmts else "")
          + (f"; policy {meta['policy_file']}" if meta.get("policy_file") else
             "; static: every layer at the budget you run it at" if meta["kind"] == "fixed" else "") + ")")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from solm_compile.errors import UserError
    from solm_compile.runtime.device import check_device
    from solm_compile.runtime.session import PREFILL_CHUNK, SolmSession

    check_device(args.device)                       # before the artifact loads: one line if there is no CUDA
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sess = SolmSession(args.artifact, threads=args.threads, device=args.device,
                       prefill_chunk=PREFILL_CHUNK if args.prefill_chunk is None else args.prefill_chunk)
    budget = (args.attn_keep, args.mlp_keep, args.bits)
    if sess.kind != "dense":
        sess.check_budget(budget)
    chat = bool(sess.meta.get("chat_template")) if args.chat is None else args.chat
    if args.show or args.json:
        from solm_compile.cli.show import run_show

        return run_show(sess, args, budget, chat)
    stream = lambda s: (sys.stdout.write(s), sys.stdout.flush())      # noqa: E731
    if not chat:
        stream(args.prompt)                         # plain text: the answer continues the prompt
    r = sess.generate(args.prompt, args.max_new_tokens, budget, greedy=args.greedy, temperature=args.temperature,
                      seed=args.seed, on_text=stream, chat=chat)
    u = r.usage
    print(f"\n[{len(r.tokens)} tokens, {r.tok_s:.1f} tok/s, {sess.kind} on {sess.sess.get_providers()[0]}; "
          f"usage attn_keep {u['attn_keep']:.2f} mlp_keep {u['mlp_keep']:.2f} bits {u['bits']:.1f}]")
    return 0
