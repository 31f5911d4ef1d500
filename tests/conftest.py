"""Shared fixtures. In CI (CI=true) nothing may skip: a missing dependency fails."""

from __future__ import annotations

import os
import socket
from typing import Any

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


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fail any attempt to connect or resolve a name (Unix sockets excepted), and
    record it: the test asserts the list is empty."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX:
            return real_connect(self, address)
        attempts.append(address)
        raise OSError(f"network is blocked in this test (connect to {address!r})")

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(host)
        raise OSError(f"network is blocked in this test (lookup of {host!r})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts
