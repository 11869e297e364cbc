"""Per-layer controls (issue 18): GatedLM and the eval engine take (κ, ρ, bits) per row and layer.

The reference runs the ORIGINAL shared-controls graph through a plain ``torch.fx.Interpreter`` that hands the
l-th attention op and the l-th MLP op (graph order = layer order) layer l's own keeps — the model run layer by
layer, each layer with its own controls, without the rewritten graph under test.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

import solm_compile.ops.torch_ops  # noqa: F401 (registers torch.ops.solm)
from solm_compile.eval.evaluate import run_traces
from solm_compile.eval.sources import BlockSource, ScheduleController
from tiny_lm import gated_tiny_llama, random_blocks

DENSE = (1.0, 1.0, 16.0)
GATED = (torch.ops.solm.quest_attention.default, torch.ops.solm.sparse_mlp.default)


class LayerByLayer(fx.Interpreter):
    """Runs the shared graph, giving the l-th gated op of each kind layer l's controls ``per`` [B, L, 3] where the
    shared (gated) control is not dense."""

    def __init__(self, gm: fx.GraphModule, per: torch.Tensor):
        super().__init__(gm)
        self.per, self.seen = per, {}

    def run_node(self, n: fx.Node):
        if n.op != "call_function" or n.target not in GATED:
            return super().run_node(n)
        layer = self.seen[n.target] = self.seen.get(n.target, -1) + 1
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        for pos, a in enumerate(n.args):
            if isinstance(a, fx.Node) and a.target is operator.getitem and \
                    a.args[0].target is torch.ops.solm.gate_controls.default:
                i = a.args[1]
                args[pos] = torch.where(args[pos] == DENSE[i], args[pos], self.per[:, layer, i])
        return n.target(*args, **kwargs)


def _state(seed: int = 0, B: int = 3, ctx: int = 20):
    lm = gated_tiny_llama(seed)
    blocks = random_blocks(B, ctx + 2, seed=seed)
    _, _, cache = lm.prefill(blocks[:, :ctx])
    return lm, blocks, cache, ctx


# rows: layer 0 compressed / layer 1 dense, the reverse, and both compressed differently
PER = torch.tensor([[[0.25, 0.5, 5.0], [1.0, 1.0, 16.0]],
                    [[1.0, 1.0, 16.0], [0.5, 0.5, 8.0]],
                    [[0.5, 0.75, 8.0], [0.25, 0.5, 5.0]]])          # [B, L, 3]


def test_per_layer_controls_equal_the_layer_by_layer_reference():
    lm, blocks, cache, ctx = _state()
    ids = blocks[:, ctx, None]
    pos = torch.full((3, 1), ctx)
    sentinel = torch.full((3,), 0.5)                                 # any non-dense shared value: the gate passes it
    ref = LayerByLayer(lm.model.gm, PER).run(ids, pos, *cache.tensors, sentinel, sentinel, sentinel * 16)
    got, hid, new = lm.step(ids, cache, PER[..., 0], PER[..., 1], PER[..., 2])
    assert torch.allclose(got, ref[0], atol=1e-5, rtol=1e-5) and torch.allclose(hid, ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(new.tensors, ref[2:]):                           # the KV cache written is the same
        assert torch.allclose(a, b, atol=1e-6)
    shared, _, _ = lm.step(ids, cache, PER[:, 0, 0], PER[:, 0, 1], PER[:, 0, 2])
    assert (got - shared).abs().max() > 1e-3                        # layer 1's own keeps matter


def test_shared_controls_equal_identical_per_layer_rows_and_the_gate_still_applies():
    lm, blocks, cache, ctx = _state(seed=1)
    ids = blocks[:, ctx, None]
    k, r, b = torch.tensor([0.25, 0.5, 1.0]), torch.tensor([0.5, 0.75, 1.0]), torch.tensor([5.0, 8.0, 16.0])
    shared, h1, _ = lm.step(ids, cache, k, r, b)
    L = lm.info.num_layers
    per, h2, _ = lm.step(ids, cache, k[:, None].expand(3, L), r[:, None].expand(3, L), b[:, None].expand(3, L))
    assert torch.equal(shared, per) and torch.equal(h1, h2)
    mixed, _, _ = lm.step(ids, cache, k, r[:, None].expand(3, L), b)      # [B] and [B, L] broadcast together
    assert torch.equal(shared, mixed)
    # a multi-token call is dense whatever the controls (gate_controls), per layer too
    two = blocks[:, ctx:ctx + 2]
    dense, _, _ = lm.forward(two, cache, torch.ones(3), torch.ones(3), torch.full((3,), 16.0))
    sparse, _, _ = lm.forward(two, cache, PER[..., 0], PER[..., 1], PER[..., 2])
    assert torch.equal(dense, sparse)
    with pytest.raises(ValueError, match="3 columns; the model has 2 layers"):
        lm.step(ids, cache, torch.ones(3, 3), r, b)


def test_the_eval_engine_carries_per_layer_schedules():
    lm = gated_tiny_llama(0)
    blocks = random_blocks(4, 20 + 4 + 1, seed=3)
    src = BlockSource(lm, blocks, 20, 4)
    shared = torch.tensor([0.5, 0.75, 8.0]).repeat(4, 4, 1)                      # [n, T, 3]
    per = PER[2].repeat(4, 4, 1, 1)                                              # [n, T, L, 3]
    same = shared[:, :, None].expand(4, 4, 2, 3).clone()                         # [n, T, L, 3], equal layers
    tr = run_traces(lm, src, {n: ScheduleController(v).begin for n, v in
                              (("shared", shared), ("per", per), ("same", same))}, batch_rows=64)
    assert torch.equal(tr["shared"].nll, tr["same"].nll)
    # the reference for the per-layer rows: the step API by hand with the same per-layer controls
    _, _, cache = lm.prefill(blocks[:, :20])
    for t in range(4):
        lg, _, cache = lm.step(blocks[:, 20 + t, None], cache, per[:, t, :, 0], per[:, t, :, 1], per[:, t, :, 2])
        nll = -torch.log_softmax(lg[:, 0].float(), -1).gather(1, blocks[:, 21 + t, None])[:, 0]
        assert torch.allclose(tr["per"].nll[:, t], nll, atol=1e-5)
    # the trace records the plain layer mean: usage (0.375, 0.625, 6.5/16)
    assert torch.allclose(tr["per"].controls, torch.tensor([0.375, 0.625, 6.5]).repeat(4, 4, 1))
