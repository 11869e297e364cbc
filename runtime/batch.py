"""Continuous batching: sequences of different lengths and start times share one run per decode step.

    b = sess.batch(rows=8, capacity=2048)       # KV (and page state) for 8 rows of up to 2048 positions
    slot, logits = b.join(prompt_ids, budget)   # the row's own dense prefill; logits [V] of its last position
    slot = b.begin(prompt_ids, budget)          # ... or one prefill run at a time, stepping the others in between:
    logits = b.advance(slot)                    # None until its last run (then the row is live)
    out = b.step({slot: token, ...})            # every live row's next token -> {slot: {logits, action, controls}}
    b.leave(slot)                               # its slot is free for the next join

``Batch`` drives a step-protocol-2 artifact (the ai.solm kinds, docs/protocol.md): one buffer per layer of
[rows, Hkv, C, d] for the KV and [rows, Hkv, C/S, d] for the page state, numpy arrays that onnxruntime reads and
writes in place through IO binding by pointer. A row's slice of a buffer is contiguous, so a joining row is prefilled
in a run of its own (B = 1) bound to its slice: only its own rows, pages and policy state are written, and its
policy episode restarts while the others' go on. A step runs the rows [0, n) (n = the highest live slot + 1), each at
its own ``past_length``; a free slot inside that range runs along as an empty row (its outputs are ignored; rows
never mix in any op). Joins take the lowest free slot, so n stays small.

A prompt is prefilled in runs of ``sess.prefill_chunk`` tokens (``advance``: one run a call). A server steps the live
rows between a joining row's runs, so a long prompt does not stall everyone's next token. Until its last run the
joining slot is not live; a step inside [0, n) runs its row on a placeholder token at the next position to prefill,
which that run then writes over: runs start on page boundaries (the chunk is a multiple of the page size, else the
prompt goes in one run), where the page min/max restart from the first key, so nothing of the placeholder remains.

``RowByRow`` has the same interface for protocol-1 artifacts (portable, dense: equal-length rows only): each row
is its own ``SolmSession.steps`` generator, stepped one after another.
"""

from __future__ import annotations

import numpy as np

from solm_compile.errors import UserError

DENSE = np.array([1.0, 1.0, 16.0], np.float32)


class _Slots:
    """Slot bookkeeping shared by both kinds of batch."""

    def __init__(self, sess, rows: int, capacity: int):
        if rows < 1 or capacity < 2:
            raise UserError(f"a batch needs rows >= 1 and capacity >= 2, got {rows} rows of {capacity}")
        self.sess, self.rows, self.capacity = sess, int(rows), int(capacity)
        self.live: dict[int, int] = {}             # slot -> positions in its cache
        self.filling: dict[int, dict] = {}         # slot -> a prompt being prefilled (``begin``/``advance``)

    @property
    def free(self) -> int:
        return self.rows - len(self.live) - len(self.filling)

    def join(self, prompt_ids, budget=(1.0, 1.0, 16)) -> tuple[int, np.ndarray]:
        """Prefill ``prompt_ids`` in a free slot, every run now: (slot, logits [V] of its last position)."""
        slot = self.begin(prompt_ids, budget)
        logits = None
        while logits is None:
            logits = self.advance(slot)
        return slot, logits

    def _take(self, prompt_ids, budget) -> tuple[int, np.ndarray]:
        n = len(prompt_ids)
        if n < 1:
            raise UserError("a batch row needs a prompt of at least one token")
        if n + 1 > self.capacity:
            raise UserError(f"a prompt of {n} tokens leaves no room in a batch row of {self.capacity} positions")
        if self.free < 1:
            raise UserError(f"the batch is full ({self.rows} rows)")
        slot = min(set(range(self.rows)) - self.live.keys() - self.filling.keys())
        if self.sess.kind == "dense":                                     # no controls: the budget is ignored
            return slot, DENSE / [1, 1, 16]
        return slot, self.sess.check_budget(budget)                       # [3] κ, ρ, bits/16

    def _check_step(self, tokens: dict) -> None:
        if set(tokens) != set(self.live):
            raise ValueError(f"step needs a token for every live slot {sorted(self.live)}, got {sorted(tokens)}")
        full = [s for s in tokens if self.live[s] + 1 > self.capacity]
        if full:
            raise UserError(f"batch row {full[0]} is full ({self.capacity} positions)")

    def _controls(self, past: int, budget: np.ndarray) -> np.ndarray:
        """The controls a fixed artifact applies at a step with ``past`` positions before it (GateControls' rule)."""
        g = self.sess.meta.get("gate", {})
        on = past + 1 > g.get("ts", 4) + g.get("tw", 2) + 1
        return (budget * [1, 1, 16]).astype(np.float32) if on else DENSE.copy()


