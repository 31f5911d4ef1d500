"""NeptuneSink against the real ``neptune`` client in offline mode.

The client writes every operation to its offline disk queue
(``.neptune/offline/run__<id>__<pid>__<key>/data-*.log``); the tests read that queue
back with the client's own ``DiskQueue`` and ``Operation.from_dict`` and assert on the
decoded operations. Every test runs with the network blocked: a connection or DNS
lookup attempt fails the test.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from pathlib import Path
from typing import Any

import pytest

from eventbus import EventBus, Evaluate, Log, Predict, RunInfo, Save, TrainBegin, TrainEnd
from eventbus.errors import SinkConfigError
from eventbus.registry import create_sink
from tests.conftest import require_module

pytestmark = pytest.mark.integration

SECRET = "nep-secret-token-0123456789abcdef"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> Path:
    """A clean working directory for the client's ``.neptune/`` data, a secret token
    in the environment (it must never be written), and no network."""
    require_module("neptune")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEPTUNE_API_TOKEN", SECRET)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_CUSTOM_RUN_ID", raising=False)
    monkeypatch.delenv("NEPTUNE_DATA_DIRECTORY", raising=False)
    yield tmp_path
    assert no_network == [], f"the neptune sink tried the network in offline mode: {no_network}"


class Offline:
    """What one offline run's operation queue holds, decoded by the client's reader."""

    def __init__(self, ops: list[Any]) -> None:
        self.ops = ops
        self.values: dict[str, Any] = {}
        self.series: dict[str, list[tuple[float, float | None]]] = {}
        self.tags: set[str] = set()
        self.uploads: list[tuple[str, list[str]]] = []
        self.deletes: list[tuple[str, list[str]]] = []
        for op in ops:
            path = "/".join(op.path)
            kind = type(op).__name__
            if kind.startswith("Assign"):
                self.values[path] = op.value
            elif kind == "LogFloats":
                self.series.setdefault(path, []).extend((v.value, v.step) for v in op.values)
            elif kind == "AddStrings" and path == "sys/tags":
                self.tags |= set(op.values)
            elif kind == "UploadFileSet":
                self.uploads.append((path, list(op.file_globs)))
            elif kind == "DeleteFiles":
                self.deletes.append((path, list(op.file_paths)))


def read_offline(root: Path) -> Offline:
    """Decode the single offline run under ``root/.neptune`` with the client's own classes."""
    runs = sorted((root / ".neptune" / "offline").glob("run__*"))
    assert len(runs) == 1, f"expected one offline run, found {runs}"
    return _decode_run(runs[0])


def read_offline_runs(root: Path) -> list[Offline]:
    """Every offline run under ``root/.neptune``, decoded."""
    return [_decode_run(d) for d in sorted((root / ".neptune" / "offline").glob("run__*"))]


def _decode_run(run_dir: Path) -> Offline:
    from neptune.core.components.queue.disk_queue import DiskQueue
    from neptune.internal.operation import Operation

    queue = DiskQueue(
        data_path=run_dir,
        to_dict=lambda op: op.to_dict(),
        from_dict=Operation.from_dict,
        lock=threading.RLock(),
    )
    try:
        ops = [element.obj for element in queue.get_batch(1_000_000)]
    finally:
        queue.close()
    return Offline(ops)


def _token(address: str) -> str:
    return base64.b64encode(json.dumps({"api_address": address, "api_url": address, "api_key": SECRET}).encode()).decode()


