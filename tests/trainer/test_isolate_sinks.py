"""``TrainingArguments(isolate_sinks=...)``: the named sinks run in a child process
each, and a real training run writes the same JSON lines and the same offline Comet
archive as without isolation."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest

from eventbus.errors import SinkConfigError
from eventbus.isolation import ProcessSink
from tests.conftest import require, tb_run_dir
from tests.integration.test_comet import _COMET_ENV, Archive
from tests.trainer._loop_helpers import TinyClassifier, make_dataset
from trainer import PrinterCallback, ProgressCallback, Trainer, TrainingArguments
from trainer.arguments import TrainingArgumentsError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("all", ["all"]),
        ("comet_ml, neptune", ["comet_ml", "neptune"]),
        (["jsonl", "jsonl", "comet_ml"], ["jsonl", "comet_ml"]),
        ([], []),
        ("none", []),
    ],
)
def test_isolate_sinks_is_normalized(tmp_path: Path, value: Any, expected: Any) -> None:
    assert TrainingArguments(output_dir=str(tmp_path), isolate_sinks=value).isolate_sinks == expected


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (["all", "jsonl"], "'all' and 'none' cannot be combined"),
        (["none", "jsonl"], "'all' and 'none' cannot be combined"),
        ([1], "list of sink names"),
        ("", "list of sink names"),
        (["jsonl", " "], "list of sink names"),
        (True, "list of sink names"),
    ],
)
def test_bad_isolate_sinks_is_a_clear_error(tmp_path: Path, value: Any, says: str) -> None:
    with pytest.raises(TrainingArgumentsError, match="isolate_sinks") as info:
        TrainingArguments(output_dir=str(tmp_path), isolate_sinks=value)
    assert says in str(info.value)


def test_isolate_sinks_naming_no_sink_of_the_run_is_an_error(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), report_to="jsonl", isolate_sinks=["comet_ml"])
    with pytest.raises(TrainingArgumentsError) as info:
        Trainer(TinyClassifier(), args, train_dataset=make_dataset(8))
    assert "['comet_ml']" in str(info.value) and "['jsonl']" in str(info.value)


@pytest.fixture
def offline_comet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    require(importlib.util.find_spec("comet_ml") is not None, "comet_ml is not installed")
    for var in _COMET_ENV:
        monkeypatch.setenv(var, "")  # restored to absent at teardown, even if the sink set a default
        monkeypatch.delenv(var)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "no-such.comet.config"))
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    monkeypatch.chdir(tmp_path)


# Differ between any two runs: wall-clock times (and the SDK's "process duration"),
# run ids and the run's own directories.
_VOLATILE = ("runtime", "duration", "per_second", "output_dir", "logging_dir", "isolate_sinks", "run_id", "time_ns", "run_name")


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if not any(s in str(k) for s in _VOLATILE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def _train(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, isolate: Any) -> tuple[Trainer, list[Any], Archive]:
    out = tmp_path / name
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(out / "comet"))
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=12,
        per_device_train_batch_size=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=6,
        save_strategy="no",
        report_to=["jsonl", "comet_ml"],
        isolate_sinks=isolate,
        run_name="same-name",
        disable_tqdm=True,
    )
    trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(48), eval_dataset=make_dataset(16, seed=1))
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    sinks = {s.name: s for s in trainer.bus.sinks}
    stats = trainer.bus.stats().sinks
    for name in ("jsonl", "comet_ml"):
        assert (stats[name].failed, stats[name].dropped, stats[name].errors) == (0, 0, 0), stats[name]
        assert stats[name].delivered == stats[name].received > 0
    from sinks.jsonl import read_jsonl

    events = [msgspec.to_builtins(ev) for ev in read_jsonl(sinks["jsonl"].path)]
    [archive_path] = list((out / "comet").glob("*.zip"))
    assert sinks["comet_ml"].archive_path == str(archive_path)  # copied back from the child when isolated
    return trainer, events, Archive(archive_path)


def test_isolated_jsonl_and_comet_write_what_they_write_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_comet: None
) -> None:
    plain, plain_events, plain_archive = _train(tmp_path, "in-process", monkeypatch, "none")
    isolated, iso_events, iso_archive = _train(tmp_path, "isolated", monkeypatch, ["jsonl", "comet_ml"])

    assert not any(isinstance(s, ProcessSink) for s in plain.bus.sinks)
    proxies = isolated.bus.sinks
    assert sorted(s.name for s in proxies) == ["comet_ml", "jsonl"]
    assert all(isinstance(s, ProcessSink) for s in proxies)

    # Same events, in the same order, with the same values (bar timings and run ids).
    assert len(iso_events) == len(plain_events) > 12  # InitEnd, TrainBegin, 6 Logs, 2 Evaluates, ..., TrainEnd
    assert [e["type"] for e in iso_events] == [e["type"] for e in plain_events]
    assert _stable(iso_events) == _stable(plain_events)
    assert sum(e["type"] == "Log" for e in iso_events) >= 6

    # Same Comet metrics (name -> [(value, step, epoch)]) and parameters.
    assert _stable(iso_archive.metrics) == _stable(plain_archive.metrics)
    assert {"train/loss", "eval/loss"} <= set(iso_archive.metrics)
    assert _stable(iso_archive.params) == _stable(plain_archive.params)
    assert iso_archive.others.get("train_status") == plain_archive.others.get("train_status") == "completed"


def test_isolated_tensorboard_writes_the_scalars_it_writes_in_process(tmp_path: Path) -> None:
    """TensorBoardSink travels to its child (tensorboard is imported again there) and
    the event files read back the same through tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(name: str, isolate: list[str] | None) -> dict[str, list[tuple[int, float]]]:
        out = tmp_path / name
        args = TrainingArguments(
            output_dir=str(out), max_steps=8, per_device_train_batch_size=4, logging_steps=2,
            save_strategy="no", report_to=["tensorboard"], isolate_sinks=isolate, disable_tqdm=True,
        )
        trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(32))
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        assert all(isinstance(s, ProcessSink) for s in trainer.bus.sinks) == (isolate != ["none"])
        stats = trainer.bus.stats().sinks["tensorboard"]
        assert stats.delivered == stats.received > 0 and stats.errors == 0
        acc = EventAccumulator(tb_run_dir(out / "logs", trainer.run_id), size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    plain, isolated = run("in-process", ["none"]), run("isolated", ["tensorboard"])
    assert [s for s, _ in isolated["train/loss"]] == [2, 4, 6, 8]
    assert {t: [s for s, _ in v] for t, v in isolated.items()} == {t: [s for s, _ in v] for t, v in plain.items()}


def test_mlflow_sink_pickles_without_its_http_client() -> None:
    """What process isolation sends to the child: options travel, the connection pool
    does not, and the copy builds its own client from the same options."""
    import pickle

    from sinks.mlflow import MLflowSink

    sink = MLflowSink(tracking_uri="http://127.0.0.1:5999", experiment_name="exp")
    copy = pickle.loads(pickle.dumps(sink))
    assert copy.base_url == sink.base_url and copy._client is None
    assert copy.http is not sink.http and copy.http.base_url == sink.http.base_url


def test_by_default_the_sdk_and_http_sinks_run_isolated_where_they_can(tmp_path: Path) -> None:
    """TensorBoard, MLflow and Azure ML (the Python-heavy writers) run in a child process
    by default, as Neptune and Comet do; jsonl stays here; an Azure ML sink whose token
    provider is a closure cannot travel, so it runs here rather than failing."""
    from eventbus import EventBus, RunInfo
    from sinks.azureml import AzureMLSink
    from sinks.jsonl import JSONLSink
    from sinks.mlflow import MLflowSink
    from sinks.tensorboard import TensorBoardSink

    token = "t0ken-secret"

    def provider() -> str:  # a closure: cannot be pickled
        return token

    url = "http://127.0.0.1:5999"
    sinks = [JSONLSink(), TensorBoardSink(), MLflowSink(url), AzureMLSink(url, token="static-token")]
    bus = EventBus(sinks, run=RunInfo(output_dir=str(tmp_path)))
    assert {s.name: isinstance(s, ProcessSink) for s in bus.sinks} == {
        "jsonl": False, "tensorboard": True, "mlflow": True, "azure_ml": True,
    }
    closure = AzureMLSink(url, token_provider=provider)
    assert EventBus([closure], run=RunInfo(output_dir=str(tmp_path))).sinks == [closure]
    closure.isolate = True  # asked for: must work, so it is an error
    with pytest.raises(SinkConfigError, match="cannot be pickled"):
        EventBus([closure], run=RunInfo(output_dir=str(tmp_path)))


def test_by_default_the_sdk_sinks_run_isolated_and_the_others_in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline_comet: None
) -> None:
    trainer, events, archive = _train(tmp_path, "defaults", monkeypatch, None)
    kinds = {s.name: isinstance(s, ProcessSink) for s in trainer.bus.sinks}
    assert kinds == {"jsonl": False, "comet_ml": True}
    assert [e["type"] for e in events].count("Log") >= 6
    assert len(archive.metrics["train/loss"]) == 6
