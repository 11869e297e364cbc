"""solm: a compiler that makes frozen language models spend compute where it counts.

Importing this package is cheap and has no side effects; the heavy modules (torch, transformers, onnx) load
when a function that needs them runs.
"""

__version__ = "0.1.0"
