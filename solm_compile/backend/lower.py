"""Lowering for the solm Dynamo backend: a Dynamo torch-IR graph → the flat ATen decode-step graph the passes take.

Parameters and buffers become attributes and SymInt inputs the sizes of the tensors they measure; torch.export
(non-strict) gives the flat ATen graph; ``_roles`` finds input_ids, the past keys and the hidden state in it. See
``dynamo.py`` for the whole path.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor

aten = torch.ops.aten

def _source_name(src) -> str:
    name = getattr(src, "name", "")
    return name() if callable(name) else str(name)


def _root_module(gm: fx.GraphModule):
    """The nn.Module being compiled, found from the sources of the graph's parameter inputs."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:  # noqa: BLE001
        tx = None
    if tx is None:
        return None
    scope = {"L": tx.f_locals, "G": tx.f_globals}
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        src = getattr(n.meta.get("grapharg"), "source", None)
        if src is None or "_parameters" not in _source_name(src):
            continue
        chain = []
        while src is not None:
            chain.append(src)
            src = getattr(src, "base", None)
        for s in reversed(chain):                                   # from the frame's local outwards in
            try:
                obj = eval(_source_name(s), {"__builtins__": {}}, scope)  # noqa: S307 - Dynamo's own source text
            except Exception:  # noqa: BLE001
                continue
            if isinstance(obj, torch.nn.Module):
                return obj
    return None


def _has_attention(gm: fx.GraphModule) -> bool:
    import torch.nn.functional as F

    sdpa = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
    softmax = {torch.softmax, F.softmax, torch.Tensor.softmax}
    for n in gm.graph.nodes:
        if n.op == "call_function" and (n.target in sdpa or n.target in softmax):
            return True
        if n.op == "call_method" and n.target == "softmax":
            return True
    return False


