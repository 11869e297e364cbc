"""solm's runtime: running the compiled ONNX artifact.

``SolmSession`` (session.py) opens an artifact and generates with it; ``ep`` locates and registers SolmEP, the C++
onnxruntime plugin execution provider that executes the ``ai.solm`` nodes and really skips the pruned work;
``ep_build`` compiles it (``python -m solm_compile.runtime.ep_build``). runtime/ep/README.md maps the C++ files.
``driver_build`` compiles ``driver/solm_driver.cc``, a C++ host of the step protocol (docs/protocol.md).
"""

__all__ = ["SolmSession"]


def __getattr__(name: str):
    if name == "SolmSession":
        from solm_compile.runtime.session import SolmSession

        return SolmSession
    raise AttributeError(f"module 'solm_compile.runtime' has no attribute {name!r}")
