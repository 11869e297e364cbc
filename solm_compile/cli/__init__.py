"""The ``solm`` and ``solm-compile`` commands: one module per command, all built on ``app``."""

from solm_compile.cli.app import compile_main, main

__all__ = ["compile_main", "main"]