class Batch(_Slots):
    """Up to ``rows`` sequences of up to ``capacity`` positions on one step-protocol-2 artifact (module doc)."""

    def __init__(self, sess, rows: int, capacity: int):
        super().__init__(sess, rows, capacity)
        kv = sess.kv
        if not kv.paged:
            raise UserError(f"{sess.path}: continuous batching needs step protocol 2 or 3 (a solm or fixed "
                            f"artifact compiled by this solm); this one is protocol {sess.meta.get('protocol', 1)}")
        self.kv, self.C = kv, kv.capacity(capacity)
        R = self.rows
        self.buffers = {name: np.zeros((R, kv.kv_heads, self.C, kv.head_dim), kv.dtype)    # [R, Hkv, C, d]
                        for name in kv.names("past")}
        self.buffers.update({name: np.zeros(kv.page_shape(R, self.C), kv.page_dtype)       # [R, Hkv, C/S, d]
                             for name in kv.page_names("past")})
        self.alias = kv.aliases()                                                          # present -> past
        self.length = np.zeros((R,), np.int64)                                             # [R] past_length
        self.policy = sess.kind == "solm"
        self.budget = np.tile(DENSE / [1, 1, 16], (R, 1)).astype(np.float32)              # [R, 3] κ, ρ, bits/16
        if self.policy:
            self.state = self._start(R)

    def _start(self, n: int) -> dict:
        return self.sess._policy_start(n, np.zeros((n, self.sess.meta["hidden_size"]), np.float32))

    # ------------------------------------------------------------------------------------------ rows
    def begin(self, prompt_ids, budget=(1.0, 1.0, 16)) -> int:
        """Reserve a free slot for ``prompt_ids``; ``advance`` prefills it (B = 1 runs on its rows of the buffers)."""
        slot, target = self._take(prompt_ids, budget)
        self.budget[slot] = target
        page = int(self.sess.meta.get("gate", {}).get("page_size", 1))
        spans = self.sess.prefill_runs(len(prompt_ids))
        if any(a % page for a, _ in spans):                  # a run must start on a page boundary (module doc)
            spans = [(0, len(prompt_ids))]
        self.filling[slot] = {"ids": np.asarray(prompt_ids, np.int64), "spans": spans}
        self.length[slot] = 0
        if self.policy:
            for name, value in self._start(1).items():
                self.state[name][slot] = value[0]
        return slot

    def advance(self, slot: int):
        """The next prefill run of ``slot``: None, or after its last run the logits [V] (the row is then live)."""
        job = self.filling[slot]
        a, b = job["spans"].pop(0)
        feeds = {"input_ids": job["ids"][None, a:b],                                         # [1, b - a]
                 "position_ids": np.arange(a, b, dtype=np.int64)[None],                      # [1, b - a]
                 "past_length": np.asarray([a], np.int64)}                                   # [1]
        if self.policy:
            feeds.update({name: value[slot:slot + 1] for name, value in self.state.items()})
        out = self._run(feeds, slot, slot + 1)
        if self.policy:
            for name in self.state:
                self.state[name][slot] = out[f"{name}_out"][0]
        self.length[slot] = b                    # a step before the next run writes position b, which it rewrites
        if job["spans"]:
            return None
        del self.filling[slot]
        self.live[slot] = b
        return out["logits"][0, -1]

    def leave(self, slot: int) -> None:
        """Free ``slot``; its buffers keep their stale rows (never read: the next join starts at position 0)."""
        self.live.pop(slot, None)
        self.filling.pop(slot, None)
        self.length[slot] = 0
        if self.policy:
            for name, value in self._start(1).items():
                self.state[name][slot] = value[0]

    def step(self, tokens: dict) -> dict:
        """One decode step of every live row: ``tokens`` {slot: token} -> {slot: {logits [V], action, controls}}."""
        self._check_step(tokens)
        if not tokens:
            return {}
        n = max(tokens) + 1                      # rows [0, n): free and filling slots below n run along
        ids = np.zeros((n, 1), np.int64)                                                    # [n, 1]
        for slot, tok in tokens.items():
            ids[slot, 0] = tok
        past = self.length[:n].copy()                                                       # [n]
        feeds = {"input_ids": ids, "position_ids": past[:, None].copy(), "past_length": past}
        if self.policy:
            feeds.update({name: value[:n] for name, value in self.state.items()})
        out = self._run(feeds, 0, n)
        res = {}
        for slot in tokens:
            res[slot] = {"logits": out["logits"][slot, -1], "action": None, "controls": None}
            if self.policy:
                res[slot]["action"], res[slot]["controls"] = int(out["action"][slot]), out["controls"][slot]
                for name in self.state:
                    self.state[name][slot] = out[f"{name}_out"][slot]
            elif self.sess.kind == "fixed":
                res[slot]["controls"] = self._controls(int(past[slot]), self.budget[slot])
            self.length[slot] += 1
            self.live[slot] += 1
        return res

    # ------------------------------------------------------------------------------------------ one run
    def _run(self, feeds: dict, r0: int, r1: int) -> dict:
        """One run over rows [r0, r1): the buffers' slices bound by pointer (read and written in place), the
        controls from the rows' budgets; returns every other output as numpy."""
        sess = self.sess
        if sess.kind == "solm":
            feeds["budget"] = self.budget[r0:r1]
        elif sess.kind == "fixed":
            b = self.budget[r0:r1]
            feeds.update(attn_keep=b[:, 0].copy(), mlp_keep=b[:, 1].copy(), bits=b[:, 2] * 16.0)
        binding = sess.sess.io_binding()
        for name in sess.input_names:
            if name in self.buffers:
                view = self.buffers[name][r0:r1]                                            # contiguous rows
                binding.bind_input(name, "cpu", 0, view.dtype.type, list(view.shape), view.ctypes.data)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        for name in sess.output_names:
            if name in self.alias:
                view = self.buffers[self.alias[name]][r0:r1]
                binding.bind_output(name, "cpu", 0, view.dtype.type, list(view.shape), view.ctypes.data)
            else:
                binding.bind_output(name, "cpu")
        sess.sess.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in zip(sess.output_names, binding.get_outputs())
                if name not in self.alias}


