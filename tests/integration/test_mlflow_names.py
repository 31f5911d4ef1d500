"""Metric names against a real ``mlflow server``: every name the sinks send is one the
server takes, a key it refuses anyway costs that key and not the batch (nor the spool),
two names that sanitise alike stay two series, and an int too large for a float does
not fail the batch. What was published through a real EventBus is read back over
MLflow's REST API."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import anyio
import httpx
import pytest

from eventbus import EventBus, Log, RunInfo, TrainBegin, TrainEnd
from eventbus.errors import SinkError
from sinks import mlflow as mlflow_module
from sinks.azureml import AzureMLSink
from sinks.mlflow import MLflowSink, sanitize_name
from tests.integration.test_mlflow import API, history, run_data

pytestmark = pytest.mark.integration

HOSTILE = [
    "..dots",
    "...",
    "a" * 249 + "/b",  # cut at 250: a trailing "/"
    "c" * 248 + "/.x",  # cut at 250: a trailing "/."
    "x" * 300,
    "",
    "/lead",
    "a/./b",
    "trail/",
    "../up",
    "loss(avg)",
    "été",
]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("MLFLOW_", "AZUREML_")):
            monkeypatch.delenv(k)


def experiment() -> str:
    return f"names-{uuid.uuid4().hex[:8]}"


def publish(sink: MLflowSink, events: list[Any], **bus: Any) -> Any:
    with EventBus([sink], run=RunInfo(run_name="names"), **bus) as b:
        for ev in events:
            b.publish(ev)
    return b.stats().sinks[sink.name]


def steps_of(url: str, run_id: str, key: str) -> list[tuple[int, Any]]:
    return [(s, v) for s, v, _ in history(url, run_id, key)]


def refused_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sinks.mlflow" and "refused" in r.getMessage()]


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "in-a-child-process"])
def test_every_hostile_name_reaches_the_server_with_the_rest_of_its_batch(mlflow_server: str, isolate: bool) -> None:
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    sink.isolate = isolate
    stats = publish(sink, [Log(step=s, values={"loss": 1.0 / s, **{k: float(i) for i, k in enumerate(HOSTILE)}}) for s in (1, 2, 3)])
    assert (stats.delivered, stats.failed, stats.errors) == (3, 0, 0), stats.last_error
    run = sink.run_id or ""
    assert steps_of(mlflow_server, run, "loss") == [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]
    names = [sanitize_name(k) for k in HOSTILE]
    assert len(set(names)) == len(HOSTILE)
    for i, name in enumerate(names):
        assert steps_of(mlflow_server, run, name) == [(1, float(i)), (2, float(i)), (3, float(i))], (HOSTILE[i], name)


def test_a_spooling_sink_is_not_blocked_by_a_name_the_server_would_refuse(mlflow_server: str, tmp_path: Any) -> None:
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    sink.isolate = False
    sink.spool = True
    with EventBus([sink], run=RunInfo(run_name="names", output_dir=str(tmp_path))) as bus:
        bus.publish(Log(step=1, values={"loss": 1.0, "...": 0.1}))
        for s in range(2, 11):
            bus.publish(Log(step=s, values={"loss": 1.0 / s}))
    stats = bus.stats().sinks["mlflow"]
    assert (stats.received, stats.delivered, stats.spooled, stats.failed, stats.errors) == (10, 10, 0, 0, 0), stats.last_error
    assert [s for s, _ in steps_of(mlflow_server, sink.run_id or "", "loss")] == list(range(1, 11))
    assert steps_of(mlflow_server, sink.run_id or "", "___") == [(1, 0.1)]


def test_the_azure_ml_sink_keeps_its_metrics_beside_a_name_that_needs_repair(mlflow_server: str) -> None:
    # An Azure ML workspace speaks MLflow's REST API; the real server stands in for it.
    sink = AzureMLSink(mlflow_server, token="not-a-real-token", experiment_name=experiment())
    sink.isolate = False
    stats = publish(sink, [Log(step=s, values={"loss": 1.0 / s, "..dots": 0.1, "loss(avg)": 0.2}) for s in (1, 2, 3)])
    assert (stats.delivered, stats.failed, stats.errors) == (3, 0, 0), stats.last_error
    run = sink.run_id or ""
    assert [s for s, _ in steps_of(mlflow_server, run, "loss")] == [1, 2, 3]
    assert [s for s, _ in steps_of(mlflow_server, run, "__dots")] == [1, 2, 3]
    assert [s for s, _ in steps_of(mlflow_server, run, "loss_avg_")] == [1, 2, 3]


@pytest.mark.parametrize("bad", ["..dots", "m" * 251], ids=["server-names-the-entry", "too-long-server-does-not-say-which"])
def test_a_key_the_server_refuses_is_dropped_and_its_batch_arrives(
    mlflow_server: str, bad: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A server rule the sink's renaming does not know (a newer server, a Windows one
    # refusing ":"): here, renaming that lets this one name through as it is.
    real = mlflow_module.sanitize_name
    monkeypatch.setattr(mlflow_module, "sanitize_name", lambda name: name if name == bad else real(name))
    caplog.set_level(logging.WARNING)
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    sink.isolate = False
    events: list[Any] = [TrainBegin(step=0, config={"lr": 0.1})]
    events += [Log(step=s, values={"loss": 1.0 / s, bad: 0.5, "acc": 0.25 * s}) for s in range(1, 6)]
    stats = publish(sink, events + [TrainEnd(step=5)])
    assert (stats.received, stats.delivered, stats.failed, stats.dropped, stats.errors) == (7, 7, 0, 0, 0), stats.last_error
    got = run_data(mlflow_server, sink.run_id or "")
    assert got["status"] == "FINISHED" and got["params"] == {"lr": "0.1"}
    assert sorted(got["metrics"]) == ["acc", "loss"]
    assert [s for s, _ in steps_of(mlflow_server, sink.run_id or "", "loss")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in steps_of(mlflow_server, sink.run_id or "", "acc")] == [1, 2, 3, 4, 5]
    (warning,) = refused_warnings(caplog)
    assert warning.startswith(f"mlflow sink: MLflow refused metric {bad!r}") and "rest of this run" in warning


def test_a_param_the_run_holds_with_another_value_costs_that_param_only(mlflow_server: str, caplog: pytest.LogCaptureFixture) -> None:
    # MLflow refuses to change a param ("Changing param values is not allowed"), without
    # saying which entry of the batch it is.
    caplog.set_level(logging.WARNING)
    sink = MLflowSink(mlflow_server, experiment_name=experiment())

    async def go() -> None:
        await sink.open(RunInfo(run_name="names"))
        async with httpx.AsyncClient() as c:  # another process set it meanwhile
            r = await c.post(f"{mlflow_server}{API}/runs/log-parameter", json={"run_id": sink.run_id, "key": "lr", "value": "1"})
            r.raise_for_status()
        batch = [TrainBegin(step=0, config={"lr": 0.1, "epochs": 3})]
        batch += [Log(step=s, values={"loss": 1.0 / s}) for s in range(1, 4)]
        await sink.write(batch)
        await sink.write([TrainEnd(step=3)])
        await sink.close()

    anyio.run(go)
    got = run_data(mlflow_server, sink.run_id or "")
    assert got["params"] == {"lr": "1", "epochs": "3"} and got["status"] == "FINISHED"
    assert [s for s, _ in steps_of(mlflow_server, sink.run_id or "", "loss")] == [1, 2, 3]
    (warning,) = refused_warnings(caplog)
    assert warning.startswith("mlflow sink: MLflow refused param 'lr'") and "Changing param values" in warning


def test_a_deleted_run_is_an_error_not_a_list_of_refused_keys(mlflow_server: str, caplog: pytest.LogCaptureFixture) -> None:
    # The server answers 400 INVALID_PARAMETER_VALUE for a deleted run too: no key is
    # to blame, none is dropped.
    caplog.set_level(logging.WARNING)
    sink = MLflowSink(mlflow_server, experiment_name=experiment())

    async def go() -> None:
        await sink.open(RunInfo(run_name="names"))
        async with httpx.AsyncClient() as c:
            (await c.post(f"{mlflow_server}{API}/runs/delete", json={"run_id": sink.run_id})).raise_for_status()
        batch = [Log(step=1, values={"loss": 1.0, "acc": 0.5})]
        with pytest.raises(SinkError, match="answered 400.*active"):
            await sink.write(batch)
        async with httpx.AsyncClient() as c:
            (await c.post(f"{mlflow_server}{API}/runs/restore", json={"run_id": sink.run_id})).raise_for_status()
        await sink.write(batch)  # the bus's retry: the same batch, every key in it
        await sink.close()

    anyio.run(go)
    assert sorted(run_data(mlflow_server, sink.run_id or "")["metrics"]) == ["acc", "loss"]
    assert refused_warnings(caplog) == []


def test_two_names_that_sanitise_alike_are_two_series(mlflow_server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    sink.isolate = False
    stats = publish(sink, [Log(step=s, values={"acc@1": 0.9, "acc_1": 0.1}) for s in (1, 2)])
    assert (stats.delivered, stats.errors) == (2, 0)
    run = sink.run_id or ""
    assert steps_of(mlflow_server, run, "acc_1") == [(1, 0.1), (2, 0.1)]
    moved = sink.metric_names["acc@1"]
    assert moved.startswith("acc_1_") and steps_of(mlflow_server, run, moved) == [(1, 0.9), (2, 0.9)]
    assert sorted(run_data(mlflow_server, run)["metrics"]) == sorted(["acc_1", moved])
    (warning,) = [r.getMessage() for r in caplog.records if "kept apart" in r.getMessage()]
    assert "'acc@1'" in warning and "'acc_1'" in warning and repr(moved) in warning


def test_an_int_too_large_for_a_float_does_not_cost_its_batch(mlflow_server: str) -> None:
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    sink.isolate = False
    stats = publish(sink, [Log(step=1, values={"loss": 1.0, "hugeint": 10**400}), Log(step=2, values={"loss": 0.5})])
    assert (stats.delivered, stats.failed, stats.errors) == (2, 0, 0), stats.last_error
    assert steps_of(mlflow_server, sink.run_id or "", "loss") == [(1, 1.0), (2, 0.5)]
    assert "hugeint" not in run_data(mlflow_server, sink.run_id or "")["metrics"]
