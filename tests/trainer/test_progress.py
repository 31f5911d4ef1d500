"""ProgressCallback and PrinterCallback: transformers' bars and printed logs, tensors
formatted only when printed."""

from __future__ import annotations

import torch

from tests.conftest import require_module
from trainer.arguments import TrainingArguments
from trainer.progress import PrinterCallback, ProgressCallback
from trainer.state import TrainerControl, TrainerState

ARGS = TrainingArguments()


def drive_progress(cb, state, control, logs_list, eval_batches=3):
    """A short training: 4 steps, logs, one evaluation, then a prediction run."""
    cb.on_train_begin(ARGS, state, control)
    seen = {}
    for step in range(1, 5):
        state.global_step = step
        cb.on_step_end(ARGS, state, control)
    seen["train_n"] = None if cb.training_bar is None else cb.training_bar.n
    for logs in logs_list:
        cb.on_log(ARGS, state, control, logs=logs)
    loader = list(range(eval_batches))
    for _ in loader:
        cb.on_prediction_step(ARGS, state, control, eval_dataloader=loader)
    seen["eval_bar"] = cb.prediction_bar
    seen["eval_n"] = None if cb.prediction_bar is None else (cb.prediction_bar.n, cb.prediction_bar.total, cb.prediction_bar.leave)
    cb.on_evaluate(ARGS, state, control, metrics={})
    seen["eval_closed"] = cb.prediction_bar is None
    cb.on_prediction_step(ARGS, state, control, eval_dataloader=iter(loader))  # no len(): no bar
    seen["no_len_bar"] = cb.prediction_bar
    cb.on_prediction_step(ARGS, state, control, eval_dataloader=loader)
    cb.on_predict(ARGS, state, control, metrics={})
    seen["predict_closed"] = cb.prediction_bar is None
    cb.on_train_end(ARGS, state, control)
    seen["train_closed"] = cb.training_bar is None
    return seen


LOGS = [
    {"loss": 0.123456789, "learning_rate": 5e-05, "epoch": 0.5, "step": 2, "total_flos": 1e12},
    {"note": "x" * 150, "short": "ok", "flag": True},
]


def test_progress_bars_and_logs(capsys):
    cb = ProgressCallback(max_str_len=100)
    state = TrainerState(max_steps=4)
    seen = drive_progress(cb, state, TrainerControl(), LOGS)
    assert seen["train_n"] == 4
    assert seen["eval_n"] == (3, 3, False)  # leave=False while training bar is open
    assert seen["eval_closed"] and seen["predict_closed"] and seen["train_closed"]
    assert seen["no_len_bar"] is None
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "{'loss': '0.1235', 'learning_rate': '5e-05', 'epoch': '0.5', 'step': 2}"
    assert "total_flos" not in out[0]
    assert "[String too long to display, length: 150 > 100." in out[1]
    assert "'short': 'ok'" in out[1] and "'flag': True" in out[1]
    assert LOGS[0]["total_flos"] == 1e12  # the caller's dict is not changed


def test_progress_output_matches_transformers(capsys):
    tcb = require_module("transformers.trainer_callback")
    seen_ours = drive_progress(ProgressCallback(max_str_len=20), TrainerState(max_steps=4), TrainerControl(), LOGS)
    ours = capsys.readouterr().out
    seen_theirs = drive_progress(tcb.ProgressCallback(max_str_len=20), tcb.TrainerState(max_steps=4), tcb.TrainerControl(), LOGS)
    theirs = capsys.readouterr().out
    assert ours == theirs and ours.count("\n") == 2
    for key in ("train_n", "eval_n", "eval_closed", "predict_closed", "train_closed"):
        assert seen_ours[key] == seen_theirs[key], key


