"""The Lightning bridge, driven by the real ``lightning.Trainer`` on the CPU."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

from eventbus import (
    EpochEnd,
    Evaluate,
    Log,
    OptimizerStep,
    PreOptimizerStep,
    Predict,
    Save,
    StepBegin,
    StepEnd,
    SubstepEnd,
    TrainBegin,
    TrainEnd,
)
from tests.conftest import require_module
from tests.eventbus.bridges._recording import RecordingSink

try:
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.logger import Logger

    from eventbus.bridges.lightning import EventBusLightningCallback, EventBusLogger
except ImportError:  # checked per test by _frameworks (skips locally, fails in CI)
    L = None
    Logger = object  # so that the classes below still define


# Tests that check what happens without the framework, so they run anyway.
_NO_FRAMEWORK = {"test_missing_lightning_names_the_extra"}


@pytest.fixture(autouse=True)
def _frameworks(request: pytest.FixtureRequest) -> None:
    if request.node.name not in _NO_FRAMEWORK:
        require_module("lightning")


SECRET = "sk-do-not-log-this-key-123"


class TinyModule(L.LightningModule if L is not None else object):  # type: ignore[misc]
    """A linear regressor that logs the way users do: self.log(...)."""

    def __init__(self, lr: float = 0.05, api_key: str = SECRET, fail_at: int = -1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.linear = nn.Linear(4, 1)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.hparams.fail_at:
            raise RuntimeError("boom at step 3")
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class RecordingLogger(Logger):
    """What Lightning hands to any logger: the reference our sink must match."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, Any]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def _loader(n: int, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


def _trainer(tmp_path, loggers: Any, callbacks: list, **kw: Any) -> Any:
    opts = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=2,
        default_root_dir=str(tmp_path),
        logger=loggers,
        callbacks=callbacks,
    )
    opts.update(kw)
    return L.Trainer(**opts)


