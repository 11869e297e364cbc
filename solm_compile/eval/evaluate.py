"""``solm eval``: the policy against budget-matched baselines, on perplexity and multiple-choice accuracy.

Perplexity protocol (shared/research/sol_method.md §6.1; the training rollout with K=1 and greedy actions):
each block holds ctx + T + 1 tokens; dense prefill of the first ctx, then T single-token steps, step t feeding
token ctx+t under the method's controls and scoring the true token ctx+t+1. The KV entries the controlled steps
write are the compressed ones. Steps with L ≤ ts+tw+1 are dense and left out of the usage.

Every method runs through one engine (``run_traces``): a controller per method picks (κ, ρ, bits) per row and
step — or per row, step and layer ([rows, L, 3], the ``layers`` floor), then a trace records the plain mean over
layers, which is the usage (layers are equal-sized) —; the rows of several methods share one batched ``lm.step``. The policy goes first; its realised usage
(κ̄, ρ̄, b̄/16 over the effective steps of all blocks) is what every baseline is matched to (``baselines.py``).

Reported per method: ``ppl`` = exp(mean NLL over all scored tokens), ``ppl_se`` = ppl·sd(block NLL)/√n (delta
method over per-block mean NLL), the paired difference of block NLL to the policy, the realised ``usage``,
``net_keep`` = (κ̄ + ρ̄ + b̄/16)/3 (SOL's nominal metric), and ``flops_fraction`` / ``bytes_fraction``: the
mean over counted row-steps of the cost model's per-token fraction at that step's L and controls
(``*_at_mean``: one evaluation at L = ctx + T/2 and the mean usage).

Multiple choice (``evaluate_choices``): per item a dense prefill of context[:-1]; the last context token and
the continuation tokens are then processed one at a time under control, in episodes of the policy's training T
(SOL's lm-eval runner): the progress scalar is (t+1)/T within the episode, and at each episode boundary the KV
cache is rebuilt by a dense replay of every token so far and the policy starts a new episode (its own cache,
running usage and previous action reset; h from the replay). Every method gets the same refreshes.
Continuations run from 1 to ~60 tokens (hellaswag's median is ~30), so without episodes the policy would see
progress values and step positions it was never trained on. Each choice is scored by the sum of its
continuation log-probabilities (``acc``) and by that sum per character (``acc_norm``, the HellaSwag metric).
The baselines are those of perplexity but ``schedule`` and the static single-axis settings: a step-index schedule
is fit on 16-step perplexity blocks and has no meaning for continuations whose counted steps differ per row.
Each method reports its paired per-item accuracy difference to the policy.

Layout: the controllers and the prefill sources are in ``eval_sources.py``, the cost model and the per-method
summaries in ``eval_report.py``; here, the engine and the two evaluators.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch
from torch import Tensor

from solm_compile.eval import baselines as bl
from solm_compile.eval import floor as fl
from solm_compile.eval.offsets import policy_factory
from solm_compile.policy.actions import ActionGrid
from solm_compile.eval.report_html import passages_of
from solm_compile.eval.summarize import CostModel, _spend, action_histogram, summarize
from solm_compile.eval.sources import (BlockSource, ChoiceSource, DenseController, Factory, PolicyController,
                           PrefillBatch, ScheduleController, StepInputs, Trace)
from solm_compile.train.grpo import ll_reward
from solm_compile.policy.network import RecurrentActorCriticPolicy
from solm_compile.train.rollout import gate_of

METHODS = ("dense", "policy", "fixed", "random", "emc", "dac", "uniform", "schedule",
           "static_attn", "static_mlp", "static_bits")
FLOOR_METHODS = ("layers", "floor")   # need a calibration (layer_costs, calib_blocks): asked for by name
MC_METHODS = ("dense", "policy", "fixed", "random", "emc", "dac", "uniform")


# ---------------------------------------------------------------------------------------------- engine
@torch.no_grad()
def run_batch(lm, pre: PrefillBatch, methods: Sequence[tuple[str, Factory]], batch_rows: int,
              episode: Optional[int] = None) -> dict:
    """Run every method's controller over the rows of ``pre``: name -> (nll [c,T], controls [c,T,3], actions).

    ``episode``: every ``episode`` steps the cache is rebuilt by a dense replay of all tokens so far (shared by
    every method) and each controller is told so (``refresh``): SOL's lm-eval runner, where compressed KV
    entries live for at most one episode."""
    c, T = pre.ids.shape
    min_len = gate_of(lm).min_len
    eff = [pre.L0 + t + 1 > min_len for t in range(T)]
    mask = pre.valid & torch.tensor(eff)[None]
    x = StepInputs(pre.rows, pre.hid, pre.logits, pre.last_ids, pre.ids, pre.valid, mask, T)
    dense = torch.tensor(bl.DENSE)
    G = max(1, batch_rows // c)
    replays: dict[int, tuple] = {}                     # step -> (h, logits, cache): one replay for every group
    out = {}
    for g in range(0, len(methods), G):
        group = methods[g:g + G]
        k = len(group)
        ctrls = [make(x) for _, make in group]
        cache = bl.map_cache(pre.cache, lambda t: t.repeat(k, *([1] * (t.dim() - 1))))
        ids, labels = pre.ids.repeat(k, 1), pre.labels.repeat(k, 1)
        nll, ctl = torch.zeros(k * c, T), dense.repeat(k * c, T, 1)
        for t in range(T):
            if episode and t and t % episode == 0:
                if t not in replays:
                    replays[t] = _dense_replay(lm, pre, t)
                h, lg, cache = replays[t]
                for ctrl in ctrls:
                    ctrl.refresh(t, h, lg)
                cache = bl.map_cache(cache, lambda x: x.repeat(k, *([1] * (x.dim() - 1))))
            ctl_t = _joint([ctrl.act(t, eff[t]) for ctrl in ctrls])           # [k·c, 3] or [k·c, L, 3]
            if not eff[t]:
                ctl_t = dense.expand_as(ctl_t)
            lg, hid, cache = lm.step(ids[:, t, None], cache, ctl_t[..., 0].contiguous(),
                                     ctl_t[..., 1].contiguous(), ctl_t[..., 2].contiguous())
            nll[:, t] = -ll_reward(lg[:, 0], labels[:, t])
            ctl[:, t] = ctl_t if ctl_t.dim() == 2 else ctl_t.mean(1)         # [k·c, 3]: the plain layer mean
            for j, ctrl in enumerate(ctrls):
                sl = slice(j * c, (j + 1) * c)
                ctrl.observe(t, lg[sl, 0], hid[sl, 0], ctl[sl, t])
        for j, ((name, _), ctrl) in enumerate(zip(group, ctrls)):
            sl = slice(j * c, (j + 1) * c)
            out[name] = (nll[sl] * pre.valid, ctl[sl], getattr(ctrl, "actions", None))
    return out


def _joint(acts: Sequence[Tensor]) -> Tensor:
    """The controllers' controls as one batch: [rows, 3] when all are shared by the layers, else [rows, L, 3]
    (a shared row is repeated for every layer)."""
    per_layer = [a.shape[1] for a in acts if a.dim() == 3]
    if not per_layer:
        return torch.cat(acts).float()                                          # [k·c, 3]
    L = per_layer[0]
    return torch.cat([a if a.dim() == 3 else a[:, None].expand(-1, L, -1) for a in acts]).float()   # [k·c, L, 3]


def _dense_replay(lm, pre: PrefillBatch, t: int) -> tuple[Tensor, Tensor, object]:
    """The dense replay of the prefix and the first t controlled tokens [c rows]: its last hidden state [c, D],
    last logits [c, V] and cache."""
    if pre.prefix is None:
        raise ValueError("episodes need the prefill's tokens (PrefillBatch.prefix) for the dense replay")
    c = pre.ids.shape[0]
    toks = torch.cat([pre.prefix.expand(c, -1), pre.ids[:, :t]], dim=1)           # [c, L0 + t]
    logits, hid, cache = lm.prefill(toks)
    return hid[:, -1].float(), logits[:, -1].float(), cache


def run_traces(lm, source, methods: dict[str, Factory], batch_rows: int = 32,
               episode: Optional[int] = None) -> dict[str, Trace]:
    """Every method over every row of ``source`` (rows of one prefill batch share the prefill)."""
    n, T = source.n, source.T
    mask = source.mask()
    res = {name: Trace(torch.zeros(n, T), torch.tensor(bl.DENSE).repeat(n, T, 1), torch.zeros(n, T, dtype=torch.bool),
                       mask, torch.zeros(n, dtype=torch.long)) for name in methods}
    items = list(methods.items())
    for pre in source.batches(max(1, batch_rows // max(1, len(items)))):
        Ti = pre.ids.shape[1]
        for name, (nll, ctl, actions) in run_batch(lm, pre, items, batch_rows, episode).items():
            tr = res[name]
            tr.nll[pre.rows, :Ti], tr.controls[pre.rows, :Ti] = nll, ctl
            tr.valid[pre.rows, :Ti], tr.L0[pre.rows] = pre.valid, pre.L0
            if actions is not None:
                if tr.actions is None:
                    tr.actions = torch.full((n, T), -1, dtype=torch.long)
                tr.actions[pre.rows, :Ti] = actions
    return res


# ---------------------------------------------------------------------------------------------- perplexity
class PPLEvaluator:
    """Perplexity of the policy and its matched baselines on ``blocks`` [n, ≥ ctx+T+1], for any targets.

    Dense traces and the step-schedule fit are computed once and reused across ``run`` calls (a sweep)."""

    def __init__(self, lm, policy: Optional[RecurrentActorCriticPolicy], grid: ActionGrid, blocks: Tensor, *,
                 ctx: int, T: int, cost: Optional[CostModel] = None, fit_blocks: Optional[Tensor] = None,
                 random_seeds: int = 10, seed: int = 0, batch_rows: int = 32, methods: Sequence[str] = METHODS,
                 keep_passages: int = 3, layer_costs: Optional[fl.LayerCosts] = None,
                 calib_blocks: Optional[Tensor] = None, policy_floor: Optional[dict] = None):
        """``policy`` None: no policy runs (``solm eval --policy static``); every baseline is matched to the
        targets themselves. ``layer_costs``: the ``layers`` calibration; ``calib_blocks``: the calibration text
        ``floor`` picks uniform, schedule or layers on; ``policy_floor``: an offsets policy's floor record."""
        unknown = set(methods) - set(METHODS) - set(FLOOR_METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}")
        if ("schedule" in methods or "floor" in methods) and fit_blocks is None:
            raise ValueError("the schedule baseline needs fit_blocks (training text)")
        if ("layers" in methods or "floor" in methods) and layer_costs is None:
            raise ValueError("the layers baseline needs layer_costs (fit_layer_costs on calibration text)")
        if "floor" in methods and calib_blocks is None:
            raise ValueError("the floor needs calib_blocks (calibration text) to choose its static allocation on")
        self.lm, self.policy, self.grid, self.cost = lm, policy.eval() if policy else None, grid, cost
        self.ctx, self.T, self.batch_rows, self.methods = ctx, T, batch_rows, tuple(methods)
        self.random_seeds, self.seed, self.fit_blocks = random_seeds, seed, fit_blocks
        self.source = BlockSource(lm, blocks, ctx, T)
        self.layer_costs, self.policy_floor = layer_costs, policy_floor
        self.calib = None if calib_blocks is None else BlockSource(lm, calib_blocks, ctx, T)
        self.step_costs: Optional[bl.StepCosts] = None
        self._dense: Optional[Trace] = None
        self.timing: dict[str, float] = {}
        self.keep_passages = keep_passages
        self.passages: list[dict] = []    # per run: the policy's per-token steps on the first blocks (report_html)

    def floor_choice(self, usage: Sequence[float]) -> tuple[str, dict]:
        """Which of uniform / schedule / layers has the lowest perplexity on the calibration blocks at ``usage``,
        and those perplexities (never measured on the evaluated text)."""
        mask = self.calib.mask()
        ctl = {"uniform": bl.uniform_controls(usage, mask),
               "schedule": bl.step_schedule_controls(self.fit(), usage, mask),
               "layers": fl.layer_controls(self.layer_costs, usage, mask)}
        tr = run_traces(self.lm, self.calib, {n: ScheduleController(v).begin for n, v in ctl.items()},
                        self.batch_rows)
        ppl = {n: summarize(t)["ppl"] for n, t in tr.items()}
        return fl.choose_floor(ppl), ppl

    def fit(self) -> Optional[bl.StepCosts]:
        if ("schedule" in self.methods or "floor" in self.methods) and self.step_costs is None:
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
            elif name == "layers":
                open_loop["layers"] = fl.layer_controls(self.layer_costs, usage, mask)
        out: dict[str, Factory] = {n: ScheduleController(v).begin for n, v in open_loop.items()}
        for kind in ("emc", "dac"):
            if kind in self.methods:
                out[kind] = lambda x, kind=kind: bl.HeuristicController(kind, self.lm, self.grid, usage).begin(x)
        return out

    def run(self, targets: Sequence[float]) -> dict:
        """targets (κ, ρ, b/16) for the policy; returns {"targets", "matched_usage", "methods", "timing"}.
        Without a policy the baselines are matched to the targets."""
        t0 = time.perf_counter()
        first: dict[str, Factory] = {}
        if self.policy is not None:
            first["policy"] = policy_factory(self.lm, self.policy, self.grid, targets, self.T, self.policy_floor)
        if self._dense is None and "dense" in self.methods:
            first["dense"] = lambda x: DenseController().begin(x)
        tr = run_traces(self.lm, self.source, first, self.batch_rows) if first else {}
        self._dense = tr.get("dense", self._dense)
        policy = tr.get("policy")
        usage = policy.usage() if policy is not None else tuple(float(x) for x in targets)
        if policy is not None:
            self.passages.append(passages_of(policy, self.source.blocks, self.ctx, self.cost, self.grid,
                                             self.keep_passages))
        t1 = time.perf_counter()
        self.fit()
        floor = self.floor_choice(usage) if "floor" in self.methods else None
        t2 = time.perf_counter()
        factories = self.baselines(usage)
        if floor is not None and floor[0] not in factories:
            factories[floor[0]] = self._one(floor[0], usage)
        base = run_traces(self.lm, self.source, factories, self.batch_rows)
        t3 = time.perf_counter()
        methods = {}
        if self._dense is not None:
            methods["dense"] = summarize(self._dense, self.cost, policy)
        if policy is not None:
            methods["policy"] = summarize(policy, self.cost)
            methods["policy"]["actions"] = action_histogram(policy, self.grid)
        for name in self.methods:
            if name in base:
                methods[name] = summarize(base[name], self.cost, policy)
            elif name == "floor":
                methods["floor"] = {**summarize(base[floor[0]], self.cost, policy), "floor_of": floor[0],
                                    "calibration_ppl": floor[1], "calibration_blocks": self.calib.n}
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
                "timing": {"policy_s": t1 - t0, "floor_choice_s": t2 - t1, "baselines_s": t3 - t2, **self.timing}}

    def _one(self, name: str, usage: Sequence[float]) -> Factory:
        """The factory of one static method the floor chose but ``methods`` does not list."""
        mask = self.source.mask()
        v = {"uniform": lambda: bl.uniform_controls(usage, mask),
             "schedule": lambda: bl.step_schedule_controls(self.fit(), usage, mask),
             "layers": lambda: fl.layer_controls(self.layer_costs, usage, mask)}[name]()
        return ScheduleController(v).begin


