"""The handler's per-callback profiler, and the trainer's one-time warning when
control callbacks take more than ``callback_time_warning_share`` of the step time.

No speed is asserted: a callback that sleeps takes at least its sleep, and one that
sleeps 20 ms per step in a loop of milliseconds is over a 5% share on any machine."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from tests.trainer._loop_helpers import TinyClassifier, make_dataset
from trainer import CallbackHandler, DefaultFlowCallback, Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from trainer.arguments import TrainingArgumentsError
from trainer._callback_watch import CallbackTimeWatch


class Sleepy(TrainerCallback):
    """Sleeps ``seconds`` in on_step_end; implements on_log (cheap) too."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds
        self.logs = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.logs += 1


def _handler(*callbacks: Any) -> CallbackHandler:
    return CallbackHandler([DefaultFlowCallback(), *callbacks], None, None, None, None)


def _steps(handler: CallbackHandler, n: int, watch: CallbackTimeWatch | None = None, state: TrainerState | None = None) -> None:
    args = TrainingArguments(output_dir="unused", logging_steps=2, save_strategy="no", report_to="none")
    state = state or TrainerState()
    state.max_steps = 10**6
    state.compute_steps(args, state.max_steps)
    control = TrainerControl()
    if watch is not None:
        watch.start(state.global_step)
    for _ in range(n):
        control = handler.on_step_begin(args, state, control)
        control = handler.on_pre_optimizer_step(args, state, control)
        control = handler.on_optimizer_step(args, state, control)
        state.global_step += 1
        control = handler.on_step_end(args, state, control)
        if control.should_log:
            control = handler.on_log(args, state, control, {"loss": 1.0})
        if watch is not None and state.global_step >= watch.due:
            watch.tick(state.global_step)


def test_profiler_records_time_per_callback_and_hook() -> None:
    handler = _handler(Sleepy(0.001))
    handler.profile = True
    _steps(handler, 6)
    report = handler.profile_report()
    assert report[("Sleepy", "on_step_end")]["calls"] == 6
    assert report[("Sleepy", "on_log")]["calls"] == 3  # logging_steps=2
    assert report[("DefaultFlowCallback", "on_step_end")]["calls"] == 6
    # Each call slept 1 ms, so at least that much was recorded.
    assert report[("Sleepy", "on_step_end")]["total_s"] >= 0.006
    assert report[("Sleepy", "on_step_end")]["mean_s"] == pytest.approx(report[("Sleepy", "on_step_end")]["total_s"] / 6)
    # Hooks a callback does not implement are never called, so never recorded.
    assert ("Sleepy", "on_step_begin") not in report
    assert ("DefaultFlowCallback", "on_log") not in report


def test_profiler_is_off_by_default_and_records_only_while_on() -> None:
    cb = Sleepy(0.0)
    handler = _handler(cb)
    assert handler.profile is False
    _steps(handler, 4)
    assert handler.profile_report() == {}
    handler.profile = True
    _steps(handler, 3)
    handler.profile = False
    _steps(handler, 5)
    assert handler.profile_report()[("Sleepy", "on_step_end")]["calls"] == 3
    assert cb.logs == 2 + 1 + 2  # called on every logging step (every 2nd), profiled or not


def test_watch_warns_once_for_a_slow_callback(caplog: pytest.LogCaptureFixture) -> None:
    handler = _handler(Sleepy(0.02))
    watch = CallbackTimeWatch(handler, 0.05, window=3, every=5)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        _steps(handler, 20, watch)
    warnings = [r for r in caplog.records if "callback_time_warning_share" in r.getMessage()]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "Sleepy.on_step_end" in message and "ms/step" in message
    assert watch.warned and watch.last_share is not None and watch.last_share > 0.05
    # The sample's profiling was undone: the handler is as the user left it.
    assert handler.profile is False
    assert handler.profile_report() == {}


def test_watch_keeps_the_users_own_profiling(caplog: pytest.LogCaptureFixture) -> None:
    handler = _handler(Sleepy(0.02))
    handler.profile = True
    watch = CallbackTimeWatch(handler, 0.05, window=3, every=5)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        _steps(handler, 8, watch)
    assert watch.warned
    assert handler.profile is True
    assert handler.profile_report()[("Sleepy", "on_step_end")]["calls"] == 8


