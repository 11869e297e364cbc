"""The gated graph: the decode step after the passes, with per-row controls as inputs.

``GatedModel`` is the compiled graph plus what the passes reported; ``GatedLM`` wraps it into the step API the
policy trains and evaluates against (prefill, controlled single-token steps, a tileable KV cache).

Controls are per row and shared by every layer — κ, ρ, bits each [B] — or per row and layer — each [B, L]
(issue 18's per-layer floor and actions). Per-layer controls run a copy of the graph (``per_layer_graph``) in
which the l-th attention op reads column l of the gated κ and the l-th MLP op column l of the gated ρ and bits
(graph order is layer order); the gating rule (dense unless a single-token step past the sinks and window) is
the same single ``gate_controls`` node, applied elementwise.
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field

import torch

from solm_compile.config import GateConfig
from solm_compile.errors import UserError
from solm_compile.frontend.export import flat_module
from solm_compile.frontend.models import LoadedModel, ModelInfo

log = logging.getLogger(__name__)


@dataclass
class GatedModel:
    gm: torch.fx.GraphModule        # forward(input_ids, position_ids, *past, attn_keep, mlp_keep, bits)
    info: ModelInfo
    gate: GateConfig
    results: list = field(default_factory=list)   # PassResult per pass, in pipeline order
    original: torch.fx.GraphModule | None = None   # the ungated decode step (same signature, no controls)
    _per_layer: torch.fx.GraphModule | None = field(default=None, repr=False)   # built on first [B, L] call

    @property
    def gated(self) -> list[tuple[str, str]]:
        return [g for r in self.results for g in r.gated]

    def count(self, kind: str) -> int:
        target = {"attention": torch.ops.solm.quest_attention.default,
                  "mlp": torch.ops.solm.sparse_mlp.default}[kind]
        return sum(1 for n in self.gm.graph.nodes if n.target is target)

    def __call__(self, ids, pos, past, kappa, rho, bits):
        """kappa, rho, bits: [B] (every layer alike) or any of them [B, L] (per layer; the others broadcast)."""
        if max(kappa.dim(), rho.dim(), bits.dim()) == 2:
            L = self.info.num_layers
            kappa, rho, bits = (x if x.dim() == 2 else x[:, None].expand(-1, L) for x in (kappa, rho, bits))
            for name, x in (("attn_keep", kappa), ("mlp_keep", rho), ("bits", bits)):
                if x.shape[1] != L:
                    raise ValueError(f"per-layer {name} has {x.shape[1]} columns; the model has {L} layers")
            if self._per_layer is None:
                self._per_layer = per_layer_graph(self.gm, L)
            out = self._per_layer(ids, pos, *past, kappa.contiguous(), rho.contiguous(), bits.contiguous())
        else:
            out = self.gm(ids, pos, *past, kappa, rho, bits)
        return out[0], out[1], list(out[2:])


def per_layer_graph(gm: torch.fx.GraphModule, num_layers: int) -> torch.fx.GraphModule:
    """A copy of ``gm`` (sharing its weights) whose controls are [B, L]: the l-th op of each gated kind (graph
    order) reads column l of each gated control it consumes."""
    graph = copy.deepcopy(gm.graph)
    gate = next((n for n in graph.nodes if n.target is torch.ops.solm.gate_controls.default), None)
    if gate is None:
        raise UserError("per-layer controls: the graph has no solm.gate_controls node")
    for item in [u for u in gate.users if u.target is operator.getitem]:
        seen: dict = {}
        for user in list(item.users):
            layer = seen[user.target] = seen.get(user.target, -1) + 1
            with graph.inserting_before(user):
                col = graph.call_function(torch.ops.aten.select.int, (item, 1, layer))
                col = graph.call_method("contiguous", (col,))
            user.replace_input_with(item, col)
        for target, last in seen.items():
            if last + 1 != num_layers:
                raise UserError(f"per-layer controls: {last + 1} {target} ops read control {item.args[1]}, "
                                f"the model has {num_layers} layers")
    graph.lint()
    return torch.fx.GraphModule(gm, graph)


def compile_gated(loaded: LoadedModel, gate: GateConfig | None = None) -> GatedModel:
    """Run the pass pipeline over the model's decode step; refuse a model with nothing to gate."""
    from solm_compile.passes import PassContext, run_pipeline

    gate = gate or GateConfig()
    gm = flat_module(loaded.ep)
    original = flat_module(loaded.ep)
    results = run_pipeline(gm, PassContext(gate=gate, model_name=loaded.info.name))
    model = GatedModel(gm=gm, info=loaded.info, gate=gate, results=results, original=original)
    if model.count("attention") == 0 and model.count("mlp") == 0:
        raise UserError(f"{loaded.info.name}: found no attention and no MLP to gate (looked for "
                        "aten.scaled_dot_product_attention or softmax(QKᵀ)V, and down(act(gate(x))*up(x)) or "
                        "proj(act(fc(x))) over linear layers)")
    for kind in ("attention", "mlp"):
        if model.count(kind) == 0:
            log.warning("%s: no %s was gated; it stays dense", loaded.info.name, kind)
    return model


