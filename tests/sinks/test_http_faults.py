"""The HTTP sinks against a loopback server that fails on cue: 500, 429 with
Retry-After, 401 until the token is refreshed, a reset connection, no answer at all.
Every test asserts exact request counts."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import anyio
import pytest

from eventbus import EventBus, Log, RunInfo, TrainBegin, TrainEnd
from eventbus.errors import SinkConfigError, SinkError, TransientSinkError
from sinks._http import HttpClient, is_loopback_host, parse_retry_after
from sinks.mlflow import MLflowSink
from tests._faultserver import FaultServer, no_mlflow_env, server  # noqa: F401 (fixtures)

TOKEN = "tok-SUPERSECRET-123456"


class Sleeps:
    """Records the waits a client asks for instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def client(server: FaultServer, **kw: Any) -> HttpClient:
    kw.setdefault("sleep", Sleeps())
    kw.setdefault("timeout", 5.0)
    return HttpClient(server.url, name="test", **kw)


# -- HttpClient ----------------------------------------------------------------------


async def test_500_is_retried_then_succeeds(server: FaultServer) -> None:
    server.fail("/echo", 500, 503)
    c = client(server, max_attempts=3)
    r = await c.json("GET", "/api/2.0/mlflow/echo")
    await c.aclose()
    assert r == {"ok": True}
    assert server.count("/echo") == 3
    assert (c.requests, c.retries) == (3, 2)
    # exponential backoff with jitter: attempt n waits in [0.5, 1] * backoff * 2**(n-1)
    assert 0.125 <= c._sleep.delays[0] <= 0.25 and 0.25 <= c._sleep.delays[1] <= 0.5


async def test_persistent_500_becomes_a_transient_error_after_max_attempts(server: FaultServer) -> None:
    server.fail("/echo", *[500] * 10)
    c = client(server, max_attempts=4)
    with pytest.raises(TransientSinkError, match="answered 500") as info:
        await c.json("GET", "/api/2.0/mlflow/echo")
    await c.aclose()
    assert server.count("/echo") == 4
    assert info.value.retry_after is None


async def test_408_is_retried_and_400_is_not(server: FaultServer) -> None:
    server.fail("/echo", 408)
    c = client(server)
    assert await c.json("GET", "/api/2.0/mlflow/echo") == {"ok": True}
    assert server.count("/echo") == 2
    server.fail("/echo", 400)
    with pytest.raises(SinkError) as info:
        await c.json("GET", "/api/2.0/mlflow/echo")
    await c.aclose()
    assert not isinstance(info.value, TransientSinkError)
    assert server.count("/echo") == 3  # a bad request is not repeated


async def test_429_waits_exactly_what_retry_after_says(server: FaultServer) -> None:
    server.fail("/echo", (429, {"Retry-After": "2"}), (429, {"Retry-After": "1.5"}))
    c = client(server)
    assert await c.json("GET", "/api/2.0/mlflow/echo") == {"ok": True}
    await c.aclose()
    assert server.count("/echo") == 3
    assert c._sleep.delays == [2.0, 1.5]


async def test_429_really_waits_for_retry_after(server: FaultServer) -> None:
    server.fail("/echo", (429, {"Retry-After": "1"}))
    c = HttpClient(server.url, name="test")  # the real sleep
    assert await c.json("GET", "/api/2.0/mlflow/echo") == {"ok": True}
    await c.aclose()
    first, second = [r.time for r in server.requests]
    assert second - first >= 0.95  # a lower bound: a busy machine only makes it longer


async def test_a_long_retry_after_is_handed_to_the_bus(server: FaultServer) -> None:
    server.fail("/echo", (429, {"Retry-After": "120"}))
    c = client(server, max_retry_after=10)
    with pytest.raises(TransientSinkError) as info:
        await c.json("GET", "/api/2.0/mlflow/echo")
    await c.aclose()
    assert server.count("/echo") == 1
    assert info.value.retry_after == 120.0
    assert c._sleep.delays == []


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-5") == 0.0


async def test_401_refreshes_the_token_once_and_succeeds(server: FaultServer) -> None:
    tokens = iter(["expired-token-aaaa", "fresh-token-bbbb"])
    calls: list[str] = []

    def provider() -> str:
        calls.append("x")
        return next(tokens)

    server.valid_tokens = {"fresh-token-bbbb"}
    c = client(server, token_provider=provider)
    assert await c.json("GET", "/api/2.0/mlflow/echo") == {"ok": True}
    assert await c.json("GET", "/api/2.0/mlflow/echo") == {"ok": True}
    await c.aclose()
    assert len(calls) == 2 and c.token_refreshes == 1
    assert [r.authorization for r in server.requests] == [
        "Bearer expired-token-aaaa",
        "Bearer fresh-token-bbbb",
        "Bearer fresh-token-bbbb",  # the fresh token is kept
    ]


