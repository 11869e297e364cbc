"""What the `solm serve` tests share: the tiny artifact, the server's settings and small HTTP helpers (stdlib
urllib, loopback only, every call with a timeout)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

from solm_compile.serve import ServeConfig

SERVE_CONFIG = ServeConfig(context=512, max_active=4, max_queue=8, timeout_s=60.0)
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w1 w2{% endif %}")
TIMEOUT_S = 30


def build_artifact(d, tiny_llama):
    from test_artifact import word_tokenizer
    from tiny_lm import random_policy_file
    from solm_compile.artifact.write import write_artifact
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy import checkpoint

    tok = word_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    loaded = models._from_hf(tiny_llama, tok, name="tiny", source="<test>")
    lm = GatedLM.from_loaded(loaded)
    pf = random_policy_file(d / "p.pt", checkpoint.model_identity(lm.info), lm.gate)
    lp = checkpoint.load_policy(pf, lm.info)
    return write_artifact(lm, d / "tiny.portable.onnx", "portable", lp, tokenizer=loaded.tokenizer)


def post(url: str, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
        return r.status, r.read().decode()


def metric(url: str, name: str) -> float:
    """One sample of /metrics, e.g. ``solm_active_requests`` or ``solm_requests_total{outcome="ok"}``."""
    _, text = get(url + "/metrics")
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))
