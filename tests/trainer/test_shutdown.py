"""Shutdown: SIGTERM/SIGINT finish the current step, save a checkpoint, close the bus
and raise a clear error; an exception in the loop still closes the bus after
publishing TrainEnd(status="failed"); signal handlers are restored."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from eventbus import Save, TrainEnd
from tests.trainer._loop_helpers import RecordingSink, TinyClassifier, checkpoints, make_dataset, tiny_args
from trainer import Trainer, TrainerCallback
from trainer.trainer import TrainingInterrupted

TRAIN = make_dataset(20)


def _args(tmp_path, **kw):
    return tiny_args(tmp_path / "out", **{"max_steps": 10, "learning_rate": 1e-2, "bus_close_timeout": 5.0, **kw})


class SendOnStepEnd(TrainerCallback):
    def __init__(self, signum: int, at_step: int) -> None:
        self.signum, self.at_step = signum, at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class SendOnSubstep(TrainerCallback):
    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.sent_at: int | None = None

    def on_substep_end(self, args, state, control, **kwargs):
        if self.sent_at is None and state.global_step == 1:
            self.sent_at = state.global_step
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_finishes_the_step_saves_and_raises(tmp_path, signum):
    before = signal.getsignal(signum)
    sink = RecordingSink()
    t = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN, callbacks=[SendOnStepEnd(signum, 3)], sinks=[sink])
    with pytest.raises(TrainingInterrupted) as info:
        t.train()
    err = info.value
    name = signal.Signals(signum).name
    assert name in str(err) and "checkpoint-3" in str(err) and "resume" in str(err)
    assert err.signum == signum and err.global_step == 3
    assert err.checkpoint == os.path.join(t.args.output_dir, "checkpoint-3")
    assert checkpoints(t.args.output_dir) == ["checkpoint-3"]
    # The bus was closed within its deadline, after Save and TrainEnd(interrupted).
    assert not t.bus.running and sink.closed
    assert sink.of(Save)[-1].checkpoint_dir == err.checkpoint
    end = sink.of(TrainEnd)
    assert len(end) == 1 and end[0].status == "interrupted" and name in end[0].error
    assert signal.getsignal(signum) is before

    # And the checkpoint resumes.
    t2 = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN)
    t2.train(resume_from_checkpoint=True)
    assert t2.state.global_step == 10


def test_signal_during_accumulation_finishes_the_whole_step(tmp_path):
    cb = SendOnSubstep(signal.SIGTERM)
    t = Trainer(TinyClassifier(), _args(tmp_path, gradient_accumulation_steps=3), train_dataset=TRAIN, callbacks=[cb])
    with pytest.raises(TrainingInterrupted) as info:
        t.train()
    # Sent in the middle of step 2's micro-batches: step 2 completes, then the save.
    assert cb.sent_at == 1
    assert info.value.global_step == 2
    assert checkpoints(t.args.output_dir) == ["checkpoint-2"]


def test_no_second_checkpoint_when_the_step_was_just_saved(tmp_path):
    sink = RecordingSink()
    t = Trainer(
        TinyClassifier(),
        _args(tmp_path, save_strategy="steps", save_steps=2),
        train_dataset=TRAIN,
        callbacks=[SendOnStepEnd(signal.SIGTERM, 4)],
        sinks=[sink],
    )
    with pytest.raises(TrainingInterrupted):
        t.train()
    assert checkpoints(t.args.output_dir) == ["checkpoint-2", "checkpoint-4"]
    assert [s.step for s in sink.of(Save)] == [2, 4]


class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise RuntimeError("boom at step 2")


def test_exception_publishes_failed_train_end_then_closes_and_reraises(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    sink = RecordingSink()
    t = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN, callbacks=[Boom()], sinks=[sink])
    with pytest.raises(RuntimeError, match="boom at step 2"):
        t.train()
    end = sink.of(TrainEnd)
    assert len(end) == 1
    assert end[0].status == "failed" and "boom at step 2" in end[0].error and end[0].step == 2
    assert sink.received[-1] is end[0]  # last thing the sink saw
    assert not t.bus.running and sink.closed
    assert t.bus.stats().sinks["recording"].delivered == len(sink.received)
    assert signal.getsignal(signal.SIGTERM) is before


def test_train_in_a_worker_thread_installs_no_handlers(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2), train_dataset=TRAIN, callbacks=[Look()])
    errors = []

    def run():
        try:
            t.train()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    th.join(60)
    assert not errors and t.state.global_step == 2
    assert seen["handler"] is before


def test_handlers_are_installed_during_training_and_restored_after(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    seen = {}

    class Look(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["handler"] = signal.getsignal(signal.SIGINT)

    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2), train_dataset=TRAIN, callbacks=[Look()])
    t.train()
    assert seen["handler"] is not before and callable(seen["handler"])
    assert signal.getsignal(signal.SIGINT) is before


def test_handlers_are_restored_when_the_final_close_raises(tmp_path, monkeypatch):
    # A second Ctrl-C inside the close raises out of it: the trainer's handler must
    # not stay installed (it would swallow every later SIGTERM of the process).
    before = signal.getsignal(signal.SIGTERM)
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=2), train_dataset=TRAIN)
    real_close = t._close_bus

    def interrupted_close() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(t, "_close_bus", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    assert signal.getsignal(signal.SIGTERM) is before
    real_close()


def test_a_signal_after_the_loop_s_last_look_is_handed_on_not_dropped(tmp_path):
    # SIGTERM during on_train_end (the final save and close come after the loop's
    # last check): training completes, then the signal reaches the handler that was
    # there before train(), instead of vanishing with the trainer's.
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:

        class TermAtEnd(TrainerCallback):
            def on_train_end(self, args, state, control, **kwargs):
                os.kill(os.getpid(), signal.SIGTERM)

        sink = RecordingSink()
        t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=3), train_dataset=TRAIN, callbacks=[TermAtEnd()], sinks=[sink])
        out = t.train()
        assert out.global_step == 3 and sink.of(TrainEnd)[-1].status == "completed"
        assert got == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


_GROUP_SIGTERM_SCRIPT = """
import json, os, signal, subprocess, sys
sys.path.insert(0, {root!r})
from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
from trainer import Trainer, TrainerCallback
from trainer.trainer import TrainingInterrupted

