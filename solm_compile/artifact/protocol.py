"""The step protocol's version: how a host drives an artifact's step graph (docs/protocol.md, every input and output).

``write_artifact`` stores ``PROTOCOL`` (``BUFFER_PROTOCOL`` for the ai.solm kinds' KV buffer form) as the metadata
key ``solm.protocol``; a host (``SolmSession``, the C++
driver ``runtime/driver/solm_driver.cc``) drives only the versions it knows and refuses any other in one line.
Artifacts written before the protocol was versioned carry no key; they follow version 1, so hosts accept them.
Bump ``PROTOCOL`` with any change to a name, dtype, shape, initial value or ownership rule in docs/protocol.md.
"""

from __future__ import annotations

from solm_compile.errors import UserError

PROTOCOL = 1             # portable and dense artifacts (and ai.solm ones in the concat form): equal-length rows
BUFFER_PROTOCOL = 3      # the ai.solm kinds' buffer form: per-row lengths, page state in place (continuous batching)
                         # in the KV cache's dtype (2: the same with float32 page state)
SUPPORTED = (1, 2, 3)


def check(meta: dict, path) -> int:
    """The artifact's protocol version (``meta``: its solm metadata); a UserError if this runtime cannot drive it."""
    version = meta.get("protocol", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version not in SUPPORTED:
        raise UserError(f"{path}: step protocol {version!r} is not one this runtime drives "
                        f"({', '.join(map(str, SUPPORTED))}); update solm or compile the model again")
    return version
