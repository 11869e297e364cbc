"""Lockstep comparison of an artifact with the torch gated graph, and rounding-boundary certificates.

SOL's controls are discontinuous: fake quantisation rounds, the MLP keeps the ⌈ρD⌉ largest channels, Quest keeps the
best pages, the policy takes an argmax. Two float32 backends (torch's and onnxruntime's matmuls sum in different
orders) feed these decisions inputs that differ by ~1e-6 relative, so whenever a decision sits within that noise of
its boundary the two can legitimately take different sides — at 5 bits one quantisation step of a massive-activation
row is several units of the residual stream, which moves the logits by whole units.

So the artifact is compared step by step on the *same* state (the torch run's KV cache and policy state fed to both),
and every step where the two disagree must be explained. A probe copy of the artifact also outputs every
QuestAttention / SparseMLP result; the first op whose output differs must contain a decision within float noise of
its boundary whose flip (re-running the torch step with it taken the other way) makes that op agree; then the next
differing op, and so on, until the step's action and logits agree. A semantic difference (a wrong page formula, an
off-by-one channel count, a different scale) is not explained by flipped near-boundary decisions and fails.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from solm_compile.ops import torch_ops as ops

NEAR = 1e-4     # a decision whose relative margin is below this is a candidate for a float-noise flip
NEAR_Q = 2e-3   # the same for quantisation, in steps: 1e-6 of a row's max is 1.3e-4 of a step at 8 bits
OP_TOL = 1e-3   # an op output is "the same" if within this (relative to max(1, its max |value|))
_OP_OUT = re.compile(r"(quest_attention|sparse_mlp)(?:_(\d+))?")


@dataclass
class Recorder:
    """Wraps the decision points of ``solm_compile.ops.torch_ops`` for one torch step: records near-boundary decisions as
    (kind, call, where) and takes the decisions listed in ``flip`` the other way."""
    flip: list | None = None
    calls: dict = field(default_factory=lambda: {"quant": 0, "chan": 0, "page": 0, "policy": 0})
    near: list = field(default_factory=list)     # (kind, call, where, op): op = index into ``outs`` (-1: policy)
    outs: list = field(default_factory=list)     # every solm op output of the step, in graph order

    def _next(self, kind: str) -> int:
        self.calls[kind] += 1
        return self.calls[kind] - 1

    def _near(self, kind: str, call: int, where: tuple) -> None:
        self.near.append((kind, call, where, len(self.outs) if kind != "policy" else -1))

    def _flipping(self, kind: str, call: int):
        return [f[2] for f in self.flip or () if f[:2] == (kind, call)]

    def fake_quant(self, orig, y, bits):
        c = self._next("quant")
        out = orig(y, bits)
        if float(bits.min()) >= 16:
            return out
        qmax = (2.0 ** (torch.round(bits) - 1) - 1).view(-1, 1, 1)           # [B,1,1]
        s = y.abs().amax(-1, keepdim=True) / qmax                            # [B,T,1]
        r = (y / s).double()                                                 # [B,T,D] in quantisation steps
        margin = ((r.abs() % 1) - 0.5).abs()                                 # distance to a k+½ boundary
        for idx in (margin < NEAR_Q).nonzero().tolist():
            self._near("quant", c, tuple(idx))
        for where in self._flipping("quant", c):
            out = out.clone()
            v = r[where]
            alt = torch.floor(v) if torch.round(v) > v else torch.ceil(v)    # the other side of the boundary
            out[where] = (alt.clamp(-qmax.view(-1)[where[0]], qmax.view(-1)[where[0]]) * s[where[:2]][0]).float()
        return out

    def topk_channels(self, orig, x, rho):
        c = self._next("chan")
        out = orig(x, rho)
        D = x.shape[-1]
        k = torch.ceil(rho.double() * D - 1e-9).clamp(1, D).long()           # [B]
        mag, order = x.abs().sort(-1, descending=True)                       # [B,T,D]
        for b, t in np.ndindex(*x.shape[:2]):
            kb = int(k[b])
            if kb < D and float(mag[b, t, kb - 1] - mag[b, t, kb]) < NEAR * float(mag[b, t, 0]):
                self._near("chan", c, (b, t))
        for b, t in self._flipping("chan", c):   # drop the k-th largest channel, keep the (k+1)-th instead
            out = out.clone()
            kb = int(k[b])
            out[b, t, order[b, t, kb - 1]] = 0
            out[b, t, order[b, t, kb]] = x[b, t, order[b, t, kb]]
        return out

    def quest_keep(self, orig, q, k, kappa, S, sinks, window, attn_mask=None):
        # (the near-tie analysis below assumes every key is unmasked: true for SmolLM2's decode steps, whose mask,
        # when there is one, allows every past key)
        c = self._next("page")
        keep = orig(q, k, kappa, S, sinks, window, attn_mask)                # [B,H,L]
        B, H, _, d = q.shape
        Hkv, L = k.shape[1], k.shape[2]
        P = -(-L // S)
        kp = torch.cat([k, k[:, :, -1:].expand(B, Hkv, P * S - L, d)], 2)    # [B,Hkv,P*S,d]
        pages = kp.view(B, Hkv, P, S, d).double()
        hi, lo = pages.amax(3), pages.amin(3)                                # [B,Hkv,P,d]
        qv = q[:, :, 0].double().reshape(B, Hkv, H // Hkv, 1, d)             # [B,Hkv,G,1,d]
        score = torch.maximum(qv * hi[:, :, None], qv * lo[:, :, None]).sum(-1).reshape(B, H, P)
        n = torch.ceil(kappa.double() * L - 1e-9).clamp(0, L)
        pb = torch.ceil(n / S).clamp(max=P).long()                           # [B]
        top, order = score.sort(-1, descending=True)                         # [B,H,P]
        for b, h in np.ndindex(B, H):
            p = int(pb[b])
            if 0 < p < P and float(kappa[b]) < 1 and \
                    float(top[b, h, p - 1] - top[b, h, p]) < NEAR * float(top[b, h].abs().max()):
                self._near("page", c, (b, h))
        for b, h in self._flipping("page", c):   # the pb-th best page out, the (pb+1)-th in; sinks, window stay
            p = int(pb[b])
            keep = keep.clone()
            pos = torch.arange(L)
            forced = (pos < sinks) | (pos >= L - window)
            out_p, in_p = int(order[b, h, p - 1]), int(order[b, h, p])
            keep[b, h] = torch.where(pos // S == out_p, forced, keep[b, h])
            keep[b, h] |= pos // S == in_p
        return keep

    def policy_tail(self, orig, *a, **kw):
        c = self._next("policy")
        logits = orig(*a, **kw)                                              # [B,1,A]
        top = logits.topk(2, -1)
        for b in range(logits.shape[0]):
            if float(top.values[b, 0, 0] - top.values[b, 0, 1]) < NEAR * max(1.0, float(top.values[b, 0, 0].abs())):
                self._near("policy", c, (b,))
        for (b,) in self._flipping("policy", c):   # swap the best two actions
            logits = logits.clone()
            i, j = top.indices[b, 0, 0], top.indices[b, 0, 1]
            logits[b, 0, i], logits[b, 0, j] = top.values[b, 0, 1], top.values[b, 0, 0]
        return logits


class _Outputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Appends the output of every solm attention / MLP op to ``rec.outs``."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.solm.quest_attention.default, torch.ops.solm.sparse_mlp.default):
            self.rec.outs.append(out.detach().numpy().copy())
        return out


@contextlib.contextmanager
def recording(rec: Recorder, policy):
    saved = {n: getattr(ops, n) for n in ("fake_quant", "topk_channels", "quest_keep")}
    tail = policy._tail
    try:
        for n, orig in saved.items():
            setattr(ops, n, (lambda f, o: lambda *a: f(o, *a))(getattr(rec, n), orig))
        policy._tail = lambda *a, **kw: rec.policy_tail(tail, *a, **kw)
        with _Outputs(rec):
            yield rec
    finally:
        for n, orig in saved.items():
            setattr(ops, n, orig)
        del policy._tail


def probe_copy(artifact: Path) -> tuple[Path, list[str]]:
    """A copy of ``artifact`` (beside it, so it finds the tokenizer) that also outputs every QuestAttention and
    SparseMLP result; returns its path and those output names in graph order."""
    import onnx

    m = onnx.load(str(artifact))
    names = [o for n in m.graph.node for o in n.output if _OP_OUT.fullmatch(o)]
    order = {n: (int(_OP_OUT.fullmatch(n).group(2) or 0), n.startswith("sparse")) for n in names}
    names.sort(key=order.get)                                    # layer by layer, attention before MLP
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    path = artifact.with_name(artifact.stem + ".probe.onnx")
    onnx.save(m, str(path), save_as_external_data=True, location=path.name + ".data")
    return path, names


def _replay(step, pol, flip, tok, pos, past, state, target):
    rec = Recorder(flip=flip)
    with recording(rec, pol):
        return step(tok, pos, tuple(past), *state, target), rec


def _diff(torch_outs: list, ort_outs: list) -> tuple[int, int]:
    """(index of the first op whose output differs, how many of its elements differ); (n_ops, 0) if none."""
    for i, (a, b) in enumerate(zip(torch_outs, ort_outs)):
        b = b.reshape(a.shape)
        bad = np.abs(a - b) > OP_TOL * max(1.0, float(np.abs(b).max()))
        if bad.any():
            return i, int(bad.sum())
    return len(torch_outs), 0


def _explain(run, ort_outs: list, action, near: list, max_flips: int = 8, reach: int = 4) -> tuple | None:
    """Flip near-boundary decisions, op by op in graph order, until the torch step's op outputs and action match
    the artifact's. ``run(flips) -> (torch_out, Recorder)``. A flip is accepted when it moves the first differing
    op later or leaves fewer differing elements in it (one op may hold several flips); it is looked for in that op
    first, then in the ``reach`` ops before it (a flip too small to exceed
    the tolerance where it happens shows a little later). Returns the flips, or None if nothing explains a
    difference (``explain_failure`` says where)."""
    flips: list = []
    if action is not None:    # the policy chose differently: only a near-tie of its top two actions explains it
        pol = [c for c in near if c[0] == "policy"]
        if not pol:
            _last_failure.update(op=-1, why="the actions differ and the policy's top two are not near-tied")
            return None
        flips.append(pol[0][:3])
    for _ in range(max_flips):
        o, rec = run(flips)
        i, n = _diff(rec.outs, ort_outs)
        if i == len(rec.outs):
            return tuple(flips)
        cands = sorted((c for c in rec.near if i - reach <= c[3] <= i and c[:3] not in flips), key=lambda c: -c[3])
        for c in cands:
            _, r2 = run(flips + [c[:3]])
            j, m = _diff(r2.outs, ort_outs)
            if j > i or (j == i and m < n):
                flips.append(c[:3])
                break
        else:
            a, b = rec.outs[i], ort_outs[i].reshape(rec.outs[i].shape)
            _last_failure.update(op=i, why=f"op {i} differs by {float(np.abs(a - b).max()):.3g} (max |x| "
                                 f"{float(np.abs(b).max()):.3g}); near-boundary decisions in ops {i - reach}..{i}: "
                                 f"{[c[:3] for c in cands][:8]}, flips so far {flips}")
            return None
    return None


_last_failure: dict = {}


def _distance(torch_out, ort_out, k: int) -> float:
    """Max |Δlogit| between the two steps; infinite if they chose different actions."""
    if int(torch_out[8 + k][0]) != int(ort_out["action"][0]):
        return float("inf")
    return float(np.abs(torch_out[0][0, -1].numpy() - ort_out["logits"][0, -1]).max())


@torch.no_grad()
def lockstep(lm, loaded_policy, sess, op_names: list[str], prompt_ids: list[int], budget, n: int,
             tol: float = 1e-3) -> list[dict]:
    """Run ``n`` greedy steps of the torch ArtifactStep; feed every step's exact inputs to the onnxruntime session
    ``sess`` (of a ``probe_copy``, whose extra outputs are ``op_names``) as well. Returns per step {token, action,
    agree, certificate, worst}: ``certificate`` lists the near-boundary decisions whose flips reproduce the
    artifact's step (None where the two agree, or where nothing explains the difference)."""
    from solm_compile.artifact.step import ArtifactStep, initial_policy_state
    from solm_compile.policy.step import STATE_NAMES, PolicyStep

    from solm_compile.runtime.kv import KvCache

    meta = {k[5:]: json.loads(v) for k, v in sess.get_modelmeta().custom_metadata_map.items() if k.startswith("solm.")}
    kv = KvCache.of(meta)                          # the artifact's KV protocol: concat, or a buffer + past_length
    pol = loaded_policy.policy
    step = ArtifactStep(lm.model.gm, PolicyStep.from_loaded(loaded_policy), lm._embedding, lm.gate.min_len).eval()
    names = [o.name for o in sess.get_outputs()]
    ids = torch.tensor([prompt_ids])                                                     # [1, T]
    target = torch.tensor([[budget[0], budget[1], budget[2] / 16]], dtype=torch.float32)  # [1, 3]
    logits, hid, cache = lm.prefill(ids)
    logits, past = logits[:, -1], list(cache.tensors)
    state, report = initial_policy_state(step.step, 1, hid[:, -1]), []
    n_layers = len(past) // 2
    state_names = STATE_NAMES
    for t in range(n):
        tok = logits.argmax(-1, keepdim=True)                                            # [1, 1]
        pos = torch.full((1, 1), ids.shape[1] + t)
        cache = {f"past_{kind}_{i}": past[2 * i + j].numpy() for i in range(n_layers)
                 for j, kind in enumerate(("key", "value"))}                              # [1, Hkv, L, d] each
        if kv.buffered:                            # the same rows in the artifact's buffer (runtime/kv.py)
            restored = kv.restore(cache, capacity=cache["past_key_0"].shape[2] + 1)  # alive through the run:
            cache = {name: v if isinstance(v, np.ndarray) else v.numpy()         # .numpy() views its memory
                     for name, v in restored.items()}
        feeds = {"input_ids": tok.numpy(), "position_ids": pos.numpy(), "budget": target.numpy(), **cache,
                 **{name: s.numpy() for name, s in zip(state_names, state)}}
        got = dict(zip(names, sess.run(None, feeds)))
        run = lambda flips: _replay(step, pol, flips, tok, pos, past, state, target)  # noqa: E731
        o, rec = run([])
        k = len(past)
        worst = _distance(o, got, k)
        cert = None
        if worst > tol:
            _last_failure.clear()
            diff_action = int(o[8 + k][0]) != int(got["action"][0])
            cert = _explain(run, [got[n] for n in op_names], got["action"] if diff_action else None, rec.near)
            if cert is not None and _distance(run(list(cert))[0], got, k) > tol:
                _last_failure.update(why="op outputs agree after the flips but the logits do not")
                cert = None
        report.append({"token": int(tok), "action": int(o[8 + k]), "agree": worst <= tol, "certificate": cert,
                       "worst": worst, "unexplained": None if worst <= tol or cert else _last_failure.get("why")})
        past, logits = list(o[1:1 + k]), o[0][:, -1]
        state = tuple(o[1 + k:8 + k])
    return report
