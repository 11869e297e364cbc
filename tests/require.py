"""What a test needs from the machine: under CI's require flags a missing piece fails the test instead of skipping.

CI sets SOLM_REQUIRE_EP=1: the CI machine builds SolmEP, so a test that needs it and finds it missing is a failure.
"""

from __future__ import annotations

import os

import pytest


def need_ep(available: bool, why: str = "SolmEP is not built here (python -m solm_compile.runtime.ep_build)"):
    if available:
        return
    if os.environ.get("SOLM_REQUIRE_EP"):
        pytest.fail(f"SOLM_REQUIRE_EP is set: {why}")
    pytest.skip(why)