def _csv_rows(csv_logger: CSVLogger) -> list[dict[str, float]]:
    with open(os.path.join(csv_logger.log_dir, "metrics.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_sinks_receive_what_lightning_loggers_log_at_the_same_steps(tmp_path):
    sink = RecordingSink()
    ours = EventBusLogger([sink], save_dir=str(tmp_path / "bus"))
    reference = RecordingLogger()
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=-1, every_n_epochs=1)
    trainer = _trainer(tmp_path, [csv_logger, reference, ours], [ours.callback(), ckpt])
    model = TinyModule()
    trainer.fit(model, _loader(32, 0), _loader(16, 1))

    # finalize() closed the bus: all delivered before fit() returned.
    assert not ours.bus.running
    assert ours.last_stats.sinks["recording"].dropped == 0
    assert sink.closed == 1

    logs = [(e.step, dict(e.values)) for e in sink.of(Log)]
    assert len(logs) >= 8  # 16 steps logged every 2
    # The validation-end metrics are Evaluate events (below), not training Logs.
    assert logs == [call for call in reference.calls if "val_loss" not in call[1]]
    assert not [e for e in sink.of(Log) if "val_loss" in e.values]

    # The same numbers at the same steps as Lightning's own CSV logger wrote.
    rows = [r for r in _csv_rows(csv_logger) if "val_loss" not in r]
    assert len(rows) == len(logs)
    for row, (step, values) in zip(rows, logs):
        assert row.pop("step") == step
        assert row == pytest.approx({k: float(v) for k, v in values.items()}, rel=1e-6)
    for e in sink.of(Log):
        assert e.epoch == e.values["epoch"]

    # Lifecycle: 16 optimizer steps, 2 epochs, 2 validations (no sanity-check one).
    assert [e.step for e in sink.of(StepEnd)] == list(range(1, 17))
    assert len(sink.of(StepBegin)) == len(sink.of(OptimizerStep)) == len(sink.of(PreOptimizerStep)) == 16
    assert [e.epoch for e in sink.of(EpochEnd)] == [0.0, 1.0]
    evals = sink.of(Evaluate)
    # At the step Lightning's loggers got the validation metrics at (as the CSV rows).
    val_rows = {int(r["step"]): r["val_loss"] for r in _csv_rows(csv_logger) if "val_loss" in r}
    assert [e.step for e in evals] == sorted(val_rows) == [7, 15]
    for ev in evals:
        assert set(ev.metrics) == {"eval_val_loss"}  # train_loss is not an evaluation result
        assert ev.metrics["eval_val_loss"] == pytest.approx(val_rows[ev.step], rel=1e-6)

    (begin,) = sink.of(TrainBegin)
    assert begin.hparams["lr"] == 0.05 and begin.max_steps == 16 and begin.num_train_epochs == 2
    assert begin.config["api_key"] == "***" and begin.config["trainer"]["log_every_n_steps"] == 2
    (end,) = sink.of(TrainEnd)
    assert end.status == "completed" and end.step == 16
    assert type(sink.received[0]) is TrainBegin and type(sink.received[-1]) is TrainEnd

    saves = sink.of(Save)
    assert len(saves) == 2
    for s in saves:
        assert os.path.isfile(s.checkpoint_dir) and s.checkpoint_dir.startswith(str(tmp_path / "ckpt"))
    assert sink.runs[0].output_dir == str(tmp_path / "bus")

    from eventbus.events import encode_json

    assert SECRET not in b"".join(encode_json(e) for e in sink.received).decode()

    # trainer.test() after fit: a fresh bus over the same sink and run id.
    trainer.test(model, _loader(16, 2), verbose=False)
    (pred,) = sink.of(Predict)
    assert set(pred.metrics) == {"test_loss"} and pred.prefix == "test"
    (test_call,) = [call for call in reference.calls if "test_loss" in call[1]]
    assert pred.step == test_call[0]  # the step Lightning's loggers got the test metrics at
    assert not [e for e in sink.of(Log) if "test_loss" in e.values]
    assert pred.metrics["test_loss"] == pytest.approx(float(trainer.callback_metrics["test_loss"]))
    assert [r.run_id for r in sink.runs] == [sink.runs[0].run_id] * 2
    assert sink.closed == 2 and not ours.bus.running


def test_jsonl_sink_by_report_to_name(tmp_path):
    from sinks.jsonl import read_jsonl

    path = tmp_path / "events.jsonl"
    ours = EventBusLogger(report_to="jsonl", sink_options={"jsonl": {"path": str(path)}})
    reference = RecordingLogger()
    trainer = _trainer(tmp_path, [reference, ours], [ours.callback()], max_epochs=1, enable_checkpointing=False)
    trainer.fit(TinyModule(), _loader(32, 0), _loader(16, 1))
    events = read_jsonl(path)
    logs = [(e.step, dict(e.values)) for e in events if isinstance(e, Log)]
    assert logs == [call for call in reference.calls if "val_loss" not in call[1]]
    (val_call,) = [call for call in reference.calls if "val_loss" in call[1]]
    (ev,) = [e for e in events if isinstance(e, Evaluate)]
    assert ev.step == val_call[0] and ev.metrics["eval_val_loss"] == pytest.approx(val_call[1]["val_loss"])
    assert isinstance(events[-1], TrainEnd)
    assert SECRET not in path.read_text()


def test_gradient_accumulation_batches_are_substeps(tmp_path):
    sink = RecordingSink()
    ours = EventBusLogger([sink])
    trainer = _trainer(
        tmp_path, ours, [ours.callback()], max_epochs=1, accumulate_grad_batches=2, enable_checkpointing=False
    )
    trainer.fit(TinyModule(), _loader(32, 0))
    assert [e.step for e in sink.of(StepEnd)] == [1, 2, 3, 4]
    assert len(sink.of(SubstepEnd)) == 4 and len(sink.of(StepBegin)) == 4
    # Lightning asked the logger for its experiment before the callback's setup:
    # the sinks still learned the trainer's folder.
    assert sink.runs[0].output_dir == str(tmp_path)


def test_callback_alone_publishes_and_closes_its_bus(tmp_path):
    sink = RecordingSink()
    cb = EventBusLightningCallback([sink])
    trainer = _trainer(tmp_path, False, [cb], max_epochs=1, enable_checkpointing=False)
    trainer.fit(TinyModule(), _loader(32, 0), _loader(16, 1))
    assert not cb.bus.running and sink.closed == 1  # closed at teardown
    assert sink.of(Log) == []  # metrics reach sinks through the logger, not the callback
    assert [e.step for e in sink.of(Evaluate)] == [7]  # Lightning's logging step for it
    assert sink.runs[0].output_dir == str(tmp_path)  # the trainer's default_root_dir
    assert sink.of(TrainEnd)[0].status == "completed"


def test_a_crash_publishes_a_failed_train_end_and_closes(tmp_path):
    sink = RecordingSink()
    ours = EventBusLogger([sink])
    trainer = _trainer(tmp_path, ours, [ours.callback()], max_epochs=1, enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyModule(fail_at=3), _loader(32, 0))
    (end,) = sink.of(TrainEnd)
    assert end.status == "failed" and "boom at step 3" in end.error
    assert not ours.bus.running and sink.closed == 1
    assert [e.step for e in sink.of(StepEnd)] == [1, 2, 3]


def test_logger_alone_reports_hparams_as_train_begin(tmp_path):
    sink = RecordingSink()
    ours = EventBusLogger([sink])
    trainer = _trainer(tmp_path, ours, [], max_epochs=1, enable_checkpointing=False)
    trainer.fit(TinyModule(), _loader(32, 0), _loader(16, 1))
    kinds = [type(e) for e in sink.received]
    assert kinds[0] is TrainBegin and kinds[-1] is TrainEnd
    # No callback publishes Evaluate: the validation metrics still arrive, as a Log.
    assert [e.step for e in sink.of(Log) if "val_loss" in e.values] == [7]
    assert sink.of(Evaluate) == []
    assert sink.of(TrainBegin)[0].hparams["api_key"] == "***"
    # Without the callback the logger knows only the steps it was given.
    assert sink.of(TrainEnd)[0].step == sink.of(Log)[-1].step > 0


def test_missing_lightning_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None  # as if not installed\n"
        "from eventbus import MissingDependencyError\n"
        "try:\n"
        "    import eventbus.bridges.lightning\n"
        "except MissingDependencyError as e:\n"
        "    print('OK', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK") and "eventbus-telemetry[lightning]" in r.stdout


