"""CometSink against the real ``comet_ml`` SDK, offline.

An offline experiment ends by writing a ``.zip`` holding ``experiment.json`` and
``messages.json`` (one JSON message per line: ``metric_msg``, ``parameter_msg``,
``log_other``...). The tests open that archive with ``zipfile`` and assert on the
parsed messages. Every test runs with the network blocked: a connection or DNS lookup
attempt fails the test.
"""

from __future__ import annotations

import importlib.util
import glob
import json
import logging
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from eventbus import EventBus, Evaluate, Log, Predict, RunInfo, Save, TrainBegin, TrainEnd
from eventbus.errors import SinkConfigError
from eventbus.registry import create_sink
from tests.conftest import require

pytestmark = pytest.mark.integration

SECRET = "comet-secret-key-0123456789abcdefXYZ"

_COMET_ENV = (
    "COMET_API_KEY",
    "COMET_MODE",
    "COMET_START_ONLINE",
    "COMET_PROJECT_NAME",
    "COMET_WORKSPACE",
    "COMET_OFFLINE_DIRECTORY",
    "COMET_LOG_ASSETS",
    "COMET_EXPERIMENT_KEY",
    "COMET_ERROR_TRACKING_ENABLE",
    "COMET_INTERNAL_REPORTING",
    "COMET_DISABLE_AUTO_LOGGING",
)


@pytest.fixture
def comet_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> Path:
    """No COMET_* variables, no config file, a clean working directory, no network."""
    # Not imported here: the sink imports comet_ml on its own thread, after setting
    # the environment the SDK reads at import.
    require(importlib.util.find_spec("comet_ml") is not None, "comet_ml is not installed")
    for var in _COMET_ENV:
        # setenv first so that teardown restores the variable's absence, even after the
        # sink set a default for it.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "no-such.comet.config"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert no_network == [], f"the comet_ml sink tried the network offline: {no_network}"


