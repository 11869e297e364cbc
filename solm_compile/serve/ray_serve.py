"""Scale-out of ``solm serve`` on Ray Serve: the same FastAPI app (``app.create_app``) as a Ray Serve deployment of
N replicas behind Ray's HTTP proxy, on one machine (a local Ray started here).

Each replica is its own Ray actor process with its own ``SolmSession`` (one onnxruntime session), its own
continuous-batching scheduler and so its own KV budget; nothing but the artifact file is shared. Ray's proxy routes
each request to the less loaded of the replicas. Every answer carries ``x-solm-replica``: the id of the replica
that served it. Ray is imported only here, and this module only by ``solm serve --replicas``, so plain ``solm serve``
never needs it.

    with ray_serving("tiny.portable.onnx", ServeConfig(port=8123, threads=1, replicas=2)) as url:
        ...                                  # openai.OpenAI(base_url=url + "/v1", api_key="unused")
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"                 # before ray is imported: no usage report, ever
import ray                                                  # noqa: E402
from ray import serve                                       # noqa: E402

from solm_compile.serve.config import ServeConfig           # noqa: E402

APP_NAME = "solm"
REPLICA_HEADER = "x-solm-replica"
START_TIMEOUT_S = 120.0
SHUTDOWN_S = 10.0          # a replica's graceful shutdown; Serve's whole shutdown gets twice that


class ReplicaHeader:
    """ASGI middleware: every HTTP answer names the replica that made it (pure ASGI, so streams pass untouched)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


@serve.deployment(name="solm")
@serve.ingress()
class SolmReplica:
    """One replica: opens its own session and builds its own app (scheduler, metrics) when Ray starts it."""

    def __init__(self, artifact: str, config: ServeConfig):
        self.artifact, self.config = artifact, config

    def __serve_build_asgi_app__(self):
        from solm_compile.runtime.session import SolmSession
        from solm_compile.serve.app import create_app

        app = create_app(SolmSession(self.artifact, **self.config.session_options), self.config)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app


def cpus_per_replica(config: ServeConfig) -> int:
    """Ray CPUs a replica reserves: its onnxruntime threads (1 when left to onnxruntime)."""
    return config.threads or 1


def application(artifact: str | os.PathLike, config: ServeConfig):
    """The bound Ray Serve application: ``config.replicas`` replicas of ``SolmReplica``. Ray sends a replica at most
    ``max_active`` requests at a time (its batch rows), so a new request goes to a replica with a free row; the rest
    wait in Ray's proxy, up to ``max_queue`` of them (beyond: Ray answers 503)."""
    return SolmReplica.options(
        num_replicas=config.replicas or 1, max_ongoing_requests=config.max_active,
        max_queued_requests=config.max_queue, ray_actor_options={"num_cpus": cpus_per_replica(config)},
        graceful_shutdown_timeout_s=SHUTDOWN_S, graceful_shutdown_wait_loop_s=0.5,
    ).bind(str(Path(artifact).resolve()), config)


def start(artifact: str | os.PathLike, config: ServeConfig) -> str:
    """Start a local Ray and the application on it; returns the proxy's base URL once every replica is running."""
    init_ray(config)
    return deploy(artifact, config)


def init_ray(config: ServeConfig) -> None:
    """A local Ray of ``replicas × cpus_per_replica`` CPUs, no dashboard, its node on loopback when the proxy is."""
    node_ip = "127.0.0.1" if config.loopback else None
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"             # Ray's processes inherit it
    ray.init(address="local", num_cpus=config.replicas * cpus_per_replica(config), include_dashboard=False,
             _node_ip_address=node_ip, log_to_driver=False, configure_logging=False)


def deploy(artifact: str | os.PathLike, config: ServeConfig) -> str:
    """Serve's proxy on ``config.host:config.port`` and the application on the running Ray (stopped on failure)."""
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(application(artifact, config), name=APP_NAME, route_prefix="/", blocking=False)
        wait_running(config.replicas, START_TIMEOUT_S)
    except BaseException:
        stop()
        raise
    return f"http://{config.host}:{config.port}"


def wait_running(replicas: int, timeout_s: float) -> None:
    """Until Serve reports the application RUNNING with ``replicas`` RUNNING replicas (``serve.run`` already waits
    for the application; this also covers the replica count)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_replicas() == replicas:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{replicas} Ray Serve replicas were not running within {timeout_s:g} s: {serve.status()}")


def running_replicas() -> int:
    app = serve.status().applications.get(APP_NAME)
    if app is None or app.status != "RUNNING":
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def stop() -> None:
    """Shut down Serve (each replica's app runs its lifespan shutdown: the scheduler stops) and the local Ray. Serve
    gets ``2 * SHUTDOWN_S`` to finish; past that (a CI run once saw serve.shutdown() outlast 60 s) Ray is shut down
    anyway, which ends every process it started, replicas included."""
    if not ray.is_initialized():                  # already stopped (a failed deploy stops before re-raising)
        return

    def shutdown_serve():
        with contextlib.suppress(Exception):
            serve.shutdown()

    t = threading.Thread(target=shutdown_serve, name="solm-serve-shutdown", daemon=True)
    t.start()
    t.join(2 * SHUTDOWN_S)
    ray.shutdown()


@contextlib.contextmanager
def ray_serving(artifact: str | os.PathLike, config: ServeConfig) -> Iterator[str]:
    """Serve ``artifact`` on ``config.replicas`` Ray Serve replicas for the ``with`` block; yields the base URL."""
    url = start(artifact, config)
    try:
        yield url
    finally:
        stop()


def serve_forever(artifact: str | os.PathLike, config: ServeConfig) -> None:
    """Serve until Ctrl-C (or SIGTERM), then shut Serve and Ray down: no Ray process outlives the command."""
    try:
        init_ray(config)
        signal.signal(signal.SIGTERM, _interrupt)     # after ray.init: Ray's own SIGTERM handler aborts, skipping stop()
        signal.signal(signal.SIGINT, _interrupt)      # even if started with SIGINT ignored (`cmd &` in a script, or a
        #                                               parent that ignores it): Python then installs no handler
        logging.getLogger("ray.serve").setLevel(logging.WARNING)     # the command prints its own lines
        url = deploy(artifact, config)
        print(f"solm serve: {config.replicas} replicas running; {url}/v1", flush=True)
        while True:
            time.sleep(1.0)
    finally:
        stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt
