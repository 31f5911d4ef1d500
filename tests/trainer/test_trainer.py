"""The Trainer: control flags, evaluation and prediction, the bus and its sinks, the
optimizer and schedules, and no device sync on the step path."""

from __future__ import annotations

import math
import os
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

from eventbus import Evaluate, Log, Predict, TrainEnd
from eventbus.registry import register_sink, unregister_sink
from tests.conftest import require_module
from tests.trainer._loop_helpers import (
    RecordingSink,
    TinyClassifier,
    accuracy,
    checkpoints,
    log_as_built,
    make_dataset,
    recording_callback_class,
    tiny_args,
)
from trainer import (
    DefaultFlowCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
)
from trainer.trainer import get_decay_parameter_names, get_scheduler

TRAIN = make_dataset(20)  # batch 4: 5 steps per epoch
EVAL = make_dataset(10, seed=1)


def _args(tmp_path, **kw):
    return tiny_args(tmp_path / "out", **{"per_device_eval_batch_size": 4, "learning_rate": 1e-2, **kw})


# -- control flags ----------------------------------------------------------------------


class SetFlag(TrainerCallback):
    def __init__(self, flag: str, at_step: int) -> None:
        self.flag, self.at_step = flag, at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            setattr(control, self.flag, True)


def test_should_training_stop_ends_training_after_that_step(tmp_path):
    sink = RecordingSink()
    t = Trainer(TinyClassifier(), _args(tmp_path, num_train_epochs=3), train_dataset=TRAIN, callbacks=[SetFlag("should_training_stop", 3)], sinks=[sink])
    out = t.train()
    assert out.global_step == 3 and t.state.global_step == 3
    assert sink.of(TrainEnd)[-1].status == "stopped"


def test_should_epoch_stop_ends_the_epoch_only(tmp_path):
    Recorder = recording_callback_class()
    rec = Recorder()
    t = Trainer(TinyClassifier(), _args(tmp_path, num_train_epochs=2), train_dataset=TRAIN, callbacks=[SetFlag("should_epoch_stop", 2), rec])
    t.train()
    # Epoch 1 stops after 2 of its 5 steps; epoch 2 runs in full: 7 steps.
    assert t.state.global_step == 7
    assert rec.calls.count("on_epoch_begin") == 2
    assert [s for h, s in rec.steps if h == "on_epoch_end"] == [2, 7]


def test_should_log_forces_a_log(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=5, logging_strategy="no"), train_dataset=TRAIN, callbacks=[SetFlag("should_log", 3)])
    t.train()
    assert [h["step"] for h in t.state.log_history if "loss" in h] == [3]


def test_should_evaluate_forces_an_evaluation(tmp_path):
    t = Trainer(
        TinyClassifier(), _args(tmp_path, max_steps=5), train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[SetFlag("should_evaluate", 2)]
    )
    t.train()
    assert [h["step"] for h in t.state.log_history if "eval_loss" in h] == [2]


def test_should_save_forces_a_checkpoint(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=5), train_dataset=TRAIN, callbacks=[SetFlag("should_save", 4)])
    t.train()
    assert checkpoints(t.args.output_dir) == ["checkpoint-4"]


def test_a_checkpoint_save_removes_what_a_killed_save_left_behind(tmp_path):
    import subprocess

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that is no longer running: its half-written checkpoint is junk
    (out / f"checkpoint-2.tmp-{dead.pid}" / "model").mkdir(parents=True)
    # One whose process still runs (another training writing here) is left alone.
    (out / f"checkpoint-2.tmp-{os.getppid()}").mkdir()
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=5), train_dataset=TRAIN, callbacks=[SetFlag("should_save", 4)])
    t.train()
    assert sorted(os.listdir(out)) == sorted(["checkpoint-4", f"checkpoint-2.tmp-{os.getppid()}"] + [
        n for n in os.listdir(out) if not n.startswith("checkpoint-")
    ])


def test_flags_reset_after_their_action(tmp_path):
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append((control.should_log, control.should_evaluate, control.should_save))

    t = Trainer(
        TinyClassifier(),
        _args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=[Watch()],
    )
    t.train()
    assert seen == [(False, False, False)] * 4
    assert t.control.should_log is False and t.control.should_evaluate is False and t.control.should_save is False


# -- evaluation and prediction ----------------------------------------------------------


def _manual_eval(model, data):
    model.eval()
    x = torch.stack([d["x"] for d in data])
    y = torch.tensor([d["labels"] for d in data])
    with torch.no_grad():
        # The mean over examples (as transformers), however the batches split them.
        loss = nn.functional.cross_entropy(model(x)["logits"], y).item()
        acc = (model(x)["logits"].argmax(-1) == y).float().mean().item()
    return loss, acc


def test_evaluate_returns_loss_and_compute_metrics(tmp_path):
    sink = RecordingSink()
    model = TinyClassifier()
    t = Trainer(model, _args(tmp_path), eval_dataset=EVAL, compute_metrics=accuracy, sinks=[sink])
    metrics = t.evaluate()
    loss, acc = _manual_eval(model, EVAL)
    assert metrics["eval_loss"] == pytest.approx(loss, rel=1e-6)
    assert metrics["eval_accuracy"] == pytest.approx(acc)
    assert {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"} <= set(metrics)
    # The bus was opened for this call and closed at its end.
    assert not t.bus.running and t.bus.stats().sinks["recording"].delivered == len(sink.received)
    ev = sink.of(Evaluate)
    assert len(ev) == 1 and ev[0].metrics["eval_accuracy"] == metrics["eval_accuracy"]


def test_compute_metrics_receives_numpy_arrays(tmp_path):
    got = {}

    def cm(p):
        got["types"] = (type(p.predictions), type(p.label_ids))
        got["shapes"] = (p.predictions.shape, p.label_ids.shape)
        preds, labels = p  # unpacks like transformers' EvalPrediction
        return {"n": int(len(labels))}

    t = Trainer(TinyClassifier(), _args(tmp_path), eval_dataset=EVAL, compute_metrics=cm)
    metrics = t.evaluate()
    assert got["types"] == (np.ndarray, np.ndarray)
    assert got["shapes"] == ((10, 3), (10,))
    assert metrics["eval_n"] == 10


def test_predict_returns_predictions_labels_and_metrics(tmp_path):
    sink = RecordingSink()
    model = TinyClassifier()
    t = Trainer(model, _args(tmp_path), compute_metrics=accuracy, sinks=[sink])
    out = t.predict(EVAL)
    assert out.predictions.shape == (10, 3) and out.label_ids.shape == (10,)
    x = torch.stack([d["x"] for d in EVAL])
    with torch.no_grad():
        np.testing.assert_allclose(out.predictions, model(x)["logits"].numpy(), rtol=1e-5, atol=1e-6)
    assert "test_loss" in out.metrics and "test_accuracy" in out.metrics
    assert sink.of(Predict)[0].metrics["test_accuracy"] == out.metrics["test_accuracy"]
    # predict does not log (as transformers)
    assert not sink.of(Log)


def test_predict_without_labels(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path))
    out = t.predict([{"x": d["x"]} for d in EVAL])
    assert out.predictions.shape == (10, 3)
    assert out.label_ids is None and "test_loss" not in out.metrics


def test_model_returning_a_tuple(tmp_path):
    class TupleModel(TinyClassifier):
        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            return (out["loss"], out["logits"]) if labels is not None else (out["logits"],)

    t = Trainer(TupleModel(), _args(tmp_path, max_steps=3), train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=accuracy)
    t.train()
    assert "eval_accuracy" in t.evaluate()


def test_model_without_loss_is_a_clear_error(tmp_path):
    class NoLoss(TinyClassifier):
        def forward(self, x, labels=None):
            return {"logits": super().forward(x)["logits"]}

    t = Trainer(NoLoss(), _args(tmp_path, max_steps=2), train_dataset=TRAIN)
    with pytest.raises(ValueError, match="did not return a loss"):
        t.train()


