"""The OpenAI-style request and response shapes of ``solm serve``: parse and check a request body, build
completion objects and stream chunks, and the error body.

A request is checked completely before it is queued: every mistake is an :class:`ApiError` (HTTP 400 unless said
otherwise) with OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``. OpenAI fields solm does
not implement are accepted and ignored (``IGNORED``; docs/serve.md lists them).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from solm_compile.errors import UserError

BUDGET_FIELDS = ("attn_keep", "mlp_keep", "bits")
BUDGET_DEFAULTS = (1.0, 1.0, 16.0)            # solm run's --attn-keep / --mlp-keep / --bits defaults
COMPLETION_MAX_TOKENS = 16                    # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 256                         # (OpenAI's chat default is "up to the context"; bounded here)
MAX_STOPS = 4
ROLES = ("system", "user", "assistant")
IGNORED = ("top_p", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "user",
           "suffix", "echo", "best_of", "stream_options", "response_format", "tools", "tool_choice",
           "parallel_tool_calls", "service_tier", "store", "metadata", "modalities", "reasoning_effort")


class ApiError(Exception):
    """A request solm refuses: ``status`` with OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenRequest:
    """One checked request: prompt token ids, sampling, stop strings and the budget (attn_keep, mlp_keep, bits)."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    stop: tuple[str, ...]
    seed: int | None
    budget: tuple[float, float, float]
    stream: bool
    chat: bool

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def load_body(raw: bytes, max_body: int) -> dict:
    if len(raw) > max_body:
        raise ApiError(f"request body is {len(raw)} bytes, more than the {max_body} this server accepts")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"request body is not valid JSON ({str(e).splitlines()[0][:120]})") from e
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    return body


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(f"'{name}' must be a number, got {json.dumps(v)[:40]}", param=name)
    if not lo <= v <= hi:
        raise ApiError(f"'{name}' must be in [{lo:g}, {hi:g}], got {v}", param=name)
    return float(v)


def _integer(body: dict, name: str, default, lo: int, hi: int):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{name}' must be an integer, got {json.dumps(v)[:40]}", param=name)
    if not lo <= v <= hi:
        raise ApiError(f"'{name}' must be in [{lo}, {hi}], got {v}", param=name)
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ApiError(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    return tuple(stops)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ApiError(f"messages[{i}] must be an object with 'role' in {', '.join(ROLES)} and a string "
                           "'content'", param=f"messages[{i}]")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt_ids(body: dict, sess) -> list[int]:
    v = body.get("prompt")
    if v is None:
        raise ApiError("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if isinstance(v, str):
        return sess.prompt_ids(v, chat=False)
    vocab = int(sess.meta["vocab_size"])
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in v):
        return list(v)                               # token ids
    raise ApiError("'prompt' must be a string (one prompt per request) or a list of token ids", param="prompt")


def parse_request(body: dict, sess, context: int, chat: bool) -> GenRequest:
    """Check ``body`` of /v1/completions (``chat`` False) or /v1/chat/completions against the session ``sess``."""
    if chat:
        if not sess.meta.get("chat_template"):
            raise ApiError("this artifact has no chat template: use /v1/completions", param="messages")
        msgs = _messages(body)
        text = (sess.chat_prompt(msgs[0]["content"]) if len(msgs) == 1 and msgs[0]["role"] == "user"
                else sess.chat_prompt(None, messages=msgs))
        ids = sess.tokenizer.encode(text, add_special_tokens=False).ids   # the template writes its own <bos>
    else:
        ids = _prompt_ids(body, sess)
    if not ids:
        raise ApiError("the prompt is empty (no tokens)", param="messages" if chat else "prompt")
    if len(ids) >= context:
        raise ApiError(f"the prompt is {len(ids)} tokens; this server's context is {context}",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    room = context - len(ids)
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, min(CHAT_MAX_TOKENS if chat else COMPLETION_MAX_TOKENS, room), 1, 1 << 20)
    if max_tokens > room:
        raise ApiError(f"the prompt is {len(ids)} tokens and {name} {max_tokens} would run past this server's "
                       f"context of {context}", param=name, code="context_length_exceeded")
    if _integer(body, "n", 1, 1, 1 << 10) != 1:
        raise ApiError("'n' must be 1: one answer per request", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be true or false", param="stream")
    budget = tuple(_number(body, f, d, 0.0, 16.0 if f == "bits" else 1.0) for f, d in zip(BUDGET_FIELDS,
                                                                                        BUDGET_DEFAULTS))
    if sess.kind != "dense":
        try:
            sess.check_budget(budget)
        except UserError as e:                        # "--attn-keep 0.01 is outside this artifact's range ..."
            flag = str(e).split()[0]
            raise ApiError(str(e).replace(flag, flag.lstrip("-").replace("-", "_"), 1),
                           param=flag.lstrip("-").replace("-", "_")) from e
    return GenRequest(prompt_ids=tuple(ids), max_tokens=max_tokens,
                      temperature=_number(body, "temperature", 1.0, 0.0, 2.0), stop=_stops(body),
                      seed=_integer(body, "seed", None, 0, (1 << 63) - 1), budget=budget, stream=stream,
                      chat=chat)


# ---------------------------------------------------------------------------------------------- responses
def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def chunk(rid: str, model: str, chat: bool, text: str, finish: str | None = None, solm: dict | None = None,
          first: bool = False) -> dict:
    """One streamed event: ``text_completion`` or ``chat.completion.chunk``, ``solm`` riding along."""
    if chat:
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text or not finish else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
           "model": model, "choices": [choice]}
    if solm is not None:
        out["solm"] = solm
    return out


def completion(rid: str, model: str, chat: bool, text: str, finish: str, n_prompt: int, records: list,
               summary: dict) -> dict:
    """The whole answer of a request that did not stream; ``solm.per_token`` holds each token's record."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(n_prompt, len(records)),
            "solm": {**summary, "per_token": records}}
