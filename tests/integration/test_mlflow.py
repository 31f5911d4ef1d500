"""MLflowSink against a real ``mlflow server``: what was published through a real
EventBus is read back over MLflow's REST API, exactly."""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any

import httpx
import pytest

from eventbus import EventBus, Evaluate, Log, RunInfo, Save, TrainBegin, TrainEnd
from sinks.mlflow import RUN_ID_TAG, MLflowSink

pytestmark = pytest.mark.integration

API = "/api/2.0/mlflow"
T0 = 1_700_000_000_000_000_000  # a fixed time_ns, so timestamps can be compared exactly


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("MLFLOW_"):
            monkeypatch.delenv(k)


def get(url: str, op: str, **params: Any) -> Any:
    r = httpx.get(f"{url}{API}/{op}", params=params, timeout=30)
    r.raise_for_status()
    return r.json()


def run_data(url: str, run_id: str) -> dict[str, Any]:
    run = get(url, "runs/get", run_id=run_id)["run"]
    data = run["data"]
    return {
        "status": run["info"]["status"],
        "run_name": run["info"].get("run_name"),
        "params": {p["key"]: p["value"] for p in data.get("params", [])},
        "tags": {t["key"]: t["value"] for t in data.get("tags", [])},
        "metrics": {m["key"]: m["value"] for m in data.get("metrics", [])},
    }


def history(url: str, run_id: str, key: str) -> list[tuple[int, Any, int]]:
    ms = get(url, "metrics/get-history", run_id=run_id, metric_key=key).get("metrics", [])
    return sorted((m["step"], m["value"], m["timestamp"]) for m in ms)


def publish_all(sink: MLflowSink, events: list[Any], run_name: str | None = None, run: RunInfo | None = None) -> Any:
    with EventBus([sink], run=run or RunInfo(run_name=run_name)) as bus:
        for ev in events:
            bus.publish(ev)
    stats = bus.stats().sinks[sink.name]
    assert stats.received == stats.delivered + stats.dropped + stats.spooled + stats.queue_depth
    assert (stats.dropped, stats.errors) == (0, 0), stats.last_error
    return stats


def experiment() -> str:
    return f"eventbus-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("isolate", [True, False], ids=["in-a-child-process", "in-process"])