def test_no_sink_runs_off_rank_zero(tmp_path):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    sink = RecordingSink()
    ours = EventBusLogger([sink], save_dir=str(tmp_path))
    saved = getattr(rank_zero_only, "rank", 0)
    rank_zero_only.rank = 1  # as Lightning sets it on the second process
    try:
        ours.log_hyperparams({"lr": 0.1})
        ours.log_metrics({"loss": 1.0}, step=1)
        ours.finalize("success")
    finally:
        rank_zero_only.rank = saved
    assert sink.runs == [] and sink.received == []
    assert ours.last_stats.published == 0  # nothing was even built on that rank


def test_two_loggers_under_one_save_dir_log_tensorboard_to_their_own_log_dirs(tmp_path):
    # As Lightning's own loggers: <save_dir>/<name>/<version>, so two fits are two runs.
    require_module("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    dirs = []
    for seed in (0, 1):
        ours = EventBusLogger(report_to="tensorboard", save_dir=str(tmp_path / "runs"))
        trainer = _trainer(tmp_path, [ours], [ours.callback()], max_epochs=1, enable_checkpointing=False)
        trainer.fit(TinyModule(), _loader(32, seed), _loader(16, 1))
        assert ours.log_dir == os.path.join(str(tmp_path / "runs"), "eventbus", str(ours.version))
        dirs.append(ours.log_dir)
    assert dirs[0] != dirs[1]
    for d in dirs:
        assert [f for f in os.listdir(d) if f.startswith("events.out.tfevents")], os.listdir(d)
        acc = ea.EventAccumulator(d)
        acc.Reload()
        assert acc.Tags()["scalars"], "the run's scalars are in its own log_dir"
    assert not [f for f in os.listdir(tmp_path / "runs") if f.startswith("events.out.tfevents")]


def test_resume_keeps_the_evaluations_before_the_checkpoint_in_tensorboard(tmp_path):
    # A crash in epoch 3, a resume from the end-of-epoch-2 checkpoint (global step 16):
    # the resumed run's first scalar is at step 16, and TensorBoard's reader purges what
    # the crashed run wrote at steps >= 16, so the validations before the checkpoint
    # must sit where Lightning logs them (steps 7 and 15), not at global_step (8, 16).
    require_module("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    ckpt_dir = str(tmp_path / "ckpt")

    def fit(model: Any, **kw: Any) -> EventBusLogger:
        ours = EventBusLogger(report_to="tensorboard", save_dir=str(tmp_path / "runs"), version="v1")
        ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1)
        trainer = _trainer(tmp_path, [ours], [ours.callback(), ckpt], max_epochs=3, log_every_n_steps=1)
        trainer.fit(model, _loader(32, 0), _loader(8, 1), **kw)
        return ours

    with pytest.raises(RuntimeError, match="boom"):
        fit(TinyModule(fail_at=20))
    ours = fit(TinyModule(), ckpt_path=os.path.join(ckpt_dir, "epoch=1-step=16.ckpt"))

    acc = ea.EventAccumulator(ours.log_dir)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert [e.step for e in acc.Scalars("eval/val_loss")] == [7, 15, 23]
    # Validation metrics are not also training metrics.
    assert not [t for t in tags if t.startswith("train/") and "val_loss" in t], tags