class RowByRow(_Slots):
    """The ``Batch`` interface for protocol-1 artifacts: each row its own ``SolmSession.steps``, one after another."""

    def __init__(self, sess, rows: int, capacity: int):
        super().__init__(sess, rows, capacity)
        self.gens: dict[int, tuple] = {}

    def begin(self, prompt_ids, budget=(1.0, 1.0, 16)) -> int:
        """The whole prefill now (``SolmSession.steps``); ``advance`` hands over its logits."""
        slot, _ = self._take(prompt_ids, budget)
        box = {}
        gen = self.sess.steps([list(prompt_ids)], budget, next_token=lambda _: np.asarray([box["token"]]),
                              max_new_tokens=self.capacity - len(prompt_ids))
        first = next(gen)
        self.gens[slot] = (gen, box)
        self.filling[slot] = {"logits": first["logits"][0], "n": len(prompt_ids)}
        return slot

    def advance(self, slot: int):
        job = self.filling.pop(slot)
        self.live[slot] = job["n"]
        return job["logits"]

    def leave(self, slot: int) -> None:
        gen = self.gens.pop(slot, None)
        self.live.pop(slot, None)
        self.filling.pop(slot, None)
        if gen is not None:
            gen[0].close()

    def step(self, tokens: dict) -> dict:
        self._check_step(tokens)
        res = {}
        for slot, tok in tokens.items():
            gen, box = self.gens[slot]
            box["token"] = int(tok)
            s = next(gen)
            res[slot] = {"logits": s["logits"][0], "action": None if s["action"] is None else int(s["action"][0]),
                         "controls": None if s["controls"] is None else s["controls"][0]}
            self.live[slot] += 1
        return res


SLIDING_WINDOW = ("Gemma3",)    # architectures whose window masks the graph builds from the longest row


def make_batch(sess, rows: int, capacity: int):
    """``Batch`` for a step-protocol-2 artifact of a full-attention model, else ``RowByRow`` (docs/protocol.md:
    a sliding-window mask follows the longest row, so such rows must not differ in length)."""
    arch = str((sess.meta.get("model") or {}).get("architecture", ""))
    if sess.kv.paged and not arch.startswith(SLIDING_WINDOW):
        return Batch(sess, rows, capacity)
    return RowByRow(sess, rows, capacity)
