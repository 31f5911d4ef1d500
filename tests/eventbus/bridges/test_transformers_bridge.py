"""The transformers bridge, driven by the real ``transformers.Trainer`` on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from eventbus import (
    Evaluate,
    EventBus,
    InitEnd,
    Log,
    OptimizerStep,
    Predict,
    Save,
    SinkConfigError,
    StepBegin,
    StepEnd,
    TrainBegin,
    TrainEnd,
)
from tests.conftest import require_module
from tests.eventbus.bridges._recording import RecordingSink

try:
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

    from eventbus.bridges.transformers import EventBusCallback
except ImportError:  # checked per test by _frameworks (skips locally, fails in CI)
    pass


# Tests that check what happens without the framework, so they run anyway.
_NO_FRAMEWORK = {"test_importing_eventbus_bridges_imports_no_framework", "test_missing_transformers_names_the_extra"}


@pytest.fixture(autouse=True)
def _frameworks(request: pytest.FixtureRequest) -> None:
    if request.node.name in _NO_FRAMEWORK:
        return
    require_module("transformers")
    if request.node.name != "test_bad_configuration_is_a_clear_error":
        # TrainingArguments and Trainer refuse to run without accelerate: the
        # [transformers] extra must pull it in.
        require_module("accelerate")


SECRET = "hf_do_not_log_this_token_123"


class TinyRegressor(nn.Module):
    """A model transformers' Trainer accepts: returns {"loss", "logits"}."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.linear(x).squeeze(-1)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.mse_loss(logits, labels)
        return out


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def _args(tmp_path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",  # transformers' own integrations off: our sinks log instead
        max_steps=8,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=0.05,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        hub_token=SECRET,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _train(tmp_path, callback: EventBusCallback, **overrides) -> Trainer:
    trainer = Trainer(
        model=TinyRegressor(),
        args=_args(tmp_path, **overrides),
        train_dataset=_Data(64, 0),
        eval_dataset=_Data(16, 1),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def test_sinks_receive_what_transformers_logs_at_the_same_steps(tmp_path):
    sink = RecordingSink()
    cb = EventBusCallback([sink])
    trainer = _train(tmp_path, cb)

    # on_train_end flushed the bus: everything was delivered before train() returned,
    # and the sinks stay open for a later evaluate() (same experiment / run).
    assert cb.bus is not None and cb.bus.running
    stats = cb.last_stats
    assert stats is not None
    assert stats.sinks["recording"].dropped == 0
    assert stats.sinks["recording"].delivered == len(sink.received) > 0
    assert sink.closed == 0
    cb.close()
    assert sink.closed == 1 and not cb.bus.running

    history = trainer.state.log_history
    assert len(history) >= 6  # 4 training logs, 2 eval logs, the train summary
    expected = [(h["step"], {k: v for k, v in h.items() if k != "step"}) for h in history]
    got = [(e.step, dict(e.values)) for e in sink.of(Log)]
    assert got == expected

    evals = sink.of(Evaluate)
    eval_history = [h for h in history if "eval_loss" in h]
    assert [e.step for e in evals] == [h["step"] for h in eval_history] == [4, 8]
    for ev, h in zip(evals, eval_history):
        assert ev.metrics["eval_loss"] == h["eval_loss"]

    # Lifecycle order and headers.
    kinds = [type(e) for e in sink.received]
    assert kinds[0] is InitEnd and kinds[1] is TrainBegin and kinds[-1] is TrainEnd
    assert [e.step for e in sink.of(StepEnd)] == list(range(1, 9))
    assert len(sink.of(StepBegin)) == len(sink.of(OptimizerStep)) == 8
    assert sink.of(TrainEnd)[0].status == "completed"
    assert sink.of(TrainEnd)[0].step == 8
    log_epochs = [e.epoch for e in sink.of(Log)]
    assert log_epochs == [h.get("epoch") for h in history]
    assert len({e.run_id for e in sink.received}) == 1

    saves = sink.of(Save)
    assert [s.step for s in saves] == [4, 8]
    for s in saves:
        assert s.checkpoint_dir == os.path.join(str(tmp_path / "out"), f"checkpoint-{s.step}")
        assert os.path.isdir(s.checkpoint_dir)

    run = sink.runs[0]
    assert run.output_dir == str(tmp_path / "out") and run.rank == 0


def test_train_begin_carries_redacted_arguments_and_hparams(tmp_path):
    sink = RecordingSink()
    cb = EventBusCallback([sink])
    _train(tmp_path, cb)
    cb.close()
    (begin,) = sink.of(TrainBegin)
    assert begin.config["learning_rate"] == 0.05
    assert begin.config["output_dir"] == str(tmp_path / "out")
    assert begin.hparams["per_device_train_batch_size"] == 4
    assert begin.max_steps == 8
    assert begin.config["hub_token"] == "***"
    # No secret anywhere in what a sink would write.
    from eventbus.events import encode_json

    assert SECRET not in b"".join(encode_json(e) for e in sink.received).decode()


def test_jsonl_sink_by_report_to_name_reads_back_log_history(tmp_path):
    from sinks.jsonl import read_jsonl

    cb = EventBusCallback(report_to=["jsonl"], sink_options={"jsonl": {"path": str(tmp_path / "events.jsonl")}})
    trainer = _train(tmp_path, cb)
    # Read before close: the flush at train end got TrainEnd written, which flushes the file.
    events = read_jsonl(tmp_path / "events.jsonl")
    got = [(e.step, dict(e.values)) for e in events if isinstance(e, Log)]
    expected = [(h["step"], {k: v for k, v in h.items() if k != "step"}) for h in trainer.state.log_history]
    assert got == expected
    lines = (tmp_path / "events.jsonl").read_text()
    assert SECRET not in lines
    assert json.loads(lines.splitlines()[-1])["type"] == "TrainEnd"
    cb.close()


def test_only_subscribed_events_are_built(tmp_path):
    class LogsOnly(RecordingSink):
        events = (Log,)

    sink = LogsOnly()
    cb = EventBusCallback([sink])
    _train(tmp_path, cb)
    assert sink.received and all(type(e) is Log for e in sink.received)
    # Nothing else entered the bus at all: StepEnd etc. were never built.
    assert cb.last_stats.published == len(sink.received)
    cb.close()


def test_evaluate_after_train_goes_to_the_same_bus_and_open_sinks(tmp_path):
    sink = RecordingSink()
    cb = EventBusCallback([sink])
    trainer = _train(tmp_path, cb)
    bus = cb.bus
    first_run = sink.runs[0].run_id
    metrics = trainer.evaluate()
    assert cb.bus is bus and bus.running  # the training's bus: its sinks were never closed
    cb.close()
    last = sink.of(Evaluate)[-1]
    assert last.metrics == metrics
    assert last.step == 8
    assert [r.run_id for r in sink.runs] == [first_run]
    assert sink.closed == 1
    assert cb.last_stats.sinks["recording"].delivered == len(sink.received)

    # After an explicit close, the next use opens a fresh bus over the same sinks and run.
    trainer.evaluate()
    assert cb.bus is not bus and cb.bus.running
    cb.close()
    assert [r.run_id for r in sink.runs] == [first_run, first_run]
    assert sink.closed == 2


def test_a_second_train_is_a_run_of_its_own_and_a_resume_is_not(tmp_path):
    # transformers' integrations start a new run (MLflow) per train(): the same
    # trainer trained again from step 0 is a new run here too (new run id, report_to
    # sinks built anew: another jsonl file), the evaluate() after it goes to that run,
    # and a resume from a checkpoint continues the run it is in.
    cb = EventBusCallback(report_to=["jsonl"], sink_options={"jsonl": {"dir": str(tmp_path / "events")}})
    trainer = _train(tmp_path, cb)
    first = cb.bus.run.run_id
    trainer.train()
    second = cb.bus.run.run_id
    trainer.evaluate()
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert cb.bus.run.run_id == second
    cb.close()
    assert first != second
    files = sorted(os.listdir(tmp_path / "events"))
    assert files == sorted([f"events-{first}.jsonl", f"events-{second}.jsonl"])
    from sinks.jsonl import read_jsonl

    def steps(run_id):
        return [e.step for e in read_jsonl(tmp_path / "events" / f"events-{run_id}.jsonl") if type(e) is Log and "loss" in e.values]

    assert steps(first) == [2, 4, 6, 8]
    # The resume from checkpoint-4 is marked as one (TrainBegin.resumed_from): the
    # reader drops what the run logged after step 4 before it, which it logged again.
    assert steps(second) == [2, 4, 6, 8]
    begins = [e for e in read_jsonl(tmp_path / "events" / f"events-{second}.jsonl", purge_orphans=False) if type(e) is TrainBegin]
    assert [(b.step, b.resumed_from) for b in begins] == [(0, None), (4, str(tmp_path / "out" / "checkpoint-4"))]
    evaluations = [e for e in read_jsonl(tmp_path / "events" / f"events-{second}.jsonl", purge_orphans=False) if type(e) is Evaluate]
    # during training (4, 8), evaluate() after it (8), then the resumed run's (8)
    assert [e.step for e in evaluations] == [4, 8, 8, 8]


def test_a_hyperparameter_search_trial_closes_its_bus_at_train_end(tmp_path):
    """As transformers' CometCallback makes one experiment per trial."""
    sink = RecordingSink()
    cb = EventBusCallback([sink])
    args = _args(tmp_path)
    state, control = TrainerState(is_hyper_param_search=True), TrainerControl()
    cb.on_train_begin(args, state, control, model=TinyRegressor())
    cb.on_log(args, state, control, logs={"loss": 1.0})
    cb.on_train_end(args, state, control)
    assert not cb.bus.running and sink.closed == 1
    assert [type(e) for e in sink.received] == [TrainBegin, Log, TrainEnd]


@pytest.mark.parametrize(
    ("call", "prefix"),
    [
        (lambda t: t.evaluate(), "eval"),
        (lambda t: t.evaluate(metric_key_prefix="val"), "val"),
        (lambda t: t.evaluate(eval_dataset={"squad": _Data(8, 2)}), "eval_squad"),
        (lambda t: t.predict(_Data(8, 2)), "test"),
        (lambda t: t.predict(_Data(8, 2), metric_key_prefix="holdout_set"), "holdout_set"),
    ],
    ids=["evaluate", "evaluate-val", "evaluate-dict", "predict", "predict-custom"],
)
def test_evaluate_and_predict_carry_the_metric_key_prefix_used(tmp_path, call, prefix):
    """transformers passes no metric_key_prefix to callbacks: it is read off the
    speed metrics every evaluate()/predict() adds (<prefix>_runtime...)."""
    sink = RecordingSink()
    cb = EventBusCallback([sink])
    trainer = _train(tmp_path, cb, eval_strategy="no", save_strategy="no")
    call(trainer)
    cb.close()
    (event,) = sink.of(Evaluate) + sink.of(Predict)
    assert event.prefix == prefix
    assert f"{prefix}_loss" in event.metrics and f"{prefix}_runtime" in event.metrics


def test_no_sink_runs_off_world_process_zero(tmp_path):
    sink = RecordingSink()
    cb = EventBusCallback([sink])
    args = _args(tmp_path)
    state = TrainerState(is_world_process_zero=False)
    control = TrainerControl()
    cb.on_train_begin(args, state, control, model=TinyRegressor())
    cb.on_log(args, state, control, logs={"loss": 1.0})
    cb.on_train_end(args, state, control)
    assert sink.runs == [] and sink.received == []
    assert cb.last_stats.published == 0  # nothing was even built on that rank


def test_logs_dict_is_copied(tmp_path):
    sink = RecordingSink()
    bus = EventBus([sink])
    cb = EventBusCallback(bus=bus)
    args = _args(tmp_path)
    state, control = TrainerState(), TrainerControl()
    logs = {"loss": 1.5}
    cb.on_log(args, state, control, logs=logs)
    logs["loss"] = 99.0  # a later callback editing transformers' dict
    cb.on_train_end(args, state, control)
    assert bus.running  # a bus passed in is the caller's to close
    bus.close(timeout=10)
    assert sink.of(Log)[0].values == {"loss": 1.5}


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(SinkConfigError, match="not both"):
        EventBusCallback([RecordingSink()], bus=EventBus())
    with pytest.raises(SinkConfigError, match="eventbus.Sink"):
        EventBusCallback(["tensorboard"])  # a name where a Sink was expected


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_eventbus_bridges_imports_no_framework():
    r = _run_python(
        "import sys, eventbus, eventbus.bridges\n"
        "bad = [m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules]\n"
        "print(bad)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_missing_transformers_names_the_extra():
    r = _run_python(
        "import sys\n"
        "sys.modules['transformers'] = None  # as if not installed\n"
        "from eventbus import MissingDependencyError\n"
        "try:\n"
        "    from eventbus.bridges import EventBusCallback\n"
        "except MissingDependencyError as e:\n"
        "    print('OK', e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK") and "eventbus-telemetry[transformers]" in r.stdout
