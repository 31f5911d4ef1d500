"""Shared fixtures. In CI (CI=true) nothing may skip: a missing dependency fails."""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