def run_training(sink: Any, tmp_path: Path, run_id: str = "run-7f3a") -> None:
    import torch

    ckpt = tmp_path / "out" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    with EventBus([sink], run=RunInfo(run_id=run_id, output_dir=str(tmp_path / "out"))) as bus:
        bus.publish(
            TrainBegin(
                run_id=run_id,
                config={
                    "learning_rate": 0.1,
                    "hub_token": "***",
                    "report_to": ["neptune"],
                    "warmup": None,
                    "api_key": "leaked?",
                    "nested": {"beta": 0.9},
                },
                hparams={"learning_rate": 0.1, "batch_size": 8},
                model_config={"hidden_size": 4, "layers": [4, 4], "eps": float("nan")},
                max_steps=3,
            )
        )
        bus.publish(Log(run_id=run_id, step=1, epoch=0.25, values={"loss": torch.tensor(2.5), "learning_rate": 0.1, "epoch": 0.25}))
        bus.publish(Log(run_id=run_id, step=2, epoch=0.5, values={"loss": torch.tensor(float("nan")), "epoch": 0.5}))
        bus.publish(Log(run_id=run_id, step=3, epoch=0.75, values={"loss": torch.tensor(1.5), "grad_norm": torch.tensor(0.25), "note": "hello"}))
        # transformers logs evaluation metrics through on_log and then on_evaluate: log once.
        bus.publish(Log(run_id=run_id, step=3, epoch=0.75, values={"eval_loss": 1.25, "eval_accuracy": 0.75, "epoch": 0.75}))
        bus.publish(Evaluate(run_id=run_id, step=3, epoch=0.75, metrics={"eval_loss": torch.tensor(1.25), "eval_accuracy": 0.75}))
        bus.publish(Predict(run_id=run_id, step=3, metrics={"test_loss": 1.125}))
        bus.publish(Save(run_id=run_id, step=3, checkpoint_dir=str(ckpt), is_best=True))
        bus.publish(TrainEnd(run_id=run_id, step=3, status="completed", best_metric=1.25, best_model_checkpoint=str(ckpt)))
    stats = bus.stats().sinks["neptune"]
    assert stats.failed == 0 and stats.errors == 0, stats


