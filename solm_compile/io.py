"""Atomic writes, the one way solm puts a file or directory in place: a reader sees the old or the new, never half.

Everything is first written to a scratch path in the destination's directory and then moved with ``os.replace``
(a rename on one filesystem). On an exception the scratch is deleted and the destination is left untouched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a scratch path beside ``final`` (a file or directory to create); on a clean exit move it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield scratch / final.name
        _publish(scratch / final.name, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _publish(tmp: Path, final: Path) -> None:
    """``os.replace`` tmp onto final; if a racing process already put a directory there, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not (tmp.is_dir() and final.is_dir()):
            raise
        log.info("%s appeared meanwhile (another process?); keeping that copy", final)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
