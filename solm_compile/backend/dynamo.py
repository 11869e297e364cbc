"""``torch.compile(model, backend="solm")``: the solm passes and policy as a Dynamo backend.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml), so ``backend="solm"`` works after
``pip install`` without importing solm_compile first. Options (``torch.compile(..., options={...})``)::

    policy      "static" (default: no learned policy, every decode step at the budget: the floor that no learned
                policy has beaten on held-out text, docs/policy.md), "shipped" (the learned policy shipped in
                solm_compile/policy/shipped/ for this model's identity; none → dense, with a warning when the
                budget is not dense) or the path of a policy checkpoint
    attn_keep   attention keep target κ̄ (default 1)        mlp_keep   MLP keep target ρ̄ (default 1)
    bits        output bits target (default 16)            runtime    "torch" (default) | "onnxruntime"
                each budget field is a number (every row) or a list with one number per batch row (per-row
                budgets; the batch must then have that many rows, and a number beside a list applies to every row)
    fast_mlp    use ``solm.sparse_mlp_gather`` (gathers the kept channels' weights; default True)
    fast_attention  use ``solm.quest_attention_gather`` (reads only the kept pages' keys/values; default: as
                fast_mlp, so ``fast_mlp=False`` alone gives the reference ops)
    inductor    compile the gated graph with inductor (default True; False runs it as an FX graph)

What happens to each graph Dynamo hands over (``solm_backend``)::

    Dynamo torch-IR gm ──(params/buffers → attributes, SymInt inputs → sizes of the tensors they measure)──►
    torch.export (non-strict, dynamic where Dynamo's shapes are symbolic) ──► flat ATen graph (the IR of
    ``export.py``) ──► roles: input_ids = the token-embedding index, past key = the first attention's
    ``cat(past, new)`` input (else its key), hidden = the LM head's input ──► ``passes.run_pipeline`` (the same
    passes as ``solm compile``) ──► + output hidden[:, -1] ──► sparse_mlp → sparse_mlp_gather, quest_attention →
    quest_attention_gather ──► inductor.  With ``runtime="onnxruntime"`` the gated graph (reference ops) is
    exported to ONNX instead and run by onnxruntime with SolmEP (``dynamo_ort.py``).

At run time a ``PolicyController`` (one per model and options) computes the per-row controls before each call
and keeps the policy's state across calls, exactly ``ArtifactStep.forward`` / ``train.rollout`` greedy: a
multi-token call (prefill) or a call with an empty past is dense and starts a new episode whose first hidden
state is the prefill's last one; each single-token call is one policy step. ``controller(model)`` returns it
(with the recorded actions).

A graph on which every control would be dense (a dense budget, no policy, no LM head) skips the passes: inductor
compiles Dynamo's graph unchanged and ``dynamo_run._Dense`` only keeps the controller's books.

Fallbacks: a graph without attention (a graph-break fragment), without a token embedding feeding it, or in which
the passes gate nothing is compiled by inductor unchanged (logged at INFO). A graph the lowering cannot handle (e.g.
a SymFloat input, an export failure) runs uncompiled (``gm.forward``), and a gated graph that fails at run time
switches to ``gm.forward`` — each with one warning per process, never an exception. With ``runtime="onnxruntime"``
a gated graph that cannot be exported or loaded runs the torch runtime (one warning), and a graph that is dense on
every call runs inductor's graph as above (nothing to skip). Bad options or a policy for another model raise
``UserError``.

Use ``model.compile(backend="solm", options=...)`` (or ``model.forward = torch.compile(model.forward, ...)``)
for ``model.generate()``: the module returned by ``torch.compile(model)`` forwards ``generate`` to the
uncompiled model (PyTorch's OptimizedModule semantics), so its decode steps would not be compiled.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx

from solm_compile.ops import fast as fast_ops  # noqa: F401  (register torch.ops.solm.*)
from solm_compile.ops import torch_ops as ops  # noqa: F401  (registers torch.ops.solm.*)
from solm_compile.config import Budget, GateConfig
from solm_compile.backend.once import warn_once as _warn_once
from solm_compile.errors import UserError

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")


# ---------------------------------------------------------------------------------------------- options
def _row_budgets(o: dict) -> tuple[Budget, ...]:
    """Budgets from the options: one (numbers) or one per batch row (lists, numbers broadcast)."""
    vals = {k: o.get(k, d) for k, d in (("attn_keep", 1.0), ("mlp_keep", 1.0), ("bits", 16.0))}
    lens = {len(v) for v in vals.values() if isinstance(v, (list, tuple))}
    if len(lens) > 1 or 0 in lens:
        raise UserError("torch.compile(backend='solm'): per-row attn_keep/mlp_keep/bits lists must be non-empty "
                        f"and of one length, got lengths {sorted(lens)}")
    rows = lens.pop() if lens else 1
    cols = [list(v) if isinstance(v, (list, tuple)) else [v] * rows for v in vals.values()]
    try:
        return tuple(Budget(float(k), float(r), float(b)) for k, r, b in zip(*cols))
    except (TypeError, ValueError) as e:
        raise UserError(f"torch.compile(backend='solm'): budgets must be numbers, got {vals}") from e


@dataclass(frozen=True)
class Options:
    policy: str | None = None
    budgets: tuple[Budget, ...] = (Budget(),)      # one shared, or one per batch row
    runtime: str = "torch"
    fast_mlp: bool = True
    inductor: bool = True
    fast_attention: bool = True

    @classmethod
    def parse(cls, options: dict | None) -> "Options":
        o = dict(options or {})
        known = {"policy", "attn_keep", "mlp_keep", "bits", "runtime", "fast_mlp", "inductor", "fast_attention"}
        unknown = sorted(set(o) - known)
        if unknown:
            raise UserError(f"torch.compile(backend='solm'): unknown option(s) {unknown}; "
                            f"known: {sorted(known)}")
        runtime = o.get("runtime", "torch")
        if runtime not in RUNTIMES:
            raise UserError(f"torch.compile(backend='solm'): runtime must be one of {RUNTIMES}, got {runtime!r}")
        budgets = _row_budgets(o)
        policy = o.get("policy")
        return cls(str(policy) if policy is not None else None, budgets, runtime, bool(o.get("fast_mlp", True)),
                   bool(o.get("inductor", True)), bool(o.get("fast_attention", o.get("fast_mlp", True))))

    @property
    def dense(self) -> bool:
        """Every row's budget is dense."""
        return all(b.is_dense for b in self.budgets)