def test_end_to_end_offline_logs_transformers_names(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Metrics, parameters and tags land under the names transformers' NeptuneCallback uses."""
    from sinks.neptune import NeptuneSink

    caplog.set_level(logging.WARNING, logger="sinks")
    sink = NeptuneSink(mode="offline", name="my-run", tags=["demo"], capture_hardware_metrics=False)
    run_training(sink, offline)
    data = read_offline(offline)

    # Metric series: appended with step=global step; NaN skipped; the evaluation once.
    assert data.series["finetuning/train/loss"] == [(2.5, 1), (1.5, 3)]
    assert data.series["finetuning/train/learning_rate"] == [(0.1, 1)]
    assert data.series["finetuning/train/grad_norm"] == [(0.25, 3)]
    assert data.series["finetuning/eval/loss"] == [(1.25, 3)]
    assert data.series["finetuning/eval/accuracy"] == [(0.75, 3)]
    assert data.series["finetuning/test/loss"] == [(1.125, 3)]
    # train/epoch is a single value (transformers' flat_metrics), the last one logged.
    assert "finetuning/train/epoch" not in data.series
    assert data.values["finetuning/train/epoch"] == 0.75
    assert "finetuning/train/note" not in data.series and "finetuning/train/note" not in data.values
    assert any("nan" in r.getMessage() and "train/loss" in r.getMessage() for r in caplog.records)
    assert sum("'train/note'" in r.getMessage() for r in caplog.records) == 1

    # Parameters: training arguments and model config, secrets redacted, unsupported stringified.
    assert data.values["finetuning/trainer_parameters/learning_rate"] == 0.1
    assert data.values["finetuning/trainer_parameters/hub_token"] == "***"
    assert data.values["finetuning/trainer_parameters/api_key"] == "***"
    assert data.values["finetuning/trainer_parameters/report_to"] == "['neptune']"
    assert data.values["finetuning/trainer_parameters/warmup"] == "None"
    assert data.values["finetuning/trainer_parameters/nested/beta"] == 0.9
    assert data.values["finetuning/model_parameters/hidden_size"] == 4
    assert data.values["finetuning/model_parameters/layers"] == "[4, 4]"
    assert data.values["finetuning/model_parameters/eps"] == "nan"
    assert data.values["finetuning/hparams/batch_size"] == 8

    # Run identity: name, the bus run id as a tag and a field, our version.
    assert data.values["sys/name"] == "my-run"
    assert {"run-7f3a", "demo"} <= data.tags
    assert data.values["finetuning/run_id"] == "run-7f3a"
    assert data.values["source_code/integrations/eventbus-telemetry"]
    # Source code is off: the file set is empty.
    assert ("source_code/files", []) in data.uploads

    # The end of training.
    assert data.values["finetuning/train_status"] == "completed"
    assert data.values["finetuning/best_metric"] == 1.25
    assert data.values["finetuning/best_model_checkpoint"].endswith("checkpoint-3")
    assert data.values["sys/failed"] is False
    # No checkpoint upload unless asked, and then Save events are not even subscribed to.
    assert not [u for u in data.uploads if "checkpoints" in u[0]]
    assert Save not in sink.events and Log in sink.events


def test_configured_from_environment(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to="neptune" with no options: NEPTUNE_MODE and NEPTUNE_PROJECT are honoured."""
    from sinks.neptune import NeptuneSink

    monkeypatch.delenv("NEPTUNE_API_TOKEN")
    assert not NeptuneSink.available()
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.setenv("NEPTUNE_PROJECT", "team/project")
    assert NeptuneSink.available()
    sink = create_sink("neptune")
    assert isinstance(sink, NeptuneSink)
    assert (sink.mode, sink.project) == ("offline", "team/project")
    with EventBus([sink], run=RunInfo(run_id="envrun", run_name="from-bus")) as bus:
        bus.publish(Log(step=5, values={"loss": 0.5}))
    data = read_offline(offline)
    assert data.series["finetuning/train/loss"] == [(0.5, 5)]
    assert data.values["sys/name"] == "from-bus"
    assert "envrun" in data.tags


def test_available_needs_token_and_project_online(monkeypatch: pytest.MonkeyPatch) -> None:
    """report_to="all" includes neptune only when it is configured."""
    require_module("neptune")
    from sinks.neptune import NeptuneSink

    for var in ("NEPTUNE_API_TOKEN", "NEPTUNE_PROJECT", "NEPTUNE_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert not NeptuneSink.available()
    monkeypatch.setenv("NEPTUNE_API_TOKEN", SECRET)
    assert not NeptuneSink.available()
    monkeypatch.setenv("NEPTUNE_PROJECT", "team/project")
    assert NeptuneSink.available()


def test_api_token_never_written_logged_or_shown(offline: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """The token (here from NEPTUNE_API_TOKEN and passed explicitly) is in no file, log or repr."""
    from sinks.neptune import NeptuneSink

    caplog.set_level(logging.DEBUG)
    sink = NeptuneSink(mode="offline", api_token=SECRET, capture_hardware_metrics=False)
    assert SECRET not in repr(sink)
    assert "***" in repr(sink)
    run_training(sink, offline)
    for path in offline.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"token written to {path}"
    # Neptune's git tracking would upload this checkout's uncommitted diff, which can
    # hold secrets (this very file's, while it is being edited): off by default.
    assert not list(offline.rglob("source_code_diff*")), "the working tree's git diff was uploaded"
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    assert SECRET not in caplog.text
    # ...while the run itself was written.
    assert read_offline(offline).series["finetuning/train/loss"] == [(2.5, 1), (1.5, 3)]


@pytest.mark.parametrize("policy", ["same", "last", "best"])
def test_log_checkpoints(offline: Path, policy: str) -> None:
    """same: every checkpoint; last: the latest replaces the previous; best: only best ones."""
    from sinks.neptune import NeptuneSink

    ckpts = []
    for step in (1, 2, 3):
        d = offline / "out" / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"w")
        ckpts.append(str(d))
    sink = NeptuneSink(mode="offline", log_checkpoints=policy, capture_hardware_metrics=False)
    assert Save in sink.events
    with EventBus([sink], run=RunInfo(run_id="ck")) as bus:
        for step, (d, best) in enumerate(zip(ckpts, (True, False, True)), start=1):
            bus.publish(Save(step=step, checkpoint_dir=d, is_best=best))
    data = read_offline(offline)
    uploads = [u for u in data.uploads if "checkpoints" in u[0]]
    if policy == "same":
        assert uploads == [("finetuning/checkpoints", [c]) for c in ckpts]
        assert data.deletes == []
    elif policy == "last":
        assert uploads == [("finetuning/checkpoints/last", [c]) for c in ckpts]
        assert data.deletes == [("finetuning/checkpoints/last", [ckpts[0]]), ("finetuning/checkpoints/last", [ckpts[1]])]
    else:
        assert uploads == [("finetuning/checkpoints/best", [ckpts[0]]), ("finetuning/checkpoints/best", [ckpts[2]])]
        assert data.deletes == [("finetuning/checkpoints/best", [ckpts[0]])]


def test_failed_training_marks_run_failed(offline: Path) -> None:
    """TrainEnd(status="failed") sets sys/failed and records the error, token redacted."""
    from sinks.neptune import NeptuneSink

    sink = NeptuneSink(mode="offline", base_namespace="ft", capture_hardware_metrics=False)
    with EventBus([sink], run=RunInfo(run_id="boom")) as bus:
        bus.publish(Log(step=1, values={"loss": 1.0}))
        bus.publish(TrainEnd(step=1, status="failed", error=f"RuntimeError: bad auth {SECRET}"))
    data = read_offline(offline)
    assert data.series["ft/train/loss"] == [(1.0, 1)]
    assert data.values["sys/failed"] is True
    assert data.values["ft/train_status"] == "failed"
    assert data.values["ft/error"] == "RuntimeError: bad auth ***"


def test_a_batch_is_one_operation_per_series(offline: Path) -> None:
    """A batch of Log events becomes one LogFloats operation per series (the client's
    cost is per operation), each value with its step and its event's time; the
    single-value epoch is assigned once, with the batch's last value; order with the
    other events is kept (what came before TrainEnd is logged before it)."""
    from sinks.neptune import NeptuneSink

    sink = NeptuneSink(mode="offline", capture_hardware_metrics=False)
    sink.open_sync(RunInfo(run_id="batched"))
    logs = [Log(step=s, epoch=s / 100, values={"loss": 1.0 / s, "grad_norm": float(s), "epoch": s / 100}) for s in range(1, 101)]
    try:
        sink.write_sync([*logs[:60], TrainEnd(step=60, status="running"), *logs[60:]])
    finally:
        sink.close_sync()
    data = read_offline(offline)
    loss_ops = [op for op in data.ops if type(op).__name__ == "LogFloats" and "/".join(op.path) == "finetuning/train/loss"]
    assert len(loss_ops) == 2, "one operation before TrainEnd, one after"
    assert [(v.value, v.step) for op in loss_ops for v in op.values] == [(1.0 / s, s) for s in range(1, 101)]
    assert [v.ts for op in loss_ops for v in op.values] == [ev.time_ns / 1e9 for ev in logs]
    assert data.series["finetuning/train/grad_norm"] == [(float(s), s) for s in range(1, 101)]
    epoch_ops = [op for op in data.ops if type(op).__name__.startswith("Assign") and "/".join(op.path) == "finetuning/train/epoch"]
    assert [op.value for op in epoch_ops] == [0.6, 1.0]
    kinds = [("/".join(op.path), type(op).__name__) for op in data.ops]
    status = kinds.index(("finetuning/train_status", "AssignString"))
    assert kinds.index(("finetuning/train/loss", "LogFloats")) < status < len(kinds) - 1 - kinds[::-1].index(("finetuning/train/loss", "LogFloats"))


def test_a_retried_batch_logs_what_the_failed_attempt_did_not(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A series is marked as logged up to its last step only once the client took it:
    when sending fails part-way and the bus retries the batch, nothing is skipped and
    nothing is logged twice, and what the failed attempt logged is skipped without a
    warning; a step older than what earlier batches logged is still warned about."""
    from sinks.neptune import NeptuneSink

    caplog.set_level(logging.WARNING, logger="sinks")
    sink = NeptuneSink(mode="offline", capture_hardware_metrics=False)
    sink.open_sync(RunInfo(run_id="retried"))
    real_ns = sink._ns
    failures = ["finetuning/train/grad_norm"]

    class Flaky:
        def __init__(self, handler: Any, path: str) -> None:
            self.handler, self.path = handler, path

        def extend(self, *args: Any, **kwargs: Any) -> None:
            if self.path in failures:
                failures.remove(self.path)
                raise ConnectionError("the client could not queue the operation")
            self.handler.extend(*args, **kwargs)

        def assign(self, *args: Any, **kwargs: Any) -> None:
            self.handler.assign(*args, **kwargs)

    sink._ns = lambda path: Flaky(real_ns(path), f"{sink.base_namespace}/{path}")  # type: ignore[method-assign]
    batch = [Log(step=s, values={"loss": float(s), "grad_norm": 10.0 * s}) for s in (1, 2, 3)]
    try:
        with pytest.raises(ConnectionError):
            sink.write_sync(batch)
        sink.write_sync(batch)  # the bus's retry of the same batch
        assert not [r for r in caplog.records if "not after step" in r.getMessage()]
        sink.write_sync([Log(step=2, values={"loss": 99.0})])  # a new batch, an old step
    finally:
        sink.close_sync()
    assert [r.getMessage() for r in caplog.records if "not after step" in r.getMessage()] == [
        "neptune sink: 'train/loss': step 2 is not after step 3 already logged; Neptune needs increasing steps, skipped"
    ]
    data = read_offline(offline)
    assert data.series["finetuning/train/loss"] == [(1.0, 1), (2.0, 2), (3.0, 3)]
    assert data.series["finetuning/train/grad_norm"] == [(10.0, 1), (20.0, 2), (30.0, 3)]


def test_sys_stdout_and_stderr_are_left_alone(offline: Path) -> None:
    """The SDK's stream capture is off by default: it would replace sys.stdout and
    sys.stderr from the sink's thread and, at stop, restore the streams it saw at
    start, even if the program has closed them since. capture_stdout=True opts in."""
    import io
    import sys

    from sinks.neptune import NeptuneSink

    before = (sys.stdout, sys.stderr)
    sink = NeptuneSink(mode="offline", capture_hardware_metrics=False)
    sink.open_sync(RunInfo(run_id="streams"))
    try:
        assert (sys.stdout, sys.stderr) == before
        # What the benchmark did: streams swapped while the run is open, then closed.
        temporary = io.StringIO()
        sys.stdout = sys.stderr = temporary
        try:
            sink.write_sync([Log(step=1, values={"loss": 1.0})])
        finally:
            sys.stdout, sys.stderr = before
        temporary.close()
    finally:
        sink.close_sync()
    assert (sys.stdout, sys.stderr) == before
    assert read_offline(offline).series["finetuning/train/loss"] == [(1.0, 1)]

    opted_in = NeptuneSink(mode="offline", capture_hardware_metrics=False, capture_stdout=True)
    opted_in.open_sync(RunInfo(run_id="streams-on"))
    try:
        assert sys.stdout is not before[0], "capture_stdout=True is passed to the SDK"
    finally:
        opted_in.close_sync()
    assert sys.stdout is before[0]


def test_existing_run_is_used_and_not_stopped(offline: Path) -> None:
    """run=<neptune.Run>: the sink logs into it and leaves stopping it to its owner."""
    import neptune

    from sinks.neptune import NeptuneSink

    run = neptune.init_run(mode="offline", capture_hardware_metrics=False, capture_stdout=False, capture_stderr=False)
    try:
        sink = NeptuneSink(run=run)
        with EventBus([sink], run=RunInfo(run_id="mine")) as bus:
            bus.publish(Log(step=2, values={"loss": 0.25}))
        run["after/close"] = 1  # still usable: the sink did not stop it
    finally:
        run.stop()
    data = read_offline(offline)
    assert data.series["finetuning/train/loss"] == [(0.25, 2)]
    assert "mine" in data.tags
    assert data.values["after/close"] == 1


@pytest.mark.parametrize("token", [_token("https://app.neptune.ai"), _token("https://ui.neptune.ai"), "ANONYMOUS"])
def test_hosted_service_token_refused(no_network: list[Any], token: str) -> None:
    """A token for the hosted service fails at open with the closure date, before any network call."""
    require_module("neptune")
    from sinks.neptune import NeptuneSink

    sink = NeptuneSink(api_token=token, project="team/project", mode="async")
    with pytest.raises(SinkConfigError) as info:
        sink.open_sync(RunInfo(run_id="x"))
    assert "2026-03-05" in str(info.value) and "self-hosted" in str(info.value)
    assert token not in str(info.value) and SECRET not in str(info.value)
    assert no_network == []


def test_self_hosted_token_accepted(no_network: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A token for another server passes the hosted-service check (and then talks to that server)."""
    require_module("neptune")
    from sinks.neptune import NeptuneSink

    sink = NeptuneSink(api_token=_token("https://neptune.internal.example"), project="team/project")
    sink._check_server()  # no error: only the closed hosted service is refused


def test_missing_configuration_errors_name_the_fix(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online without a token or project: a clear error, no network attempt."""
    from sinks.neptune import NeptuneSink

    monkeypatch.delenv("NEPTUNE_API_TOKEN")
    with pytest.raises(SinkConfigError, match="NEPTUNE_API_TOKEN"):
        NeptuneSink(project="team/project").open_sync(RunInfo())
    with pytest.raises(SinkConfigError, match="NEPTUNE_PROJECT"):
        NeptuneSink(api_token=_token("https://neptune.internal.example")).open_sync(RunInfo())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"log_checkpoints": "sometimes"}, "log_checkpoints"),
        ({"mode": "read-only"}, "mode"),
        ({"base_namespace": ""}, "base_namespace"),
        ({"log_parameters": "yes"}, "log_parameters"),
        ({"project": 3}, "project"),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, Any], message: str) -> None:
    """A wrong option names itself."""
    from sinks.neptune import NeptuneSink

    with pytest.raises(SinkConfigError, match=message):
        NeptuneSink(**options)