def _inplace(n: fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


@dataclass
class _Prepared:
    gm: fx.GraphModule       # tensor inputs only; parameters/buffers are attributes
    keep: list               # positions of the Dynamo inputs it takes, in order
    dynamic: list            # per kept input: {dim: Dim.DYNAMIC} or None
    examples: tuple


def _prepare(gm: fx.GraphModule, example_inputs) -> _Prepared:
    """A copy of the Dynamo graph that torch.export can take: constants bound, SymInt inputs derived."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.export import Dim

    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(phs) != len(example_inputs):
        raise RuntimeError(f"{len(phs)} graph inputs but {len(example_inputs)} example inputs")
    vals = [n.meta.get("example_value") for n in phs]
    anchor = next(n for n in graph.nodes if n.op != "placeholder")   # new nodes go after every input
    root, keep, erase = torch.nn.Module(), [], []
    for i, (n, ex) in enumerate(zip(phs, example_inputs)):
        src = _source_name(getattr(n.meta.get("grapharg"), "source", None))
        is_const = isinstance(ex, torch.nn.Parameter) or "._parameters[" in src or "._buffers[" in src
        if isinstance(ex, Tensor) and is_const and not isinstance(ex, FakeTensor) \
                and not any(_inplace(u) and u.args and u.args[0] is n for u in n.users):
            name = f"_solm_const_{i}"
            if isinstance(ex, torch.nn.Parameter):
                root.register_parameter(name, ex)
            else:
                root.register_buffer(name, ex)
            with graph.inserting_before(anchor):
                attr = graph.get_attr(name)
            attr.meta = dict(n.meta)
            n.replace_all_uses_with(attr)
            erase.append(n)
        elif isinstance(ex, Tensor):
            keep.append(i)
        else:                                                       # SymInt / SymFloat / int input
            expr = getattr(getattr(vals[i], "node", None), "expr", None)
            hit = None
            for j, v in enumerate(vals):
                if hit is None and isinstance(v, Tensor) and isinstance(example_inputs[j], Tensor):
                    for d, s in enumerate(v.shape):
                        if isinstance(s, torch.SymInt) and expr is not None and s.node.expr == expr:
                            hit = (phs[j], d)
                            break
            if hit is None:
                if isinstance(ex, (torch.SymInt, int)) and not isinstance(ex, bool):
                    keep.append(i)                          # an int of its own (a cache counter): an int input
                    continue
                raise RuntimeError(f"input {n.name} ({type(ex).__name__}) is neither a tensor, an int, nor the "
                                   "size of a tensor input")
            with graph.inserting_before(anchor):
                size = graph.call_method("size", (hit[0], hit[1]))
            n.replace_all_uses_with(size)
            erase.append(n)
    for n in erase:
        graph.erase_node(n)
    graph._codegen = fx.graph.CodeGen()
    graph.lint()
    prepared = fx.GraphModule(root, graph)
    dynamic, examples = [], []
    for i in keep:
        v, ex = vals[i], example_inputs[i]
        if not isinstance(ex, Tensor):                              # an int input
            dynamic.append(Dim.DYNAMIC)
            examples.append(int(ex.node.hint) if isinstance(ex, torch.SymInt) else int(ex))
            continue
        dims = {d: Dim.DYNAMIC for d, s in enumerate(getattr(v, "shape", ()))
                if isinstance(s, torch.SymInt) and not s.node.expr.is_number}
        dynamic.append(dims or None)
        if isinstance(ex, FakeTensor):
            shape = [int(s.node.hint) if isinstance(s, torch.SymInt) else int(s) for s in ex.shape]
            ex = torch.zeros(shape, dtype=ex.dtype, device=ex.device)
        else:       # export marks its inputs' dims; Dynamo's guards on the real inputs must not see that
            ex = ex.detach().clone()
        examples.append(ex)
    return _Prepared(prepared, keep, dynamic, tuple(examples))


@contextlib.contextmanager
def _isolated():
    """Outside the Dynamo compile that is running around the backend: its TracingContext and fake mode would
    otherwise collect export's shape facts as guards of the outer frame, and fake-ify checkpoint loading."""
    from torch._guards import tracing
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with torch.no_grad(), tracing(None), unset_fake_temporarily():
        yield


def _export(prep: _Prepared):
    with _isolated():
        return torch.export.export(prep.gm, prep.examples, dynamic_shapes=tuple(prep.dynamic), strict=False)


def _fetch(gm: fx.GraphModule, node: fx.Node):
    if "val" in node.meta:
        return node.meta["val"]
    if node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj
    return None


@dataclass
class _Roles:
    input_ids: fx.Node
    past_key: fx.Node            # a placeholder (the past) or the first attention's key (no past input)
    past_is_input: bool
    hidden: fx.Node | None       # the LM head's input (after the final norm)


def _roles(gm: fx.GraphModule) -> _Roles | None:
    from solm_compile.passes.gate_attention import _match_explicit, _sdpa_args, unrepeat_kv
    from solm_compile.passes.match import skip_transparent

    nodes = list(gm.graph.nodes)
    emb = ids = None
    for n in nodes:
        if n.target is aten.embedding.default:
            idx = skip_transparent(n.args[1])
            if isinstance(idx, fx.Node) and idx.op == "placeholder":
                emb, ids = n, idx
                break
    if emb is None:
        return None
    key = None
    for n in nodes:
        if n.target is aten.scaled_dot_product_attention.default:
            key = _sdpa_args(n)["key"]
        elif n.target in (aten.softmax.int, aten._softmax.default):
            hit = _match_explicit(n)
            key = hit[1] if hit else None
        if key is not None:
            break
    if key is None:
        return None
    key = unrepeat_kv(key)
    past, is_input = key, False
    if key.target is aten.cat.default and key.args[1] in (2, -2):
        first = skip_transparent(key.args[0][0])
        if isinstance(first, fx.Node) and first.op == "placeholder":
            past, is_input = first, True
    w_emb = _fetch(gm, emb.args[0])
    hidden = None
    if isinstance(w_emb, Tensor):
        for n in nodes:
            if n.target is aten.linear.default:
                w = _fetch(gm, n.args[1])
                x = _fetch(gm, n.args[0]) if isinstance(n.args[0], fx.Node) else None
                if isinstance(w, Tensor) and tuple(w.shape) == tuple(w_emb.shape) and getattr(x, "ndim", 0) == 3:
                    hidden = n.args[0]                              # the last one: the LM head
    return _Roles(ids, past, is_input, hidden)


def _add_hidden_output(gm: fx.GraphModule, hidden: fx.Node) -> None:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    with gm.graph.inserting_before(out):
        last = gm.graph.call_function(aten.select.int, (hidden, 1, -1))   # [B, D]
    vals = out.args[0]
    vals = tuple(vals) if isinstance(vals, (tuple, list)) else (vals,)
    out.args = (vals + (last,),)
    gm.recompile()
