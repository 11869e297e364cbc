"""The local ``ai.solm`` ONNX schemas the exporter records custom-domain nodes against, built from the registry
entries' export forms (``registry.py``). Separate from ``to_onnx`` (the translations) to keep both short."""

from __future__ import annotations

import onnx
from onnxscript.values import Op, Opset

from solm_compile.ops import registry

DOMAIN = registry.DOMAIN
VERSION = registry.VERSION
SOLM = Opset(DOMAIN, VERSION)

_S = onnx.defs.OpSchema
_ATTR_TYPES = {"int": _S.AttrType.INT, "float": _S.AttrType.FLOAT, "string": _S.AttrType.STRING}


def schema_of(sig: registry.OpSig) -> onnx.defs.OpSchema:
    """The export form of ``sig`` as an OpSchema: its exported inputs, outputs and attributes (all required: the
    translations always write them) under the registry's type constraints."""
    def param(p: registry.Param):
        option = _S.FormalParameterOption.Optional if p.optional else _S.FormalParameterOption.Single
        return _S.FormalParameter(p.name, p.type_var, "", param_option=option)

    return _S(sig.onnx_name, DOMAIN, VERSION, "",
              inputs=[param(p) for p in sig.export_inputs()], outputs=[param(p) for p in sig.export_outputs()],
              type_constraints=[(var, list(types), "") for var, types in sig.types
                                if any(p.type_var == var for p in sig.export_inputs() + sig.export_outputs())],
              attributes=[_S.Attribute(a.name, _ATTR_TYPES[a.kind], "", required=True)
                          for a in sig.export_attributes()])


def op_of(sig: registry.OpSig) -> Op:
    """The onnxscript op that records an ``ai.solm`` node of ``sig``'s export form."""
    return Op(SOLM, sig.onnx_name, schema_of(sig))
