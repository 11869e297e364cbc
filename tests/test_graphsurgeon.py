"""A solm artifact edited with onnx-graphsurgeon (solm_compile.artifact.surgeon) still is one: it runs under SolmEP
with the unedited artifact's greedy tokens and policy actions, its solm metadata, ai.solm opset import and
carried page-state inputs intact. Tiny random-init Llama and policy, so it is quick."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from require import need_ep, need_tools
from solm_compile.runtime import ep
from test_artifact import PROMPT, word_tokenizer

BUDGET = (0.5, 0.75, 8)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, tiny_llama):
    from tiny_lm import tiny_solm_artifact

    need_ep(ep.library_path() is not None)
    return tiny_solm_artifact(tmp_path_factory.mktemp("surgeon"), tiny_llama, word_tokenizer(), seed=2)


def edit(src, out):
    """The recipe of docs/interop.md: expose the LM head's input as an output, fold constants, clean up."""
    from solm_compile.artifact import surgeon

    graph = surgeon.load(src)
    logits = next(t for t in graph.outputs if t.name == "logits")
    hidden = logits.inputs[0].inputs[0]           # the producer of logits (the LM head's MatMul), its input
    hidden.name, hidden.dtype = "final_hidden", np.float32
    graph.outputs.append(hidden)
    surgeon.fold(graph)
    return surgeon.save(graph, out, like=src)


def test_graphsurgeon_edit_keeps_metadata_opset_page_inputs_and_tokens(artifact, tmp_path):
    from solm_compile.runtime.session import SolmSession

    need_tools("onnx_graphsurgeon")
    out = edit(artifact, tmp_path / "edited" / "tiny.solm.onnx")
    before, after = onnx.load(str(artifact)), onnx.load(str(out))
    assert [(p.key, p.value) for p in after.metadata_props] == [(p.key, p.value) for p in before.metadata_props]
    assert {(o.domain, o.version) for o in after.opset_import} >= {("ai.solm", 1)}
    assert any(n.domain == "ai.solm" for n in after.graph.node)
    assert [i.name for i in after.graph.input] == [i.name for i in before.graph.input]   # page state still fed
    assert [o.name for o in after.graph.output] == [o.name for o in before.graph.output] + ["final_hidden"]

    want = SolmSession(artifact).generate(PROMPT, 24, budget=BUDGET, greedy=True)
    s = SolmSession(out)
    assert s.ep_active and len(s.kv.page_names("past")) == 2 * s.n_layers        # protocol 2: page buffers
    got = s.generate(PROMPT, 24, budget=BUDGET, greedy=True)
    assert got.tokens == want.tokens and got.actions == want.actions
    assert len(set(want.actions)) > 1             # the policy acted (a sparse budget, not the dense path)
