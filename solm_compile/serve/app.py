"""The FastAPI application of ``solm serve``: OpenAI-style completions over one ``SolmSession``, the web page at
``/``, ``/health`` and ``/metrics``.

Every request is checked in full (``protocol.parse_request``) before it reaches the scheduler, so a bad one costs
the others nothing; every error answers in OpenAI's error shape. A streamed answer is server-sent events of
OpenAI chunks, each token's chunk carrying a ``solm`` object (token id, controls, action, compute fraction and its
colour on shade.py's scale) that OpenAI clients ignore.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from solm_compile.analysis import shade
from solm_compile.serve import protocol
from solm_compile.serve.config import ServeConfig
from solm_compile.serve.metrics import Metrics
from solm_compile.serve.protocol import ApiError
from solm_compile.serve.scheduler import Job, Scheduler

POLL_S = 1.0                     # how often a waiting non-streamed request checks that its client is still there
PAGE_CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def static_dir() -> Path:
    return Path(str(resources.files("solm_compile.serve") / "static"))


def model_name(sess, config: ServeConfig) -> str:
    return config.model_name or Path(sess.path).name.removesuffix(".onnx")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(sess, config: ServeConfig = ServeConfig()) -> FastAPI:
    """The application over an open ``SolmSession``; its scheduler starts and stops with the app's lifespan."""
    metrics = Metrics()
    sched = Scheduler(sess, config.max_active, config.max_queue, config.timeout_s, metrics, context=config.context,
                      kv_budget_mb=config.kv_budget_mb)
    name = model_name(sess, config)
    created = int(Path(sess.path).stat().st_mtime)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        sched.start()
        try:
            yield
        finally:
            sched.close()

    app = FastAPI(title="solm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.config = sched, metrics, config

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error_response(ApiError(str(exc.detail), status=exc.status_code,
                                       code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        if exc.status < 500:
            metrics.count_request("rejected")
        return error_response(exc)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_entry()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != name:
            raise ApiError(f"no model '{model_id}' here (this server serves '{name}')", param="model",
                           code="model_not_found", status=404)
        return model_entry()

    def model_entry() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "solm",
                "solm": {"kind": sess.kind, "chat": bool(sess.meta.get("chat_template")),
                         "budget_ranges": sess.meta.get("budget_ranges"),
                         "budget_defaults": dict(zip(protocol.BUDGET_FIELDS, protocol.BUDGET_DEFAULTS)),
                         "context": config.context, "palette": [shade.hex_colour(c) for c in shade.VIRIDIS]}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def generate(request: Request, chat: bool):
        body = protocol.load_body(await request.body(), config.max_body)
        if "model" in body and body["model"] != name:
            raise ApiError(f"no model {json.dumps(body['model'])[:60]} here (this server serves '{name}')",
                           param="model", code="model_not_found", status=404)
        req = protocol.parse_request(body, sess, config.context, chat)
        job = sched.submit(req, asyncio.get_running_loop())
        rid = protocol.new_id(chat)
        if req.stream:
            return StreamingResponse(stream(job, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await whole(job, rid, chat, request)
        finally:
            job.cancel()                       # no-op when it finished; frees the slot when the client left

    async def next_event(job: Job, wait_s: float):
        left = job.deadline - time.monotonic() + 5.0       # the worker ends it at the deadline; this is a backstop
        try:
            return await asyncio.wait_for(job.events.get(), timeout=max(0.01, min(wait_s, left)))
        except asyncio.TimeoutError:
            if time.monotonic() > job.deadline + 5.0:
                return ("error", ApiError("the request timed out", status=408, type="timeout", code="timeout"))
            return None

    async def whole(job: Job, rid: str, chat: bool, request: Request):
        records, text = [], ""
        while True:
            ev = await next_event(job, POLL_S)
            if ev is None:
                if await request.is_disconnected():
                    return PlainTextResponse("", status_code=499)
                continue
            if ev[0] == "error":
                return error_response(ev[1])
            if ev[0] == "token":
                text += ev[1]["text"]
                records.append(solm_record(ev[1]))
                continue
            _, finish, tail = ev
            return protocol.completion(rid, name, chat, text + tail, finish, len(job.req.prompt_ids), records,
                                       summary(records, sched.cost))

    async def stream(job: Job, rid: str, chat: bool):
        records = []
        try:
            if chat:
                yield sse(protocol.chunk(rid, name, chat, "", first=True))
            while True:
                ev = await next_event(job, 3600.0)
                if ev is None:
                    continue
                if ev[0] == "error":
                    yield sse(ev[1].body())
                    return
                if ev[0] == "token":
                    records.append(solm_record(ev[1]))
                    yield sse(protocol.chunk(rid, name, chat, ev[1]["text"], solm=records[-1]))
                    continue
                _, finish, tail = ev
                yield sse(protocol.chunk(rid, name, chat, tail, finish=finish,
                                         solm={**summary(records, sched.cost),
                                               "usage": protocol.usage(len(job.req.prompt_ids), len(records))}))
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel()                       # the client went away (or the stream ended): free the slot

    @app.get("/health")
    async def health():
        active, queued = sched.counts()
        return {"status": "ok" if sched.thread.is_alive() else "stopped", "model": name, "active": active,
                "queued": queued}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        html = (static_dir() / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP})

    app.mount("/static", StaticFiles(directory=static_dir()), name="static")
    return app


def solm_record(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "text"}


def summary(records: list, cost) -> dict:
    """Mean compute per token, the colour scale, and ``static_cost``: what the same tokens would have cost with the
    realised mean controls applied to every one of them (a static allocation at the same usage), by the same
    ``TokenCost``; None where the artifact reports no controls or no costs."""
    costs = [r["token_cost"] for r in records if r.get("token_cost") is not None]
    controlled = [r for r in records if r.get("controls") is not None]
    static = None
    if cost is not None and controlled and len(controlled) == len(records):
        usage = [sum(r["controls"][k] for r in records) / len(records) for k in range(3)]
        static = sum(cost(r["L"], usage) for r in records) / len(records)
    return {"mean_cost": sum(costs) / len(costs) if costs else None, "static_cost": static,
            "scale": records[0].get("scale") if records else None}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