# ---------------------------------------------------------------------------------------------- the policy
from solm_compile.policy.checkpoint import shipped_policy  # noqa: E402  (re-exported)


from solm_compile.backend.controller import HISTORY, PolicyController  # noqa: E402, F401 (re-exported)


_CONTROLLERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def controller(model) -> PolicyController | None:
    """The controller of a model compiled with backend="solm" (the last one created, if several)."""
    model = getattr(model, "_orig_mod", model)
    by_opts = _CONTROLLERS.get(model)
    return list(by_opts.values())[-1] if by_opts else None


def _model_info(root):
    from solm_compile.frontend.models import hf_model_info

    info = _INFO.get(root)
    if info is None:
        name = Path(str(getattr(getattr(root, "config", None), "_name_or_path", "") or "model")).name or "model"
        info = _INFO[root] = hf_model_info(root, name)
    return info


def _controller_for(root, opts: Options) -> PolicyController:
    key = (opts.policy, opts.budgets)
    if root is not None:
        hit = _CONTROLLERS.get(root, {}).get(key)
        if hit is not None:
            return hit
    info, loaded, gate, embedding = None, None, GateConfig(), None
    if opts.dense and opts.policy in (None, "static"):
        pass                                        # a dense budget runs the dense action whatever the policy
    elif opts.policy in (None, "static"):
        ctl = PolicyController(None, None, opts.budgets, gate, None, static=True)
        if root is not None:
            _CONTROLLERS.setdefault(root, {})[key] = ctl
        return ctl
    elif root is not None and hasattr(root, "config"):
        from solm_compile.policy.checkpoint import load_policy, require_joint

        info = _model_info(root)
        path = Path(opts.policy) if opts.policy != "shipped" else shipped_policy(info)
        if opts.policy != "shipped" and not path.is_file():
            raise UserError(f"torch.compile(backend='solm'): policy {path}: no such file")
        if path is not None:
            # UserError on a policy for another model, or of the offsets kind
            loaded = require_joint(load_policy(path, info), "torch.compile(backend='solm')")
            gate = loaded.gate
        elif not opts.dense:
            _warn_once("no-policy", f"solm: no policy shipped for {info.architecture} (weights "
                       f"{info.weights_hash}); running dense. Train one with `solm train` and pass "
                       "options={'policy': PATH}")
        emb = root.get_input_embeddings() if hasattr(root, "get_input_embeddings") else None
        embedding = emb.weight.detach() if emb is not None else None
    elif not opts.dense:
        _warn_once("no-root", "solm: could not find the compiled nn.Module; running dense")
    ctl = PolicyController(info, loaded, opts.budgets, gate, embedding)
    if root is not None:
        _CONTROLLERS.setdefault(root, {})[key] = ctl
    return ctl


# ---------------------------------------------------------------------------------------------- lowering
from solm_compile.backend.lower import (_add_hidden_output, _export, _has_attention, _isolated, _prepare,  # noqa: E402
                           _roles, _root_module)


# ---------------------------------------------------------------------------------------------- runners
from solm_compile.backend.run import _Dense, _Gated  # noqa: E402