class Archive:
    """An offline experiment archive, parsed."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with zipfile.ZipFile(path) as z:
            self.names = z.namelist()
            self.experiment = json.loads(z.read("experiment.json"))
            self.messages = [json.loads(line) for line in z.read("messages.json").decode().splitlines() if line]
            self.raw = b"".join(z.read(n) for n in self.names)
        self.metrics: dict[str, list[tuple[Any, int | None, float | None]]] = {}
        self.params: dict[str, Any] = {}
        self.others: dict[str, Any] = {}
        for m in self.messages:
            payload = m["payload"]
            if m["type"] == "metric_msg":
                metric = payload["metric"]
                self.metrics.setdefault(metric["metricName"], []).append(
                    (metric["metricValue"], metric.get("step"), metric.get("epoch"))
                )
            elif m["type"] == "parameter_msg":
                param = payload.get("param") or payload.get("params")
                if param.get("source") != "auto-logged":
                    self.params[param["paramName"]] = param["paramValue"]
            elif m["type"] == "log_other":
                self.others[payload["key"]] = payload["value"]

    def types(self) -> set[str]:
        return {m["type"] for m in self.messages}


def run_training(sink: Any, tmp_path: Path, run_id: str = "run-c0ffee", status: str = "completed", error: str | None = None) -> Any:
    import torch

    out = tmp_path / "out"
    ckpt = out / "checkpoint-3"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "weights.bin").write_bytes(b"weights")
    with EventBus([sink], run=RunInfo(run_id=run_id, run_name="my-run", output_dir=str(out))) as bus:
        bus.publish(
            TrainBegin(
                run_id=run_id,
                config={"learning_rate": 0.1, "hub_token": "***", "api_key": "oops", "report_to": ["comet_ml"], "warmup": None},
                hparams={"learning_rate": 0.1, "batch_size": 8},
                model_config={"hidden_size": 4, "eps": float("inf")},
                max_steps=3,
            )
        )
        bus.publish(Log(run_id=run_id, step=1, epoch=0.25, values={"loss": torch.tensor(2.5), "learning_rate": 0.1}))
        bus.publish(Log(run_id=run_id, step=2, epoch=0.5, values={"loss": torch.tensor(float("nan"))}))
        bus.publish(Log(run_id=run_id, step=3, epoch=0.75, values={"loss": torch.tensor(1.5), "grad_norm": torch.tensor(0.25), "note": "hi"}))
        # transformers logs evaluation metrics through on_log and then on_evaluate: log once.
        bus.publish(Log(run_id=run_id, step=3, epoch=0.75, values={"eval_loss": 1.25, "eval_accuracy": 0.75}))
        bus.publish(Evaluate(run_id=run_id, step=3, epoch=0.75, metrics={"eval_loss": torch.tensor(1.25), "eval_accuracy": 0.75}))
        bus.publish(Predict(run_id=run_id, step=3, epoch=0.75, metrics={"test_loss": 1.125}))
        bus.publish(Save(run_id=run_id, step=3, checkpoint_dir=str(ckpt), is_best=True))
        bus.publish(TrainEnd(run_id=run_id, step=3, status=status, error=error, best_metric=1.25, best_model_checkpoint=str(ckpt)))
    stats = bus.stats().sinks["comet_ml"]
    assert stats.failed == 0 and stats.errors == 0, stats
    return sink


def test_end_to_end_offline_archive(comet_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """COMET_START_ONLINE=0: metrics with step and epoch, parameters, others and tags in the archive."""
    from sinks.comet import CometSink

    caplog.set_level(logging.WARNING, logger="sinks")
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    monkeypatch.setenv("COMET_PROJECT_NAME", "demo-project")
    sink = create_sink("comet_ml")
    assert isinstance(sink, CometSink)
    run_training(sink, comet_env)
    assert sink.archive_path and Path(sink.archive_path).parent == comet_env / "out" / "comet"
    archive = Archive(sink.archive_path)

    # Metrics: transformers' names, step = global step, epoch; NaN kept as NaN.
    loss = archive.metrics["train/loss"]
    assert [(v, s, e) for v, s, e in loss if s != 2] == [(2.5, 1, 0.25), (1.5, 3, 0.75)]
    [(nan, nan_step, nan_epoch)] = [m for m in loss if m[1] == 2]
    assert (nan_step, nan_epoch) == (2, 0.5) and math.isnan(float(nan))
    assert archive.metrics["train/learning_rate"] == [(0.1, 1, 0.25)]
    assert archive.metrics["train/grad_norm"] == [(0.25, 3, 0.75)]
    assert archive.metrics["eval/loss"] == [(1.25, 3, 0.75)]
    assert archive.metrics["eval/accuracy"] == [(0.75, 3, 0.75)]
    assert archive.metrics["test/loss"] == [(1.125, 3, 0.75)]
    assert "train/note" not in archive.metrics
    assert sum("'train/note'" in r.getMessage() for r in caplog.records) == 1

    # Parameters, nested as transformers logs them ("args|...", "config|..."), secrets redacted.
    assert archive.params["args|learning_rate"] == 0.1
    assert archive.params["args|hub_token"] == "***"
    assert archive.params["args|api_key"] == "***"
    assert archive.params["args|report_to"] == ["comet_ml"]
    assert archive.params["config|hidden_size"] == 4
    assert archive.params["config|eps"] == "inf"
    assert archive.params["hparams|batch_size"] == 8

    # Identity and end of training.
    assert archive.experiment["project_name"] == "demo-project"
    assert "run-c0ffee" in archive.experiment["tags"]
    assert archive.others["Name"] == "my-run"
    assert archive.others["eventbus_run_id"] == "run-c0ffee"
    assert archive.others["train_status"] == "completed"
    assert archive.others["best_metric"] == 1.25
    assert archive.others["best_model_checkpoint"].endswith("checkpoint-3")
    assert archive.experiment["customer_error_reported"] is False
    # Nothing about the machine or the command line unless asked.
    assert not {"installed_packages", "os_packages", "system_details"} & archive.types()
    # COMET_LOG_ASSETS is off by default.
    assert archive.names == ["experiment.json", "messages.json"]


def test_offline_without_api_key(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No API key anywhere: offline, without being asked, into COMET_OFFLINE_DIRECTORY."""
    from sinks.comet import CometSink

    target = comet_env / "archives"
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(target))
    sink = CometSink()
    with EventBus([sink], run=RunInfo(run_id="nokey")) as bus:
        bus.publish(Log(step=4, epoch=1.0, values={"loss": 0.5}))
    assert sink.archive_path and Path(sink.archive_path).parent == target
    assert Archive(sink.archive_path).metrics["train/loss"] == [(0.5, 4, 1.0)]