def test_bad_neptune_mode_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """NEPTUNE_MODE with a value that cannot log is reported as such."""
    from sinks.neptune import NeptuneSink

    monkeypatch.setenv("NEPTUNE_MODE", "offlne")
    with pytest.raises(SinkConfigError, match="NEPTUNE_MODE='offlne'"):
        NeptuneSink()



def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the neptune package: not available, and opening says what to install."""
    import sys

    from eventbus.errors import MissingDependencyError
    from sinks.neptune import NeptuneSink

    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.setitem(sys.modules, "neptune", None)  # makes `import neptune` fail
    assert not NeptuneSink.available()
    with pytest.raises(MissingDependencyError, match=r"pip install 'eventbus-telemetry\[neptune\]'"):
        NeptuneSink().open_sync(RunInfo())


# -- train() then evaluate(): the same run online, a new one offline ----------------------


def _trainer(sink: Any, out: Path) -> Any:
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
    from trainer import Trainer

    args = tiny_args(out, max_steps=4, eval_strategy="steps", eval_steps=2)
    return Trainer(TinyClassifier(), args, train_dataset=make_dataset(16), eval_dataset=make_dataset(8, seed=1), sinks=[sink])


@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "in-process"])
def test_offline_evaluate_after_train_is_a_new_run_and_says_so(offline: Path, caplog: pytest.LogCaptureFixture, isolate: bool) -> None:
    """Our Trainer closes its bus at the end of train() and evaluate() opens a new one.
    The client's offline mode cannot continue a stopped run (init_run(with_id=...)
    needs the server): the evaluation goes to a new offline run, tagged with the same
    bus run id, and one warning says so."""
    from sinks.neptune import NeptuneSink
    from tests.trainer._loop_helpers import make_dataset

    caplog.set_level(logging.INFO, logger="sinks")
    sink = NeptuneSink(mode="offline", capture_hardware_metrics=False)
    sink.isolate = isolate
    trainer = _trainer(sink, offline / "out")
    trainer.train()
    assert sink.last_bus_run_id == trainer.run_id and sink.last_sys_id is None
    assert "cannot continue" not in caplog.text
    metrics = trainer.evaluate(make_dataset(8, seed=2))
    said = [r.getMessage() for r in caplog.records if "cannot continue a stopped run" in r.getMessage()]
    assert len(said) == 1 and trainer.run_id in said[0]
    runs = read_offline_runs(offline)
    assert len(runs) == 2
    [train] = [r for r in runs if "finetuning/train/loss" in r.series]
    [evaluation] = [r for r in runs if r is not train]
    assert [s for _, s in train.series["finetuning/train/loss"]] == [1, 2, 3, 4]
    assert evaluation.series["finetuning/eval/loss"] == [(metrics["eval_loss"], 4)]
    assert trainer.run_id in train.tags and trainer.run_id in evaluation.tags
    assert evaluation.values["finetuning/run_id"] == trainer.run_id
    assert not [p for p in evaluation.values if "trainer_parameters" in p]


class _FakeHandler:
    def __init__(self, run: "_FakeRun", path: str) -> None:
        self.run, self.path = run, path

    def assign(self, value: Any) -> None:
        self.run.values[self.path] = value

    def extend(self, values: Any, steps: Any = None, timestamps: Any = None) -> None:
        self.run.series.setdefault(self.path, []).extend(zip(values, steps))

    def add(self, values: Any) -> None:
        self.run.values.setdefault(self.path, []).extend(values)


class _FakeRun:
    """What the sink uses of a neptune.Run (a real online one needs a server)."""

    def __init__(self, sys_id: str) -> None:
        self._sys_id = sys_id  # as the client keeps it from the server's answer
        self.values: dict[str, Any] = {}
        self.series: dict[str, list[Any]] = {}
        self.stopped = 0
        self.fail_stop = False

    def __getitem__(self, path: str) -> _FakeHandler:
        return _FakeHandler(self, path)

    def __setitem__(self, path: str, value: Any) -> None:
        self.values[path] = value

    def wait(self) -> None:
        pass

    def stop(self) -> None:
        self.stopped += 1
        if self.fail_stop:
            raise ConnectionError("the server did not answer")


@pytest.fixture
def fake_init_run(monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> list[dict[str, Any]]:
    """neptune.init_run replaced: records its keyword arguments; a new run is
    ``PROJ-<n>``, one asked for ``with_id`` has that id."""
    require_module("neptune")
    import neptune

    calls: list[dict[str, Any]] = []

    def init_run(**kwargs: Any) -> _FakeRun:
        calls.append(kwargs)
        return _FakeRun(kwargs.get("with_id") or f"PROJ-{len(calls)}")

    monkeypatch.setattr(neptune, "init_run", init_run)
    return calls


def test_online_evaluate_after_train_continues_the_run(tmp_path: Path, fake_init_run: list[dict[str, Any]]) -> None:
    """Online (in-process: neptune.init_run is replaced), evaluate() after train()
    continues the training's run with init_run(with_id=<its sys/id>), as transformers'
    NeptuneCallback does, with the same arguments but custom_run_id (which Neptune
    refuses with with_id). Another Trainer (another run id) gets another run."""
    from sinks.neptune import NeptuneSink
    from tests.trainer._loop_helpers import make_dataset

    options = dict(api_token=_token("https://neptune.internal.example"), project="team/project", custom_run_id="mine")
    sink = NeptuneSink(**options)
    sink.isolate = False
    trainer = _trainer(sink, tmp_path / "out")
    trainer.train()
    assert (sink.last_sys_id, sink.last_bus_run_id) == ("PROJ-1", trainer.run_id)
    metrics = trainer.evaluate(make_dataset(8, seed=2))
    trainer.predict(make_dataset(8, seed=3))
    assert [c.get("with_id") for c in fake_init_run] == [None, "PROJ-1", "PROJ-1"]
    first, again = fake_init_run[0], fake_init_run[1]
    assert first["custom_run_id"] == "mine" and "custom_run_id" not in again
    assert {k: v for k, v in again.items() if k != "with_id"} == {k: v for k, v in first.items() if k != "custom_run_id"}
    assert sink.last_sys_id == "PROJ-1"

    other = NeptuneSink(**options)
    other.isolate = False
    other_trainer = _trainer(other, tmp_path / "out")
    other_trainer.evaluate()
    assert "with_id" not in fake_init_run[-1] and other.last_sys_id == "PROJ-4"
    assert len(fake_init_run) == 4 and metrics["eval_loss"]


def test_online_reopen_after_a_failed_close(
    fake_init_run: list[dict[str, Any]], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close whose stop() failed, or an open with no close before it: the reopen
    continues the run (the one left open is stopped first, its failure only logged);
    a run the server no longer has gives a new run; the token is in no log line."""
    import neptune
    from neptune.exceptions import RunNotFound

    from sinks.neptune import NeptuneSink

    caplog.set_level(logging.DEBUG)
    token = _token("https://neptune.internal.example")
    sink = NeptuneSink(api_token=token, project="team/project", mode="sync")
    sink.open_sync(RunInfo(run_id="r"))
    first = sink.neptune_run
    first.fail_stop = True
    with pytest.raises(ConnectionError):
        sink.close_sync()
    sink.open_sync(RunInfo(run_id="r"))
    assert fake_init_run[-1]["with_id"] == "PROJ-1"
    left_open = sink.neptune_run
    left_open.fail_stop = True
    sink.open_sync(RunInfo(run_id="r"))  # no close in between
    assert left_open.stopped == 1 and "could not stop the previous run" in caplog.text
    assert fake_init_run[-1]["with_id"] == "PROJ-1" and sink.neptune_run is not left_open
    sink.close_sync()

    real = neptune.init_run

    def gone(**kwargs: Any) -> Any:
        if kwargs.get("with_id"):
            fake_init_run.append(kwargs)
            raise RunNotFound(f"team/project/{kwargs['with_id']}")
        return real(**kwargs)

    monkeypatch.setattr(neptune, "init_run", gone)
    sink.open_sync(RunInfo(run_id="r"))
    sink.close_sync()
    assert [c.get("with_id") for c in fake_init_run[-2:]] == ["PROJ-1", None]
    assert sink.last_sys_id == f"PROJ-{len(fake_init_run)}"
    assert "was not found on the server" in caplog.text
    assert SECRET not in caplog.text and token not in caplog.text


def test_user_run_is_reused_on_reopen(fake_init_run: list[dict[str, Any]]) -> None:
    """run=<neptune.Run>: every open logs into it; none creates or continues a run."""
    from sinks.neptune import NeptuneSink

    mine = _FakeRun("MINE-1")
    sink = NeptuneSink(run=mine)
    for _ in range(2):
        sink.open_sync(RunInfo(run_id="r"))
        assert sink.neptune_run is mine
        sink.close_sync()
    assert fake_init_run == [] and mine.stopped == 0
    assert sink.last_sys_id is None


def test_neptune_sync_the_docs_command_for_offline_runs_starts() -> None:
    # docs/backends-neptune-comet.md: offline runs are uploaded later with
    # `neptune sync`; its CLI imports pkg_resources (setuptools < 81, in our extra).
    import subprocess
    import sys

    require_module("neptune")
    exe = Path(sys.executable).with_name("neptune")
    assert exe.exists(), "the neptune console script is not installed beside this Python"
    done = subprocess.run([str(exe), "sync", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Usage: neptune sync" in done.stdout
