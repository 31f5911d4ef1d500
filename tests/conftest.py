"""Shared fixtures. In CI (CI=true) nothing may skip: a missing dependency fails."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

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


def clean_backend_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that run the Neptune and Comet SDKs offline beside MLflow: both SDKs
    installed (a failure in CI), no COMET_/NEPTUNE_/MLFLOW_/AZUREML_ variable from
    the machine, no Comet config file, and ``tmp_path`` as the working directory
    (Neptune writes ``.neptune/`` there)."""
    import importlib.util

    require(importlib.util.find_spec("neptune") is not None, "neptune is not installed")
    require(importlib.util.find_spec("comet_ml") is not None, "comet_ml is not installed")
    from tests.integration.test_comet import _COMET_ENV

    for var in _COMET_ENV:
        monkeypatch.setenv(var, "")  # restored to absent at teardown, even if a sink set a default
        monkeypatch.delenv(var)
    for k in list(os.environ):
        if k.startswith(("MLFLOW_", "AZUREML_", "NEPTUNE_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "no-such.comet.config"))
    monkeypatch.chdir(tmp_path)


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


def wait_collected(predicate: Any, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` (collecting garbage before each try, so that finalizers of
    dropped objects run) until true or ``timeout`` seconds; returns its last value."""
    import gc
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def kill_isolated_child_once_delivered(bus: Any, name: str, events: list[Any]) -> None:
    """Publish ``events``, wait until the isolated sink ``name`` counted them all
    delivered, then SIGKILL its child process (as the OOM killer would) and reap it."""
    import signal

    [proxy] = [s for s in bus.sinks if s.name == name]
    for ev in events:
        bus.publish(ev)
    stats = bus.wait_handed(30)
    assert stats is not None and stats.sinks[name].delivered == len(events), "the events were not delivered"
    child = proxy.process
    assert child is not None and child.pid != os.getpid()
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)


def tb_run_dir(base: Any, run_id: str | None = None) -> str:
    """The TensorBoard directory of the one run (or of ``run_id``) under ``base``
    (``<output_dir>/logs``): the sink writes each run into a directory of its own,
    ``<time>_<host>_<run id>``."""
    names = sorted(n for n in os.listdir(base) if os.path.isdir(os.path.join(base, n)) and not n.startswith("rank"))
    if run_id is not None:
        names = [n for n in names if n.endswith(f"_{run_id}")]
    assert len(names) == 1, f"expected one run directory under {base}, found {names}"
    return os.path.join(str(base), names[0])


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true; fail after ``timeout`` seconds (a generous bound)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