@pytest.mark.parametrize("share", [None, 0, 0.0])
def test_watch_disabled_never_samples(share: Any, caplog: pytest.LogCaptureFixture) -> None:
    handler = _handler(Sleepy(0.02))
    watch = CallbackTimeWatch(handler, share, window=2, every=2)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        _steps(handler, 6, watch)
    assert watch.due == float("inf") and watch.last_share is None
    assert not [r for r in caplog.records if "callback_time_warning_share" in r.getMessage()]


@pytest.mark.parametrize("share", [-0.1, 1.5, "5%", True])
def test_watch_rejects_a_share_outside_0_1(share: Any) -> None:
    with pytest.raises(ValueError, match=r"callback_time_warning_share must be a fraction"):
        CallbackTimeWatch(_handler(), share)


def test_watch_leaves_the_librarys_own_callbacks_out(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # The library's own callbacks (here DefaultFlowCallback, made slow) are not the
    # user's to fix: on sub-millisecond steps their share must not warn, and a
    # warning for a user's callback names only the user's.
    flow_step_end = DefaultFlowCallback.on_step_end

    def slow_flow(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)
        return flow_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(DefaultFlowCallback, "on_step_end", slow_flow)
    handler = _handler(Sleepy(0.0))
    watch = CallbackTimeWatch(handler, 0.05, window=3, every=5)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        _steps(handler, 12, watch)
    assert not [r for r in caplog.records if "callback_time_warning_share" in r.getMessage()]
    assert watch.last_share is not None and watch.last_share < 0.05 and not watch.warned

    handler = _handler(Sleepy(0.02))
    watch = CallbackTimeWatch(handler, 0.05, window=3, every=5)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        _steps(handler, 12, watch)
    warnings = [r.getMessage() for r in caplog.records if "callback_time_warning_share" in r.getMessage()]
    assert len(warnings) == 1 and "Sleepy.on_step_end" in warnings[0]
    assert "DefaultFlowCallback" not in warnings[0]


def test_watch_stop_closes_an_open_sample() -> None:
    handler = _handler(Sleepy(0.0))
    watch = CallbackTimeWatch(handler, 0.05, window=10, every=20)
    _steps(handler, 3, watch)  # the sample began after step 1 and is still open
    assert handler.profile is True
    watch.stop()
    assert handler.profile is False and handler.profile_report() == {}
    assert watch.due == float("inf")


# -- the trainer's warning --------------------------------------------------------------


def _trainer(tmp_path: Any, callbacks: list[Any], **kwargs: Any) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=15,
        per_device_train_batch_size=4,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **kwargs,
    )
    return Trainer(TinyClassifier(), args, train_dataset=make_dataset(64), callbacks=callbacks)


def _share_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "callback_time_warning_share" in r.getMessage()]


def test_trainer_warns_once_when_a_callback_takes_20ms_per_step(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    trainer = _trainer(tmp_path, [Sleepy(0.02)])
    assert trainer.args.callback_time_warning_share == 0.05
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.train()
        trainer.train()  # a second run of the same trainer: still only once
    warnings = _share_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "Sleepy.on_step_end" in warnings[0]
    assert "eventbus bench --callbacks" in warnings[0]
    # The sample's profiling is undone once it is over.
    assert trainer.callback_handler.profile is False
    assert trainer.callback_handler.profile_report() == {}


def test_trainer_warning_can_be_turned_off(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    trainer = _trainer(tmp_path, [Sleepy(0.02)], callback_time_warning_share=None)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.train()
    assert _share_warnings(caplog) == []


@pytest.mark.parametrize("share", [-0.5, 1.01, "5%", True, float("nan")])
def test_training_arguments_reject_a_bad_share(share: Any) -> None:
    with pytest.raises(TrainingArgumentsError, match="callback_time_warning_share must be a fraction"):
        TrainingArguments(output_dir="unused", callback_time_warning_share=share)
