"""What ``on_log`` callbacks and ``state.log_history`` hold: plain numbers, as in
transformers, for every callback that has not said it takes tensors; the loop's
tensors, unread on the training thread, when every ``on_log`` callback takes them."""

from __future__ import annotations

import json
from typing import Any

import torch

from tests.trainer._loop_helpers import RecordingSink, TinyClassifier, make_dataset, tiny_args
from trainer import PrinterCallback, Trainer, TrainerCallback
from eventbus import Log


class JsonLogger(TrainerCallback):
    """A callback written for transformers: each log as a JSON line, and the history
    as JSON at every evaluation and at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.history_at: dict[str, Any] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        self.lines.append(json.dumps(logs))
        assert state.log_history[-1]["step"] == state.global_step
        json.dumps(state.log_history[-1])

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.history_at[f"eval@{state.global_step}"] = json.dumps(state.log_history)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.history_at["end"] = json.dumps(state.log_history)


class TakesTensors(TrainerCallback):
    accepts_tensor_logs = True

    def __init__(self) -> None:
        self.kinds: list[type] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if "loss" in logs:
            self.kinds.append(type(logs["loss"]))


def history_kinds(trainer: Trainer) -> set[type]:
    return {type(v) for h in trainer.state.log_history for v in h.values()}


def test_a_transformers_style_on_log_callback_gets_plain_numbers(tmp_path) -> None:
    cb = JsonLogger()
    sink = RecordingSink()
    args = tiny_args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=3)
    trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(64), eval_dataset=make_dataset(16, seed=1), callbacks=[cb], sinks=[sink])
    trainer.train()
    logged = [json.loads(line) for line in cb.lines]
    train_logs = [d for d in logged if "loss" in d]
    assert len(train_logs) == 6 and all(type(d["loss"]) is float and type(d["grad_norm"]) is float for d in train_logs)
    assert set(cb.history_at) == {"eval@3", "eval@6", "end"}
    assert history_kinds(trainer) <= {float, int}
    # the sinks got the same numbers
    got = [ev.values["loss"] for ev in sink.of(Log) if "loss" in ev.values]
    assert got == [d["loss"] for d in train_logs]


def test_callbacks_that_take_tensors_spare_the_read_and_the_history_is_read_at_the_end(tmp_path) -> None:
    cb = TakesTensors()
    args = tiny_args(tmp_path, max_steps=5)
    trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(64), callbacks=[cb])
    assert trainer.callback_handler.wants_plain_logs is False  # PrinterCallback takes them too
    assert any(isinstance(c, PrinterCallback) for c in trainer.callback_handler.callbacks)
    trainer.train()
    assert cb.kinds == [torch.Tensor] * 5  # handed over unread: no read on the training thread
    # after train() the history is plain numbers, as transformers leaves it
    assert history_kinds(trainer) <= {float, int}
    json.dumps(trainer.state.log_history)
    # adding a callback that did not say so switches the handler to plain numbers
    trainer.add_callback(JsonLogger())
    assert trainer.callback_handler.wants_plain_logs is True


class WaitsForSettledHistory(TrainerCallback):
    """At the last step, how long until the first logged step's entry in
    ``log_history`` holds numbers (read on the bus thread, not here)."""

    accepts_tensor_logs = True

    def __init__(self, at: int) -> None:
        self.at = at
        self.kinds_then: set[type] | None = None
        self.kinds_at_first_log: set[type] | None = None

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if self.kinds_at_first_log is None:
            self.kinds_at_first_log = {type(v) for v in state.log_history[0].values()}

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.at:
            return
        import time

        deadline = time.monotonic() + 20
        first = state.log_history[0]
        while any(isinstance(v, torch.Tensor) for v in first.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.kinds_then = {type(v) for v in first.values()}


def test_the_history_holds_no_tensor_for_long_during_training(tmp_path) -> None:
    # A long run with no evaluation and no checkpoint (nothing settles the history)
    # kept two tensors per logged step (on an accelerator, device memory): the bus
    # thread, which reads them for the Log event, writes the numbers back.
    cb = WaitsForSettledHistory(at=8)
    sink = RecordingSink()
    trainer = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=8), train_dataset=make_dataset(64), callbacks=[cb], sinks=[sink])
    trainer.train()
    assert cb.kinds_at_first_log is not None and torch.Tensor in cb.kinds_at_first_log  # not read on the training thread
    assert cb.kinds_then is not None and cb.kinds_then <= {float, int}
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == [ev.values["loss"] for ev in sink.of(Log) if "loss" in ev.values]


def test_with_no_sink_taking_logs_the_history_is_read_as_it_is_logged(tmp_path) -> None:
    cb = TakesTensors()
    trainer = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=3), train_dataset=make_dataset(64), callbacks=[cb])
    seen: list[set[type]] = []

    class Look(TrainerCallback):
        accepts_tensor_logs = True

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            seen.append({type(v) for v in state.log_history[-1].values()})

    trainer.add_callback(Look())
    trainer.train()
    assert seen and all(kinds <= {float, int} for kinds in seen)
    assert cb.kinds and set(cb.kinds) == {torch.Tensor}  # the callbacks still get what was logged


def test_a_per_step_hook_patched_before_train_is_called_from_the_first_step(tmp_path) -> None:
    # mock.patch.object(cb, "on_step_end") after Trainer(...), before train(): the
    # patched hook from step 1 on (it was the original at step 1, then the patch).
    from unittest import mock

    class Counting(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append(("original", state.global_step))

    seen: list[tuple[str, int]] = []
    cb = Counting()
    trainer = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=3), train_dataset=make_dataset(64), callbacks=[cb])
    with mock.patch.object(cb, "on_step_end", lambda args, state, control, **kw: seen.append(("patched", state.global_step))):
        trainer.train()
    assert seen == [("patched", 1), ("patched", 2), ("patched", 3)]


class ReadsHistoryEachStep(TrainerCallback):
    """A callback written for transformers, with no on_log: it reads (and keeps) the
    latest log_history entry's loss at every step."""

    def __init__(self) -> None:
        self.kept: list[Any] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        json.dumps(state.log_history)  # transformers' history always holds numbers
        if state.log_history:
            self.kept.append(state.log_history[-1].get("loss"))


