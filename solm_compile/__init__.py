"""solm: a compiler that makes frozen language models spend compute where it counts.

    import solm_compile as solm
    path = solm.compile("smollm2", solm.SolmConfig(), out="smollm2.solm.onnx")   # the artifact
    result = solm.load(path).generate("Name the capital of France.", budget=(0.5, 0.75, 8))

Importing this package is cheap and has no side effects; the heavy modules (torch, transformers, onnx) load
when a function that needs them runs. The rooms: ``frontend`` (load, export, gate), ``passes`` (the graph
rewrites), ``ops`` (each custom op, once), ``policy`` (actions, network, the one PolicyStep, checkpoints),
``train``, ``eval``, ``artifact`` (the ONNX artifact), ``runtime`` (sessions, SolmEP), ``backend``
(torch.compile), ``bench``, ``analysis`` (cost model, inspect, verify), ``data`` (registry assets), ``cli``.
"""

__version__ = "0.2.0"

__all__ = ["GateConfig", "SolmConfig", "__version__", "compile", "load"]


def __getattr__(name: str):
    if name in ("compile", "load", "SolmConfig"):
        from solm_compile import api

        return getattr(api, name)
    if name == "GateConfig":
        from solm_compile.config import GateConfig

        return GateConfig
    raise AttributeError(f"module 'solm_compile' has no attribute {name!r}")
