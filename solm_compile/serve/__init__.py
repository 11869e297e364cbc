"""``solm serve``: an OpenAI-style HTTP server over one artifact, with a web page showing each token's compute.

    from solm_compile.runtime import SolmSession
    from solm_compile.serve import ServeConfig, create_app, background
    app = create_app(SolmSession("smollm2.solm.onnx"), ServeConfig())
    with background(app) as url:           # http://127.0.0.1:PORT; the OpenAI API under url + "/v1"
        ...

See docs/serve.md for the endpoints, fields, errors and the scheduler's limits.
"""

from solm_compile.serve.app import create_app
from solm_compile.serve.config import ServeConfig
from solm_compile.serve.server import background, serve_forever

__all__ = ["ServeConfig", "background", "create_app", "serve_forever"]
