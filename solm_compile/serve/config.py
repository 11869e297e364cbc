"""``solm serve``'s settings: one frozen dataclass, validated where it is built (CLI flags and the Python API share
these defaults)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from solm_compile.errors import UserError

LOOPBACK = "127.0.0.1"


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise UserError(msg)


@dataclass(frozen=True)
class ServeConfig:
    """``host``/``port``: where to listen (loopback unless told otherwise; the server has no authentication).
    ``threads``: onnxruntime intra-op threads (None: its default). ``context``: tokens of prompt plus answer one
    request may use (the artifact does not record its model's own limit). ``max_active``: requests batched together
    by the scheduler (one row each); up to ``max_queue`` more wait for a slot, beyond that a request gets 503.
    ``kv_budget_mb``: MiB of KV cache the rows may take (None: no limit); fewer rows than ``max_active`` when a row
    of ``context`` positions does not fit that often. ``timeout_s``: a request still running after this long is
    ended. ``max_body``: bytes of request JSON accepted. ``replicas``: None serves from this process (uvicorn);
    N runs N replicas of the same app as a Ray Serve deployment on a local Ray (``ray_serve.py``), each with its
    own session, scheduler and KV budget. ``prefill_chunk``: tokens per prefill run of a joining prompt (the
    scheduler steps the running requests between runs, so a smaller chunk bounds the gap a join puts between their
    tokens, at the joining request's time to first token; a multiple of the artifact's page size; 0: one run).
    ``spin``: onnxruntime's intra-op threads spin between parallel regions instead of sleeping (a machine of the
    server's own: −15–20 % per decode step on two threads; an idle spinning thread takes a core other processes
    need)."""

    host: str = LOOPBACK
    port: int = 8000
    threads: int | None = None
    context: int = 2048
    max_active: int = 8
    max_queue: int = 64
    kv_budget_mb: float | None = None
    timeout_s: float = 300.0
    max_body: int = 1_000_000
    model_name: str | None = None
    replicas: int | None = None
    prefill_chunk: int = 128
    spin: bool = False

    @property
    def session_options(self) -> dict:
        """SolmSession's keyword arguments for this server (the CLI, the Ray replicas and the load test share them)."""
        return {"threads": self.threads, "prefill_chunk": self.prefill_chunk, "spin": self.spin}

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}")
        _check(self.threads is None or self.threads >= 1, f"--threads must be >= 1, got {self.threads}")
        _check(self.context >= 2, f"--context must be >= 2, got {self.context}")
        _check(self.max_active >= 1, f"--max-active must be >= 1, got {self.max_active}")
        _check(self.max_queue >= 0, f"--max-queue must be >= 0, got {self.max_queue}")
        _check(self.kv_budget_mb is None or self.kv_budget_mb > 0,
               f"--kv-budget must be > 0 MiB, got {self.kv_budget_mb}")
        _check(self.timeout_s > 0, f"--timeout must be > 0 seconds, got {self.timeout_s}")
        _check(self.max_body >= 1024, f"max_body must be >= 1024 bytes, got {self.max_body}")
        _check(self.prefill_chunk == 0 or self.prefill_chunk >= 2,
               f"--prefill-chunk must be 0 (one run) or >= 2 tokens, got {self.prefill_chunk}")
        _check(self.replicas is None or self.replicas >= 1, f"--replicas must be >= 1, got {self.replicas}")
        _check(self.replicas is None or self.port != 0,
               "--port 0 (any free port) does not work with --replicas: Ray's proxy needs a fixed port")
        _check(bool(self.host) and " " not in self.host, f"--host must be an address or a name, got {self.host!r}")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