async def test_401_after_a_refresh_is_a_permanent_error(server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.valid_tokens = {"nothing-matches"}
    calls: list[int] = []

    async def provider() -> str:
        calls.append(1)
        return TOKEN

    c = client(server, token_provider=provider)
    with pytest.raises(SinkError, match="401") as info:
        await c.json("GET", "/api/2.0/mlflow/echo")
    await c.aclose()
    assert not isinstance(info.value, TransientSinkError)
    assert server.count("/echo") == 2 and len(calls) == 2
    assert TOKEN not in str(info.value) and "***" in str(info.value)  # the body echoed it
    assert TOKEN not in caplog.text


async def test_static_token_401_is_not_retried(server: FaultServer) -> None:
    server.valid_tokens = {"other"}
    c = client(server, token=TOKEN)
    with pytest.raises(SinkError, match="check the token"):
        await c.json("GET", "/api/2.0/mlflow/echo")
    await c.aclose()
    assert server.count("/echo") == 1


async def test_a_reset_connection_is_retried(server: FaultServer) -> None:
    server.fail("/echo", "reset")
    c = client(server)
    assert await c.json("GET", "/api/2.0/mlflow/echo") == {"ok": True}
    await c.aclose()
    assert server.count("/echo") == 2
    assert c.retries == 1


async def test_a_server_that_never_answers_times_out(server: FaultServer) -> None:
    server.fail("/echo", "hang", "hang")
    c = client(server, timeout=0.3, max_attempts=2)
    started = time.monotonic()
    with pytest.raises(TransientSinkError, match="timed out"):
        await c.json("GET", "/api/2.0/mlflow/echo")
    await c.aclose()
    assert server.count("/echo") == 2
    assert time.monotonic() - started < 20  # a generous deadline bound: it does not hang


# -- credentials ------------------------------------------------------------------


def test_no_token_over_plain_http_to_a_remote_host() -> None:
    with pytest.raises(SinkConfigError, match="plain http"):
        HttpClient("http://tracking.example.com:5000", token=TOKEN)
    with pytest.raises(SinkConfigError, match="allow_insecure_token"):
        HttpClient("http://10.0.0.7", token_provider=lambda: TOKEN)
    with pytest.raises(SinkConfigError, match="plain http"):
        HttpClient("http://tracking.example.com", basic_auth=("me", "pw-secret"))
    # allowed: https, loopback, no credential, or an explicit opt-in
    HttpClient("https://tracking.example.com", token=TOKEN)
    HttpClient("http://127.0.0.1:5000", token=TOKEN)
    HttpClient("http://[::1]:5000", token=TOKEN)
    HttpClient("http://localhost:5000", token=TOKEN)
    HttpClient("http://tracking.example.com")
    HttpClient("http://tracking.example.com", token=TOKEN, allow_insecure_token=True)


def test_the_sink_refuses_an_env_token_over_plain_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", TOKEN)
    with pytest.raises(SinkConfigError) as info:
        MLflowSink("http://mlflow.internal:5000")
    assert TOKEN not in str(info.value)
    MLflowSink("http://mlflow.internal:5000", allow_insecure_token=True)


def test_tls_is_verified_unless_mlflow_env_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert MLflowSink("https://mlflow.example.com")._client_options["verify"] is True
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    assert MLflowSink("https://mlflow.example.com")._client_options["verify"] is False
    monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS")
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", "/nonexistent/ca.pem")
    with pytest.raises(SinkConfigError, match="/nonexistent/ca.pem"):
        MLflowSink("https://mlflow.example.com")


def test_loopback_hosts() -> None:
    assert is_loopback_host("127.0.0.1") and is_loopback_host("127.8.9.1") and is_loopback_host("::1")
    assert is_loopback_host("localhost") and is_loopback_host("[::1]")
    assert not is_loopback_host("10.0.0.1") and not is_loopback_host("example.com") and not is_loopback_host(None)


# -- through a real EventBus ---------------------------------------------------------


def sink_for(server: FaultServer, isolate: bool | None = None, **kw: Any) -> MLflowSink:
    """The sink under test; ``isolate`` None: its default (a child process on POSIX)."""
    sink = MLflowSink(server.url, experiment_name="faults", token=TOKEN, timeout=kw.pop("timeout", 5.0), **kw)
    if isolate is not None:
        sink.isolate = isolate
    sink.retry_backoff = 0.01  # the bus's own backoff, between whole write attempts
    sink.retry_backoff_max = 0.05
    return sink


def run_bus(sink: MLflowSink, n: int = 5, status: str = "completed") -> Any:
    bus = EventBus([sink], run=RunInfo(run_name="faulty"))
    # Published before start: the first drain hands the sink one batch with everything.
    bus.publish(TrainBegin(step=0, config={"learning_rate": 0.1, "hub_token": TOKEN}))
    for step in range(1, n + 1):
        bus.publish(Log(step=step, values={"loss": 1.0 / step}))
    bus.publish(TrainEnd(step=n, status=status))
    bus.start()
    return bus.close(timeout=30)


def assert_identity(stats: Any) -> None:
    s = stats.sinks["mlflow"]
    assert s.received == s.delivered + s.dropped + s.spooled + s.queue_depth


@pytest.mark.parametrize("isolate", [True, False], ids=["in-a-child-process", "in-process"])
def test_bus_delivers_through_500s_without_duplicates(server: FaultServer, isolate: bool) -> None:
    server.fail("/runs/log-batch", 500, 500, 500)
    sink = sink_for(server, isolate, max_attempts=2)
    sink.max_retries = 3
    stats = run_bus(sink)
    s = stats.sinks["mlflow"]
    assert_identity(stats)
    assert (s.received, s.delivered, s.dropped, s.failed, s.retries) == (7, 7, 0, 0, 1)
    # write 1: 2 attempts fail -> bus retry; write 2: 1 more fails, then it succeeds
    assert server.count("/runs/log-batch") == 4
    run = server.runs["run1"]
    assert [(m["key"], m["step"], m["value"]) for m in run["metrics"]] == [("loss", i, 1.0 / i) for i in range(1, 6)]
    assert run["params"] == {"learning_rate": "0.1", "hub_token": "***"}
    assert run["status"] == "FINISHED"
    assert server.count("/runs/update") == 1


@pytest.mark.parametrize("isolate", [True, False], ids=["in-a-child-process", "in-process"])
def test_bus_resumes_a_split_batch_where_it_failed(server: FaultServer, isolate: bool) -> None:
    # 1500 metrics: two log-batch requests; the second fails once past the client's
    # attempts, and the bus's retry must not send the first again.
    sink = sink_for(server, isolate, max_attempts=1)
    sink.max_retries = 2
    bus = EventBus([sink], run=RunInfo())
    bus.publish(Log(step=1, values={f"m{i}": float(i) for i in range(1500)}))
    bus.publish(TrainEnd(step=1))
    original = server._mlflow

    calls = {"n": 0}

    def flaky(method: str, path: str, query: Any, body: Any) -> Any:
        if path.endswith("/runs/log-batch"):
            calls["n"] += 1
            if calls["n"] == 2:
                return 503, {"error_code": "TEMPORARILY_UNAVAILABLE"}
        return original(method, path, query, body)

    server._mlflow = flaky  # type: ignore[method-assign]
    bus.start()
    stats = bus.close(timeout=30)
    assert_identity(stats)
    assert stats.sinks["mlflow"].delivered == 2 and stats.sinks["mlflow"].retries == 1
    assert server.count("/runs/log-batch") == 3
    metrics = server.metrics("run1")
    assert sorted(m["key"] for m in metrics) == sorted(f"m{i}" for i in range(1500))  # each exactly once


def test_bus_honours_429_retry_after_and_timeouts(server: FaultServer) -> None:
    server.fail("/runs/log-batch", (429, {"Retry-After": "0"}), "hang", "reset")
    sink = sink_for(server, max_attempts=4, timeout=0.5)
    stats = run_bus(sink)
    s = stats.sinks["mlflow"]
    assert_identity(stats)
    assert (s.delivered, s.dropped, s.retries) == (7, 0, 0)  # the client's own attempts sufficed
    assert server.count("/runs/log-batch") == 4
    assert len(server.metrics("run1")) == 5


@pytest.mark.parametrize("isolate", [True, False], ids=["in-a-child-process", "in-process"])
def test_a_dead_backend_is_counted_and_the_identity_holds(server: FaultServer, isolate: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.fail("/runs/log-batch", *[(500, {})] * 50)
    sink = sink_for(server, isolate, max_attempts=2)
    sink.max_retries = 1
    stats = run_bus(sink, status="failed")
    s = stats.sinks["mlflow"]
    assert_identity(stats)
    assert (s.received, s.delivered, s.failed, s.dropped, s.retries) == (7, 0, 7, 7, 1)
    assert server.count("/runs/log-batch") == 4  # (1 + max_retries) writes x max_attempts requests
    # the batch that held TrainEnd was lost; close() still ends the run as it said
    assert server.runs["run1"]["status"] == "FAILED"
    assert TOKEN not in caplog.text
    assert TOKEN not in (s.last_error or "") and TOKEN not in repr(sink) and TOKEN not in repr(sink.http)


def test_a_refused_token_is_isolated_and_never_logged(server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    server.valid_tokens = {"something-else"}
    sink = sink_for(server)
    sink.max_retries = 2
    stats = run_bus(sink)
    s = stats.sinks["mlflow"]
    assert_identity(stats)
    assert s.delivered == 0 and s.dropped == 7
    assert s.last_error and "401" in s.last_error
    assert TOKEN not in caplog.text and TOKEN not in s.last_error
    # 401 with a static token is permanent: no retry storm, neither here nor on the bus
    # a 401 with a static token is not retried by the client: each time the bus tries
    # to open the sink (once at start, then once per write attempt) is one request
    assert server.count("/experiments/get-by-name") == 1 + 1 + sink.max_retries
    assert all(r.authorization == f"Bearer {TOKEN}" for r in server.requests)


def test_credentials_in_the_url_become_basic_auth(server: FaultServer) -> None:
    host = server.url.split("//", 1)[1]
    sink = MLflowSink(f"http://alice:pa%24%24word-SECRET@{host}")
    assert sink.base_url == server.url
    assert "SECRET" not in repr(sink) and "SECRET" not in repr(sink.http)
    stats = run_bus(sink, n=1)
    assert stats.sinks["mlflow"].delivered == 3
    expected = "Basic " + base64.b64encode(b"alice:pa$$word-SECRET").decode()
    assert {r.authorization for r in server.requests} == {expected}


def test_resuming_a_run_that_does_not_exist_says_so(server: FaultServer) -> None:
    async def go() -> None:
        sink = MLflowSink(server.url, run_id="nope")
        with pytest.raises(SinkConfigError, match="MLFLOW_RUN_ID"):
            await sink.open(RunInfo())
        await sink.close()

    anyio.run(go)
    assert server.count("/runs/get") == 1 and server.count("/runs/create") == 0


@pytest.mark.parametrize(
    "kwargs, env, says",
    [
        ({}, {}, "MLFLOW_TRACKING_URI"),
        ({"tracking_uri": "file:///tmp/mlruns"}, {}, "mlflow server"),
        ({"tracking_uri": "postgresql://u:pw-SECRET@db/mlflow"}, {}, "not supported"),
        ({"tracking_uri": "http://127.0.0.1:1"}, {"MLFLOW_TAGS": "{not json"}, "MLFLOW_TAGS must be a JSON object"),
        ({"tracking_uri": "http://127.0.0.1:1"}, {"MLFLOW_TAGS": "[1, 2]"}, "must be a mapping"),
        ({"tracking_uri": "http://127.0.0.1:1"}, {"MLFLOW_MAX_LOG_PARAMS": "ten"}, "non-negative integer"),
        ({"tracking_uri": "http://127.0.0.1:1"}, {"MLFLOW_TRACKING_USERNAME": "bob"}, "username and a password"),
        ({"tracking_uri": "http://127.0.0.1:1", "timeout": "5"}, {}, "option .timeout. must be a number"),
    ],
)
def test_bad_configuration_is_a_clear_error(
    kwargs: dict[str, Any], env: dict[str, str], says: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SinkConfigError, match=says) as info:
        MLflowSink(**kwargs)
    assert "SECRET" not in str(info.value)


def test_metric_names_are_sanitised_as_mlflow_requires() -> None:
    from sinks.mlflow import sanitize_name

    assert sanitize_name("eval/accuracy") == "eval/accuracy"
    assert sanitize_name("loss (smoothed)") == "loss _smoothed_"  # transformers' rule
    assert sanitize_name("a//b/") == "a/b" and sanitize_name("/abs") == "abs"
    assert sanitize_name("../up") == "__/up" and sanitize_name(".") == "_"
    assert len(sanitize_name("k" * 300)) == 250
