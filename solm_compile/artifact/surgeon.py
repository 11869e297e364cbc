"""Edit a ``.solm.onnx`` artifact with onnx-graphsurgeon and keep what makes it a solm artifact.

    from solm_compile.artifact import surgeon
    graph = surgeon.load("smollm2.solm.onnx")          # an onnx_graphsurgeon.Graph
    ...                                                 # edit it: rename, add outputs, fold, clean up
    surgeon.save(graph, "edited.solm.onnx", like="smollm2.solm.onnx")

What a plain ``gs.import_onnx`` / ``gs.export_onnx`` round trip does to an artifact (onnx-graphsurgeon 0.6.1):

- it keeps the opset imports (the ``ai.solm`` domain included: ``Graph.import_domains``), the custom-op nodes
  with their attributes, and ``producer_name``;
- it drops every ``metadata_props`` entry, so SolmSession no longer recognises the file (``solm.kind``, the
  shapes, the tokenizer name and the budget ranges all live there);
- it turns the graph inputs that have a default (an initializer of the same name: in protocol-1 artifacts the
  carried Quest page state ``past_page_min_i``/``past_page_max_i``, empty by default; protocol 2 has none) into
  constants, so the step can no longer be fed the previous step's page state, and ``fold_constants`` is free to
  fold through them.

``load`` turns those constants back into graph inputs before you edit, and ``save`` writes their defaults
back as initializers, restores the metadata (and any opset import the edit lost), copies the tokenizer beside
the new file and writes weights over 2 GB as external data, as solm-compile does.

Rename only tensors the step protocol does not name: SolmSession (and every loop driving an artifact) binds
``input_ids``, ``position_ids``, ``past_*``/``present_*``, ``policy_*``/``policy_*_out``, ``budget``,
``logits``, ``action`` and ``controls`` by name. Fold with ``fold(graph)`` (a size threshold, so packed
low-bit weights are not expanded into float32 constants).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from solm_compile.errors import UserError

FOLD_LIMIT = 1 << 16          # bytes: fold_constants leaves larger results unfolded (weights stay as written)
EXTERNAL_ABOVE = 1_900_000_000


def _gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise UserError("onnx-graphsurgeon is not installed (pip install solm-compile[tools])") from None
    return gs


def input_defaults(model, base_dir: str | Path = "") -> dict:
    """{name: default array} of the graph inputs that have an initializer of the same name (``base_dir``: where
    their external data lies, for a model loaded without it)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    return {i.name: numpy_helper.to_array(inits[i.name], base_dir=str(base_dir))
            for i in model.graph.input if i.name in inits}


def load(path: str | Path):
    """The artifact as an ``onnx_graphsurgeon.Graph``, its defaulted inputs still graph inputs (in their order)."""
    import onnx

    gs = _gs()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such artifact")
    model = onnx.load(str(path))
    graph = gs.import_onnx(model)
    declared = {i.name: i for i in model.graph.input}
    tensors = graph.tensors()
    for name, value in input_defaults(model).items():
        t = tensors[name]
        if isinstance(t, gs.Constant):
            dims = declared[name].type.tensor_type.shape.dim
            t.to_variable(dtype=value.dtype, shape=[d.dim_param or d.dim_value for d in dims])
            t.type = "tensor_type"        # to_variable leaves it unset in 0.6.1 and export_onnx reads it
    order = [i.name for i in model.graph.input]
    graph.inputs = [tensors[n] for n in order if n in tensors]
    return graph


def fold(graph):
    """Constant folding and cleanup that leaves large constants (the weights) as they are; returns ``graph``."""
    return graph.fold_constants(size_threshold=FOLD_LIMIT).cleanup().toposort()


def save(graph, out: str | Path, like: str | Path) -> Path:
    """Export ``graph`` to ``out`` with what the artifact ``like`` carries beyond the graph restored."""
    import onnx
    from onnx import numpy_helper

    gs = _gs()
    out, like = Path(out), Path(like)
    source = onnx.load(str(like), load_external_data=False)
    model = gs.export_onnx(graph)
    names = {i.name for i in model.graph.input}
    inits = {t.name for t in model.graph.initializer}
    missing = [(n, v) for n, v in input_defaults(source, like.parent).items() if n in names and n not in inits]
    for name, value in missing:
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    have = {o.domain for o in model.opset_import}
    for o in source.opset_import:
        if o.domain not in have:
            model.opset_import.append(o)
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    model.producer_name, model.producer_version = source.producer_name, source.producer_version
    model.ir_version = max(model.ir_version, source.ir_version)
    out.parent.mkdir(parents=True, exist_ok=True)
    _copy_tokenizer(source, like, out)
    if model.ByteSize() > EXTERNAL_ABOVE:
        onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data")
    else:                                   # atomically, as solm-compile writes: ``out`` may be ``like`` itself
        from solm_compile.io import atomic_write_bytes

        atomic_write_bytes(out, model.SerializeToString())
    return out


def _copy_tokenizer(source, like: Path, out: Path) -> None:
    import json

    meta = {p.key: p.value for p in source.metadata_props}
    name = json.loads(meta.get("solm.tokenizer", "null"))
    if name and (like.parent / name).is_file() and like.parent.resolve() != out.parent.resolve():
        shutil.copyfile(like.parent / name, out.parent / name)
