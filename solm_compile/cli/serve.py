"""``solm serve ARTIFACT``: an OpenAI-style HTTP server (and the web page at ``/``) over one artifact."""

from __future__ import annotations

import argparse
import sys

from solm_compile.serve.config import ServeConfig

D = ServeConfig()


def add_serve_parser(sub, common) -> None:
    p = sub.add_parser("serve", help="serve an artifact over HTTP: OpenAI-style /v1 API and a web page at /")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--host", default=D.host, help=f"address to listen on (default {D.host}: this machine only; the "
                   "server has no authentication)")
    p.add_argument("--port", type=int, default=D.port, help=f"port (default {D.port}; 0: any free one)")
    p.add_argument("--threads", type=int, default=D.threads, help="onnxruntime intra-op threads")
    p.add_argument("--context", type=int, default=D.context,
                   help=f"tokens of prompt plus answer one request may use (default {D.context})")
    p.add_argument("--max-active", type=int, default=D.max_active,
                   help=f"requests batched together, one row each (default {D.max_active})")
    p.add_argument("--max-queue", type=int, default=D.max_queue,
                   help=f"requests waiting for a slot before new ones get 503 (default {D.max_queue})")
    p.add_argument("--kv-budget", dest="kv_budget_mb", type=float, default=D.kv_budget_mb,
                   help="MiB of KV cache the batched rows may take: fewer rows than --max-active when they do not "
                        "fit; requests beyond them wait (default: no limit)")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=D.timeout_s,
                   help=f"seconds a request may run (default {D.timeout_s:g})")
    p.add_argument("--model-name", default=D.model_name, help="the model id clients use (default: the file name)")
    p.add_argument("--replicas", type=int, default=D.replicas,
                   help="serve N replicas of the app as a Ray Serve deployment on a local Ray, each with its own "
                        "session, scheduler and KV budget, behind Ray's proxy on --host:--port (the ray extra; "
                        "default: one process, no Ray)")
    p.add_argument("--prefill-chunk", type=int, default=D.prefill_chunk,
                   help=f"tokens per prefill run of a joining prompt, the running requests stepped between runs: "
                        f"smaller bounds their inter-token gap, larger gives the newcomer its first token sooner "
                        f"(default {D.prefill_chunk}; a multiple of the page size; 0: one run)")
    p.add_argument("--spin", action="store_true", default=D.spin,
                   help="let onnxruntime's threads spin between parallel regions instead of sleeping: faster steps "
                        "on a machine of the server's own, a busy core for everyone else (default: off)")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(fn=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    config = ServeConfig(host=args.host, port=args.port, threads=args.threads, context=args.context,
                         max_active=args.max_active, max_queue=args.max_queue, timeout_s=args.timeout_s,
                         model_name=args.model_name, kv_budget_mb=args.kv_budget_mb,
                         replicas=args.replicas, prefill_chunk=args.prefill_chunk,
                         spin=args.spin)  # bad flags fail before loading
    if config.replicas is not None:
        return serve_replicas(args.artifact, config)
    try:
        from solm_compile.serve import create_app, serve_forever
    except ImportError as e:
        from solm_compile.errors import UserError

        raise UserError(f"solm serve needs the serve extra ({e.name} is missing): pip install "
                        "'solm-compile[serve]'") from e
    from solm_compile.runtime.session import SolmSession

    sess = SolmSession(args.artifact, **config.session_options)
    app = create_app(sess, config)
    _warn_if_exposed(config)
    print(f"solm serve: {sess.kind} artifact {sess.path.name} at http://{config.host}:{config.port}/ "
          f"(OpenAI API under /v1; Ctrl-C stops)", flush=True)
    serve_forever(app, config)
    return 0


def serve_replicas(artifact: str, config: ServeConfig) -> int:
    """``--replicas N``: the same app on N Ray Serve replicas (solm_compile/serve/ray_serve.py)."""
    from solm_compile.errors import UserError

    try:
        import fastapi  # noqa: F401  (each replica builds the serve extra's app)

        from solm_compile.serve import ray_serve
    except ImportError as e:
        raise UserError(f"--replicas needs Ray Serve and the serve extra ({e.name} is missing): pip install "
                        "'solm-compile[ray]'") from e
    from solm_compile.runtime.session import SolmSession

    sess = SolmSession(artifact, threads=1)              # a bad artifact is one line here, not a replica's crash
    kind, name = sess.kind, sess.path.name
    del sess
    _warn_if_exposed(config)
    print(f"solm serve: {kind} artifact {name} on {config.replicas} Ray Serve replicas at "
          f"http://{config.host}:{config.port}/ (OpenAI API under /v1; Ctrl-C stops)", flush=True)
    ray_serve.serve_forever(artifact, config)
    return 0


def _warn_if_exposed(config: ServeConfig) -> None:
    if not config.loopback:
        print(f"warning: listening on {config.host}, reachable from other machines; solm serve has no "
              "authentication", file=sys.stderr)
