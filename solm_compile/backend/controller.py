"""The run-time side of ``torch.compile(backend="solm")``: the policy's decisions across Dynamo calls.

One ``PolicyController`` per compiled model and options. Before each call it picks the per-row controls
(κ, ρ, bits) [B]; after it, it takes the LM's last hidden state. The policy is driven by ``PolicyStep``
(solm_compile/policy/step.py), the same state machine as training, evaluation and the artifact: a multi-token call
(prefill) or a call with an empty past is dense and starts a new episode from the prefill's last hidden state, each
single-token call is one policy step, and every ``episode_len`` steps (the policy's training T) a new episode starts.
"""

from __future__ import annotations

import threading
from collections import deque

import torch
from torch import Tensor

from solm_compile.backend.once import warn_once
from solm_compile.config import Budget, GateConfig
from solm_compile.errors import UserError
from solm_compile.policy.step import PolicyStep

HISTORY = 4096            # decode steps of actions kept per controller


class PolicyController:
    """Chooses each call's per-row controls (κ, ρ, bits) [B] and keeps the policy's state across calls.

    ``history`` holds, per single-token step, ``{"action": [B] long | None, "controls": [B, 3], "effective":
    [B] bool}`` (the last ``HISTORY`` steps). ``policy`` is None when running dense or ``static`` (the floor: every
    single-token step runs at the budget itself, once past the gate's warm-up).
    """

    def __init__(self, info, loaded, budgets: Budget | tuple[Budget, ...], gate: GateConfig,
                 embedding: Tensor | None, static: bool = False):
        budgets = (budgets,) if isinstance(budgets, Budget) else tuple(budgets)
        self.info, self.loaded, self.budgets, self.gate = info, loaded, budgets, gate
        self.static = static and loaded is None       # the floor: every decode step at the budget, no policy
        self.policy = loaded.policy if loaded is not None else None
        self.grid = loaded.grid if loaded is not None else None
        self.step = PolicyStep.from_loaded(loaded) if loaded is not None else None
        self.episode_len = self.step.episode_len if self.step is not None else None
        self.embedding = embedding
        self.min_len = gate.min_len
        self.state = None                     # a StepState, or None before the first prefill
        self.history: deque = deque(maxlen=HISTORY)
        self.calls = {"prefill": 0, "step": 0}
        self._pending = None
        self._dense: dict = {}
        self._lock = threading.Lock()
        from solm_compile.ops.fast_c import PageStates

        self.page_states = PageStates()     # Quest page min/max carried across steps (fast_c; reset per sequence)
        if self.policy is not None:
            self._budget = torch.tensor([[b.attn_keep, b.mlp_keep, b.bits / 16.0] for b in budgets])   # [R, 3]
        self._static = torch.tensor([[b.attn_keep, b.mlp_keep, float(b.bits)] for b in budgets])      # [R, 3]

    @property
    def active(self) -> bool:
        """Whether the policy decides anything: a policy, a budget below dense, and the LM's hidden state."""
        dense = all(b.is_dense for b in self.budgets)
        return not dense and (self.static or (self.policy is not None and self.embedding is not None))

    @property
    def actions(self) -> list:
        return [h["action"] for h in self.history if h["action"] is not None]

    def reset(self) -> None:
        self.state, self._pending = None, None
        self.page_states.reset()

    def _dense_controls(self, B: int, device) -> tuple[Tensor, Tensor, Tensor]:
        key = (B, str(device))
        hit = self._dense.get(key)
        if hit is None:
            one = torch.ones(B, device=device)
            hit = self._dense[key] = (one, one, one * 16.0)
        return hit

    def _static_controls(self, B: int, device) -> Tensor:
        rows = self._static.shape[0]
        if rows not in (1, B):
            raise UserError(f"torch.compile(backend='solm'): {rows} per-row budgets for a batch of {B} rows")
        return self._static.to(device).expand(B, 3)                                       # [B, 3]

    def _to(self, device) -> None:
        if self._budget.device != device:
            self.step.to(device)
            self._budget = self._budget.to(device)

    @torch.no_grad()
    def before(self, input_ids: Tensor, past_len: int, want_hidden: bool) -> tuple[Tensor, Tensor, Tensor]:
        B, T = input_ids.shape[0], input_ids.shape[-1]
        dev = input_ids.device
        if T > 1 or past_len == 0:                                  # prefill: dense, then a new episode
            self.calls["prefill"] += 1
            self._pending = ("prefill",) if want_hidden else None
            self.state = None
            self.page_states.reset()
            return self._dense_controls(B, dev)
        self.calls["step"] += 1
        eff_flag = past_len + T > self.min_len                       # gate_controls' rule (T == 1 here)
        if self.static and self.active:                              # the floor: the budget itself, every row
            ctl = self._static_controls(B, dev) if eff_flag else torch.stack(self._dense_controls(B, dev), -1)
            self.history.append({"action": None, "controls": ctl, "effective": torch.full((B,), eff_flag, device=dev)})
            self._pending = None
            return ctl[:, 0].contiguous(), ctl[:, 1].contiguous(), ctl[:, 2].contiguous()
        if not (self.active and want_hidden):
            ctl = self._dense_controls(B, dev)
            self.history.append({"action": None, "controls": torch.stack(ctl, -1),
                                 "effective": torch.full((B,), eff_flag, device=dev)})
            self._pending = None
            return ctl
        self._to(dev)
        rows = self._budget.shape[0]
        if rows not in (1, B):
            raise UserError(f"torch.compile(backend='solm'): {rows} per-row budgets for a batch of {B} rows")
        if self.state is None or self.state.prev.shape[0] != B:
            if self.state is None:
                warn_once("no-prefill", "solm: a decode step came without a prefill through the compiled model; "
                          "the policy starts from a zero hidden state")
            self.state = self.step.start(B, torch.zeros(B, self.policy.hidden_size, device=dev))
        eff = torch.full((B,), eff_flag, dtype=torch.bool, device=dev)                   # [B]
        d = self.step.decide(self.state, self.embedding[input_ids[:, -1]], eff, self._budget.expand(B, 3))   # [B, 3]
        self._pending = ("step", d, eff)
        self.history.append({"action": d.effective, "controls": d.controls, "effective": eff})
        ctl = d.controls                                                                  # [B, 3]
        return ctl[:, 0].contiguous(), ctl[:, 1].contiguous(), ctl[:, 2].contiguous()

    @torch.no_grad()
    def after(self, hidden_last: Tensor) -> None:
        """Take the LM's last hidden state [B, D] of this call (after the final norm)."""
        pending, self._pending = self._pending, None
        if pending is None or self.policy is None:
            return
        if pending[0] == "prefill":
            self.state = self.step.start(hidden_last.shape[0], hidden_last)
            return
        _, d, eff = pending
        self.state = self.step.advance(self.state, d, eff, hidden_last)