def test_eval_strategy_without_eval_dataset_is_a_clear_error(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1), train_dataset=TRAIN)
    with pytest.raises(ValueError, match="eval_dataset"):
        t.train()


# -- the bus and its sinks ----------------------------------------------------------------


def test_recording_sink_receives_logs_with_float_values(tmp_path):
    sink = RecordingSink()
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=4, logging_steps=2), train_dataset=TRAIN, sinks=[sink])
    t.train()
    logs = [e for e in sink.of(Log) if "loss" in e.values]
    assert [e.step for e in logs] == [2, 4]
    for e in logs:
        assert isinstance(e.values["loss"], float) and math.isfinite(e.values["loss"])
        assert isinstance(e.values["grad_norm"], float)
        assert isinstance(e.values["learning_rate"], float)
        assert e.values["epoch"] == pytest.approx(e.step / 5)
    stats = t.bus.stats()
    assert stats.sinks["recording"].delivered == len(sink.received) and stats.dropped == 0
    assert sink.closed and not t.bus.running
    end = sink.of(TrainEnd)[-1]
    assert end.status == "completed" and end.step == 4


def test_on_log_receives_tensors_when_it_accepts_them_and_log_history_ends_as_numbers(tmp_path):
    seen = []

    class Peek(TrainerCallback):
        accepts_tensor_logs = True

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                seen.append(dict(logs))

    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2), train_dataset=TRAIN, callbacks=[Peek()])
    t.train()
    assert len(seen) == 2
    for logs in seen:
        assert isinstance(logs["loss"], torch.Tensor) and logs["loss"].dim() == 0
        assert isinstance(logs["grad_norm"], torch.Tensor)
        assert isinstance(logs["learning_rate"], float)
    assert float(seen[0]["loss"]) == pytest.approx(t.state.log_history[0]["loss"])
    assert type(t.state.log_history[0]["loss"]) is float and type(t.state.log_history[0]["grad_norm"]) is float


@pytest.fixture
def built(monkeypatch):
    """Every event published to any bus, as built on the training thread (a
    ``publish_log`` as the ``Log`` the bus thread will build from it)."""
    from eventbus import EventBus

    events: list = []
    publish, publish_log = EventBus.publish, EventBus.publish_log

    def record(self, event):
        events.append(event)
        publish(self, event)

    def record_log(self, *fields):
        events.append(log_as_built(*fields))
        publish_log(self, *fields)

    monkeypatch.setattr(EventBus, "publish", record)
    monkeypatch.setattr(EventBus, "publish_log", record_log)
    return events


def test_on_the_cpu_the_log_event_keeps_the_trainers_own_tensors(tmp_path, built):
    """On the CPU the trainer hands its fresh loss and grad norm to on_log in a
    Snapshot: the Log event as published holds those tensors themselves (nothing
    copied or read on the training thread), on_log callbacks get a plain copy of the
    mapping, and the sinks still get floats."""
    from eventbus.values import Snapshot

    seen = []

    class Peek(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                seen.append((type(logs), logs["loss"], logs["grad_norm"]))

    sink = RecordingSink()
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=3), train_dataset=TRAIN, callbacks=[Peek()], sinks=[sink])
    t.train()
    logged = [e for e in built if isinstance(e, Log) and "loss" in e.values]
    assert len(logged) == len(seen) == 3
    for event, (kind, loss, grad_norm) in zip(logged, seen):
        assert kind is dict and type(event.values) is Snapshot
        assert event.values["loss"] is loss and event.values["grad_norm"] is grad_norm
    delivered = [e for e in sink.of(Log) if "loss" in e.values]
    assert [type(e.values["loss"]) for e in delivered] == [float] * 3
    assert [e.values["loss"] for e in delivered] == pytest.approx([float(h["loss"]) for h in t.state.log_history[:3]])