def test_prediction_bar_is_kept_when_no_training_bar():
    cb = ProgressCallback()
    state = TrainerState()
    cb.on_prediction_step(ARGS, state, TrainerControl(), eval_dataloader=[1, 2])
    assert cb.prediction_bar is not None and cb.prediction_bar.leave is True
    cb.on_evaluate(ARGS, state, TrainerControl(), metrics={})
    assert cb.prediction_bar is None


def test_tensor_losses_are_formatted_only_when_printed(capsys):
    cb = ProgressCallback()
    state = TrainerState(max_steps=2)
    cb.on_train_begin(ARGS, state, TrainerControl())
    logs = {"loss": torch.tensor(0.25, dtype=torch.float32), "grad_norm": torch.tensor([1.5, 2.5])}
    cb.on_log(ARGS, state, TrainerControl(), logs=logs)
    cb.on_train_end(ARGS, state, TrainerControl())
    line = capsys.readouterr().out.strip()
    assert line.startswith("{'loss': '0.25', 'grad_norm': tensor([1.5")
    assert isinstance(logs["loss"], torch.Tensor)


def test_nothing_on_other_processes(capsys):
    cb = ProgressCallback()
    state = TrainerState(max_steps=3, is_world_process_zero=False)
    seen = drive_progress(cb, state, TrainerControl(), LOGS)
    assert seen["train_n"] is None and seen["eval_bar"] is None
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_printer_prints_logs_without_total_flos(capsys):
    logs = {"loss": 0.123456, "step": 3, "total_flos": 5.0, "t": torch.tensor(2.0)}
    PrinterCallback().on_log(ARGS, TrainerState(), TrainerControl(), logs=logs)
    assert capsys.readouterr().out == "{'loss': '0.1235', 'step': 3, 't': '2'}\n"
    assert "total_flos" not in logs  # popped from the caller's dict, as transformers does


def test_printer_matches_transformers(capsys):
    tcb = require_module("transformers.trainer_callback")
    logs = {"loss": 0.5, "epoch": 1.25, "step": 10, "total_flos": 3.0, "name": "run"}
    PrinterCallback().on_log(ARGS, TrainerState(), TrainerControl(), logs=dict(logs))
    ours = capsys.readouterr().out
    tcb.PrinterCallback().on_log(ARGS, tcb.TrainerState(), tcb.TrainerControl(), logs=dict(logs))
    assert ours == capsys.readouterr().out


def test_printer_only_on_local_process_zero(capsys):
    PrinterCallback().on_log(ARGS, TrainerState(is_local_process_zero=False), TrainerControl(), logs={"loss": 1.0})
    PrinterCallback().on_log(ARGS, TrainerState(), TrainerControl(), logs=None)
    assert capsys.readouterr().out == ""


def test_accelerator_tensors_are_printed_from_a_writer_thread_without_waiting(monkeypatch, capsys):
    """Logs holding accelerator tensors are never resolved on the training thread: the
    line is written by the deferred writer once the values reached the host, and
    on_train_end waits for it. (No GPU here: CPU tensors stand in for device ones.)"""
    import threading

    import torch

    import trainer.progress as progress
    from trainer import PrinterCallback, TrainerControl, TrainerState

    monkeypatch.setattr(progress, "_on_accelerator", lambda v: isinstance(v, torch.Tensor))
    writers: list[str] = []
    real_print = print

    def recording_print(*a, **k):
        writers.append(threading.current_thread().name)
        real_print(*a, **k)

    monkeypatch.setattr("builtins.print", recording_print)
    cb = PrinterCallback()
    state = TrainerState()
    loss = torch.tensor(0.25)
    cb.on_log(None, state, TrainerControl(), logs={"loss": loss, "learning_rate": 0.001})
    loss.add_(100)  # the line shows the value as logged, not as modified afterwards
    cb.on_train_end(None, state, TrainerControl())
    out = capsys.readouterr().out
    assert "{'loss': '0.25', 'learning_rate': '0.001'}" in out
    assert writers == ["trainer-log-writer"]
