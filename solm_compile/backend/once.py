"""One warning per process and key: the backend never crashes a user's program, and never floods it either."""

from __future__ import annotations

import threading
import warnings

_WARNED: set = set()
_LOCK = threading.Lock()


def warn_once(key: str, msg: str) -> None:
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(msg, stacklevel=3)