def test_a_progress_bar_alone_gets_sampled_step_ends_and_still_reaches_the_end(tmp_path, built):
    """With the progress bar the only sink of StepEnd, the trainer builds a StepEnd at
    most every 0.2 s (its max_delay), not one per step; the bar still ends at the
    last step (TrainEnd and each Log carry it)."""
    import io

    from eventbus import StepEnd
    from sinks.console import ProgressSink

    bar = ProgressSink(file=io.StringIO())
    steps = 200  # ~1 ms each: far fewer than 0.2 s apart
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=steps, logging_steps=50), train_dataset=TRAIN, sinks=[bar])
    t.train()
    step_ends = [e.step for e in built if isinstance(e, StepEnd)]
    assert 1 <= len(step_ends) < steps // 2, step_ends
    assert step_ends == sorted(step_ends) and step_ends[0] == 1  # the first at once
    assert bar.last_step == steps and bar.bar is None


def test_sinks_from_report_to(tmp_path):
    made = []

    class Named(RecordingSink):
        name = "trainer-test-sink"

        def __init__(self):
            super().__init__()
            made.append(self)

    register_sink("trainer-test-sink", Named)
    try:
        t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2, report_to="trainer-test-sink"), train_dataset=TRAIN)
        t.train()
        t.evaluate(EVAL)
    finally:
        unregister_sink("trainer-test-sink")
    # One bus per train/evaluate call, over one sink instance built from report_to
    # (opened again for the same run: what it started, it continues); it got both.
    assert len(made) == 1
    (sink,) = made
    assert sink.of(TrainEnd) and sink.of(Evaluate)
    assert sink.opened_with.output_dir == t.args.output_dir and sink.opened_with.run_id == t.run_id


def test_bus_is_closed_with_the_deadline_from_the_arguments(tmp_path, monkeypatch):
    from eventbus import EventBus

    timeouts = []
    real = EventBus.close

    def spy(self, timeout=None):
        timeouts.append(timeout)
        return real(self, timeout)

    monkeypatch.setattr(EventBus, "close", spy)
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2, bus_close_timeout=7.5), train_dataset=TRAIN, sinks=[RecordingSink()])
    t.train()
    assert timeouts == [7.5]


def test_bus_flushes_at_the_interval_from_the_arguments(tmp_path):
    # bus_flush_interval is the pump's period; a long one holds non-urgent events in
    # the ingress until the next tick (the default, 0.2 s, is the bus's own).
    from trainer import TrainingArguments

    assert TrainingArguments(output_dir=str(tmp_path)).bus_flush_interval == 0.2
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2, bus_flush_interval=3.5), train_dataset=TRAIN, sinks=[RecordingSink()])
    assert t.bus.flush_interval == 3.5
    t2 = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2), train_dataset=TRAIN, sinks=[RecordingSink()])
    assert t2.bus.flush_interval == 0.2


# -- callbacks ------------------------------------------------------------------------------


def test_default_callbacks_like_transformers(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path, disable_tqdm=True))
    names = [type(c) for c in t.callback_handler.callbacks]
    assert names == [DefaultFlowCallback, PrinterCallback]
    t2 = Trainer(TinyClassifier(), _args(tmp_path, disable_tqdm=False), callbacks=[SetFlag("should_log", 1)])
    assert [type(c) for c in t2.callback_handler.callbacks] == [DefaultFlowCallback, SetFlag, ProgressCallback]


def test_add_pop_remove_callback(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path))
    cb = SetFlag("should_log", 1)
    t.add_callback(cb)
    assert cb in t.callback_handler.callbacks
    assert t.pop_callback(SetFlag) is cb
    assert t.pop_callback(SetFlag) is None
    t.add_callback(cb)
    t.remove_callback(cb)
    assert cb not in t.callback_handler.callbacks
    t.remove_callback(PrinterCallback)
    assert PrinterCallback not in [type(c) for c in t.callback_handler.callbacks]


# -- optimizer, schedules, clipping ----------------------------------------------------------


def test_weight_decay_groups_exclude_bias_and_layernorm(tmp_path):
    model = TinyClassifier()
    names = set(get_decay_parameter_names(model))
    assert names == {"lin.weight", "out.weight"}
    t = Trainer(model, _args(tmp_path, max_steps=1, weight_decay=0.5), train_dataset=TRAIN)
    t.train()
    decay, no_decay = t.optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 4


