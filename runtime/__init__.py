"""solm's runtime: running the compiled ONNX artifact.

``ep`` locates and registers SolmEP, the C++ onnxruntime plugin execution provider that executes the ``ai.solm``
nodes and really skips the pruned work; ``ep_build`` compiles it (``python -m solm_compile.runtime.ep_build``).
"""
