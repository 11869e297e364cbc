"""Threads (issue 15): the torch.compile path's C weight handles outlive every call using them, and SolmEP runs
concurrent Run() calls of one shared onnxruntime session correctly, each call in its own buffers.

``fast_c``: ctypes drops the GIL inside ``solm_mlp_run``, so another thread may reset the cache, modify a weight in
place or drop the last reference to a weight while the call reads the C copy of the weights; the copy is freed
only by the last reference (the cache's, or a call's).

SolmEP: a node's kernel object is shared by every Run() of its session; a Compute takes its scratch from the
node's pool (``CallPool`` in runtime/ep/ort_kernels.h) instead of one buffer set guarded by a per-node mutex.
"""

import os
import threading
import time

import numpy as np
import pytest
import torch

from solm_compile.ops import fast_c
from solm_compile.runtime import ep
from require import need_ep

THREADS = 4


@pytest.fixture(scope="module")
def c_lib():
    lib = fast_c._load(ep.library_path()) if ep.library_path() is not None else None
    if lib is None:
        if os.environ.get("SOLM_REQUIRE_EP"):
            pytest.fail("SolmEP's C API library is not available")
        pytest.skip("no C API library")
    return lib


@pytest.fixture(autouse=True)
def _restore_kernels():
    saved = dict(fast_c._state)
    yield
    fast_c.reset()
    fast_c._state.update(saved)


def mlp_inputs(seed, D=256, I=640):
    g = torch.Generator().manual_seed(seed)
    w = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    ws = (w(I, D), None, w(I, D), None, w(D, I), None)           # gate, b_gate, up, b_up, down, b_down
    x = torch.randn(2, 1, D, generator=g)                         # [B,T,D]
    return x, ws, torch.tensor([0.5, 0.75]), torch.tensor([16.0, 8.0])


class WatchedLib:
    """The real library, with the MLP calls watched: a free of a handle a call is still using is recorded (and
    deferred to the end of that call, so the test reports it instead of crashing). ``hold`` makes the next run
    wait inside the C call until released."""

    def __init__(self, lib):
        self.lib, self.mu = lib, threading.Lock()
        self.in_flight, self.deferred, self.freed_in_flight, self.freed, self.created = {}, set(), [], [], []
        self.entered, self.release, self.hold = threading.Event(), threading.Event(), False

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def solm_mlp_create(self, *args):
        h = self.lib.solm_mlp_create(*args)
        self.created.append(h)
        return h

    def solm_mlp_run(self, handle, *args):
        with self.mu:
            self.in_flight[handle] = self.in_flight.get(handle, 0) + 1
            hold, self.hold = self.hold, False
        if hold:
            self.entered.set()
            assert self.release.wait(10)
        try:
            return self.lib.solm_mlp_run(handle, *args)
        finally:
            with self.mu:
                self.in_flight[handle] -= 1
                late = not self.in_flight[handle] and handle in self.deferred
                self.deferred.discard(handle)
            if late:
                self.lib.solm_mlp_free(handle)

    def solm_mlp_free(self, handle):
        with self.mu:
            self.freed.append(handle)
            if self.in_flight.get(handle):
                self.freed_in_flight.append(handle)
                self.deferred.add(handle)
                return
        self.lib.solm_mlp_free(handle)


@pytest.mark.parametrize("how", ["reset", "in_place", "weights_die"])
def test_a_handle_is_not_freed_while_a_call_uses_it(c_lib, how, monkeypatch):
    watched = WatchedLib(c_lib)
    monkeypatch.setattr(fast_c, "_load", lambda path=None: watched)
    fast_c.reset()
    x, ws, rho, bits = mlp_inputs(0)
    want = fast_c.sparse_mlp(x, *ws, rho, bits, "silu")          # the handle is made and cached
    [handle] = watched.created
    got = {}
    watched.hold = True
    t = threading.Thread(target=lambda: got.update(y=fast_c.sparse_mlp(x, *ws, rho, bits, "silu")))
    t.start()
    assert watched.entered.wait(10)                               # the call is inside solm_mlp_run now
    if how == "reset":
        fast_c.reset()
    elif how == "in_place":                                       # a new version: the next call re-lays out
        torch.autograd.graph.increment_version(ws[2])
        fast_c.sparse_mlp(x, *ws, rho, bits, "silu")
    else:                                                         # what a dying weight's finalizer runs
        fast_c._drop(next(iter(fast_c._HANDLES)))
    assert handle not in watched.freed, "the C copy was freed while a call was using it"
    watched.release.set()
    t.join(10)
    assert handle in watched.freed and not watched.freed_in_flight  # freed by the call's release, not before
    assert torch.equal(got["y"], want)


