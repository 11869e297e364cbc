"""One worker thread that steps every active request in one batched run per token (continuous batching).

The requests share one ``SolmSession.batch`` (``runtime/batch.py``) of ``rows`` slots: a waiting request joins at the
next step (its own dense prefill into a free slot), every running request advances by one token in the same
onnxruntime run, and a request leaves (its slot free for the next) when it stops, its client disconnects or it runs
past the timeout. A protocol-2 artifact (solm, fixed) runs all rows in one run at their own lengths; a protocol-1
one (portable, dense) steps them one after another behind the same interface.

**Admission control.** The slots are the KV memory: ``rows`` is ``max_active``, or fewer when ``kv_budget_mb`` holds
fewer rows of ``context`` positions (``KvCache.row_bytes``). A request beyond them waits; beyond ``max_queue``
waiting it gets 503. A buffer artifact's batch allocates its rows once, so memory never grows past the budget.

A request's events go to its asyncio queue on the server's event loop: ``("token", record)`` per generated token,
then ``("done", finish_reason, tail_text)`` or ``("error", ApiError)``. Cancelling a request (its client went away)
frees its slot at the worker's next step. Every wait is bounded: the worker wakes at least every ``IDLE_S``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

import numpy as np

from solm_compile.analysis import shade
from solm_compile.analysis.token_cost import TokenCost, scale_floor
from solm_compile.errors import UserError
from solm_compile.runtime.session import pick_tokens
from solm_compile.serve.metrics import Metrics
from solm_compile.serve.protocol import ApiError, GenRequest

log = logging.getLogger(__name__)
IDLE_S = 0.25
MIB = 1 << 20


def batch_rows(sess, max_active: int, context: int, kv_budget_mb: float | None) -> int:
    """The slots a server keeps: ``max_active``, or as many rows of ``context`` positions as ``kv_budget_mb`` holds."""
    if kv_budget_mb is None:
        return max_active
    per_row = sess.kv.row_bytes(context)
    fit = int(kv_budget_mb * MIB // per_row)
    if fit < 1:
        raise UserError(f"--kv-budget {kv_budget_mb:g} MiB holds no request: one row of --context {context} "
                        f"needs {per_row / MIB:.2f} MiB")
    return min(max_active, fit)


class StopText:
    """The answer's text as tokens arrive, cut at the first stop string. Text that could still be the start of a
    stop string is held back until it cannot (or until the end), so a streamed answer never shows a stop string."""

    def __init__(self, decode, stops: tuple[str, ...]):
        self.inc, self.stops = shade.IncrementalText(decode), stops
        self.full, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> tuple[str, bool]:
        """(text this token releases, whether a stop string has now appeared)."""
        self.full += self.inc.push(token)
        hits = [i for i in (self.full.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:                               # released text never holds a stop's start, so it begins >= sent
            self.full, self.stopped = self.full[:min(hits)], True
            return self._release(len(self.full)), True
        held = max((k for s in self.stops for k in range(1, len(s)) if self.full.endswith(s[:k])), default=0)
        return self._release(len(self.full) - held), False

    def finish(self) -> str:
        """Whatever is still held at the end (a cut UTF-8 character, the start of a stop string never completed)."""
        if not self.stopped:
            self.full += self.inc.flush()
        return self._release(len(self.full))

    def _release(self, upto: int) -> str:
        out, self.sent = self.full[self.sent:upto], max(upto, self.sent)
        return out


class Job:
    """One request as the worker sees it; ``events`` lives on the server's event loop."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop, deadline: float):
        self.req, self.loop, self.deadline = req, loop, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.text = self.rng = self.slot = self.logits = None
        self.n = 0
        self.lo = None

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:          # the loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class Scheduler:
    """Continuous batching of up to ``rows`` requests on one ``SolmSession``; up to ``max_queue`` more wait."""

    def __init__(self, sess, max_active: int, max_queue: int, timeout_s: float, metrics: Metrics | None = None,
                 context: int = 2048, kv_budget_mb: float | None = None):
        self.sess, self.max_queue, self.timeout_s = sess, max_queue, timeout_s
        self.rows = self.max_active = batch_rows(sess, max_active, context, kv_budget_mb)
        self.batch = sess.batch(self.rows, context)
        page = int(sess.meta.get("gate", {}).get("page_size", 1))
        if sess.kv.paged and sess.prefill_chunk % page:
            raise UserError(f"--prefill-chunk {sess.prefill_chunk} is not a multiple of {sess.path.name}'s page size "
                            f"{page}: every joining prompt would be prefilled in one run")
        self.metrics = metrics or Metrics()
        self.eos = set(sess.meta.get("eos_token_ids") or [])
        try:
            self.cost = TokenCost(sess.meta, str(sess.path))
        except UserError:                      # compiled before artifacts carried cost shapes: no per-token cost
            self.cost = None
        self.pending: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []
        self.cv = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="solm-serve-scheduler", daemon=True)

    # ------------------------------------------------------------------------------------------ server side
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(req, loop, time.monotonic() + self.timeout_s)
        with self.cv:
            if self.closing:
                raise ApiError("the server is shutting down", status=503, type="server_error", code="shutting_down")
            if len(self.active) >= self.rows and len(self.pending) >= self.max_queue:
                raise ApiError(f"the server is busy ({len(self.active)} requests running, {len(self.pending)} "
                               "waiting); try again later", status=503, type="server_error", code="overloaded")
            self.pending.append(job)
            self._gauges()
            self.cv.notify()
        return job

    def close(self, timeout_s: float = 10.0) -> None:
        """Refuse new requests, end the running ones with an error event, stop the worker."""
        with self.cv:
            self.closing = True
            self.cv.notify()
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def counts(self) -> tuple[int, int]:
        """(active, waiting)."""
        with self.cv:
            return len(self.active), len(self.pending)

    def _gauges(self) -> None:               # under self.cv
        self.metrics.set_gauges(active=len(self.active), queued=len(self.pending))

    # ------------------------------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while True:
            with self.cv:
                if self.closing:
                    for job in [*self.active, *self.pending]:
                        self._end(job, "error", ApiError("the server is shutting down", status=503,
                                                          type="server_error", code="shutting_down"))
                    self.pending.clear()
                    self._gauges()
                    return
                self._drop_cancelled()
                joining = []
                while self.pending and len(self.active) + len(joining) < self.rows:
                    joining.append(self.pending.popleft())
                if not self.active and not joining:
                    self.cv.wait(IDLE_S)
                    continue
            for job in joining:                # each takes a free slot; its prompt is prefilled a run at a time
                self._join(job)
            self._advance()
            self._step()

    def _drop_cancelled(self) -> None:       # under self.cv
        for job in [j for j in self.pending if j.cancelled.is_set()]:
            self.pending.remove(job)
            self.metrics.count_request("cancelled")
        self._gauges()

    def _join(self, job: Job) -> None:
        req = job.req
        if job.cancelled.is_set():
            self.metrics.count_request("cancelled")
            return
        try:
            job.rng = np.random.default_rng(req.seed)
            job.text = StopText(self.sess.tokenizer.decode, req.stop)
            if self.cost is not None:
                job.lo = scale_floor(self.cost.floor(len(req.prompt_ids) + req.max_tokens, req.budget))
            job.slot = self.batch.begin(list(req.prompt_ids), req.budget)     # prefilled by _advance
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            log.exception("prefill failed")
            self._end(job, "error", ApiError(f"generation failed: {type(e).__name__}: {str(e)[:200]}", status=500,
                                             type="server_error", code="internal_error"))
            return
        self.metrics.count_admitted(req)
        with self.cv:
            self.active.append(job)
            self._gauges()

    def _advance(self) -> None:
        """One prefill run (``sess.prefill_chunk`` tokens) of the oldest request still prefilling, between two steps
        of the others: a long prompt delays the running requests' next token by one run, not by its whole prefill."""
        job = next((j for j in self.active if j.logits is None and not j.cancelled.is_set()), None)
        if job is None:
            return
        t0 = time.perf_counter()
        try:
            job.logits = self.batch.advance(job.slot)                      # None until its last run
        except Exception as e:  # noqa: BLE001 - one request's failure must not stop the others
            log.exception("prefill failed")
            self._end(job, "error", ApiError(f"generation failed: {type(e).__name__}: {str(e)[:200]}", status=500,
                                             type="server_error", code="internal_error"))
            return
        self.metrics.add_step_time(time.perf_counter() - t0)

    def _step(self) -> None:
        """One token of every active request in one batched run; ends those that stop, left or timed out."""
        tokens, stepped = {}, []
        for job in list(self.active):
            if job.cancelled.is_set():
                self._release(job)
                self.metrics.count_request("cancelled")
                continue
            if time.monotonic() > job.deadline:
                self._end(job, "error", ApiError(f"the request ran past this server's timeout of "
                                                 f"{self.timeout_s:g} s", status=408, type="timeout", code="timeout"))
                continue
            if job.logits is None:             # still prefilling (_advance)
                continue
            req = job.req
            tok = int(pick_tokens(job.logits[None], job.rng, greedy=req.greedy, temperature=req.temperature)[0])
            if tok in self.eos:                # the answer ended (as SolmSession.generate: the EOS is not shown)
                self._end(job, "done", "stop")
                continue
            tokens[job.slot] = tok
            stepped.append(job)
        if not tokens:
            return
        t0 = time.perf_counter()
        try:
            out = self.batch.step(tokens)
        except Exception as e:  # noqa: BLE001 - the run failed for every row in it; the server goes on
            log.exception("step failed")
            for job in stepped:
                self._end(job, "error", ApiError(f"generation failed: {type(e).__name__}: {str(e)[:200]}",
                                                 status=500, type="server_error", code="internal_error"))
            return
        self.metrics.add_step_time(time.perf_counter() - t0)
        for job in stepped:
            row = out[job.slot]
            job.logits = row["logits"]
            self._token(job, tokens[job.slot], row)

    def _token(self, job: Job, tok: int, step: dict) -> None:
        job.n += 1
        L = len(job.req.prompt_ids) + job.n   # the KV length of the step that read this token (as run --show)
        controls = None if step["controls"] is None else [float(c) for c in step["controls"]]
        action = step["action"]
        cost = None if self.cost is None else self.cost(L, controls)
        text, stopped = job.text.push(tok)
        rec = {"token": tok, "text": text, "token_cost": cost, "controls": controls, "action": action, "L": L}
        if cost is not None:
            rgb = shade.colour(cost, job.lo, 1.0)
            rec.update(colour=shade.hex_colour(rgb), ink=shade.hex_colour(shade.foreground(rgb)), scale=[job.lo, 1.0])
        self.metrics.count_token(cost)
        job.emit("token", rec)
        if stopped:
            self._end(job, "done", "stop")
        elif job.n >= job.req.max_tokens:
            self._end(job, "done", "length")

    def _end(self, job: Job, kind: str, what) -> None:
        """The request's last event; counted first, so a client that reads /metrics after its answer sees it."""
        self._release(job)
        self.metrics.count_request("ok" if kind == "done" else "error")
        if kind == "done":
            job.emit("done", what, job.text.finish() if job.text is not None else "")
        else:
            job.emit("error", what)

    def _release(self, job: Job) -> None:
        """Free the job's slot (worker thread only) and take it off the active list."""
        if job.slot is not None:
            self.batch.leave(job.slot)
            job.slot = None
        with self.cv:
            if job in self.active:
                self.active.remove(job)
            self._gauges()
