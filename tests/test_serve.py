"""`solm serve` (issue 19, first slice): the official openai client against the server in this process, greedy
answers against SolmSession.generate (an independent reference), bad requests, a client that leaves mid-stream and
two streams at once. The tiny artifact and the server are session fixtures (conftest.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest

from serve_helpers import TIMEOUT_S, get, metric, post
from test_artifact import PROMPT

openai = pytest.importorskip("openai", reason="the test extra installs the openai client")
BUDGET = {"attn_keep": 0.5, "mlp_keep": 0.75, "bits": 8}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def reference(serve_artifact):
    from solm_compile.runtime.session import SolmSession

    return SolmSession(serve_artifact, threads=1)


def _model(client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_artifact(client, served):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny.portable"]
    status, text = get(served["url"] + "/health")
    assert status == 200 and '"status":"ok"' in text.replace(" ", "")


def test_completion_plain_and_streamed_equal_generate(client, reference):
    want = reference.generate(PROMPT, 12, (0.5, 0.75, 8), greedy=True, chat=False)
    r = client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body=BUDGET)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(PROMPT.split())
    per_token = r.model_extra["solm"]["per_token"]
    from solm_compile.analysis.token_cost import TokenCost

    usage = [sum(p["controls"][k] for p in per_token) / 12 for k in range(3)]        # the realised mean controls
    static = sum(TokenCost(reference.meta)(p["L"], usage) for p in per_token) / 12
    assert r.model_extra["solm"]["static_cost"] == pytest.approx(static, rel=1e-12)
    assert [p["token"] for p in per_token] == want.tokens
    assert [p["action"] for p in per_token] == want.actions
    chunks = list(client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, extra_body=BUDGET))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    streamed = [c.model_extra["solm"] for c in chunks if "token" in (c.model_extra.get("solm") or {})]
    assert [s["token_cost"] for s in streamed] == [p["token_cost"] for p in per_token]
    assert len({round(p["token_cost"], 9) for p in per_token}) > 1          # a random policy varies its compute
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_completion_uses_the_chat_template(client, reference):
    prompt = "w5 w17 w3"
    want = reference.generate(prompt, 8, (1.0, 1.0, 16), greedy=True, chat=True)
    r = client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": prompt}],
                                       max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    parts = list(client.chat.completions.create(model=_model(client), max_tokens=8, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": prompt}]))
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want.text


def test_seeded_sampling_equals_generate(client, reference):
    """temperature > 0 with a seed: the same draws as SolmSession.generate with that seed."""
    want = reference.generate(PROMPT, 10, (1.0, 1.0, 16), greedy=False, temperature=0.9, seed=11, chat=False)
    r = [client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=10, temperature=0.9, seed=11)
         for _ in range(2)]
    assert r[0].choices[0].text == r[1].choices[0].text == want.text


def test_chat_conversation_is_rendered_whole(client):
    """A system turn and a user turn go through the template together: the same answer as completing the text
    the template renders (CHAT_TEMPLATE: each content and a space, then the assistant cue "w1 w2")."""
    msgs = [{"role": "system", "content": "w9"}, {"role": "user", "content": "w5 w17"}]
    chat = client.chat.completions.create(model=_model(client), messages=msgs, max_tokens=6, temperature=0)
    plain = client.completions.create(model=_model(client), prompt="w9 w5 w17 w1 w2", max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == 5


def test_stop_string_cuts_the_answer(client, reference):
    full = reference.generate(PROMPT, 12, (1.0, 1.0, 16), greedy=True, chat=False).text
    stop = full.split()[3]
    r = client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[:full.index(stop)]


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": PROMPT, "max_tokens": "4"}, "max_tokens"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "attn_keep": 0.001}, "attn_keep"),
    ({"prompt": PROMPT, "mlp_keep": True}, "mlp_keep"),
    ({"prompt": PROMPT, "stop": 3}, "stop"),
    ({"prompt": PROMPT, "seed": -1}, "seed"),
    ({"prompt": PROMPT, "max_tokens": 600}, "max_tokens"),
    ({"prompt": list(range(5)) * 120, "max_tokens": 1}, "prompt"),
])
def test_bad_request_is_400_in_openai_shape(served, body, param):
    raw = isinstance(body, bytes)
    status, err = post(served["url"] + "/v1/completions", body, raw=raw)
    assert status == 400
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["param"] == param
    assert "\n" not in err["error"]["message"]
    status, ok = post(served["url"] + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    assert status == 200 and ok["usage"]["completion_tokens"] == 2             # the server is undisturbed


def test_chat_without_messages_and_unknown_model(served):
    status, err = post(served["url"] + "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})
    assert status == 400 and err["error"]["param"] == "messages[0]"
    status, err = post(served["url"] + "/v1/completions", {"model": "gpt-4", "prompt": PROMPT})
    assert status == 404 and err["error"]["code"] == "model_not_found"
    status, err = post(served["url"] + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "top_p": 0.5,
                                                          "presence_penalty": 1, "user": "u"})
    assert status == 200                                                       # unimplemented fields: ignored


def _wait_idle(url: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while metric(url, "solm_active_requests") or metric(url, "solm_queue_length"):
        assert time.monotonic() < deadline, "the server never freed the slot"
        time.sleep(0.05)


@contextlib.contextmanager
def _raw_stream(url: str, events: int, max_tokens: int = 480):
    """A streamed completion on a bare socket, open after ``events`` SSE events; closing it is the client leaving."""
    host, port = url.removeprefix("http://").split(":")
    body = b'{"prompt": "%s", "max_tokens": %d, "temperature": 0, "stream": true}' % (PROMPT.encode(), max_tokens)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: ") < events:
            data = s.recv(4096)
            assert data, "the stream ended early"
            got += data
        yield s


def test_client_leaving_mid_stream_frees_its_slot(served):
    url = served["url"]
    _wait_idle(url)
    cancelled = metric(url, 'solm_requests_total{outcome="cancelled"}')
    with _raw_stream(url, events=3):                                            # a few tokens in, then leave
        pass
    _wait_idle(url)
    assert metric(url, 'solm_requests_total{outcome="cancelled"}') == cancelled + 1
    assert metric(url, "solm_tokens_generated_total") > 0


def test_two_concurrent_streams_both_complete(client, reference):
    budgets = [(1.0, 1.0, 16), (0.5, 0.75, 8)]
    want = [reference.generate(PROMPT, 40, b, greedy=True, chat=False).text for b in budgets]
    got, first = [None, None], [None, None]

    def one(i):
        b = dict(zip(("attn_keep", "mlp_keep", "bits"), budgets[i]))
        text = ""
        for c in client.completions.create(model=_model(client), prompt=PROMPT, max_tokens=40, temperature=0,
                                           stream=True, extra_body=b):
            first[i] = first[i] or time.monotonic()
            text += c.choices[0].text
        got[i] = (text, time.monotonic())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert [g[0] for g in got] == want
    assert max(first) < min(g[1] for g in got)          # each started before the other finished: interleaved


def test_serve_command_refuses_in_one_line(capsys, tmp_path):
    from solm_compile.cli import app as cli

    assert cli.main(["serve", str(tmp_path / "missing.onnx")]) == 2
    assert cli.main(["serve", str(tmp_path / "missing.onnx"), "--port", "70000"]) == 2
    assert cli.main(["serve", str(tmp_path / "missing.onnx"), "--max-active", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"solm: error: {tmp_path / 'missing.onnx'}: no such artifact",
                   "solm: error: --port must be in [0, 65535], got 70000",
                   "solm: error: --max-active must be >= 1, got 0"]


def test_stop_text_never_releases_a_stop_string():
    from solm_compile.serve.scheduler import StopText

    pieces = ["Hel", "lo, wo", "rld. E", "ND here"]
    text = StopText(lambda ids: "".join(pieces[i] for i in ids), ("END", "wox"))
    out = [text.push(i) for i in range(4)]
    assert out == [("Hel", False), ("lo, ", False), ("world. ", False), ("", True)]   # "wo" held, then released
    assert text.finish() == ""
    text = StopText(lambda ids: "".join(pieces[i] for i in ids), ("E",))
    assert [text.push(i) for i in range(2)] == [("Hel", False), ("lo, wo", False)] and text.finish() == ""
    text = StopText(lambda ids: "".join(pieces[i] for i in ids), ("rlx",))
    assert "".join(text.push(i)[0] for i in range(2)) + text.finish() == "Hello, wo"


def test_full_server_says_503_and_a_slow_request_times_out(serve_artifact):
    """One slot, no queue: a second request while a long stream runs gets 503 (overloaded); a request longer than
    the timeout ends with 408. A server of its own, so the shared one is not disturbed."""
    from solm_compile.runtime.session import SolmSession
    from solm_compile.serve import ServeConfig, background, create_app

    sess = SolmSession(serve_artifact, threads=1)
    with background(create_app(sess, ServeConfig(context=512, max_active=1, max_queue=0))) as url:
        with _raw_stream(url, events=1):                                        # streaming: the slot is taken
            status, err = post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
            assert status == 503 and err["error"]["code"] == "overloaded"
        _wait_idle(url)
    with background(create_app(sess, ServeConfig(context=512, timeout_s=0.2))) as url:
        status, err = post(url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 480, "temperature": 0})
        assert status == 408 and err["error"]["code"] == "timeout"
        assert metric(url, 'solm_requests_total{outcome="error"}') == 1


def test_solm_cli_does_not_need_the_serve_extra():
    """`solm run` and friends import nothing of FastAPI/uvicorn: they are the serve extra's, loaded by `solm serve`."""
    import subprocess
    import sys

    code = ("import sys, solm_compile.cli.app, solm_compile.serve; "
            "assert not {'fastapi', 'uvicorn', 'starlette'} & set(sys.modules), sorted(sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