def test_calls_while_another_thread_resets(c_lib, monkeypatch):
    """Four threads call the C MLP on shared weights while a fifth keeps dropping the cached copies (reset, and
    in-place version bumps that make the next call re-lay out): every result equals the lone call's, bit for bit."""
    watched = WatchedLib(c_lib)
    monkeypatch.setattr(fast_c, "_load", lambda path=None: watched)
    fast_c.reset()
    x, ws, rho, bits = mlp_inputs(1)
    want = fast_c.sparse_mlp(x, *ws, rho, bits, "silu")
    stop, bad, calls = threading.Event(), [], [0] * THREADS

    def call(i):
        while not stop.is_set() and calls[i] < 400:
            y = fast_c.sparse_mlp(x, *ws, rho, bits, "silu")
            calls[i] += 1
            if y is None or not torch.equal(y, want):
                bad.append(i)

    def churn():                                                  # until every caller is done
        n = 0
        while not stop.is_set():
            if n % 2:
                fast_c.reset()
            else:
                torch.autograd.graph.increment_version(ws[2])
            n += 1
            time.sleep(0.0002)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(THREADS)] + [threading.Thread(target=churn)]
    [t.start() for t in threads]
    [t.join(60) for t in threads[:THREADS]]
    stop.set()
    threads[-1].join(10)
    assert not bad, f"{len(bad)} wrong results"
    assert not watched.freed_in_flight, f"{len(watched.freed_in_flight)} copies freed during a call"
    assert len(watched.freed) > 10 and sum(calls) == THREADS * 400


# ---------------------------------------------------------------------------------------------- SolmEP
@pytest.fixture(scope="module")
def solm_artifact(tmp_path_factory, tiny_llama):
    need_ep(ep.library_path() is not None)
    from test_artifact import word_tokenizer
    from tiny_lm import tiny_solm_artifact

    return tiny_solm_artifact(tmp_path_factory.mktemp("conc"), tiny_llama, word_tokenizer(), seed=3)


def _trace(session, prompt, budget, n=40):
    """Every step's logits [B,V] and action of one generation (greedy)."""
    return [(st["logits"], st["action"]) for st in session.steps(prompt, budget, max_new_tokens=n)]


def test_threads_sharing_a_solm_ep_session_equal_lone_runs(solm_artifact):
    """Four threads share one SolmEP session, each with its own prompts and budget (batch 2, 40 decode steps,
    three rounds): every step's logits and actions equal the same input run alone."""
    from solm_compile.runtime.session import SolmSession

    s = SolmSession(solm_artifact, threads=2)
    assert s.sess.get_providers()[0] == "SolmEP"
    rng = np.random.default_rng(0)
    inputs = [(rng.integers(0, 160, (2, 24 + 8 * i)).tolist(), budget)
              for i, budget in enumerate([(0.5, 0.75, 8), (0.25, 0.5, 5), (0.3, 0.6, 12), (0.75, 0.9, 16)])]
    lone = [_trace(s, *inp) for inp in inputs]
    errors, spans = [], []
    run = s.sess.run_with_iobinding

    def timed_run(*args, **kwargs):                  # when each thread's calls ran: they must overlap
        t0 = time.perf_counter()
        out = run(*args, **kwargs)
        spans.append((threading.get_ident(), t0, time.perf_counter()))
        return out

    s.sess.run_with_iobinding = timed_run

    def work(i):
        for _ in range(3):
            got = _trace(s, *inputs[i])
            for (gl, ga), (wl, wa) in zip(got, lone[i]):
                if not (np.allclose(gl, wl, rtol=0, atol=1e-6) and np.array_equal(ga, wa)):
                    errors.append((i, float(np.abs(gl - wl).max())))
                    return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    assert len(spans) == THREADS * 3 * 41                                   # prefill + 40 steps, 3 rounds each
    spans.sort(key=lambda sp: sp[1])
    overlaps = sum(1 for a, b in zip(spans, spans[1:]) if a[0] != b[0] and b[1] < a[2])
    assert overlaps > 0, "no two threads' session.run calls overlapped: the session serialised them"
