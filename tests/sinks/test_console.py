"""ConsoleSink (printed logs, as PrinterCallback) and ProgressSink (a tqdm bar), run
on a real EventBus."""

from __future__ import annotations

import io
import re

import torch

from eventbus import EventBus, RunInfo
from eventbus.events import Evaluate, Log, Save, StepEnd, TrainBegin, TrainEnd
from sinks.console import ConsoleSink, ProgressSink, format_logs


def run_bus(sinks: list, events: list) -> None:
    bus = EventBus(sinks, run=RunInfo(run_id="c"))
    bus.start()
    for ev in events:
        bus.publish(ev)
    stats = bus.close(timeout=30)
    for s in sinks:
        st = stats.sinks[s.name]
        assert (st.errors, st.failed, st.dropped) == (0, 0, 0), st.last_error


def events(max_steps: int = 10, start: int = 0) -> list:
    out: list = [TrainBegin(step=start, max_steps=max_steps)]
    for s in range(start + 1, max_steps + 1):
        out.append(StepEnd(step=s))
        if s % 5 == 0:
            out.append(Log(step=s, values={"loss": torch.tensor(1.0 / s), "learning_rate": 1e-4, "epoch": s / 10, "total_flos": 123.0}))
    out.append(Evaluate(step=max_steps, epoch=1.0, metrics={"eval_loss": 0.123456, "eval_runtime": 2.0}))
    # A trainer that also logs the evaluation through on_log must not print it twice.
    out.append(Log(step=max_steps, values={"eval_loss": 0.123456, "eval_runtime": 2.0, "epoch": 1.0}))
    out.append(Save(step=max_steps, checkpoint_dir="x"))
    out.append(TrainEnd(step=max_steps))
    return out


def test_console_prints_like_printer_callback():
    out = io.StringIO()
    run_bus([ConsoleSink(file=out)], events())
    assert out.getvalue().splitlines() == [
        "{'loss': '0.2', 'learning_rate': '0.0001', 'epoch': '0.5'}",
        "{'loss': '0.1', 'learning_rate': '0.0001', 'epoch': '1'}",
        "{'eval_loss': '0.1235', 'eval_runtime': '2', 'epoch': '1'}",
    ]


def test_console_prints_an_evaluation_once_whichever_comes_first():
    out = io.StringIO()
    metrics = {"eval_loss": 0.5}
    run_bus(
        [ConsoleSink(file=out)],
        [
            Log(step=3, epoch=1.0, values={**metrics, "epoch": 1.0}),
            Evaluate(step=3, epoch=1.0, metrics=metrics),
            Log(step=4, values={"loss": 0.5}),
            Log(step=5, values={"loss": 0.5}),
        ],
    )
    assert out.getvalue().splitlines() == [
        "{'eval_loss': '0.5', 'epoch': '1'}",
        "{'loss': '0.5'}",
        "{'loss': '0.5'}",
    ]


def test_console_defaults_to_stdout(capsys):
    run_bus([ConsoleSink()], [Log(step=1, values={"loss": 0.5, "note": "x" * 200, "n": 3})])
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("{'loss': '0.5', 'note': '[String too long to display, length: 200 > 100.")
    assert printed.endswith("'n': 3}")


def test_format_logs_keeps_non_floats():
    assert format_logs({"a": 1, "b": 0.333333, "c": [1.0], "total_flos": 1.0}) == {"a": 1, "b": "0.3333", "c": [1.0]}


def test_progress_bar_follows_steps_and_closes():
    out = io.StringIO()
    sink = ProgressSink(file=out)
    run_bus([sink], events(max_steps=10))
    assert sink.bar is None, "closed at TrainEnd"
    text = out.getvalue()
    final = text.split("\r")[-1]
    assert re.search(r"\b10/10\b", final), final
    assert "loss=0.1" in final
    assert sink.last_step == 10


def test_progress_bar_formats_the_loss_once_per_batch(monkeypatch):
    """A batch of many Log events sets the bar's loss once, to the batch's latest
    training loss (an evaluation's Log, without "loss", leaves it alone)."""
    from tqdm import tqdm

    calls: list[dict] = []
    original = tqdm.set_postfix

    def spy(self, ordered_dict=None, refresh=True, **kwargs):
        calls.append(dict(kwargs))
        return original(self, ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(tqdm, "set_postfix", spy)
    out = io.StringIO()
    sink = ProgressSink(file=out)
    sink.open_sync(RunInfo(run_id="c"))
    batch = [TrainBegin(step=0, max_steps=100)]
    for s in range(1, 51):
        batch += [StepEnd(step=s), Log(step=s, values={"loss": 1.0 / s})]
    batch.append(Log(step=50, values={"eval_loss": 9.0}))
    sink.write_sync(batch)
    assert calls == [{"loss": "0.02"}] and sink.last_step == 50
    sink.write_sync([StepEnd(step=51), Log(step=51, values={"loss": 0.5}), StepEnd(step=52), TrainEnd(step=52)])
    assert calls[-1] == {"loss": "0.5"} and len(calls) == 2
    assert sink.bar is None and sink.last_step == 52
    assert "loss=0.5" in out.getvalue().split("\r")[-1]
    sink.close_sync()


def test_progress_bar_samples_step_end_and_follows_log_steps():
    """The bar samples StepEnd (the trainer may skip most of them), so a Log's step
    moves it too, and a Log older than the batch's latest StepEnd does not move it back."""
    assert ProgressSink.sampled == (StepEnd,)
    out = io.StringIO()
    sink = ProgressSink(file=out)
    sink.write_sync([TrainBegin(step=0, max_steps=100), StepEnd(step=3), Log(step=7, values={"loss": 0.5})])
    assert sink.last_step == 7
    sink.write_sync([StepEnd(step=12), Log(step=10, values={"eval_loss": 1.0})])
    assert sink.last_step == 12 and sink.bar.n == 12
    sink.close_sync()


def test_progress_bar_starts_at_the_resume_step():
    out = io.StringIO()
    sink = ProgressSink(file=out)
    bus = EventBus([sink], run=RunInfo(run_id="c"))
    bus.start()
    bus.publish(TrainBegin(step=6, max_steps=10, resumed_from="ckpt-6"))
    bus.publish(StepEnd(step=7))
    bus.close(timeout=30)
    # Training ended without TrainEnd: close() still closes the bar.
    assert sink.bar is None
    assert re.search(r"\b7/10\b", out.getvalue().split("\r")[-1])
    assert sink.last_step == 7


def test_progress_and_console_together_do_not_steer_or_fail():
    out = io.StringIO()
    bar = io.StringIO()
    run_bus([ConsoleSink(file=out), ProgressSink(file=bar)], events(max_steps=5))
    assert "{'loss': '0.2'" in out.getvalue()
    assert "5/5" in bar.getvalue()


def test_observers_are_not_picked_by_report_to_all():
    assert not ConsoleSink.available() and not ProgressSink.available()
    assert set(ConsoleSink.events) == {Log, Evaluate}
    assert set(ProgressSink.events) == {TrainBegin, StepEnd, Log, TrainEnd}


def test_the_terminal_sinks_write_more_often_than_the_backends():
    # Backends batch up to a second (fewer wakes of the bus and sink threads); what a
    # person watches in the terminal is written five times a second.
    from eventbus import Sink
    from sinks.jsonl import JSONLSink
    from sinks.tensorboard import TensorBoardSink

    assert Sink.max_delay == JSONLSink.max_delay == TensorBoardSink.max_delay == 1.0
    assert ConsoleSink.max_delay == ProgressSink.max_delay == 0.2
