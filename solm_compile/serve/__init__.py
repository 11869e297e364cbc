"""``solm serve``: an OpenAI-style HTTP server over one artifact, with a web page showing each token's compute.

    from solm_compile.runtime import SolmSession
    from solm_compile.serve import ServeConfig, create_app, background
    app = create_app(SolmSession("smollm2.solm.onnx"), ServeConfig())
    with background(app) as url:           # http://127.0.0.1:PORT; the OpenAI API under url + "/v1"
        ...

See docs/serve.md for the endpoints, fields, errors and the scheduler's limits. FastAPI and uvicorn (the ``serve``
extra) are imported only when the server is built, so the rest of solm (``solm run`` ...) works without them.
"""

from solm_compile.serve.config import ServeConfig

__all__ = ["ServeConfig", "background", "create_app", "serve_forever"]


def __getattr__(name: str):
    if name == "create_app":
        from solm_compile.serve.app import create_app

        return create_app
    if name in ("background", "serve_forever"):
        from solm_compile.serve import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
