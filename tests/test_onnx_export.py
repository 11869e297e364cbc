"""solm's export (ops/onnx_export.py: optimize=False, then onnxscript's optimizer without its multi-output rewrite
rules) writes the graph ``torch.onnx.export(optimize=True)`` writes: the same nodes in the same order, the same
initializers, and onnxruntime gives the same outputs. The reference is torch's own exporter with its own optimizer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from tiny_lm import random_policy_file


@pytest.fixture(scope="module")
def step(tiny_llama, tmp_path_factory):
    from test_artifact import word_tokenizer

    from solm_compile.artifact import write
    from solm_compile.frontend import models
    from solm_compile.frontend.gated import GatedLM
    from solm_compile.policy import checkpoint

    loaded = models._from_hf(tiny_llama, word_tokenizer(), name="tiny", source="<test>")
    lm = GatedLM.from_loaded(loaded)
    path = random_policy_file(tmp_path_factory.mktemp("px") / "p.pt", checkpoint.model_identity(lm.info), lm.gate)
    module, policy = write.build_module(lm, "portable", checkpoint.load_policy(path, lm.info))
    torch.manual_seed(0)
    args = write._example(lm, policy, kind="portable")
    ins, outs = write.io_names(lm, "portable")
    return module.eval(), args, write._dynamic_shapes(args, policy), ins, outs


def _nodes(model: ir.Model) -> list[tuple]:
    return [(n.domain, n.op_type, len(n.inputs), len(n.outputs)) for n in model.graph]


def _run(program, args, names) -> list[np.ndarray]:
    import onnxruntime as ort

    flat = [a for x in args for a in (x if isinstance(x, tuple) else (x,))]
    sess = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: a.numpy() for n, a in zip(names, flat)})


def test_fast_optimizer_writes_what_torch_optimize_writes(step):
    from solm_compile.ops.onnx_export import export
    from solm_compile.ops.to_onnx import translation_table

    module, args, dynamic, ins, outs = step
    table = translation_table(portable=True)
    mine = export(module, args, table, dynamic, ins, outs)
    with torch.no_grad():
        ref = torch.onnx.export(module, args, dynamo=True, custom_translation_table=table, dynamic_shapes=dynamic,
                                input_names=ins, output_names=outs, optimize=True, verbose=False)
    assert _nodes(mine.model) == _nodes(ref.model)
    assert sorted(mine.model.graph.initializers) == sorted(ref.model.graph.initializers)
    names = [v.name for v in mine.model.graph.inputs]
    for a, b in zip(_run(mine, args, names), _run(ref, args, names)):
        np.testing.assert_array_equal(a, b)
