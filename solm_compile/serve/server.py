"""Run the app under uvicorn: in the foreground (``solm serve``) or in a background thread on an ephemeral loopback
port (tests, notebooks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

from solm_compile.errors import UserError
from solm_compile.serve.config import LOOPBACK, ServeConfig


def _server(app, host: str, port: int):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="on")
    return uvicorn.Server(config)


def serve_forever(app, config: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C ends open streams and stops the scheduler)."""
    sock = bind(config.host, config.port)
    _server(app, config.host, config.port).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def background(app, host: str = LOOPBACK, start_timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` from a thread on an ephemeral port of ``host``; yields its base URL (``http://host:port``)
    and stops it (within a few seconds) on exit."""
    sock = bind(host, 0)
    port = sock.getsockname()[1]
    server = _server(app, host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="solm-serve-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the server did not start within {start_timeout_s:g} s")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(15.0)
        sock.close()