def _ungated(gm: fx.GraphModule, example_inputs, opts: Options, why: str):
    log.info("solm: %s; compiling the graph unchanged", why)
    if opts.inductor:
        try:
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs)
        except Exception as e:  # noqa: BLE001
            _warn_once("inductor", f"solm: inductor failed on an ungated graph ({type(e).__name__}); "
                       "running it uncompiled")
    return gm.forward


def _lower_and_gate(gm: fx.GraphModule, example_inputs, opts: Options):
    from solm_compile.frontend.export import flat_module
    from solm_compile.passes import PassContext, run_pipeline, strip_asserts

    if not _has_attention(gm):
        return _ungated(gm, example_inputs, opts, "no attention in this graph (a graph-break fragment?)")
    root = _root_module(gm)
    with _isolated():
        ctl = _controller_for(root, opts)
    prep = _prepare(gm, example_inputs)
    ep = _export(prep)
    agm = flat_module(ep)
    phs = [n for n in agm.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(prep.keep):
        raise RuntimeError(f"the exported graph has {len(phs)} inputs, expected {len(prep.keep)}")
    strip_asserts(agm, PassContext())       # (the pipeline's first pass) export's asserts hide the real users
    roles = _roles(agm)
    if roles is None:
        return _ungated(gm, example_inputs, opts, "no token embedding feeding attention in this graph")
    ids_pos = phs.index(roles.input_ids)
    past_pos = phs.index(roles.past_key) if roles.past_is_input else None
    if not (ctl.active and roles.hidden is not None):   # every control would be dense: the graph as inductor has it
        fn = _ungated(gm, example_inputs, opts, "a dense budget (or no policy to run)")
        return _Dense(fn, prep.keep[ids_pos], None if past_pos is None else prep.keep[past_pos], ctl)
    name = ctl.info.name if ctl.info is not None else "model"
    results = run_pipeline(agm, PassContext(gate=ctl.gate, model_name=name, input_ids=roles.input_ids.name,
                                            past_key=roles.past_key.name))
    counts = {k: v for r in results for k, v in r.counts.items()}
    if not counts.get("quest_attention") and not counts.get("sparse_mlp"):
        return _ungated(gm, example_inputs, opts, "the passes found nothing to gate")
    out = next(n for n in reversed(agm.graph.nodes) if n.op == "output")
    n_out = len(out.args[0]) if isinstance(out.args[0], (tuple, list)) else 1
    with_hidden = roles.hidden is not None
    if with_hidden:
        _add_hidden_output(agm, roles.hidden)
    elif ctl.active:
        _warn_once("no-hidden", "solm: no LM head found in the graph, so the policy cannot see the hidden state; "
                   "running dense")
    fn = None
    if opts.runtime == "onnxruntime":     # before the gather kernels: they have no ONNX form
        from solm_compile.backend.ort import compile_ort

        fn = compile_ort(agm, prep.examples, prep.dynamic, ids_pos)
    if fn is None:
        fn = _torch_runtime(agm, prep, opts)
    log.info("solm: gated %s (%d inputs, dynamic=%s)", counts, len(phs), [d for d in prep.dynamic if d])
    runner = _Gated(fn, prep.keep, ids_pos, past_pos, n_out, with_hidden, ctl, gm.forward)
    runner.counts, runner.graph = counts, agm
    return runner


def _torch_runtime(agm: fx.GraphModule, prep, opts: Options):
    if opts.fast_mlp:
        fast_ops.use_gather_mlp(agm)
    if opts.fast_attention:
        fast_ops.use_gather_attention(agm)
    fn = agm
    if opts.inductor:
        def gated(*args):         # (torch.compile of the GraphModule itself is not traced here; a function is)
            return agm(*args)

        fn = torch.compile(gated, backend="inductor", dynamic=any(d is not None for d in prep.dynamic))
    return fn


def solm_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, **kwargs):
    """The Dynamo backend: gate what can be gated, compile with inductor, fall back to eager with one warning."""
    opts = Options.parse(options)
    if kwargs.get("mode") not in (None, "default"):
        _warn_once("mode", f"solm: mode={kwargs['mode']!r} is ignored")
    try:
        return _lower_and_gate(gm, example_inputs, opts)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - never crash the user's program on a graph we cannot handle
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        _warn_once("fallback", f"solm: cannot compile this graph ({type(e).__name__}: {msg}); running it "
                   "uncompiled")
        log.debug("solm fallback", exc_info=True)
        return gm.forward


def register() -> None:
    """Register ``backend="solm"`` in this process (for when the package is not pip-installed)."""
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "solm" not in _BACKENDS or _BACKENDS["solm"] is None:
        register_backend(name="solm")(solm_backend)


__all__ = ["Options", "PolicyController", "controller", "solm_backend", "register", "shipped_policy"]
