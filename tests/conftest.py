"""Rules for the whole suite (tests/core and tests/comfy).

``CASA_NO_SKIP=1`` (set by tests/run.sh under ``CI=true``) turns every skipped test into a failure,
whatever the reason: CI must never land a change whose tests did not run.
"""
from __future__ import annotations

import os

import pytest

NO_SKIP_ENV = "CASA_NO_SKIP"


def _no_skip() -> bool:
    return os.environ.get(NO_SKIP_ENV, "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if _no_skip() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"{NO_SKIP_ENV} is set (CI): a skipped test is a failure. It was skipped because: {reason}"