def test_a_callback_reading_the_history_outside_on_log_finds_numbers(tmp_path) -> None:
    """With a sink taking Log, the loop's CPU loss went into log_history as a tensor
    until the bus thread read it (a flush interval later): a user's callback reading
    the history at another hook found tensors, or kept one for good. On the CPU, the
    entry is read as it is recorded when such a callback is there."""
    cb = ReadsHistoryEachStep()
    sink = RecordingSink()
    # A long flush interval: the bus thread would not settle the entries during the run.
    args = tiny_args(tmp_path, max_steps=6, bus_flush_interval=30.0)
    trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(64), callbacks=[cb], sinks=[sink])
    assert trainer.callback_handler.wants_plain_history is True
    trainer.train()
    # on_step_end comes before the step's log: steps 2..6 see the entries of steps 1..5
    assert len(cb.kept) == 5 and all(type(v) is float for v in cb.kept)
    assert [ev.values["loss"] for ev in sink.of(Log) if "loss" in ev.values][:5] == cb.kept
    # the library's own callbacks alone read no history: nothing read on the training thread
    alone = Trainer(TinyClassifier(), tiny_args(tmp_path / "alone", max_steps=1), train_dataset=make_dataset(8))
    assert alone.callback_handler.wants_plain_history is False


def test_numpy_arrays_reach_on_log_callbacks_as_arrays(tmp_path) -> None:
    """transformers hands on_log what was logged: a numpy array stays one (a callback
    reads its .shape); the sinks get its number or list."""
    import numpy as np

    seen: list[tuple[type, type]] = []

    class Shapes(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if "hist" in logs:
                seen.append((type(logs["hist"]), type(logs["one"])))

    class LogsArrays(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            trainer.log({"hist": np.arange(3.0), "one": np.array([0.5])})

    sink = RecordingSink()
    trainer = Trainer(
        TinyClassifier(), tiny_args(tmp_path, max_steps=1), train_dataset=make_dataset(8), callbacks=[Shapes(), LogsArrays()],
        sinks=[sink],
    )
    trainer.train()
    assert seen == [(np.ndarray, np.ndarray)]
    (ev,) = [e for e in sink.of(Log) if "hist" in e.values]
    assert ev.values["hist"] == [0.0, 1.0, 2.0] and ev.values["one"] == 0.5