# ---------------------------------------------------------------------------------------------- step API
@dataclass
class Cache:
    """Per-layer KV tensors [B, Hkv, L, d], flat (k0, v0, k1, v1, ...)."""

    tensors: list

    @property
    def length(self) -> int:
        return self.tensors[0].shape[2]

    @property
    def batch(self) -> int:
        return self.tensors[0].shape[0]

    def repeat_interleave(self, k: int) -> "Cache":
        return Cache([t.repeat_interleave(k, dim=0) for t in self.tensors])


class GatedLM:
    """Prefill and controlled decode steps over a ``GatedModel`` (no grad, fp32)."""

    def __init__(self, model: GatedModel, kv_shape: tuple[int, int]):
        self.model = model
        self.info = model.info
        self.gate = model.gate
        self.kv_heads, self.head_dim = kv_shape
        self.weights = None          # quant.weights.WeightTable of the loaded model (--weights), set by its loader
        self._embedding = _embedding_weight(model.gm)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self._embedding)        # [B,T,D]

    def empty_cache(self, batch: int) -> Cache:
        n = 2 * self.info.num_layers
        return Cache([torch.zeros(batch, self.kv_heads, 0, self.head_dim) for _ in range(n)])

    @torch.no_grad()
    def forward(self, ids, cache: Cache, kappa, rho, bits):
        """kappa, rho, bits [B] (shared by the layers) or [B, L] (per layer)."""
        B, T = ids.shape
        pos = torch.arange(cache.length, cache.length + T).expand(B, T)   # [B,T]
        logits, hidden, present = self.model(ids, pos, cache.tensors, kappa, rho, bits)
        return logits, hidden, Cache(present)

    def prefill(self, ids: torch.Tensor):
        B = ids.shape[0]
        one = torch.ones(B)
        return self.forward(ids, self.empty_cache(B), one, one, one * 16)

    def step(self, ids, cache: Cache, kappa, rho, bits):
        return self.forward(ids, cache, kappa, rho, bits)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, gate: GateConfig | None = None) -> "GatedLM":
        model = compile_gated(loaded, gate)
        return cls(model, _kv_shape_from_graph(loaded))

    @classmethod
    def from_hf(cls, hf_model, gate: GateConfig | None = None, name: str = "model") -> "GatedLM":
        from solm_compile.frontend.models import _from_hf

        return cls.from_loaded(_from_hf(hf_model, None, name=name, source="<memory>"), gate)


def _embedding_weight(gm: torch.fx.GraphModule) -> torch.Tensor:
    for n in gm.graph.nodes:
        if n.target is torch.ops.aten.embedding.default and n.args[0].op == "get_attr":
            w = gm
            for part in n.args[0].target.split("."):
                w = getattr(w, part)
            return w.detach()
    raise UserError(f"{gm.__class__.__name__}: no token embedding found in the decode-step graph")


def _kv_shape_from_graph(loaded: LoadedModel) -> tuple[int, int]:
    past = [n for n in loaded.ep.graph.nodes if n.op == "placeholder"]
    user = [n for n in past if n.name not in loaded.ep.graph_signature.inputs_to_parameters
            and n.name not in loaded.ep.graph_signature.inputs_to_buffers
            and n.name not in loaded.ep.graph_signature.inputs_to_lifted_tensor_constants]
    val = user[2].meta["val"]
    return int(val.shape[1]), int(val.shape[3])