@pytest.mark.parametrize(
    "name,options",
    [
        ("linear", None),
        ("cosine", None),
        ("cosine", {"num_cycles": 1.5}),
        ("cosine_with_restarts", {"num_cycles": 3}),
        ("polynomial", {"lr_end": 0.1, "power": 2.0}),
        ("constant", None),
        ("constant_with_warmup", None),
        ("inverse_sqrt", None),
        ("inverse_sqrt", {"timescale": 7}),
        ("cosine_with_min_lr", {"min_lr_rate": 0.2}),
        ("cosine_with_min_lr", {"min_lr": 0.05, "num_cycles": 0.75}),
        ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
        ("cosine_warmup_with_min_lr", {"min_lr": 0.1, "warmup_lr_rate": 0.3}),
        ("warmup_stable_decay", {"num_decay_steps": 4}),
        ("warmup_stable_decay", {"num_decay_steps": 3, "num_stable_steps": 2, "warmup_type": "cosine",
                                 "decay_type": "1-sqrt", "min_lr_ratio": 0.1}),
    ],
)
def test_schedules_match_transformers(name, options):
    optimization = require_module("transformers.optimization")
    p = [nn.Parameter(torch.zeros(1))]
    ours = get_scheduler(name, torch.optim.SGD(p, lr=1.0), 3, 10, options)
    theirs = optimization.get_scheduler(
        name, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), num_warmup_steps=3, num_training_steps=10,
        scheduler_specific_kwargs=options,
    )
    a, b = [], []
    for _ in range(14):
        a.append(ours.get_last_lr()[0])
        b.append(theirs.get_last_lr()[0])
        ours.optimizer.step()
        ours.step()
        theirs.optimizer.step()
        theirs.step()
    assert a == pytest.approx(b, abs=1e-12)


def test_learning_rate_is_logged_before_the_scheduler_steps(tmp_path):
    t = Trainer(
        TinyClassifier(),
        _args(tmp_path, max_steps=4, warmup_steps=2, learning_rate=1.0, lr_scheduler_type="linear"),
        train_dataset=TRAIN,
    )
    t.train()
    lrs = [h["learning_rate"] for h in t.state.log_history if "loss" in h]
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.5])


def test_gradients_are_clipped_and_the_norm_is_the_unclipped_one(tmp_path):
    norms = []

    class Norm(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())

    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=3, max_grad_norm=1e-3), train_dataset=TRAIN, callbacks=[Norm()])
    t.train()
    assert all(n <= 1e-3 * 1.01 for n in norms)
    logged = [float(h["grad_norm"]) for h in t.state.log_history if "grad_norm" in h]
    assert all(g > 1e-3 for g in logged)  # the norm before clipping


def test_nan_loss_is_filtered_on_the_device(tmp_path):
    class SometimesNaN(TinyClassifier):
        calls = 0

        def forward(self, x, labels=None):
            out = super().forward(x, labels)
            if labels is not None and self.training:
                type(self).calls += 1
                if type(self).calls == 2:
                    # NaN in the value, a zero gradient: training itself goes on.
                    out["loss"] = torch.where(torch.tensor(True), torch.tensor(float("nan")), out["loss"])
            return out

    per_step = Trainer(TinyClassifier(), _args(tmp_path, max_steps=1), train_dataset=TRAIN)
    per_step.train()
    first_loss = float(per_step.state.log_history[0]["loss"])

    t = Trainer(SometimesNaN(), _args(tmp_path, max_steps=2, logging_steps=2), train_dataset=TRAIN)
    t.train()
    logged = float(t.state.log_history[0]["loss"])
    assert math.isfinite(logged)
    # transformers' rule: the NaN step adds tr_loss / (1 + steps since the last log).
    assert logged == pytest.approx((first_loss + first_loss / 2) / 2, rel=1e-5)

    off = Trainer(SometimesNaN(), _args(tmp_path, max_steps=2, logging_steps=2, logging_nan_inf_filter=False), train_dataset=TRAIN)
    SometimesNaN.calls = 0
    off.train()
    assert math.isnan(float(off.state.log_history[0]["loss"]))


