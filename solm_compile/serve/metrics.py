"""``/metrics``: the server's counters in Prometheus' text exposition format (version 0.0.4), no client library.

Counters: requests by outcome, generated and prompt tokens, the sum of per-token compute fractions (mean =
``solm_token_cost_sum / solm_tokens_costed_total``), seconds spent in onnxruntime steps, requests per budget
served. Gauges: requests running and waiting. Budget labels are rounded to 0.01 and capped at ``MAX_BUDGETS``
distinct values (the rest count under ``other``), so no client can grow the page without bound.
"""

from __future__ import annotations

import threading

MAX_BUDGETS = 64


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {"ok": 0, "error": 0, "cancelled": 0, "rejected": 0}
        self.tokens = self.prompt_tokens = self.costed = 0
        self.cost_sum = self.step_seconds = 0.0
        self.active = self.queued = 0
        self.budgets: dict[tuple[str, str, str], int] = {}

    def set_gauges(self, active: int, queued: int) -> None:
        with self.lock:
            self.active, self.queued = active, queued

    def count_request(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] += 1

    def count_admitted(self, req) -> None:
        key = tuple(f"{v:.2f}" if i < 2 else f"{v:g}" for i, v in enumerate(req.budget))
        with self.lock:
            self.prompt_tokens += len(req.prompt_ids)
            if key not in self.budgets and len(self.budgets) >= MAX_BUDGETS:
                key = ("other", "other", "other")
            self.budgets[key] = self.budgets.get(key, 0) + 1

    def count_token(self, cost: float | None) -> None:
        with self.lock:
            self.tokens += 1
            if cost is not None:
                self.costed += 1
                self.cost_sum += cost

    def add_step_time(self, seconds: float) -> None:
        with self.lock:
            self.step_seconds += seconds

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP solm_requests_total Requests finished, by outcome.", "# TYPE solm_requests_total counter",
                *(f'solm_requests_total{{outcome="{k}"}} {v}' for k, v in self.requests.items()),
                "# HELP solm_tokens_generated_total Tokens generated.", "# TYPE solm_tokens_generated_total counter",
                f"solm_tokens_generated_total {self.tokens}",
                "# HELP solm_prompt_tokens_total Prompt tokens prefilled.", "# TYPE solm_prompt_tokens_total counter",
                f"solm_prompt_tokens_total {self.prompt_tokens}",
                "# HELP solm_token_cost_sum Sum of per-token compute (bytes read over the dense budget's).",
                "# TYPE solm_token_cost_sum counter", f"solm_token_cost_sum {self.cost_sum!r}",
                "# HELP solm_tokens_costed_total Tokens with a compute fraction.",
                "# TYPE solm_tokens_costed_total counter", f"solm_tokens_costed_total {self.costed}",
                "# HELP solm_step_seconds_total Seconds spent in onnxruntime runs (prefill and decode).",
                "# TYPE solm_step_seconds_total counter", f"solm_step_seconds_total {self.step_seconds!r}",
                "# HELP solm_active_requests Requests being stepped now.", "# TYPE solm_active_requests gauge",
                f"solm_active_requests {self.active}",
                "# HELP solm_queue_length Requests waiting for a slot.", "# TYPE solm_queue_length gauge",
                f"solm_queue_length {self.queued}",
                "# HELP solm_budget_requests_total Requests admitted, by budget (attn_keep, mlp_keep, bits).",
                "# TYPE solm_budget_requests_total counter",
                *(f'solm_budget_requests_total{{attn_keep="{a}",mlp_keep="{m}",bits="{b}"}} {n}'
                  for (a, m, b), n in sorted(self.budgets.items())),
            ]
        return "\n".join(lines) + "\n"
