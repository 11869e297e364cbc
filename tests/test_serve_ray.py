"""`solm serve --replicas 2` (issue 19, scale-out): the command starts a local Ray and 2 Ray Serve replicas of the
same app behind Ray's HTTP proxy on loopback; concurrent requests from the official openai client answer exactly
what SolmSession.generate gives (greedy, dense budget), both replicas serve, and Ctrl-C stops everything.

One Ray start for the module (the slow part, ~25 s here): the command runs in a subprocess, as a user runs it.
Ray is in the test extra, so it is imported, never skipped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import ray  # noqa: F401  (the test extra installs ray[serve]; a missing one fails here, not a skip)

from serve_helpers import TIMEOUT_S, get
from test_artifact import PROMPT

REPLICAS = 2
MAX_ACTIVE = 2                   # per replica: Ray sends a replica at most this many requests at once
START_TIMEOUT_S = 150.0
STOP_TIMEOUT_S = 60.0
PROMPTS = [" ".join(PROMPT.split()[:k]) for k in range(3, 11)]        # 8 distinct prompts
MAX_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"solm serve --replicas exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if get(url + "/health")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"solm serve --replicas did not answer within {START_TIMEOUT_S:g} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def replicated(serve_artifact, tmp_path_factory):
    """`solm serve ARTIFACT --replicas 2` on a free loopback port (1 onnxruntime thread, so 1 Ray CPU, per replica):
    {url, proc, log}. Interrupted (SIGINT, as Ctrl-C) at the end if a test did not already."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    cmd = [sys.executable, "-m", "solm_compile", "serve", str(serve_artifact), "--replicas", str(REPLICAS),
           "--threads", "1", "--port", str(port), "--context", "512", "--max-active", str(MAX_ACTIVE),
           "--max-queue", "16", "--timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url, log)
        yield {"url": url, "proc": proc, "log": log, "port": port}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def reference(serve_artifact):
    from solm_compile.runtime.session import SolmSession

    return SolmSession(serve_artifact, threads=1)


def _complete(client, prompt: str):
    raw = client.completions.with_raw_response.create(model="tiny.portable", prompt=prompt, max_tokens=MAX_TOKENS,
                                                      temperature=0)
    return raw.headers.get("x-solm-replica"), raw.parse()


def test_two_replicas_answer_like_one_session(replicated, reference):
    """8 concurrent greedy completions through Ray's proxy equal SolmSession.generate's, token for token, and both
    replicas answered some (a replica takes at most MAX_ACTIVE at once, so 8 at once cannot all go to one; up to 3
    rounds in case a round's requests happen not to overlap)."""
    client = openai.OpenAI(base_url=replicated["url"] + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    want = {p: reference.generate(p, MAX_TOKENS, (1.0, 1.0, 16), greedy=True, chat=False) for p in PROMPTS}
    seen = set()
    for _ in range(3):
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: _complete(client, p), PROMPTS))
        for prompt, (replica, r) in zip(PROMPTS, answers):
            assert r.choices[0].text == want[prompt].text, prompt
            assert [t["token"] for t in r.model_extra["solm"]["per_token"]] == want[prompt].tokens, prompt
            assert replica, "an answer without x-solm-replica"
            seen.add(replica)
        if len(seen) == REPLICAS:
            break
    assert len(seen) == REPLICAS, f"answers came from {sorted(seen)} only"


def test_streamed_through_the_proxy(replicated, reference):
    client = openai.OpenAI(base_url=replicated["url"] + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    want = reference.generate(PROMPT, MAX_TOKENS, (1.0, 1.0, 16), greedy=True, chat=False)
    chunks = list(client.completions.create(model="tiny.portable", prompt=PROMPT, max_tokens=MAX_TOKENS,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_serve_load_through_the_proxy(replicated, serve_artifact, capsys, monkeypatch):
    """The load test's --url mode against the replicas: every request completes without error and names the
    replica that answered. Prompts are token ids of the tiny vocabulary (the held-out novel is a fetched asset)."""
    from solm_compile.bench import serve_load

    rng = np.random.default_rng(0)
    monkeypatch.setattr(serve_load, "prompts", lambda sess, n, lo, hi, seed: [
        rng.integers(1, 160, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)])
    assert serve_load.main([str(serve_artifact), "--url", replicated["url"], "--clients", "4", "--requests", "2",
                            "--max-tokens", "8", "--prompt-min", "16", "--prompt-max", "48", "--keep", "",
                            "--max-wall", "60"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["budget"], r["completed"], r["requests"], r["errors"]) for r in rows] == [("dense", 8, 8, [])]
    assert rows[0]["replicas_seen"] >= 1


def descendants(pid: int) -> set[int]:
    """Every live process under ``pid`` (Linux /proc): Ray's GCS, raylet, agents, controller, proxy and replicas."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_ray_and_the_proxy(replicated):
    """SIGINT (Ctrl-C) ends the command with 130 within STOP_TIMEOUT_S, the proxy's port stops answering and none
    of the processes Ray started under it (at least GCS, raylet, controller, proxy, 2 replicas) is left."""
    proc = replicated["proc"]
    ray_processes = descendants(proc.pid)
    assert len(ray_processes) >= 6, ray_processes
    proc.send_signal(signal.SIGINT)
    assert proc.wait(STOP_TIMEOUT_S) == 130, replicated["log"].read_text()[-2000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", replicated["port"]), timeout=2).close()
    deadline = time.monotonic() + 10.0
    while any(map(alive, ray_processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in ray_processes if alive(pid)]
    assert not left, [Path(f"/proc/{pid}/cmdline").read_bytes()[:80] for pid in left]


def test_replicas_zero_is_one_line(serve_artifact, capsys):
    from solm_compile.cli import main

    assert main(["serve", str(serve_artifact), "--replicas", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "solm: error: --replicas must be >= 1, got 0"


def test_missing_ray_is_one_line(serve_artifact, capsys, monkeypatch):
    from solm_compile.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)                       # import ray -> ImportError
    monkeypatch.delitem(sys.modules, "solm_compile.serve.ray_serve", raising=False)
    assert main(["serve", str(serve_artifact), "--replicas", "2", "--port", "8123"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--replicas" in err and "ray is missing" in err and "solm-compile[ray]" in err
