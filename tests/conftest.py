"""Shared fixtures. In CI (CI=true) nothing may skip: a missing dependency fails."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Whatever imports comet_ml first in this process (transformers' integrations do, when
# comet_ml is installed) must not start the SDK's Sentry reporter, which would send
# from a thread of its own during later tests. The Comet sink sets the same defaults
# itself; tests/integration/test_comet.py checks that in a fresh process without these.
os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
os.environ.setdefault("COMET_INTERNAL_REPORTING", "false")


def require(condition: bool, reason: str) -> None:
    """Skip the calling test when ``condition`` is false, except in CI, where it fails."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def require_module(name: str) -> object:
    """Import ``name`` or skip (fail in CI), like ``pytest.importorskip``."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError as exc:
        require(False, f"{name} is not installed ({exc})")
        raise  # unreachable
