"""``solm eval``: the policy against budget-matched baselines, on perplexity and multiple-choice accuracy.

Perplexity protocol (shared/research/sol_method.md §6.1; the training rollout with K=1 and greedy actions):
each block holds ctx + T + 1 tokens; dense prefill of the first ctx, then T single-token steps, step t feeding
token ctx+t under the method's controls and scoring the true token ctx+t+1. The KV entries the controlled steps
write are the compressed ones. Steps with L ≤ ts+tw+1 are dense and left out of the usage.

Every method runs through one engine (``run_traces``): a controller per method picks (κ, ρ, bits) per row and
step; the rows of several methods share one batched ``lm.step``. The policy goes first; its realised usage
(κ̄, ρ̄, b̄/16 over the effective steps of all blocks) is what every baseline is matched to (``baselines.py``).

Reported per method: ``ppl`` = exp(mean NLL over all scored tokens), ``ppl_se`` = ppl·sd(block NLL)/√n (delta
method over per-block mean NLL), the paired difference of block NLL to the policy, the realised ``usage``,
``net_keep`` = (κ̄ + ρ̄ + b̄/16)/3 (SOL's nominal metric), and ``flops_fraction`` / ``bytes_fraction``: the
mean over counted row-steps of the cost model's per-token fraction at that step's L and controls
(``*_at_mean``: one evaluation at L = ctx + T/2 and the mean usage).

Multiple choice (``evaluate_choices``): per item a dense prefill of context[:-1]; the last context token and
the continuation tokens are then processed one at a time under control (SOL's lm-eval runner, without its
16-token dense refresh: continuations here are short). Each choice is scored by the sum of its continuation
log-probabilities (``acc``) and by that sum per character (``acc_norm``, the HellaSwag metric).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Optional, Sequence

import sympy as sp
import torch
from sympy.printing.pycode import PythonCodePrinter
from torch import Tensor

from . import baselines as bl
from . import cost as cm
from .actions import ActionGrid
from .grpo import ll_reward
from .policy import RecurrentActorCriticPolicy
from .train import gate_of, step_scalars

METHODS = ("dense", "policy", "fixed", "random", "emc", "dac", "uniform", "schedule",
           "static_attn", "static_mlp", "static_bits")
MC_METHODS = ("dense", "policy", "fixed", "uniform", "emc", "dac")
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


@dataclass
class Trace:
    nll: Tensor                       # [n, T] −log p(true next token), 0 where not valid
    controls: Tensor                  # [n, T, 3] applied (κ, ρ, bits)
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


class ScheduleController:
    """Open loop: ``values`` [N_rows, T, 3] fixed before the run."""

    def __init__(self, values: Tensor):
        self.values = values

    def begin(self, x: StepInputs) -> "ScheduleController":
        self.v = self.values[x.rows, :x.T]
        return self

    def act(self, t: int, eff: bool) -> Tensor:
        return self.v[:, t]

    def observe(self, t, logits, hid, applied) -> None:
        pass


class PolicyController:
    """Greedy policy actions, exactly as ``train.rollout(..., K=1, greedy=True)`` takes them."""

    def __init__(self, lm, policy: RecurrentActorCriticPolicy, grid: ActionGrid, targets: Sequence[float]):
        self.lm, self.policy, self.grid = lm, policy, grid
        self.targets = torch.tensor([float(x) for x in targets])

    def begin(self, x: StepInputs) -> "PolicyController":
        n = x.ids.shape[0]
        self.h = x.hid.float()
        self.E = self.lm.embed(x.ids).float()                                   # [n, T, D]
        self.C = self.targets.expand(n, 3)
        self.usage_sum, self.count = torch.zeros(n, 3), torch.zeros(n)
        self.prev = torch.full((n,), self.policy.bos, dtype=torch.long)
        self.state, self.T, self.mask = None, x.T, x.mask
        self.actions = torch.full((n, x.T), -1, dtype=torch.long)
        return self

    def act(self, t: int, eff: bool) -> Tensor:
        s = step_scalars(t, self.T, eff, self.C, self.usage_sum, self.count)
        logits, self.state = self.policy.step(self.h, self.E[:, t], s, self.prev, t, self.state, 1.0)
        a = logits.argmax(-1)
        self.a_eff, self.eff = (a if eff else torch.full_like(a, self.grid.dense_idx)), eff
        self.actions[:, t] = torch.where(self.mask[:, t], self.a_eff, torch.full_like(a, -1))
        return torch.stack(self.grid.decode(self.a_eff), dim=-1)

    def observe(self, t, logits, hid, applied) -> None:
        if self.eff:
            self.usage_sum += self.grid.usage(self.a_eff)
            self.count += 1
        self.prev, self.h = self.a_eff, hid.float()


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
                               torch.ones(len(rows), self.T, dtype=torch.bool), self.ctx)


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
                               ids, labels, valid, len(ctx) - 1)


def _tensors(cache) -> list:
    return list(cache.tensors) if hasattr(cache, "tensors") else list(cache.layers)


def _cat_caches(caches: list):
    if len(caches) == 1:
        return caches[0]
    cols = zip(*[_tensors(c) for c in caches])
    merged = [torch.cat(col, 0) for col in cols]
    return type(caches[0])(merged)


# ---------------------------------------------------------------------------------------------- engine
@torch.no_grad()
def run_batch(lm, pre: PrefillBatch, methods: Sequence[tuple[str, Factory]], batch_rows: int) -> dict:
    """Run every method's controller over the rows of ``pre``: name -> (nll [c,T], controls [c,T,3], actions)."""
    c, T = pre.ids.shape
    min_len = gate_of(lm).min_len
    eff = [pre.L0 + t + 1 > min_len for t in range(T)]
    mask = pre.valid & torch.tensor(eff)[None]
    x = StepInputs(pre.rows, pre.hid, pre.logits, pre.last_ids, pre.ids, pre.valid, mask, T)
    dense = torch.tensor(bl.DENSE)
    G = max(1, batch_rows // c)
    out = {}
    for g in range(0, len(methods), G):
        group = methods[g:g + G]
        k = len(group)
        ctrls = [make(x) for _, make in group]
        cache = bl.map_cache(pre.cache, lambda t: t.repeat(k, *([1] * (t.dim() - 1))))
        ids, labels = pre.ids.repeat(k, 1), pre.labels.repeat(k, 1)
        nll, ctl = torch.zeros(k * c, T), dense.repeat(k * c, T, 1)
        for t in range(T):
            ctl_t = torch.cat([ctrl.act(t, eff[t]) for ctrl in ctrls]).float()   # [k·c, 3]
            if not eff[t]:
                ctl_t = dense.repeat(k * c, 1)
            lg, hid, cache = lm.step(ids[:, t, None], cache, ctl_t[:, 0].contiguous(), ctl_t[:, 1].contiguous(),
                                     ctl_t[:, 2].contiguous())
            nll[:, t] = -ll_reward(lg[:, 0], labels[:, t])
            ctl[:, t] = ctl_t
            for j, ctrl in enumerate(ctrls):
                sl = slice(j * c, (j + 1) * c)
                ctrl.observe(t, lg[sl, 0], hid[sl, 0], ctl_t[sl])
        for j, ((name, _), ctrl) in enumerate(zip(group, ctrls)):
            sl = slice(j * c, (j + 1) * c)
            out[name] = (nll[sl] * pre.valid, ctl[sl], getattr(ctrl, "actions", None))
    return out


def run_traces(lm, source, methods: dict[str, Factory], batch_rows: int = 32) -> dict[str, Trace]:
    """Every method over every row of ``source`` (rows of one prefill batch share the prefill)."""
    n, T = source.n, source.T
    mask = source.mask()
    res = {name: Trace(torch.zeros(n, T), torch.tensor(bl.DENSE).repeat(n, T, 1), torch.zeros(n, T, dtype=torch.bool),
                       mask, torch.zeros(n, dtype=torch.long)) for name in methods}
    items = list(methods.items())
    for pre in source.batches(max(1, batch_rows // max(1, len(items)))):
        Ti = pre.ids.shape[1]
        for name, (nll, ctl, actions) in run_batch(lm, pre, items, batch_rows).items():
            tr = res[name]
            tr.nll[pre.rows, :Ti], tr.controls[pre.rows, :Ti] = nll, ctl
            tr.valid[pre.rows, :Ti], tr.L0[pre.rows] = pre.valid, pre.L0
            if actions is not None:
                if tr.actions is None:
                    tr.actions = torch.full((n, T), -1, dtype=torch.long)
                tr.actions[pre.rows, :Ti] = actions
    return res


# ---------------------------------------------------------------------------------------------- cost
class _FractionPrinter(PythonCodePrinter):
    def _print_Rational(self, e):
        return f"Fraction({e.p}, {e.q})"

    def _print_Half(self, e):
        return "Fraction(1, 2)"


def _dec(x) -> Fraction:
    return Fraction(str(round(float(x), 6)))


class CostModel:
    """``cost.decode_cost`` compiled to exact Python arithmetic (Fractions: the same ceilings as ``Cost.at``)."""

    def __init__(self, shapes: cm.ModelShapes, gate, dtype_bytes: int = 4):
        c = cm.decode_cost(shapes, gate, dtype_bytes)
        self._fn = sp.lambdify((cm.L, cm.kappa, cm.rho, cm.b), [c.flops, c.bytes],
                               modules=[{"Fraction": Fraction, "math": math}, "math"], printer=_FractionPrinter)
        self._memo: dict = {}

    def fraction(self, L: int, kappa, rho, bits=16) -> tuple[float, float]:
        key = (int(L), _dec(kappa), _dec(rho), _dec(bits))
        if key not in self._memo:
            got = self._fn(key[0], key[1], key[2], key[3])
            dense = self._fn(key[0], Fraction(1), Fraction(1), Fraction(16))
            self._memo[key] = (float(Fraction(got[0]) / dense[0]), float(Fraction(got[1]) / dense[1]))
        return self._memo[key]

    def mean_fraction(self, Ls: Tensor, controls: Tensor) -> tuple[float, float]:
        fr = [self.fraction(int(L), *c.tolist()) for L, c in zip(Ls, controls)]
        return sum(f for f, _ in fr) / len(fr), sum(b for _, b in fr) / len(fr)


# ---------------------------------------------------------------------------------------------- summaries
def _spend(tr: Trace, cost: Optional[CostModel]) -> dict:
    u = tr.usage()
    out = {"usage": {"attn_keep": u[0], "mlp_keep": u[1], "bits": 16 * u[2], "bits_ratio": u[2]},
           "net_keep": cm.net_keep(u[0], u[1], 16 * u[2]), "counted_steps": int(tr.mask.sum())}
    if cost is not None:
        if bool(tr.mask.any()):
            L = (tr.L0[:, None] + torch.arange(tr.mask.shape[1])[None] + 1)[tr.mask]
            f, b = cost.mean_fraction(L, tr.controls[tr.mask])
            L_mid = int(L.double().mean().floor())
        else:
            f, b, L_mid = 1.0, 1.0, int(tr.L0.double().mean() + tr.mask.shape[1] / 2)
        fm, bm = cost.fraction(L_mid, u[0], u[1], 16 * u[2])
        out.update(flops_fraction=f, bytes_fraction=b, flops_fraction_at_mean=fm, bytes_fraction_at_mean=bm,
                   cost_L=L_mid)
    return out


def _row_nll(tr: Trace) -> Tensor:
    v = tr.valid.double()
    return (tr.nll.double() * v).sum(1) / v.sum(1).clamp_min(1)


def summarize(tr: Trace, cost: Optional[CostModel] = None, ref: Optional[Trace] = None) -> dict:
    """ppl, its delta-method standard error over per-block mean NLL, usage, net keep and cost fractions."""
    rows = _row_nll(tr)
    n = rows.numel()
    v = tr.valid.double()
    mean = float((tr.nll.double() * v).sum() / v.sum().clamp_min(1))
    ppl = math.exp(mean)
    sd = float(rows.std()) if n > 1 else float("nan")
    out = {"ppl": ppl, "ppl_se": ppl * sd / math.sqrt(n) if n > 1 else None, "nll": mean,
           "nll_se": sd / math.sqrt(n) if n > 1 else None, "blocks": n, "tokens": int(v.sum())}
    if ref is not None:
        d = rows - _row_nll(ref)
        out["delta_nll_vs_policy"] = float(d.mean())
        out["delta_nll_vs_policy_se"] = float(d.std()) / math.sqrt(n) if n > 1 else None
    out.update(_spend(tr, cost))
    return out


def action_histogram(tr: Trace, grid: ActionGrid) -> dict:
    a = tr.actions[tr.mask] if tr.actions is not None else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(a[a >= 0], minlength=grid.num_actions)
    return {grid.tag(i): int(c) for i, c in enumerate(counts) if c}


# ---------------------------------------------------------------------------------------------- perplexity
class PPLEvaluator:
    """Perplexity of the policy and its matched baselines on ``blocks`` [n, ≥ ctx+T+1], for any targets.

    Dense traces and the step-schedule fit are computed once and reused across ``run`` calls (a sweep)."""

    def __init__(self, lm, policy: RecurrentActorCriticPolicy, grid: ActionGrid, blocks: Tensor, *, ctx: int,
                 T: int, cost: Optional[CostModel] = None, fit_blocks: Optional[Tensor] = None,
                 random_seeds: int = 10, seed: int = 0, batch_rows: int = 32, methods: Sequence[str] = METHODS):
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}")
        if "schedule" in methods and fit_blocks is None:
            raise ValueError("the schedule baseline needs fit_blocks (training text)")
        self.lm, self.policy, self.grid, self.cost = lm, policy.eval(), grid, cost
        self.ctx, self.T, self.batch_rows, self.methods = ctx, T, batch_rows, tuple(methods)
        self.random_seeds, self.seed, self.fit_blocks = random_seeds, seed, fit_blocks
        self.source = BlockSource(lm, blocks, ctx, T)
        self.step_costs: Optional[bl.StepCosts] = None
        self._dense: Optional[Trace] = None
        self.timing: dict[str, float] = {}

    def fit(self) -> Optional[bl.StepCosts]:
        if "schedule" in self.methods and self.step_costs is None:
            t0 = time.perf_counter()
            self.step_costs = bl.fit_step_costs(self.lm, self.fit_blocks, self.grid, self.ctx, self.T, self.batch_rows)
            self.timing["schedule_fit_s"] = time.perf_counter() - t0
        return self.step_costs

    def baselines(self, usage: Sequence[float]) -> dict[str, Factory]:
        """Factories of every baseline in ``self.methods`` (but dense and policy) matched to ``usage``."""
        mask = self.source.mask()
        fixed = bl.fixed_controls(self.grid, usage, mask)
        open_loop: dict[str, Tensor] = {}
        for name in self.methods:
            if name == "fixed":
                open_loop["fixed"] = fixed
            elif name == "random":
                for k in range(self.random_seeds):
                    gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
                    open_loop[f"random_{k}"] = bl.random_controls(fixed, mask, gen)
            elif name == "uniform":
                open_loop["uniform"] = bl.uniform_controls(usage, mask)
            elif name.startswith("static_"):
                axes = {"static_attn": (True, False, False), "static_mlp": (False, True, False),
                        "static_bits": (False, False, True)}[name]
                open_loop[name] = bl.uniform_controls(usage, mask, axes)
            elif name == "schedule":
                open_loop["schedule"] = bl.step_schedule_controls(self.fit(), usage, mask)
        out: dict[str, Factory] = {n: ScheduleController(v).begin for n, v in open_loop.items()}
        for kind in ("emc", "dac"):
            if kind in self.methods:
                out[kind] = lambda x, kind=kind: bl.HeuristicController(kind, self.lm, self.grid, usage).begin(x)
        return out

    def run(self, targets: Sequence[float]) -> dict:
        """targets (κ, ρ, b/16) for the policy; returns {"targets", "matched_usage", "methods", "timing"}."""
        t0 = time.perf_counter()
        first: dict[str, Factory] = {
            "policy": PolicyController(self.lm, self.policy, self.grid, targets).begin}
        if self._dense is None and "dense" in self.methods:
            first["dense"] = lambda x: DenseController().begin(x)
        tr = run_traces(self.lm, self.source, first, self.batch_rows)
        self._dense = tr.get("dense", self._dense)
        policy = tr["policy"]
        usage = policy.usage()
        t1 = time.perf_counter()
        self.fit()
        t2 = time.perf_counter()
        base = run_traces(self.lm, self.source, self.baselines(usage), self.batch_rows)
        t3 = time.perf_counter()
        methods = {}
        if self._dense is not None:
            methods["dense"] = summarize(self._dense, self.cost, policy)
        methods["policy"] = summarize(policy, self.cost)
        methods["policy"]["actions"] = action_histogram(policy, self.grid)
        for name in self.methods:
            if name in base:
                methods[name] = summarize(base[name], self.cost, policy)
            elif name == "random" and self.random_seeds:
                runs = sorted(((summarize(base[f"random_{k}"], self.cost, policy), k)
                               for k in range(self.random_seeds)), key=lambda r: r[0]["ppl"])
                seeds_ppl = [r[0]["ppl"] for r in sorted(runs, key=lambda r: r[1])]
                for label, (summary, k) in (("random_median", runs[(len(runs) - 1) // 2]), ("random_best", runs[0])):
                    methods[label] = {**summary, "seed": k, "seeds_ppl": seeds_ppl}
        return {"targets": {"attn_keep": float(targets[0]), "mlp_keep": float(targets[1]),
                            "bits": 16 * float(targets[2])},
                "matched_usage": {"attn_keep": usage[0], "mlp_keep": usage[1], "bits": 16 * usage[2]},
                "methods": methods,
                "timing": {"policy_s": t1 - t0, "baselines_s": t3 - t2, **self.timing}}


# ---------------------------------------------------------------------------------------------- multiple choice
def evaluate_choices(lm, policy: RecurrentActorCriticPolicy, grid: ActionGrid, items: Sequence[dict],
                     targets: Sequence[float], *, cost: Optional[CostModel] = None, batch_rows: int = 32,
                     methods: Sequence[str] = MC_METHODS) -> dict:
    """Accuracy on ``items`` [{"ctx": [ids], "conts": [[ids], ...], "label": int, "chars": [int, ...]}]."""
    unknown = set(methods) - set(MC_METHODS)
    if unknown:
        raise ValueError(f"unknown multiple-choice methods {sorted(unknown)} (have {', '.join(MC_METHODS)})")
    t0 = time.perf_counter()
    source = ChoiceSource(lm, items)
    first: dict[str, Factory] = {"policy": PolicyController(lm, policy.eval(), grid, targets).begin}
    if "dense" in methods:
        first["dense"] = lambda x: DenseController().begin(x)
    tr = run_traces(lm, source, first, batch_rows)
    usage = tr["policy"].usage()
    mask = source.mask()
    second: dict[str, Factory] = {}
    if "fixed" in methods:
        second["fixed"] = ScheduleController(bl.fixed_controls(grid, usage, mask)).begin
    if "uniform" in methods:
        second["uniform"] = ScheduleController(bl.uniform_controls(usage, mask)).begin
    for kind in ("emc", "dac"):
        if kind in methods:
            second[kind] = lambda x, kind=kind: bl.HeuristicController(kind, lm, grid, usage).begin(x)
    tr.update(run_traces(lm, source, second, batch_rows))
    labels = [int(it["label"]) for it in items]
    out = {}
    for name in methods:
        scores = -tr[name].nll.double().sum(1)                                      # [rows]
        hit = hit_norm = 0
        for i, it in enumerate(items):
            s = scores[source.offsets[i]:source.offsets[i + 1]]
            chars = torch.tensor([max(1, int(c)) for c in it["chars"]], dtype=torch.float64)
            hit += int(int(s.argmax()) == labels[i])
            hit_norm += int(int((s / chars).argmax()) == labels[i])
        n = len(items)
        acc, acc_n = hit / n, hit_norm / n
        out[name] = {"acc": acc, "acc_se": math.sqrt(acc * (1 - acc) / n), "acc_norm": acc_n,
                     "acc_norm_se": math.sqrt(acc_n * (1 - acc_n) / n), "items": n, **_spend(tr[name], cost)}
    out["policy"]["actions"] = action_histogram(tr["policy"], grid)
    return {"targets": {"attn_keep": float(targets[0]), "mlp_keep": float(targets[1]), "bits": 16 * float(targets[2])},
            "matched_usage": {"attn_keep": usage[0], "mlp_keep": usage[1], "bits": 16 * usage[2]},
            "methods": out, "timing": {"total_s": time.perf_counter() - t0}}


# ---------------------------------------------------------------------------------------------- sweep
# (κ, ρ, bits) targets along the diagonal of the default grid: SOL net keep (κ+ρ+b/16)/3 of
# 0.41, 0.48, 0.55, 0.62, 0.69, 0.76, 0.87, 0.93; clamped up to the policy grid's lowest levels.
SWEEP_POINTS = ((0.3, 0.55, 6), (0.4, 0.6, 7), (0.5, 0.65, 8), (0.6, 0.7, 9), (0.7, 0.75, 10), (0.8, 0.8, 11),
                (0.9, 0.9, 13), (0.95, 0.95, 14))


def sweep_points(grid: ActionGrid) -> list[tuple[float, float, float]]:
    out = []
    for k, r, b in SWEEP_POINTS:
        p = (max(k, grid.kappa_levels[0]), max(r, grid.rho_levels[0]), float(max(b, grid.bit_levels[0])))
        if p not in out:
            out.append(p)
    return out
