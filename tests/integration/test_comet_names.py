"""CometSink and what the ``comet_ml`` SDK would lose without a word: metric names
over Comet's 100-character limit (the SDK cuts them, merging names that differ only
past it), and an experiment the SDK could not start or that was ended under the sink
(it drops whatever is logged to it). Offline experiments are read back from their
archives (``Archive``, as in ``test_comet``); the online start runs the real SDK
against a loopback server that refuses it, as a Comet server does with a bad key or
an outage (no real server can be had here)."""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from eventbus import EventBus, Log, RunInfo, TrainBegin, TrainEnd
from eventbus.errors import SinkError
from tests.conftest import require
from tests.integration import test_comet
from tests.integration.test_comet import _COMET_ENV, Archive

comet_env = test_comet.comet_env  # the fixture: no COMET_* variables, no config file, no network

pytestmark = pytest.mark.integration

SECRET = "comet-names-key-0123456789abcdefXYZ"
PEFT = "grad_norm/base_model.model.model.layers.10.self_attn.q_proj.base_layer.lora_magnitude_vector.default."


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("sinks") and r.levelno >= logging.WARNING]


def test_long_names_that_differ_past_the_limit_stay_apart(comet_env: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two PEFT-style names of 111 and 113 characters that differ only past Comet's
    100: the SDK cut both to one name, a series holding both values at every step.
    Each is logged under its first characters, ``~`` and a hash of the whole name
    (100 characters), its own values in its own series, with one warning per name
    (the SDK warned per name per step)."""
    from sinks.comet import CometSink

    caplog.set_level(logging.WARNING)
    sink = CometSink(online=False, offline_directory=str(comet_env / "off"))
    sink.isolate = False
    weight, bias = f"train/{PEFT}weight", f"train/{PEFT}bias"
    with EventBus([sink], run=RunInfo(run_id="long-names")) as bus:
        for step in range(1, 6):
            bus.publish(Log(step=step, values={"loss": 1.0 / step, PEFT + "weight": 1.0, PEFT + "bias": 2.0}))
    stats = bus.stats().sinks["comet_ml"]
    assert (stats.delivered, stats.failed) == (5, 0), stats
    archive = Archive(sink.archive_path)

    def logged_as(name: str) -> str:
        return f"{name[:91]}~{hashlib.sha256(name.encode()).hexdigest()[:8]}"

    assert len(weight) > 100 and len(bias) > 100 and weight[:100] == bias[:100]
    assert {n for n in archive.metrics if n.startswith("train/grad_norm")} == {logged_as(weight), logged_as(bias)}
    assert all(len(n) <= 100 for n in archive.metrics)
    assert [(v, s) for v, s, _ in archive.metrics[logged_as(weight)]] == [(1.0, s) for s in range(1, 6)]
    assert [(v, s) for v, s, _ in archive.metrics[logged_as(bias)]] == [(2.0, s) for s in range(1, 6)]
    assert [(v, s) for v, s, _ in archive.metrics["train/loss"]] == [(1.0 / s, s) for s in range(1, 6)]
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    for name, warning in zip((weight, bias), warnings):
        assert warning.startswith(f"comet_ml sink: metric name {name!r} has {len(name)} characters")
        assert warning.endswith(f"logged as {logged_as(name)!r} (shown once per key)")
    assert "will be truncated" not in caplog.text


class _Refusing:
    """A loopback HTTP server answering every request with ``status`` and an error
    body, as Comet's server does for a key it refuses (401) or in an outage (500)."""

    def __init__(self, status: int) -> None:
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                server.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                body = b'{"msg": "refused", "code": %d}' % status
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = _answer

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/clientlib/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def refusing(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Refusing]:
    """No COMET_* variables but an API key and the SDK pointed at a refusing loopback
    server (with no retries of its own, to keep the test short); any connection
    elsewhere fails the test."""
    import importlib.util

    require(importlib.util.find_spec("comet_ml") is not None, "comet_ml is not installed")
    for var in _COMET_ENV:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "no-such.comet.config"))
    monkeypatch.chdir(tmp_path)
    server = _Refusing(request.param)
    monkeypatch.setenv("COMET_URL_OVERRIDE", server.url)
    monkeypatch.setenv("COMET_API_KEY", SECRET)
    monkeypatch.setenv("COMET_HTTP_SESSION_RETRY_TOTAL", "0")
    monkeypatch.setenv("COMET_GET_OR_ADD_EXPERIMENT_RETRY_TOTAL", "0")
    elsewhere: list[Any] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: Any) -> None:
        if self.family == socket.AF_UNIX or (isinstance(address, tuple) and address[0] == "127.0.0.1"):
            return real_connect(self, address)
        elsewhere.append(address)
        raise OSError(f"network is blocked in this test (connect to {address!r})")

    monkeypatch.setattr(socket.socket, "connect", connect)
    try:
        yield server
    finally:
        server.close()
    assert elsewhere == [], f"the comet_ml sink tried the network beyond the loopback server: {elsewhere}"


@pytest.mark.parametrize("refusing", [401, 500], indirect=True)
def test_an_online_experiment_the_server_refuses_fails_the_open(
    refusing: _Refusing, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """The SDK logs 'COMET ERROR: Failed to create experiment' and returns an
    experiment that is not alive, which drops everything logged to it: the events
    counted as delivered were lost without a trace. The open now fails with a
    SinkError that says so (and no key), so the bus counts the events as failed."""
    from sinks.comet import CometSink

    caplog.set_level(logging.WARNING)
    sink = CometSink(project_name="p", workspace="w")
    sink.isolate = False
    sink.max_retries = 0
    with pytest.raises(SinkError, match="Comet did not start the online experiment") as raised:
        sink.open_sync(RunInfo(run_id="refused"))
    assert sink.experiment is None and sink.last_experiment_key is None
    assert refusing.requests > 0, "the SDK did ask the server"
    assert SECRET not in str(raised.value)

    with EventBus([sink], run=RunInfo(run_id="refused")) as bus:
        bus.publish(TrainBegin(step=0, config={"learning_rate": 0.1}))
        bus.publish(Log(step=1, values={"loss": 1.0}))
        bus.publish(TrainEnd(step=1))
    stats = bus.stats().sinks["comet_ml"]
    assert (stats.received, stats.delivered, stats.failed) == (3, 0, 3), stats
    assert "Comet did not start the online experiment" in (stats.last_error or "")
    assert SECRET not in caplog.text and SECRET not in "".join(capfd.readouterr())


def test_a_write_to_an_experiment_ended_under_the_sink_fails(comet_env: Path) -> None:
    """An experiment ended by something else in the process (comet_ml allows one
    alive experiment per process: another one started ends it) drops what is logged to
    it: the write fails instead, so the bus counts (or spools) those events."""
    from sinks.comet import CometSink

    sink = CometSink(online=False, offline_directory=str(comet_env / "off"))
    sink.open_sync(RunInfo(run_id="ended"))
    try:
        sink.write_sync([Log(step=1, values={"loss": 1.0})])
        sink.experiment.end()
        with pytest.raises(SinkError, match="no longer alive"):
            sink.write_sync([Log(step=2, values={"loss": 0.5})])
    finally:
        sink.close_sync()
    assert [(v, s) for v, s, _ in Archive(sink.archive_path).metrics["train/loss"]] == [(1.0, 1)]