def test_online_asked_without_key_falls_back_offline(comet_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """COMET_START_ONLINE=1 with no API key: a warning, and the data is kept offline."""
    from sinks.comet import CometSink

    monkeypatch.setenv("COMET_START_ONLINE", "1")
    sink = CometSink(offline_directory=comet_env / "off")
    with EventBus([sink], run=RunInfo(run_id="wantonline")) as bus:
        bus.publish(Log(step=1, values={"loss": 0.25}))
    assert "no Comet API key" in caplog.text
    assert Archive(sink.archive_path).metrics["train/loss"][0][:2] == (0.25, 1)


def test_api_key_never_written_logged_or_shown(comet_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """COMET_API_KEY set but COMET_START_ONLINE=0: offline, and the key is nowhere."""
    from sinks.comet import CometSink

    caplog.set_level(logging.DEBUG)
    # Whatever the SDK did to its own loggers when first imported: they propagate at
    # DEBUG here, where the SDK logs its init parameters (the key among them).
    CometSink()._import()
    for name in ("comet_ml", "comet_ml.comet_start"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    monkeypatch.setenv("COMET_API_KEY", SECRET)
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    assert CometSink.available()
    sink = CometSink()
    assert SECRET not in repr(sink) and "***" in repr(sink)
    run_training(sink, comet_env, status="failed", error=f"401 Unauthorized for key {SECRET}")
    archive = Archive(sink.archive_path)
    assert archive.metrics["train/loss"][0] == (2.5, 1, 0.25)
    assert SECRET.encode() not in archive.raw
    for path in comet_env.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"key written to {path}"
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    assert SECRET not in caplog.text


def test_failed_training_reported_as_crashed(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TrainEnd(status="failed"): the experiment is marked as errored, with the error."""
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    sink = create_sink("comet_ml")
    run_training(sink, comet_env, status="failed", error="RuntimeError: CUDA out of memory")
    archive = Archive(sink.archive_path)
    assert archive.experiment["customer_error_reported"] is True
    assert archive.experiment["customer_error_message"] == "RuntimeError: CUDA out of memory"
    assert archive.others["train_status"] == "failed"
    assert archive.others["train_error"] == "RuntimeError: CUDA out of memory"


def test_log_assets_uploads_output_dir(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMET_LOG_ASSETS=TRUE: the run's output directory goes into the experiment as assets."""
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    monkeypatch.setenv("COMET_LOG_ASSETS", "TRUE")
    sink = create_sink("comet_ml", offline_directory=str(comet_env / "archives"))
    run_training(sink, comet_env)
    archive = Archive(sink.archive_path)
    uploads = [m["payload"] for m in archive.messages if m["type"] == "file_upload"]
    [upload] = [u for u in uploads if u["additional_params"]["fileName"].endswith("checkpoint-3/weights.bin")]
    assert upload["upload_type"] == "asset" and upload["additional_params"]["step"] == 3
    with zipfile.ZipFile(sink.archive_path) as z:
        assert z.read(upload["file_path"]) == b"weights"


_IMPORT_CHECK = """
import json, os, socket, sys

attempts = []
def blocked(*args, **kwargs):
    attempts.append(repr(args[1:2] or args[:1]))
    raise OSError("network is blocked in this test")
real_connect = socket.socket.connect
socket.socket.connect = lambda self, a: real_connect(self, a) if self.family == socket.AF_UNIX else blocked(self, a)
socket.getaddrinfo = blocked

from eventbus import EventBus, Log, RunInfo
from sinks.comet import CometSink

sink = CometSink(offline_directory=sys.argv[1])
sink.isolate = sys.argv[2] == "isolated"
with EventBus([sink], run=RunInfo(run_id="quiet")) as bus:
    bus.publish(Log(step=1, values={"loss": 1.0}))
if sink.isolate:
    # The SDK ran in the sink's child process only.
    print(json.dumps({"imported_here": "comet_ml" in sys.modules, "archive": sink.archive_path, "network": attempts}))
    sys.exit(0)
import comet_ml
from comet_ml import error_tracking
config = comet_ml.get_config()
print(json.dumps({
    "env": {k: os.environ.get(k) for k in ("COMET_ERROR_TRACKING_ENABLE", "COMET_INTERNAL_REPORTING", "COMET_DISABLE_AUTO_LOGGING")},
    "error_tracking": config.get_bool(None, "comet.error_tracking.enable", default=True),
    "reporting": config.get_bool(None, "comet.internal.reporting", default=True),
    "sentry": error_tracking.initialized(),
    "import_hooks": [type(f).__name__ for f in sys.meta_path if "Comet" in type(f).__name__],
    "archive": sink.archive_path,
    "network": attempts,
}))
"""


def _fresh_process_check(comet_env: Path, subdir: str, isolated: bool) -> dict[str, Any]:
    """Run _IMPORT_CHECK in a fresh interpreter with no COMET_* variables; its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMET_")}
    env["COMET_CONFIG"] = str(comet_env / "no-such.comet.config")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, str(comet_env / subdir), "isolated" if isolated else "in-process"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sdk_error_reporting_off_by_default(comet_env: Path) -> None:
    """In a fresh process (comet_ml reads these at import): Sentry error tracking, usage
    reporting and the auto-logging import hooks are off unless the user set them."""
    result = _fresh_process_check(comet_env, "off", isolated=False)
    assert result["env"] == {
        "COMET_ERROR_TRACKING_ENABLE": "false",
        "COMET_INTERNAL_REPORTING": "false",
        "COMET_DISABLE_AUTO_LOGGING": "1",
    }
    assert result["error_tracking"] is False and result["reporting"] is False
    assert result["sentry"] is False
    assert result["import_hooks"] == []
    assert result["network"] == []
    assert Archive(result["archive"]).metrics["train/loss"] == [(1.0, 1, None)]


def test_the_sdk_runs_in_a_child_process_by_default(comet_env: Path) -> None:
    """By default (POSIX) the sink runs isolated: the training process never imports
    comet_ml, and the archive the child wrote holds the metric."""
    from sinks.comet import CometSink

    assert CometSink.isolate is True
    result = _fresh_process_check(comet_env, "iso", isolated=True)
    assert result["imported_here"] is False
    assert result["network"] == []
    assert Archive(result["archive"]).metrics["train/loss"] == [(1.0, 1, None)]


def test_user_choice_for_sdk_settings_is_kept(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who set COMET_ERROR_TRACKING_ENABLE keeps their value (spelled "0",
    not the sink's own "false", so an overwrite would show; not "true", which would
    start the SDK's Sentry reporter in this process and send from a thread of its own
    during later tests)."""
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    monkeypatch.setenv("COMET_ERROR_TRACKING_ENABLE", "0")
    sink = create_sink("comet_ml")
    sink.open_sync(RunInfo(run_id="keep"))
    try:
        assert os.environ["COMET_ERROR_TRACKING_ENABLE"] == "0"
    finally:
        sink.close_sync()


def test_available(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to="all" includes comet_ml only with an API key or an explicit offline mode."""
    from sinks.comet import CometSink

    assert not CometSink.available()
    monkeypatch.setenv("COMET_START_ONLINE", "0")
    assert CometSink.available()
    monkeypatch.delenv("COMET_START_ONLINE")
    monkeypatch.setenv("COMET_MODE", "OFFLINE")
    assert CometSink.available()
    monkeypatch.setenv("COMET_MODE", "DISABLED")
    monkeypatch.setenv("COMET_API_KEY", SECRET)
    assert not CometSink.available()
    monkeypatch.delenv("COMET_MODE")
    assert CometSink.available()
    monkeypatch.delenv("COMET_API_KEY")
    config = comet_env / "comet.config"
    config.write_text(f"[comet]\napi_key = {SECRET}\n")
    monkeypatch.setenv("COMET_CONFIG", str(config))
    assert CometSink.available()


def test_disabled_mode_logs_nothing(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMET_MODE=DISABLED (transformers' older switch): no experiment, no archive."""
    monkeypatch.setenv("COMET_MODE", "DISABLED")
    sink = create_sink("comet_ml", offline_directory=str(comet_env / "off"))
    with EventBus([sink], run=RunInfo(run_id="off")) as bus:
        bus.publish(Log(step=1, values={"loss": 1.0}))
    assert bus.stats().sinks["comet_ml"].delivered == 1
    assert sink.archive_path is None
    assert not (comet_env / "off").exists() or not list((comet_env / "off").iterdir())


@pytest.mark.parametrize(
    "env, options, message",
    [
        ({"COMET_MODE": "sometimes"}, {}, "COMET_MODE='sometimes'"),
        ({"COMET_START_ONLINE": "perhaps"}, {}, "COMET_START_ONLINE='perhaps'"),
        ({}, {"mode": "bogus"}, "mode='bogus'"),
        ({}, {"online": "yes"}, "online"),
        ({}, {"project_name": 3}, "project_name"),
    ],
)
def test_bad_configuration_is_a_clear_error(comet_env: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], options: dict[str, Any], message: str) -> None:
    """A wrong option or environment variable names itself."""
    from sinks.comet import CometSink

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SinkConfigError) as info:
        CometSink(**options)
    assert message in str(info.value)


def test_missing_sdk_names_the_extra(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the comet_ml package: not available, and opening says what to install."""
    from eventbus.errors import MissingDependencyError
    from sinks.comet import CometSink

    monkeypatch.setenv("COMET_START_ONLINE", "0")
    monkeypatch.setitem(sys.modules, "comet_ml", None)  # makes `import comet_ml` fail
    assert not CometSink.available()
    with pytest.raises(MissingDependencyError, match=r"pip install 'eventbus-telemetry\[comet\]'"):
        CometSink().open_sync(RunInfo())


# -- train() then evaluate(): one experiment ------------------------------------------


def _trainer(sink: Any, out: Path) -> Any:
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
    from trainer import Trainer

    args = tiny_args(out, max_steps=4, eval_strategy="steps", eval_steps=2)
    return Trainer(TinyClassifier(), args, train_dataset=make_dataset(16), eval_dataset=make_dataset(8, seed=1), sinks=[sink])


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "in-process"])
def test_evaluate_after_train_continues_the_experiment(comet_env: Path, monkeypatch: pytest.MonkeyPatch, isolate: bool) -> None:
    """Our Trainer closes its bus at the end of train(); evaluate() and predict() open new
    ones over the same sink. They continue the training's experiment: offline, each
    writes another archive with the same experiment key and resume strategy "get"
    (`comet upload` appends it to that experiment); the parameters are in the first
    only. Another Trainer (another run id) with another sink gets another experiment."""
    from sinks.comet import CometSink
    from tests.trainer._loop_helpers import make_dataset

    monkeypatch.setenv("COMET_START_ONLINE", "0")
    sink = CometSink()
    sink.isolate = isolate
    trainer = _trainer(sink, comet_env / "out")
    trainer.train()
    first, key = sink.archive_path, sink.last_experiment_key
    assert first and key and sink.last_bus_run_id == trainer.run_id
    metrics = trainer.evaluate(make_dataset(8, seed=2))
    second = sink.archive_path
    predicted = trainer.predict(make_dataset(8, seed=3)).metrics
    third = sink.archive_path
    assert len({first, second, third}) == 3
    assert {Path(p).parent for p in (first, second, third)} == {comet_env / "out" / "comet"}
    train, evaluation, prediction = (Archive(p) for p in (first, second, third))

    assert [a.experiment["offline_id"] for a in (train, evaluation, prediction)] == [key] * 3
    assert train.experiment["user_provided_experiment_key"] is False
    assert train.experiment["resume_strategy"] != "get"
    for continued in (evaluation, prediction):
        assert continued.experiment["resume_strategy"] == "get"
        assert continued.experiment["user_provided_experiment_key"] is True
        assert trainer.run_id in continued.experiment["tags"]
        assert continued.params == {}, "parameters are logged once, with the training"
        assert "train/loss" not in continued.metrics
        assert "eventbus_run_id" not in continued.others
    assert train.params["args|max_steps"] == 4
    assert train.others["eventbus_run_id"] == trainer.run_id
    assert [m[1] for m in train.metrics["train/loss"]] == [1, 2, 3, 4]
    assert evaluation.metrics["eval/loss"] == [(metrics["eval_loss"], 4, 1.0)]
    assert prediction.metrics["test/loss"][0][:2] == (predicted["test_loss"], 4)
    assert "test/loss" not in train.metrics and "eval/loss" not in prediction.metrics

    # A new Trainer (a new run id) with a new sink: a new experiment.
    other = CometSink()
    other.isolate = isolate
    other_trainer = _trainer(other, comet_env / "out")
    assert other_trainer.run_id != trainer.run_id
    other_trainer.evaluate()
    fresh = Archive(other.archive_path)
    assert other.last_experiment_key != key and fresh.experiment["offline_id"] == other.last_experiment_key
    assert fresh.experiment["resume_strategy"] != "get" and fresh.experiment["user_provided_experiment_key"] is False


def test_reopen_after_a_close_that_did_not_run(comet_env: Path) -> None:
    """Opened again without a close (a failed open, a close that never ran): the
    experiment left open is ended as a close would (its archive written) and the
    reopen continues it; another run id starts another experiment."""
    from sinks.comet import CometSink

    sink = CometSink(online=False, offline_directory=comet_env / "off")
    sink.open_sync(RunInfo(run_id="left-open"))
    sink.write_sync([Log(step=1, values={"loss": 1.0})])
    key = sink.experiment.get_key()
    sink.open_sync(RunInfo(run_id="left-open"))  # no close in between
    first = sink.archive_path
    assert first and sink.last_experiment_key == key
    sink.write_sync([Evaluate(step=1, metrics={"eval_loss": 0.5})])
    sink.close_sync()
    assert sink.archive_path != first
    assert Archive(first).metrics["train/loss"] == [(1.0, 1, None)]
    continued = Archive(sink.archive_path)
    assert (continued.experiment["offline_id"], continued.experiment["resume_strategy"]) == (key, "get")
    assert continued.metrics["eval/loss"] == [(0.5, 1, None)]

    sink.open_sync(RunInfo(run_id="another-run"))
    try:
        assert sink.experiment.get_key() != key
        assert sink.last_experiment_key is None  # until this experiment's archive is written
    finally:
        sink.close_sync()
    assert Archive(sink.archive_path).experiment["resume_strategy"] != "get"


class _FakeExperiment:
    """What the sink uses of an online experiment (the real one needs a server)."""

    def __init__(self, key: str) -> None:
        self.key, self.others, self.ended = key, {}, False

    def get_key(self) -> str:
        return self.key

    def log_other(self, key: str, value: Any) -> None:
        self.others[key] = value

    def log_metrics(self, *args: Any, **kwargs: Any) -> None:
        pass

    def end(self) -> None:
        self.ended = True


def test_online_reopen_continues_with_an_existing_experiment(
    comet_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """Online, through the real comet_ml.start with only its server calls replaced: a
    reopen for the same run asks for the experiment's key with mode "get", which the
    SDK serves as an ExistingExperiment. An experiment the server does not have (logged
    offline, not uploaded) gives a new experiment instead, and the SDK's error log of
    its start arguments does not show the API key."""
    from sinks.comet import CometSink

    CometSink()._import()
    from comet_ml.comet_start import experiment_factory

    made: list[tuple[Any, Any, bool]] = []

    def create(experiment_config: Any, init_parameters: Any, existing: bool) -> _FakeExperiment:
        made.append((init_parameters.experiment_key, init_parameters.mode, existing))
        return _FakeExperiment(init_parameters.experiment_key or f"{len(made):032d}")

    on_server = [True]
    monkeypatch.setattr(experiment_factory, "_create_online_experiment", create)
    monkeypatch.setattr(experiment_factory, "check_experiment_already_exists", lambda params: on_server[0])
    for name in ("comet_ml", "comet_ml.comet_start"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
        monkeypatch.setattr(logging.getLogger(name), "level", logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("COMET_API_KEY", SECRET)
    sink = CometSink()
    sink.open_sync(RunInfo(run_id="online"))
    first = sink.experiment
    assert sink.last_experiment_key == first.key and sink.last_bus_run_id == "online"
    assert first.others["eventbus_run_id"] == "online"
    sink.close_sync()
    assert first.ended
    sink.open_sync(RunInfo(run_id="online"))
    sink.close_sync()
    assert made == [(None, "get_or_create", False), (first.key, "get", True)]

    on_server[0] = False  # e.g. started offline, now online
    sink.open_sync(RunInfo(run_id="online"))
    sink.close_sync()
    assert made[-1] == (None, "get_or_create", False) and len(made) == 3
    assert "is not on the server" in caplog.text
    assert "doesn't exists at Comet" in caplog.text  # the SDK's own error log, redacted
    assert SECRET not in caplog.text
    assert SECRET not in "".join(capfd.readouterr())
    sink.open_sync(RunInfo(run_id="another"))
    sink.close_sync()
    assert made[-1] == (None, "get_or_create", False) and len(made) == 4


def test_report_to_sinks_are_kept_across_train_and_evaluate(comet_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``report_to`` (not sink objects), the trainer builds its sinks once and every
    bus of it reuses them, so evaluate() after train() continues the experiment too."""
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
    from trainer import Trainer

    monkeypatch.setenv("COMET_START_ONLINE", "0")
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(comet_env / "offline"))
    args = tiny_args(comet_env / "out", max_steps=4, report_to=["comet_ml", "jsonl"])
    trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(16), eval_dataset=make_dataset(8, seed=1))
    trainer.train()
    trained = {s.name: getattr(s, "sink", s) for s in trainer.bus.sinks}
    metrics = trainer.evaluate()
    evaluated = {s.name: getattr(s, "sink", s) for s in trainer.bus.sinks}
    assert all(evaluated[name] is sink for name, sink in trained.items())
    comet = evaluated["comet_ml"]
    train, evaluation = (Archive(p) for p in sorted(glob.glob(str(comet_env / "offline" / "*.zip")), key=os.path.getmtime))
    assert evaluation.experiment["offline_id"] == train.experiment["offline_id"] == comet.last_experiment_key
    assert evaluation.metrics["eval/loss"][0][:2] == (metrics["eval_loss"], 4)
