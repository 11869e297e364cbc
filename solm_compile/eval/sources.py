"""What ``evaluate`` runs: per-step inputs and traces, the controllers that pick each method's controls, and the
sources of dense prefills (held-out blocks, multiple-choice items)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from solm_compile.eval import baselines as bl
from solm_compile.policy.actions import ActionGrid
from solm_compile.policy.network import RecurrentActorCriticPolicy
from solm_compile.policy.step import PolicyStep
from solm_compile.train.rollout import gate_of

PREFILL_ROWS = 4          # prefill sub-batch: the prefill computes [rows, ctx, vocab] logits
USAGE_SCALE = torch.tensor([1.0, 1.0, 16.0])


# ---------------------------------------------------------------------------------------------- data types
@dataclass
class StepInputs:
    """What a controller sees of its rows before the first controlled step."""

    rows: Tensor      # [n] global row ids (block index, or item-choice row)
    hid: Tensor       # [n, D] final hidden state at the last prefill position
    logits: Tensor    # [n, V] next-token logits at the last prefill position
    last_ids: Tensor  # [n] last prefill token
    ids: Tensor       # [n, T] tokens fed at the controlled steps
    valid: Tensor     # [n, T] bool: the step is scored
    mask: Tensor      # [n, T] bool: scored and effective (counts towards usage)
    T: int


@dataclass
class PrefillBatch:
    rows: Tensor
    hid: Tensor
    logits: Tensor
    last_ids: Tensor
    cache: object
    ids: Tensor       # [c, T]
    labels: Tensor    # [c, T]
    valid: Tensor     # [c, T]
    L0: int           # cache length before the first controlled step
    prefix: Optional[Tensor] = None  # [1 or c, L0] the tokens in the cache: a dense replay rebuilds it from them


@dataclass
class Trace:
    nll: Tensor                       # [n, T] −log p(true next token), 0 where not valid
    controls: Tensor                  # [n, T, 3] applied (κ, ρ, bits); per-layer controls: their layer mean
    valid: Tensor                     # [n, T]
    mask: Tensor                      # [n, T] counted (valid and effective)
    L0: Tensor                        # [n]
    actions: Optional[Tensor] = None  # [n, T] policy action ids (−1 where not counted)

    def usage(self) -> tuple[float, float, float]:
        """Realised (κ̄, ρ̄, b̄/16) over the counted steps; dense (1, 1, 1) when none count."""
        if not bool(self.mask.any()):
            return (1.0, 1.0, 1.0)
        u = self.controls[self.mask].double().mean(0) / USAGE_SCALE.double()
        return tuple(float(x) for x in u)


# ---------------------------------------------------------------------------------------------- controllers
class DenseController:
    def begin(self, x: StepInputs) -> "DenseController":
        self.n = x.ids.shape[0]
        return self

    def act(self, t: int, eff: bool) -> Tensor:
        return torch.tensor(bl.DENSE).repeat(self.n, 1)

    def observe(self, t, logits, hid, applied) -> None:
        pass

    def refresh(self, t, hid, logits) -> None:
        pass


class ScheduleController:
    """Open loop: ``values`` [N_rows, T, 3] (shared by the layers) or [N_rows, T, L, 3] fixed before the run."""

    def __init__(self, values: Tensor):
        self.values = values

    def begin(self, x: StepInputs) -> "ScheduleController":
        self.v = self.values[x.rows, :x.T]
        return self

    def act(self, t: int, eff: bool) -> Tensor:
        return self.v[:, t]

    def observe(self, t, logits, hid, applied) -> None:
        pass

    def refresh(self, t, hid, logits) -> None:
        pass


class PolicyController:
    """Greedy policy actions through ``PolicyStep``, exactly as ``train.rollout(..., K=1, greedy=True)`` takes them.

    ``episode`` (SOL's lm-eval runner): the progress scalar is (t+1)/episode, and at every ``episode`` steps the
    engine replays the history densely and calls ``refresh``, which starts a new episode (policy KV cache, running
    usage, previous action and step index reset; h from the replay). None: one episode of the source's T steps."""

    def __init__(self, lm, policy: RecurrentActorCriticPolicy, grid: ActionGrid, targets: Sequence[float],
                 episode: Optional[int] = None):
        self.lm, self.policy, self.grid, self.episode = lm, policy, grid, episode
        self.targets = torch.tensor([float(x) for x in targets])

    def begin(self, x: StepInputs) -> "PolicyController":
        n = x.ids.shape[0]
        self.E = self.lm.embed(x.ids).float()                                   # [n, T, D]
        self.C = self.targets.expand(n, 3)
        self.step = PolicyStep(self.policy, self.grid, self.episode or x.T)
        self.mask = x.mask
        self.actions = torch.full((n, x.T), -1, dtype=torch.long)
        self.refresh(0, x.hid, x.logits)
        return self

    def refresh(self, t: int, hid: Tensor, logits: Tensor) -> None:
        self.state = self.step.start(hid.shape[0], hid.float())

    def act(self, t: int, eff: bool) -> Tensor:
        self.eff = torch.full((self.C.shape[0],), bool(eff))                        # [n]
        self.d = self.step.decide(self.state, self.E[:, t], self.eff, self.C)
        self.actions[:, t] = torch.where(self.mask[:, t], self.d.effective, torch.full_like(self.d.effective, -1))
        return self.d.controls                                                  # [n, 3]

    def observe(self, t, logits, hid, applied) -> None:
        self.state = self.step.advance(self.state, self.d, self.eff, hid)


Factory = Callable[[StepInputs], object]


# ---------------------------------------------------------------------------------------------- sources
class BlockSource:
    """Token blocks [n, ≥ ctx+T+1]; dense prefills are kept per block while they fit in ``max_cache_bytes``."""

    def __init__(self, lm, blocks: Tensor, ctx: int, T: int, max_cache_bytes: int = 1 << 30):
        if blocks.dim() != 2 or blocks.shape[1] < ctx + T + 1:
            raise ValueError(f"blocks must be [n, ≥ ctx+T+1 = {ctx + T + 1}], got {list(blocks.shape)}")
        self.lm, self.blocks, self.ctx, self.T = lm, blocks[:, :ctx + T + 1], ctx, T
        self.n = blocks.shape[0]
        self.max_cache_bytes = max_cache_bytes
        self._store: dict[int, tuple] = {}
        self._keep: Optional[bool] = None

    def mask(self) -> Tensor:
        min_len = gate_of(self.lm).min_len
        eff = torch.tensor([self.ctx + t + 1 > min_len for t in range(self.T)])
        return eff[None].expand(self.n, self.T).clone()

    def _prefill(self, rows: list[int]) -> list[tuple]:
        out = []
        for s in range(0, len(rows), PREFILL_ROWS):
            sub = rows[s:s + PREFILL_ROWS]
            logits, hid, cache = self.lm.prefill(self.blocks[sub, :self.ctx])
            last_h, last_lg = hid[:, -1].float().clone(), logits[:, -1].float().clone()
            del logits, hid
            for j, _ in enumerate(sub):
                out.append((last_h[j], last_lg[j], bl.map_cache(cache, lambda x, j=j: x[j:j + 1])))
        if self._keep is None:
            per_row = sum(x.numel() * x.element_size() for x in _tensors(out[0][2])) + out[0][1].numel() * 4
            self._keep = per_row * self.n <= self.max_cache_bytes
        if self._keep:
            self._store.update(zip(rows, out))
        return out

    def batches(self, chunk: int) -> Iterator[PrefillBatch]:
        for s in range(0, self.n, chunk):
            rows = list(range(s, min(self.n, s + chunk)))
            parts = ([self._store[r] for r in rows] if all(r in self._store for r in rows)
                     else self._prefill(rows))
            cache = _cat_caches([p[2] for p in parts])
            b = self.blocks[rows]
            yield PrefillBatch(torch.tensor(rows), torch.stack([p[0] for p in parts]),
                               torch.stack([p[1] for p in parts]), b[:, self.ctx - 1], cache,
                               b[:, self.ctx:self.ctx + self.T], b[:, self.ctx + 1:self.ctx + self.T + 1],
                               torch.ones(len(rows), self.T, dtype=torch.bool), self.ctx, b[:, :self.ctx])


class ChoiceSource:
    """Multiple-choice items {"ctx": [ids], "conts": [[ids], ...]}: one batch per item, a row per choice."""

    def __init__(self, lm, items: Sequence[dict]):
        for i, it in enumerate(items):
            if len(it["ctx"]) < 2 or not it["conts"] or any(len(c) == 0 for c in it["conts"]):
                raise ValueError(f"item {i}: needs a context of ≥ 2 tokens and non-empty continuations")
        self.lm, self.items = lm, list(items)
        self.offsets = [0]
        for it in self.items:
            self.offsets.append(self.offsets[-1] + len(it["conts"]))
        self.n = self.offsets[-1]
        self.T = max(len(c) for it in self.items for c in it["conts"])

    def _shape(self):
        valid = torch.zeros(self.n, self.T, dtype=torch.bool)
        L0 = torch.zeros(self.n, dtype=torch.long)
        for i, it in enumerate(self.items):
            for j, c in enumerate(it["conts"]):
                valid[self.offsets[i] + j, :len(c)] = True
                L0[self.offsets[i] + j] = len(it["ctx"]) - 1
        return valid, L0

    def mask(self) -> Tensor:
        valid, L0 = self._shape()
        eff = L0[:, None] + torch.arange(self.T)[None] + 1 > gate_of(self.lm).min_len
        return valid & eff

    def batches(self, chunk: int) -> Iterator[PrefillBatch]:
        for i, it in enumerate(self.items):
            ctx, conts = it["ctx"], it["conts"]
            k, Ti = len(conts), max(len(c) for c in conts)
            logits, hid, cache = self.lm.prefill(torch.tensor([ctx[:-1]]))
            ids = torch.zeros(k, Ti, dtype=torch.long)
            labels = torch.zeros(k, Ti, dtype=torch.long)
            valid = torch.zeros(k, Ti, dtype=torch.bool)
            for j, c in enumerate(conts):
                ids[j, :len(c)] = torch.tensor([ctx[-1]] + list(c[:-1]))
                labels[j, :len(c)] = torch.tensor(list(c))
                valid[j, :len(c)] = True
            yield PrefillBatch(torch.arange(self.offsets[i], self.offsets[i] + k),
                               hid[:, -1].float().expand(k, -1).clone(), logits[:, -1].float().expand(k, -1).clone(),
                               torch.full((k,), ctx[-2]), bl.map_cache(cache, lambda x: x.repeat(k, 1, 1, 1)),
                               ids, labels, valid, len(ctx) - 1, torch.tensor([ctx[:-1]]))


def _tensors(cache) -> list:
    return list(cache.tensors) if hasattr(cache, "tensors") else list(cache.layers)


def _cat_caches(caches: list):
    if len(caches) == 1:
        return caches[0]
    cols = zip(*[_tensors(c) for c in caches])
    merged = [torch.cat(col, 0) for col in cols]
    return type(caches[0])(merged)