class GroupTerm(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            # From another process to the whole group, as Slurm, timeout or a
            # terminal send it (torch's handler spares only what the parent sends).
            subprocess.run(["kill", "-TERM", "--", "-%d" % os.getpgrp()], check=False)

if __name__ == "__main__":
    args = tiny_args(
        sys.argv[1], max_steps=200, dataloader_num_workers=2, dataloader_persistent_workers={persistent},
        dataloader_multiprocessing_context={context!r},
    )
    t = Trainer(TinyClassifier(), args, train_dataset=make_dataset(400), callbacks=[GroupTerm()])
    try:
        t.train()
    except TrainingInterrupted as exc:
        print(json.dumps({{"step": exc.global_step, "checkpoint": exc.checkpoint}}))
        sys.exit(0)
    print("not interrupted")
    sys.exit(3)
"""


@pytest.mark.parametrize(
    ("persistent", "context"),
    [(False, "fork"), (True, "fork"), (False, "spawn")],
    ids=["workers", "persistent-workers", "spawned-workers"],
)
def test_a_sigterm_to_the_process_group_with_loader_workers_saves_and_stops(tmp_path, persistent, context):
    # The workers get the job's SIGTERM too: they must leave it to the trainer (torch's
    # own handler ends them, and the training process then dies mid-step with
    # "DataLoader worker ... killed by signal", no checkpoint).
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "group_term.py"
    script.write_text(_GROUP_SIGTERM_SCRIPT.format(root=root, persistent=persistent, context=context))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True, text=True, timeout=180, start_new_session=True, cwd=root,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"step": 3, "checkpoint": str(out / "checkpoint-3")}
    assert checkpoints(str(out)) == ["checkpoint-3"]
    assert "killed by signal" not in proc.stderr


def _start_and_terminate_a_program(conn) -> None:
    """In a process set up as a loader worker: a program it starts (a decoder) must
    still end on SIGTERM (nothing blocked or ignored is inherited)."""
    import subprocess
    import time

    from trainer.trainer import LoaderWorkerSignals

    LoaderWorkerSignals()(0)
    child = subprocess.Popen(["sleep", "30"])
    child.terminate()
    start = time.monotonic()
    try:
        code = child.wait(10)
    except subprocess.TimeoutExpired:
        child.kill()
        code = None
    conn.send((code, time.monotonic() - start < 10))


def test_a_program_a_loader_worker_starts_still_ends_on_sigterm():
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_start_and_terminate_a_program, args=(child,))
    proc.start()
    try:
        assert parent.poll(30), "the worker-like process did not answer"
        code, in_time = parent.recv()
    finally:
        proc.join(10)
    assert code == -signal.SIGTERM and in_time


def test_a_loader_worker_ends_on_a_second_sigterm_or_without_its_parent():
    # The first SIGTERM is the job's (the trainer handles it); a second one is torch
    # (or multiprocessing at exit) ending the worker: it must end then.
    import multiprocessing
    import time

    from trainer.trainer import LoaderWorkerSignals

    def worker(conn) -> None:
        LoaderWorkerSignals()(0)
        conn.send("ready")
        while True:
            time.sleep(0.05)

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=worker, args=(child,))
    proc.start()
    assert parent.poll(30) and parent.recv() == "ready"
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(1.0)
    assert proc.is_alive(), "the first SIGTERM (the job's) must be left to the trainer"
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(10)
    assert not proc.is_alive() and proc.exitcode == 0
