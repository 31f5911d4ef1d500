"""The deferred log writer of ProgressCallback/PrinterCallback (lines whose values are
on an accelerator are written off the training thread): its thread is stopped at the
end of training and when the callback is dropped, never kept for the process's life.
No GPU here: CPU tensors stand in for device ones."""

from __future__ import annotations

import threading

import pytest
import torch

import trainer.progress as progress
from trainer.arguments import TrainingArguments
from trainer.progress import PrinterCallback, ProgressCallback
from trainer.state import TrainerControl, TrainerState
from tests.conftest import wait_collected

ARGS = TrainingArguments()


@pytest.fixture(autouse=True)
def _cpu_tensors_are_on_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "_on_accelerator", lambda v: isinstance(v, torch.Tensor))


def _writers(before: set[threading.Thread]) -> list[threading.Thread]:
    """Writer threads started since ``before``: this test's."""
    return [t for t in threading.enumerate() if t not in before and t.name == "trainer-log-writer"]




def test_printer_stops_its_writer_thread_at_train_end(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(threading.enumerate())
    cb = PrinterCallback()
    state, control = TrainerState(), TrainerControl()
    cb.on_log(ARGS, state, control, logs={"loss": torch.tensor(0.25)})
    threads = _writers(before)
    assert len(threads) == 1
    cb.on_train_end(ARGS, state, control)
    assert not threads[0].is_alive()  # joined at on_train_end, after the line
    assert "{'loss': '0.25'}" in capsys.readouterr().out

    # Used again (an evaluate() after train(), a second train()): a new thread, stopped
    # again at the next on_train_end; lines still in order.
    cb.on_log(ARGS, state, control, logs={"loss": torch.tensor(0.5)})
    cb.on_log(ARGS, state, control, logs={"loss": torch.tensor(0.75)})
    again = [t for t in _writers(before) if t not in threads]
    assert len(again) == 1
    cb.on_train_end(ARGS, state, control)
    assert not again[0].is_alive()
    assert capsys.readouterr().out.splitlines() == ["{'loss': '0.5'}", "{'loss': '0.75'}"]


def test_progress_stops_its_writer_thread_at_train_end(capsys: pytest.CaptureFixture[str]) -> None:
    before = set(threading.enumerate())
    cb = ProgressCallback()
    state, control = TrainerState(max_steps=2), TrainerControl()
    cb.on_train_begin(ARGS, state, control)
    cb.on_log(ARGS, state, control, logs={"loss": torch.tensor(0.125)})
    threads = _writers(before)
    assert len(threads) == 1
    cb.on_train_end(ARGS, state, control)
    assert not threads[0].is_alive()
    assert "{'loss': '0.125'}" in capsys.readouterr().out


@pytest.mark.parametrize("kind", [PrinterCallback, ProgressCallback])
def test_a_dropped_callback_keeps_no_writer_thread(kind: type, capsys: pytest.CaptureFixture[str]) -> None:
    """A callback dropped without on_train_end (a run that raised, a trainer deleted
    mid-way) lets its writer thread exit, after writing what it was given."""
    threads: list[threading.Thread] = []
    for _ in range(3):
        before = set(threading.enumerate())
        cb = kind()
        state, control = TrainerState(max_steps=2), TrainerControl()
        cb.on_train_begin(ARGS, state, control)
        cb.on_log(ARGS, state, control, logs={"loss": torch.tensor(0.5)})
        threads += _writers(before)
        del cb
    assert len(threads) == 3
    assert wait_collected(lambda: not any(t.is_alive() for t in threads)), [t for t in threads if t.is_alive()]
    assert capsys.readouterr().out.count("{'loss': '0.5'}") == 3
