"""``torch.onnx.export`` of a graph with solm's ops: the translation table, then onnxscript's optimizer minus one rule.

``torch.onnx.export(..., optimize=True)`` runs ``onnxscript.optimizer.optimize_ir``: constant folding, the default
rewrite rules, dead-node removal, initializer deduplication and CSE. One of those rules, ``SlicesSplit`` (two
``Slice`` nodes of one tensor into one ``Split``), has two output nodes, and onnxscript matches such a pattern by
scanning every node of the graph for each candidate ``Slice``: quadratic in the graph's size. On SmolLM2's portable
step graph (about 13,000 nodes before optimization) that one rule was 80 % of the compile time (measured in
session 11: the whole export 597 s → 98 s on a busy 2-core machine, 190 s → ~60 s on a quiet one), and it changes
nothing in solm's graphs: the written artifacts have the same nodes, op for op, with and without it.

So the export runs with ``optimize=False`` and then the same passes as ``optimize_ir`` with the single-output rewrite
rules only. If a future onnxscript renames its rule list, the full ``optimize_ir`` runs instead (slower, same result).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def optimize(model) -> None:
    """What ``torch.onnx.export(optimize=True)`` runs (onnxscript's ``optimize_ir``, then its ONNX fusions) on the
    ``onnx_ir`` model, in place, without the multi-output-node rewrite rules."""
    import onnxscript.optimizer as optimizer
    from onnx_ir import passes
    from onnx_ir.passes import common
    from onnxscript import rewriter
    from onnxscript.rewriter import onnx_fusions

    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    folding = getattr(optimizer, "_constant_folding", None)
    if rules is None or not hasattr(folding, "FoldConstantsPass"):
        log.debug("onnxscript has no _DEFAULT_REWRITE_RULES/FoldConstantsPass: running the full optimize_ir")
        optimizer.optimize_ir(model)
    else:
        single = [r for r in rules if r._target_pattern.has_single_output_node]
        fold = folding.FoldConstantsPass(shape_inference=True,
                                         input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                         output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT)
        loop = passes.PassManager([fold, rewriter.RewritePass(single), common.RemoveUnusedNodesPass(),
                                   common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
                                  steps=2, early_stop=True)
        passes.Sequential(common.InlinePass(), loop, common.RemoveUnusedNodesPass(),
                          common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                          common.LiftSubgraphInitializersToMainGraphPass(), common.DeduplicateInitializersPass(),
                          common.CommonSubexpressionEliminationPass(), common.OutputFixPass(),
                          common.NameFixPass())(model)
    onnx_fusions.fuse(model)


def export(module: torch.nn.Module, args: tuple, table: dict | None, dynamic_shapes, input_names: list[str],
           output_names: list[str] | None = None):
    """The ``ONNXProgram`` of ``module`` traced at ``args`` (``custom_translation_table=table``), optimized."""
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=table,
                                    dynamic_shapes=dynamic_shapes, input_names=input_names,
                                    output_names=output_names, optimize=False, verbose=False)
    optimize(program.model)
    return program