# ---------------------------------------------------------------------------------------------- multiple choice
def choice_hits(nll: Tensor, offsets: Sequence[int], items: Sequence[dict]) -> tuple[Tensor, Tensor]:
    """Per item, 1.0 where the choice with the highest summed log-probability (``hit``) or the highest
    log-probability per character (``hit_norm``) is the labelled one. ``nll`` [rows, T] is 0 on padding."""
    scores = -nll.double().sum(1)                                                    # [rows]
    hit, hit_norm = torch.zeros(len(items)), torch.zeros(len(items))                 # [items]
    for i, it in enumerate(items):
        s = scores[offsets[i]:offsets[i + 1]]                                        # [choices]
        chars = torch.tensor([max(1, int(c)) for c in it["chars"]], dtype=torch.float64)
        hit[i] = float(int(s.argmax()) == int(it["label"]))
        hit_norm[i] = float(int((s / chars).argmax()) == int(it["label"]))
    return hit, hit_norm


def _paired(ref: Tensor, other: Tensor) -> tuple[float, float]:
    """Mean and standard error of the per-item difference ref - other."""
    d = (ref - other).double()
    n = d.numel()
    return float(d.mean()), (float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan"))


def evaluate_choices(lm, policy: RecurrentActorCriticPolicy, grid: ActionGrid, items: Sequence[dict],
                     targets: Sequence[float], *, cost: Optional[CostModel] = None, batch_rows: int = 32,
                     methods: Sequence[str] = MC_METHODS, random_seeds: int = 10, seed: int = 0,
                     episode: Optional[int] = None) -> dict:
    """Accuracy on ``items`` [{"ctx": [ids], "conts": [[ids], ...], "label": int, "chars": [int, ...]}].

    ``random`` runs ``random_seeds`` permutations of the fixed schedule and reports the median and the best seed
    by ``acc`` (best-of-N is an oracle over the evaluated items, as in perplexity). ``delta_acc_vs_policy`` is the
    paired per-item difference policy - method (> 0: the method is worse than the policy), with its error.
    ``episode``: the policy's training T (see the module docstring); None runs each continuation as one episode."""
    unknown = set(methods) - set(MC_METHODS)
    if unknown:
        raise ValueError(f"unknown multiple-choice methods {sorted(unknown)} (have {', '.join(MC_METHODS)})")
    t0 = time.perf_counter()
    source = ChoiceSource(lm, items)
    first: dict[str, Factory] = {"policy": PolicyController(lm, policy.eval(), grid, targets, episode).begin}
    if "dense" in methods:
        first["dense"] = lambda x: DenseController().begin(x)
    tr = run_traces(lm, source, first, batch_rows, episode)
    usage = tr["policy"].usage()
    mask = source.mask()
    fixed = bl.fixed_controls(grid, usage, mask)
    open_loop: dict[str, Tensor] = {}
    if "fixed" in methods:
        open_loop["fixed"] = fixed
    if "uniform" in methods:
        open_loop["uniform"] = bl.uniform_controls(usage, mask)
    if "random" in methods:
        for k in range(random_seeds):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
            open_loop[f"random_{k}"] = bl.random_controls(fixed, mask, gen)
    second: dict[str, Factory] = {n: ScheduleController(v).begin for n, v in open_loop.items()}
    for kind in ("emc", "dac"):
        if kind in methods:
            second[kind] = lambda x, kind=kind: bl.HeuristicController(kind, lm, grid, usage).begin(x)
    tr.update(run_traces(lm, source, second, batch_rows, episode))
    hits = {name: choice_hits(t.nll, source.offsets, items) for name, t in tr.items()}
    n = len(items)
    out = {}
    for name in tr:
        h, hn = hits[name]
        acc, acc_n = float(h.mean()), float(hn.mean())
        out[name] = {"acc": acc, "acc_se": math.sqrt(acc * (1 - acc) / n), "acc_norm": acc_n,
                     "acc_norm_se": math.sqrt(acc_n * (1 - acc_n) / n), "items": n, **_spend(tr[name], cost)}
        if name != "policy":
            d, se = _paired(hits["policy"][0], h)
            dn, sen = _paired(hits["policy"][1], hn)
            out[name].update(delta_acc_vs_policy=d, delta_acc_vs_policy_se=se, delta_acc_norm_vs_policy=dn,
                             delta_acc_norm_vs_policy_se=sen)
    if "random" in methods and random_seeds:
        runs = sorted(range(random_seeds), key=lambda k: (-out[f"random_{k}"]["acc"], k))
        seeds_acc = [out[f"random_{k}"]["acc"] for k in range(random_seeds)]
        for label, k in (("random_median", runs[(random_seeds - 1) // 2]), ("random_best", runs[0])):
            out[label] = {**out[f"random_{k}"], "seed": k, "seeds_acc": seeds_acc}
        for k in range(random_seeds):
            del out[f"random_{k}"]
    out["policy"]["actions"] = action_histogram(tr["policy"], grid)
    return {"targets": {"attn_keep": float(targets[0]), "mlp_keep": float(targets[1]), "bits": 16 * float(targets[2])},
            "matched_usage": {"attn_keep": usage[0], "mlp_keep": usage[1], "bits": 16 * usage[2]},
            "episode": episode, "methods": out, "timing": {"total_s": time.perf_counter() - t0}}


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