# -- no device sync on the step path ------------------------------------------------------


def test_no_host_sync_on_the_step_path(tmp_path, monkeypatch):
    """Tensor.item/__float__/__bool__/tolist called from the trainer package on the
    training thread during training steps fail the test; evaluation and the end of
    training (one final loss) are exempt."""
    src = os.path.dirname(sys.modules["trainer"].__file__)
    active = {"on": False}
    offenders: list[str] = []

    def guard(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if active["on"] and threading.current_thread() is threading.main_thread():
                frame = sys._getframe(1)
                if frame.f_code.co_filename.startswith(src):
                    offenders.append(f"{name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("item", "__float__", "__bool__", "tolist", "__int__", "cpu"):
        guard(name)

    class Phase(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            active["on"] = True

    t = Trainer(
        TinyClassifier(),
        _args(tmp_path, max_steps=6, logging_steps=1, logging_first_step=True, eval_strategy="steps", eval_steps=3, gradient_accumulation_steps=2),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        compute_metrics=accuracy,
        callbacks=[Phase()],
        sinks=[RecordingSink()],
    )
    real_evaluate, real_finalize = t.evaluate, t._finalize_training

    def evaluate(*a, **k):
        active["on"] = False
        try:
            return real_evaluate(*a, **k)
        finally:
            active["on"] = True

    def finalize(*a, **k):
        active["on"] = False
        return real_finalize(*a, **k)

    monkeypatch.setattr(t, "evaluate", evaluate)
    monkeypatch.setattr(t, "_finalize_training", finalize)
    # The printer formats values for humans: it is an observer, not the loop.
    t.remove_callback(PrinterCallback)
    t.train()
    assert t.state.global_step == 6
    assert offenders == []


# -- early stopping in the loop, iterable data --------------------------------------------


def test_early_stopping_stops_the_loop_and_reports_stopped(tmp_path):
    from trainer import EarlyStoppingCallback

    scores = iter([0.5, 0.6, 0.6, 0.6, 0.6, 0.9, 0.9, 0.9])
    sink = RecordingSink()
    t = Trainer(
        TinyClassifier(),
        _args(
            tmp_path,
            max_steps=16,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            load_best_model_at_end=True,
            metric_for_best_model="score",
        ),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        compute_metrics=lambda _: {"score": next(scores)},
        callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
        sinks=[sink],
    )
    t.train()
    # Best at step 4 (0.6); steps 6 and 8 do not improve: patience 2 runs out at 8.
    assert t.state.global_step == 8
    assert t.state.best_global_step == 4 and t.state.best_metric == 0.6
    end = sink.of(TrainEnd)[-1]
    assert end.status == "stopped" and end.best_metric == 0.6
    assert end.best_model_checkpoint == os.path.join(t.args.output_dir, "checkpoint-4")


def test_iterable_dataset_with_max_steps(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield from TRAIN

    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=7), train_dataset=Stream())
    out = t.train()
    assert out.global_step == 7
    assert [h["step"] for h in t.state.log_history if "loss" in h] == list(range(1, 8))

    t2 = Trainer(TinyClassifier(), _args(tmp_path, max_steps=-1), train_dataset=Stream())
    with pytest.raises(ValueError, match="max_steps must be set to a positive value"):
        t2.train()


def test_iterable_dataset_resume_skips_what_was_trained(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from TRAIN * 100

    full = Trainer(TinyClassifier(), _args(tmp_path / "a", max_steps=6), train_dataset=Stream())
    full.train()
    cut = Trainer(TinyClassifier(), _args(tmp_path / "b", max_steps=6, save_strategy="steps", save_steps=3), train_dataset=Stream(), callbacks=[SetFlag("should_training_stop", 3)])
    cut.train()
    resumed = Trainer(TinyClassifier(), _args(tmp_path / "b", max_steps=6), train_dataset=Stream())
    resumed.train(resume_from_checkpoint=True)
    a = [float(h["loss"]) for h in full.state.log_history if "loss" in h]
    b = [float(h["loss"]) for h in resumed.state.log_history if "loss" in h]
    assert b == pytest.approx(a, rel=1e-5)


# -- where this process sits (single process now; the seams for distributed runs) ----------


def test_rank_from_the_environment(tmp_path, monkeypatch):
    from trainer import distributed

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.get_info()
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert not info.is_world_process_zero and info.is_distributed

    sink = RecordingSink()
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2), train_dataset=TRAIN, sinks=[sink])
    assert not t.is_world_process_zero()
    t.train()
    assert t.bus.run.rank == 1 and t.bus.run.world_size == 2
    assert sink.received == []  # sinks run on rank 0 only
    # Rank 1 writes only its own RNG state; the model and state are rank 0's job.
    assert sorted(os.listdir(os.path.join(t.args.output_dir, "checkpoint-2"))) == ["rng_state_1.pth"]


def test_inconsistent_rank_environment_is_a_clear_error(monkeypatch):
    from trainer import distributed

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK must be in"):
        distributed.get_info()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        distributed.get_info()


# -- the objects callbacks receive as keywords ------------------------------------------------------


class _LoaderSpy(TrainerCallback):
    """Records the train/eval DataLoader each hook receives, and the batches the loop
    actually iterates (through the train loader's sampler)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, object, object]] = []

    def _rec(self, hook, state, kwargs):
        self.seen.append((hook, state.global_step, kwargs.get("train_dataloader"), kwargs.get("eval_dataloader")))

    def on_train_begin(self, args, state, control, **kwargs):
        self._rec("on_train_begin", state, kwargs)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._rec("on_epoch_begin", state, kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self._rec("on_step_end", state, kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        self._rec("on_evaluate", state, kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        self._rec("on_train_end", state, kwargs)


def test_callbacks_receive_the_train_and_eval_dataloaders(tmp_path):
    spy = _LoaderSpy()
    t = Trainer(TinyClassifier(), _args(tmp_path, num_train_epochs=2, eval_strategy="epoch"),
                train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[spy])
    t.train()
    DataLoader = torch.utils.data.DataLoader
    for hook, _, train_dl, _ in spy.seen:
        assert isinstance(train_dl, DataLoader), hook
        assert train_dl.dataset is TRAIN
    begin = [train_dl for hook, _, train_dl, _ in spy.seen if hook == "on_epoch_begin"]
    assert len(begin) == 2 and begin[0] is not begin[1]  # each epoch's own loader
    # on_train_begin gets the loader the first epoch iterates; each step the loader of its epoch.
    assert spy.seen[0][0] == "on_train_begin" and spy.seen[0][2] is begin[0]
    for hook, step, train_dl, _ in spy.seen:
        if hook == "on_step_end":
            assert train_dl is begin[0 if step <= 5 else 1]
    evals = [eval_dl for hook, _, _, eval_dl in spy.seen if hook == "on_evaluate"]
    assert len(evals) == 2 and all(isinstance(e, DataLoader) and e.dataset is EVAL for e in evals)
    assert t.callback_handler.train_dataloader is begin[1]


def test_resumed_training_passes_the_resumed_epochs_dataloader(tmp_path):
    args = _args(tmp_path, num_train_epochs=2, save_strategy="steps", save_steps=3)
    Trainer(TinyClassifier(), args, train_dataset=TRAIN).train()
    spy = _LoaderSpy()
    t = Trainer(TinyClassifier(), args, train_dataset=TRAIN, callbacks=[spy])
    t.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    first = spy.seen[0]
    assert first[0] == "on_train_begin" and isinstance(first[2], torch.utils.data.DataLoader)
    # The first loader skips the 3 batches trained before the checkpoint.
    assert len(first[2]) == 2
    steps = [(step, dl) for hook, step, dl, _ in spy.seen if hook == "on_step_end"]
    assert [s for s, _ in steps] == list(range(4, 11))
    assert all(dl is first[2] for s, dl in steps if s <= 5)