def test_run_params_tags_and_metric_histories_read_back(mlflow_server: str, monkeypatch: pytest.MonkeyPatch, isolate: bool) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name := experiment())
    monkeypatch.setenv("MLFLOW_TAGS", '{"team": "nlp", "release.version": "2.2.0"}')
    sink = MLflowSink()
    assert sink.isolate == (os.name == "posix")  # the default: in a child process
    sink.isolate = isolate
    config = {"learning_rate": 5e-5, "per_device_train_batch_size": 8, "hub_token": "***", "report_to": ["mlflow"]}
    events: list[Any] = [TrainBegin(step=0, config=config, model_config={"hidden_size": 32, "learning_rate": 1.0})]
    for step in range(1, 21):
        events.append(Log(step=step, epoch=step / 10, time_ns=T0 + step * 10**6, values={"loss": 2.0 / step, "learning_rate": 1e-3 * step}))
    events.append(Log(step=3, time_ns=T0, values={"grad_norm": float("nan"), "acc (top-1)": 0.25, "note": "not a number"}))
    events.append(Log(step=4, time_ns=T0, values={"grad_norm": float("inf")}))
    # transformers publishes eval metrics both as a log and as an evaluation: log once
    events.append(Log(step=10, time_ns=T0, values={"eval_loss": 0.75}))
    events.append(Evaluate(step=10, time_ns=T0, metrics={"eval_loss": 0.75}))
    events.append(Evaluate(step=20, time_ns=T0, metrics={"eval_loss": 0.5}))
    events.append(Save(step=20, checkpoint_dir="/tmp/out/checkpoint-20", is_best=True))
    events.append(TrainEnd(step=20, status="completed"))
    publish_all(sink, events, run_name="first-run")

    exp = get(mlflow_server, "experiments/get-by-name", experiment_name=name)["experiment"]
    run_id = sink.run_id
    assert run_id
    got = run_data(mlflow_server, run_id)
    assert get(mlflow_server, "runs/get", run_id=run_id)["run"]["info"]["experiment_id"] == exp["experiment_id"]
    assert got["status"] == "FINISHED"
    assert got["run_name"] == "first-run"
    # training arguments over the model config, as transformers merges them; secrets stay redacted
    assert got["params"] == {
        "hidden_size": "32",
        "learning_rate": "5e-05",
        "per_device_train_batch_size": "8",
        "hub_token": "***",
        "report_to": "['mlflow']",
    }
    assert got["tags"]["team"] == "nlp" and got["tags"]["release.version"] == "2.2.0"
    assert got["tags"]["checkpoint.last"] == got["tags"]["checkpoint.best"] == "/tmp/out/checkpoint-20"
    assert history(mlflow_server, run_id, "loss") == [(s, 2.0 / s, (T0 + s * 10**6) // 10**6) for s in range(1, 21)]
    assert [(s, v) for s, v, _ in history(mlflow_server, run_id, "learning_rate")] == [(s, 1e-3 * s) for s in range(1, 21)]
    assert [(s, v) for s, v, _ in history(mlflow_server, run_id, "eval_loss")] == [(10, 0.75), (20, 0.5)]
    grad = history(mlflow_server, run_id, "grad_norm")
    assert grad[0][0] == 3 and (grad[0][1] == "NaN" or math.isnan(grad[0][1]))
    assert grad[1][0] == 4 and grad[1][1] == pytest.approx(1.7976931348623157e308)  # MLflow stores inf as max float
    # a name MLflow refuses is sanitised as transformers does, and the mapping kept
    # (by the sink in whichever process ran it: here, when that is this one)
    if not isolate:
        assert sink.metric_names == {"acc (top-1)": "acc _top-1_"}
    assert history(mlflow_server, run_id, "acc _top-1_") == [(3, 0.25, T0 // 10**6)]
    assert "note" not in got["metrics"]


def test_failed_training_ends_the_run_failed(mlflow_server: str) -> None:
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    publish_all(sink, [Log(step=1, values={"loss": 1.0}), TrainEnd(step=1, status="failed", error="boom")])
    got = run_data(mlflow_server, sink.run_id or "")
    assert got["status"] == "FAILED"
    assert got["tags"]["eventbus.train_status"] == "failed"


def test_interrupted_training_ends_the_run_killed(mlflow_server: str) -> None:
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    publish_all(sink, [Log(step=1, values={"loss": 1.0}), TrainEnd(step=1, status="interrupted")])
    assert run_data(mlflow_server, sink.run_id or "")["status"] == "KILLED"


def test_more_than_1000_metrics_in_one_batch_are_split(mlflow_server: str) -> None:
    sink = MLflowSink(mlflow_server, experiment_name=experiment())
    sink.isolate = False  # in this process: the test spies on the sink's HTTP client
    http = sink.http
    sent: list[int] = []
    original = http._client.request

    async def spy(method: str, url: str, **kw: Any) -> Any:
        if url.endswith("/runs/log-batch"):
            body = json.loads(kw.get("content") or b"{}")
            sent.append(tuple(len(body.get(k, [])) for k in ("metrics", "params", "tags")))
        return await original(method, url, **kw)

    http._client.request = spy  # type: ignore[method-assign]
    params: dict[str, Any] = {f"p{i:03d}": i for i in range(119)}
    params["long"] = "y" * 7000
    values = {f"m{i:04d}": float(i) for i in range(1010)}
    publish_all(sink, [TrainBegin(step=0, config=params), Log(step=7, values=values), TrainEnd(step=7)])
    # within MLflow's limits per request: 1000 metrics, 100 params, 1000 entities in all
    assert sent == [(900, 100, 0), (110, 20, 0)]
    got = run_data(mlflow_server, sink.run_id or "")
    assert got["metrics"] == values
    # params once each, a value past MLflow's limit truncated to it
    assert got["params"] == {**{k: str(v) for k, v in params.items()}, "long": "y" * 6000}
    assert history(mlflow_server, sink.run_id or "", "m1009")[0][:2] == (7, 1009.0)


def test_mlflow_run_id_resume_appends(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    first = MLflowSink(mlflow_server, experiment_name=experiment())
    publish_all(
        first,
        [TrainBegin(step=0, config={"lr": 0.1, "seed": 1})]
        + [Log(step=s, values={"loss": 1.0 / s}) for s in range(1, 6)]
        + [TrainEnd(step=5, status="interrupted")],
    )
    run_id = first.run_id
    assert run_data(mlflow_server, run_id or "")["status"] == "KILLED"

    monkeypatch.setenv("MLFLOW_RUN_ID", run_id or "")
    second = MLflowSink(mlflow_server)
    # the resumed trainer sends its config again, with one value changed and one new:
    # MLflow refuses to change a param, so params already set are not sent again
    publish_all(
        second,
        [TrainBegin(step=5, config={"lr": 0.2, "seed": 1, "resumed": True})]
        + [Log(step=s, values={"loss": 1.0 / s}) for s in range(6, 11)]
        + [TrainEnd(step=10)],
    )
    assert second.run_id == run_id
    got = run_data(mlflow_server, run_id or "")
    assert got["status"] == "FINISHED"
    assert got["params"] == {"lr": "0.1", "seed": "1", "resumed": "True"}
    assert [(s, v) for s, v, _ in history(mlflow_server, run_id or "", "loss")] == [(s, 1.0 / s) for s in range(1, 11)]


def runs_of(url: str, experiment_name: str) -> list[str]:
    exp = get(url, "experiments/get-by-name", experiment_name=experiment_name)["experiment"]["experiment_id"]
    r = httpx.post(f"{url}{API}/runs/search", json={"experiment_ids": [exp]}, timeout=30)
    r.raise_for_status()
    return sorted(run["info"]["run_id"] for run in r.json().get("runs", []))


def killed_at_15(bus_run_id: str) -> tuple[list[Any], RunInfo]:
    """What a first process published before it was killed in the evaluation at step
    15: training metrics through step 15, evaluations at 5 and 10 (not 15), a NaN."""
    events: list[Any] = [TrainBegin(step=0, config={"lr": 0.1})]
    for s in range(1, 16):
        events.append(Log(step=s, time_ns=T0 + s * 10**6, values={"loss": 1.0 / s, "grad_norm": float("nan") if s == 13 else 1.0}))
        if s % 5 == 0 and s < 15:
            events.append(Evaluate(step=s, time_ns=T0 + s * 10**6, metrics={"eval_loss": 2.0 / s}))
    return events, RunInfo(run_id=bus_run_id)


def resumed_from_10(bus_run_id: str, end: int = 20) -> tuple[list[Any], RunInfo]:
    """The resumed process (checkpoint 10): steps 11-15 again, with new timestamps and
    other values (they must not reach MLflow), then new steps, evaluations at 15, 20."""
    t1 = T0 + 10**12
    events: list[Any] = [TrainBegin(step=10, config={"lr": 0.2, "resumed": True}, resumed_from="/out/checkpoint-10")]
    for s in range(11, end + 1):
        events.append(Log(step=s, time_ns=t1 + s * 10**6, values={"loss": 1.0 / s + (1.0 if s <= 15 else 0.0), "grad_norm": 1.0}))
        if s % 5 == 0:
            events.append(Evaluate(step=s, time_ns=t1 + s * 10**6, metrics={"eval_loss": 2.0 / s}))
    events.append(TrainEnd(step=end))
    return events, RunInfo(run_id=bus_run_id, resumed=True)


def assert_continued_once(url: str, run_id: str, end: int = 20) -> None:
    """Each step once; 1-15 as the first process sent them (its values and timestamps)."""
    got = run_data(url, run_id)
    assert got["status"] == "FINISHED"
    assert got["params"] == {"lr": "0.1", "resumed": "True"}
    first = [(s, 1.0 / s, (T0 + s * 10**6) // 10**6) for s in range(1, 16)]
    then = [(s, 1.0 / s, (T0 + 10**12 + s * 10**6) // 10**6) for s in range(16, end + 1)]
    assert history(url, run_id, "loss") == first + then
    # per key: the evaluation at 15 the first process never sent goes, though the
    # run already had the training metrics of step 15
    assert [(s, v) for s, v, _ in history(url, run_id, "eval_loss")] == [(s, 2.0 / s) for s in range(5, end + 1, 5)]
    grad = history(url, run_id, "grad_norm")
    assert [s for s, _, _ in grad] == list(range(1, end + 1))
    assert grad[12][1] == "NaN" or math.isnan(grad[12][1])


@pytest.mark.parametrize("isolate", [True, False], ids=["in-a-child-process", "in-process"])
def test_a_resumed_bus_run_continues_its_mlflow_run_without_resending_steps(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch, isolate: bool
) -> None:
    # The eventbus run (one run id) is killed after step 15 and resumed from its
    # checkpoint at step 10, without MLFLOW_RUN_ID: one MLflow run, each step once.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name := experiment())
    bus_run_id = uuid.uuid4().hex[:12]
    first = MLflowSink(mlflow_server)
    first.isolate = isolate
    events, run = killed_at_15(bus_run_id)
    publish_all(first, events, run=run)
    assert run_data(mlflow_server, first.run_id or "")["tags"][RUN_ID_TAG] == bus_run_id
    # (a SIGKILL would have left it RUNNING; any status is continued)
    httpx.post(f"{mlflow_server}{API}/runs/update", json={"run_id": first.run_id, "status": "RUNNING"}, timeout=30)

    second = MLflowSink(mlflow_server)
    second.isolate = isolate
    events, run = resumed_from_10(bus_run_id)
    publish_all(second, events, run=run)
    assert second.run_id == first.run_id and second.continued
    assert runs_of(mlflow_server, name) == [first.run_id]
    assert_continued_once(mlflow_server, first.run_id or "")
    if not isolate:
        assert second._skipped == 2 * 5  # loss and grad_norm at 11..15

    # Resumed once more (from step 20, say): still the same run.
    third = MLflowSink(mlflow_server)
    publish_all(third, [Log(step=21, values={"loss": 0.01}), TrainEnd(step=21)], run=RunInfo(run_id=bus_run_id, resumed=True))
    assert third.run_id == first.run_id and runs_of(mlflow_server, name) == [first.run_id]


def test_a_new_or_not_resumed_bus_run_starts_a_new_mlflow_run(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name := experiment())
    bus_run_id = uuid.uuid4().hex[:12]
    first = MLflowSink(mlflow_server)
    publish_all(first, [Log(step=1, values={"loss": 1.0}), TrainEnd(step=1)], run=RunInfo(run_id=bus_run_id))
    # the same run id, not resumed (a fresh start that reuses an id): a new run
    again = MLflowSink(mlflow_server)
    publish_all(again, [Log(step=1, values={"loss": 0.5}), TrainEnd(step=1)], run=RunInfo(run_id=bus_run_id))
    # another run id, resumed (its MLflow run was never created): a new run
    other = MLflowSink(mlflow_server)
    publish_all(other, [Log(step=1, values={"loss": 0.25}), TrainEnd(step=1)], run=RunInfo(run_id="other", resumed=True))
    assert len({first.run_id, again.run_id, other.run_id}) == 3
    assert not (first.continued or again.continued or other.continued)
    assert runs_of(mlflow_server, name) == sorted([first.run_id, again.run_id, other.run_id])
    assert run_data(mlflow_server, other.run_id or "")["tags"][RUN_ID_TAG] == "other"
    for sink, v in ((first, 1.0), (again, 0.5), (other, 0.25)):
        assert [(s, x) for s, x, _ in history(mlflow_server, sink.run_id or "", "loss")] == [(1, v)]


def test_mlflow_run_id_wins_over_the_tagged_run_and_is_not_sent_steps_again(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name := experiment())
    bus_run_id = uuid.uuid4().hex[:12]
    tagged = MLflowSink(mlflow_server)
    publish_all(tagged, [Log(step=1, values={"loss": 1.0}), TrainEnd(step=1)], run=RunInfo(run_id=bus_run_id))
    # the run the user names: one an earlier process (another bus run id) killed at 15
    named = MLflowSink(mlflow_server)
    events, run = killed_at_15("someone-else")
    publish_all(named, events, run=run)

    monkeypatch.setenv("MLFLOW_RUN_ID", named.run_id or "")
    second = MLflowSink(mlflow_server)
    events, run = resumed_from_10(bus_run_id)
    publish_all(second, events, run=run)
    assert second.run_id == named.run_id and second.continued
    assert runs_of(mlflow_server, name) == sorted([tagged.run_id, named.run_id])
    assert_continued_once(mlflow_server, named.run_id or "")
    assert run_data(mlflow_server, named.run_id or "")["tags"][RUN_ID_TAG] == "someone-else"  # kept
    assert [(s, v) for s, v, _ in history(mlflow_server, tagged.run_id or "", "loss")] == [(1, 1.0)]  # untouched


@pytest.mark.parametrize("isolate", [True, False], ids=["in-a-child-process", "in-process"])
def test_mlflow_run_id_for_a_run_that_is_not_a_resume_gets_every_metric(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch, isolate: bool
) -> None:
    # Another phase of training logged into the same run, its steps counted anew: the
    # steps the run already holds are not a resume's duplicates, and nothing is held back.
    first = MLflowSink(mlflow_server, experiment_name=experiment())
    publish_all(first, [Log(step=s, time_ns=T0 + s, values={"loss": 1.0 / s}) for s in range(1, 6)] + [TrainEnd(step=5)])
    monkeypatch.setenv("MLFLOW_RUN_ID", first.run_id or "")
    second = MLflowSink(mlflow_server)
    second.isolate = isolate
    publish_all(second, [Log(step=s, time_ns=T0 + 100 + s, values={"loss": 10.0 + s}) for s in range(1, 4)] + [TrainEnd(step=3)])
    assert second.run_id == first.run_id
    got = [(s, v) for s, v, _ in history(mlflow_server, first.run_id or "", "loss")]
    assert sorted(got) == sorted([(s, 1.0 / s) for s in range(1, 6)] + [(s, 10.0 + s) for s in range(1, 4)])


def test_nested_run_and_flattened_limited_params(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = MLflowSink(mlflow_server, experiment_name=(name := experiment()))
    publish_all(parent, [TrainEnd(step=0)])
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.run_id or "")
    monkeypatch.setenv("MLFLOW_NESTED_RUN", "1")
    monkeypatch.setenv("MLFLOW_FLATTEN_PARAMS", "TRUE")
    monkeypatch.setenv("MLFLOW_MAX_LOG_PARAMS", "3")
    child = MLflowSink(mlflow_server, experiment_name=name)
    config = {"optim": {"name": "adamw", "betas": {"b1": 0.9}}, "lr": 0.1, "long": "x" * 7000, "dropped": 1}
    publish_all(child, [TrainBegin(step=0, config=config), TrainEnd(step=0)])
    assert child.run_id != parent.run_id
    got = run_data(mlflow_server, child.run_id or "")
    assert got["tags"]["mlflow.parentRunId"] == parent.run_id
    # flattened with ".", then the first MLFLOW_MAX_LOG_PARAMS of them
    assert got["params"] == {"optim.name": "adamw", "optim.betas.b1": "0.9", "lr": "0.1"}
    assert run_data(mlflow_server, parent.run_id or "")["params"] == {}


class DiesMidBatch(MLflowSink):
    """Its first child process dies (``os._exit``, as if killed) right after the first
    ``runs/log-batch`` request of a batch of metrics got through; ``marker`` records
    that it happened, so the next child lives."""

    def __init__(self, *args: Any, marker: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.marker = marker

    async def write(self, batch: Any) -> None:
        if not os.path.exists(self.marker) and any(isinstance(ev, Log) for ev in batch):
            http = self.http
            send = http.json

            async def then_die(method: str, path: str, **kw: Any) -> Any:
                out = await send(method, path, **kw)
                if path.endswith("/runs/log-batch") and kw.get("json", {}).get("metrics"):
                    with open(self.marker, "w") as f:
                        f.write(str(os.getpid()))
                    os._exit(9)
                return out

            http.json = then_die  # type: ignore[method-assign]
        await super().write(batch)


def test_a_child_killed_mid_batch_resends_it_without_duplicate_metrics(mlflow_server: str, tmp_path: Any) -> None:
    # The new child has none of the dead one's resume state, so it sends the whole batch
    # again, metrics already stored included. Each carries its event's timestamp, so the
    # resent ones are identical to the stored ones, which MLflow's store drops.
    marker = str(tmp_path / "died")
    sink = DiesMidBatch(mlflow_server, experiment_name=experiment(), marker=marker)
    sink.isolate = True
    sink.max_delay = 0.2
    values = {f"m{i:02d}": float(i) for i in range(50)}
    steps = range(1, 61)  # 3000 metrics: three log-batch requests; the child dies after the first
    with EventBus([sink]) as bus:
        bus.publish(TrainBegin(step=0, config={"lr": 0.1}))
        for s in steps:
            bus.publish(Log(step=s, time_ns=T0 + s * 10**6, values={k: v * s for k, v in values.items()}))
        bus.publish(TrainEnd(step=60))
    stats = bus.stats().sinks[sink.name]
    assert os.path.exists(marker)  # the first child died in the middle of the batch
    assert stats.retries >= 1 and (stats.delivered, stats.dropped, stats.failed) == (stats.received, 0, 0), stats
    got = run_data(mlflow_server, sink.run_id or "")
    assert (got["status"], got["params"]) == ("FINISHED", {"lr": "0.1"})
    for key, v in values.items():
        # every step once, with its own value and timestamp
        assert history(mlflow_server, sink.run_id or "", key) == [(s, v * s, T0 // 10**6 + s) for s in steps], key


def test_a_continued_run_s_new_child_reads_again_what_the_run_has(mlflow_server: str, tmp_path: Any) -> None:
    # A resumed bus run continues its MLflow run (which has steps 1-15) and resends
    # 11-15; its child process dies after the first log-batch request of that batch.
    # The next child learns again what the run holds (params included: lr changed and
    # MLflow refuses to change a param), so neither 11-15 (new timestamps) nor what the
    # dead child sent reach MLflow twice.
    name = experiment()
    bus_run_id = uuid.uuid4().hex[:12]
    values = {f"m{i:02d}": float(i) for i in range(50)}
    first = MLflowSink(mlflow_server, experiment_name=name)
    publish_all(
        first,
        [TrainBegin(step=0, config={"lr": 0.1})]
        + [Log(step=s, time_ns=T0 + s * 10**6, values={k: v * s for k, v in values.items()}) for s in range(1, 16)],
        run=RunInfo(run_id=bus_run_id),
    )
    marker = str(tmp_path / "died")
    sink = DiesMidBatch(mlflow_server, experiment_name=name, marker=marker)
    sink.isolate = True
    sink.max_delay = 0.2
    t1 = T0 + 10**12
    with EventBus([sink], run=RunInfo(run_id=bus_run_id, resumed=True)) as bus:
        bus.publish(TrainBegin(step=10, config={"lr": 0.2}, resumed_from="/out/checkpoint-10"))
        for s in range(11, 61):  # 2250 new metrics: three log-batch requests
            bus.publish(Log(step=s, time_ns=t1 + s * 10**6, values={k: v * s + 0.5 for k, v in values.items()}))
        bus.publish(TrainEnd(step=60))
    stats = bus.stats().sinks[sink.name]
    assert os.path.exists(marker)
    assert stats.retries >= 1 and (stats.delivered, stats.dropped, stats.failed) == (stats.received, 0, 0), stats
    assert sink.run_id == first.run_id and sink.continued
    got = run_data(mlflow_server, sink.run_id or "")
    assert (got["status"], got["params"]) == ("FINISHED", {"lr": "0.1"})
    for key, v in values.items():
        assert history(mlflow_server, sink.run_id or "", key) == [(s, v * s, T0 // 10**6 + s) for s in range(1, 16)] + [
            (s, v * s + 0.5, t1 // 10**6 + s) for s in range(16, 61)
        ], key


def test_trainer_resumed_after_a_kill_continues_its_mlflow_run(mlflow_server: str, tmp_path: Any) -> None:
    # Our Trainer, end to end: trained to step 10 (checkpoints 5 and 10), then, as
    # after a SIGKILL at step 10 (only the checkpoint's high-water mark survives),
    # resumed from checkpoint-5 to step 15: one MLflow run, each step once.
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
    from trainer import Trainer

    name = experiment()
    data = make_dataset(64)

    def trainer() -> tuple[Trainer, MLflowSink]:
        sink = MLflowSink(mlflow_server, experiment_name=name)
        args = tiny_args(tmp_path, max_steps=15, save_strategy="steps", save_steps=5, seed=0)
        return Trainer(TinyClassifier(), args, train_dataset=data, sinks=[sink]), sink

    t, first = trainer()
    t.args.max_steps = 10
    t.train()
    marks = tmp_path / "eventbus_marks.json"  # what a SIGKILL would not have written
    if marks.exists():
        marks.unlink()
    t, second = trainer()
    t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert second.run_id == first.run_id and second.continued
    assert runs_of(mlflow_server, name) == [first.run_id]
    assert [s for s, _, _ in history(mlflow_server, first.run_id or "", "loss")] == list(range(1, 16))
    assert run_data(mlflow_server, first.run_id or "")["tags"][RUN_ID_TAG] == t.run_id


def test_replaying_an_outage_s_spool_continues_the_run_it_belongs_to(mlflow_server: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Steps 1-5 reach the server; then it is down and steps 6-10 (and the end) are
    # spooled; `eventbus replay` later puts them into the same MLflow run.
    from eventbus import Sink
    from eventbus.replay import replay

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name := experiment())
    bus_run_id = uuid.uuid4().hex[:12]
    live = MLflowSink(mlflow_server)
    publish_all(live, [TrainBegin(step=0, config={"lr": 0.1})] + [Log(step=s, values={"loss": 1.0 / s}) for s in range(1, 6)],
                run=RunInfo(run_id=bus_run_id, output_dir=str(tmp_path)))

    class Down(Sink):
        name = "mlflow"
        spool = True
        max_retries = 0
        circuit_threshold = 1
        circuit_cooldown = 3600

        async def write(self, batch: Any) -> None:
            raise ConnectionError("server down")

    with EventBus([Down()], run=RunInfo(run_id=bus_run_id, output_dir=str(tmp_path)), flush_interval=0.01) as bus:
        for s in range(6, 11):
            bus.publish(Log(run_id=bus_run_id, step=s, values={"loss": 1.0 / s}))
        bus.publish(TrainEnd(run_id=bus_run_id, step=10))
    assert bus.stats().sinks["mlflow"].spooled == 6

    result = replay(tmp_path / "spool" / "mlflow", MLflowSink(mlflow_server), timeout=120)
    assert (result.sent, result.failed) == (6, 0)
    assert runs_of(mlflow_server, name) == [live.run_id]
    assert [s for s, _, _ in history(mlflow_server, live.run_id or "", "loss")] == list(range(1, 11))
    assert run_data(mlflow_server, live.run_id or "")["status"] == "FINISHED"


def test_a_second_train_of_one_trainer_is_a_new_mlflow_run(mlflow_server: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' MLflowCallback starts a run per train(): the same Trainer trained
    # again (not a resume) logs into a run of its own, not into the first one with
    # every step twice; the evaluate() after it goes to that second run.
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
    from trainer import Trainer

    name = experiment()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    data = make_dataset(32)
    args = tiny_args(tmp_path, max_steps=4, report_to=["mlflow"], seed=0)
    t = Trainer(TinyClassifier(), args, train_dataset=data, eval_dataset=data)
    t.train()
    first_bus_run = t.run_id
    t.train()
    t.evaluate()
    assert t.run_id != first_bus_run
    runs = runs_of(mlflow_server, name)
    assert len(runs) == 2
    by_bus_run = {run_data(mlflow_server, r)["tags"][RUN_ID_TAG]: r for r in runs}
    assert set(by_bus_run) == {first_bus_run, t.run_id}
    for bus_run, mlflow_run in by_bus_run.items():
        assert [s for s, _, _ in history(mlflow_server, mlflow_run, "loss")] == [1, 2, 3, 4]
        assert run_data(mlflow_server, mlflow_run)["status"] == "FINISHED"
    assert [s for s, _, _ in history(mlflow_server, by_bus_run[t.run_id], "eval_loss")] == [4]
    assert history(mlflow_server, by_bus_run[first_bus_run], "eval_loss") == []
