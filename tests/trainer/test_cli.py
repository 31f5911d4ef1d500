"""``eventbus train``: the main job runs to the end and prints its summary; bad options
and interruptions give clear messages and non-zero exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from eventbus.cli import main
from tests.trainer._loop_helpers import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_train_with_report_to_none_finishes_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["train", "--output-dir", str(out), "--max-steps", "40", "--eval-steps", "10", "--report-to", "none", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "eventbus train: summary" in text
    assert "best accuracy" in text and "at step" in text
    assert f"output dir    : {out}" in text
    assert "events published" in text
    state = json.loads((out / checkpoints(str(out))[-1] / "trainer_state.json").read_text())
    assert state["global_step"] == 40
    evals = [h for h in state["log_history"] if "eval_accuracy" in h]
    assert [h["step"] for h in evals] == [10, 20, 30, 40]
    assert state["best_metric"] == max(h["eval_accuracy"] for h in evals)


def test_train_with_sinks_reports_where_the_logs_are(tmp_path, capsys):
    from eventbus.registry import available_sinks

    if not {"tensorboard", "jsonl"} <= set(available_sinks()):
        pytest.fail("the tensorboard and jsonl sinks must be registered (pip install -e '.[tensorboard]')")
    out = tmp_path / "demo"
    code = main(["train", "--output-dir", str(out), "--max-steps", "20", "--eval-steps", "10", "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    logdir = str(out / "logs")
    assert f"tensorboard --logdir {logdir}" in text
    venv_tensorboard = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if os.path.exists(venv_tensorboard):  # the environment's own, not whatever is on PATH
        assert f"open with     : {venv_tensorboard} --logdir {logdir}" in text
    assert "json lines" in text
    # The per-sink stats table.
    assert "tensorboard" in text.split("event bus")[-1] and "jsonl" in text.split("event bus")[-1]
    (run_dir,) = os.listdir(logdir)  # one directory per fresh run
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(logdir, run_dir)))
    jsonl = [p for p in os.listdir(out) if p.endswith(".jsonl")]
    assert jsonl and '"Log"' in (out / jsonl[0]).read_text()


def test_resume_continues_the_latest_run(tmp_path, capsys):
    out = tmp_path / "demo"
    base = ["train", "--output-dir", str(out), "--eval-steps", "10", "--report-to", "none", "--no-progress"]
    assert main(base + ["--max-steps", "20"]) == 0
    assert main(base + ["--max-steps", "30", "--resume"]) == 0
    state = json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "eval_accuracy" in h] == [10, 20, 30]
    # A fresh run in the same directory starts over and says so.
    capsys.readouterr()
    assert main(base + ["--max-steps", "10"]) == 0
    assert "starting fresh" in capsys.readouterr().err
    assert checkpoints(str(out)) == ["checkpoint-10"]


def test_bad_option_is_a_clear_error(capsys):
    assert main(["train", "--max-steps", "0", "--report-to", "none"]) == 2
    assert "--max-steps must be >= 1" in capsys.readouterr().err


def test_unknown_sink_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "--report-to", "no-such-sink"]) == 2
    err = capsys.readouterr().err
    assert "no-such-sink" in err and "known" in err


def test_sigterm_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eventbus", "train", "--output-dir", str(out), "--max-steps", "100000",
         "--report-to", "none", "--no-progress", "--eval-steps", "1000", "--logging-steps", "5"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Wait for the first logged loss: training is running.
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if "'loss'" in line:
                break
        else:  # pragma: no cover
            pytest.fail("training did not start logging in time")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in stderr and "resume" in stderr
    assert "eventbus train: summary" in stdout
    saved = checkpoints(str(out))
    assert saved, "a checkpoint must be saved on SIGTERM"
    step = int(saved[-1].split("-")[1])
    assert f"checkpoint-{step}" in stderr


def test_help_lists_the_exit_statuses(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    epilog = out.split("exit status:", 1)[1]
    for code, words in [("0", "completed"), ("1", "failed"), ("2", "bad option"), ("130", "SIGINT"), ("143", "SIGTERM")]:
        assert any(line.split()[:1] == [code] and words in line for line in epilog.splitlines()), (code, epilog)


def test_failed_run_says_so_and_names_only_what_exists(tmp_path, capsys):
    from eventbus.registry import available_sinks

    if not {"tensorboard", "jsonl"} <= set(available_sinks()):
        pytest.fail("the tensorboard and jsonl sinks must be registered (pip install -e '.[tensorboard]')")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "demo"  # cannot be created: its parent is a file
    code = main(["train", "--output-dir", str(out), "--max-steps", "20", "--eval-steps", "10", "--no-progress"])
    assert code == 1
    summary = capsys.readouterr().out.split("eventbus train: summary", 1)[1].split("event bus", 1)[0]
    assert "training      : FAILED at step" in summary
    assert "checkpoint was not saved" in summary
    assert f"output dir    : not created ({out})" in summary
    assert "tensorboard   : nothing written" in summary and "json lines    : nothing written" in summary
    assert "open with" not in summary and "checkpoint-" not in summary and f"{out}{os.sep}" not in summary


def test_resume_at_or_past_max_steps_trains_nothing_and_says_so(tmp_path, capsys):
    out = tmp_path / "demo"
    base = ["train", "--output-dir", str(out), "--eval-steps", "10", "--report-to", "none", "--no-progress"]
    assert main(base + ["--max-steps", "30"]) == 0
    before = checkpoints(str(out))
    state_before = (out / "checkpoint-30" / "trainer_state.json").read_text()
    capsys.readouterr()
    for max_steps in ("20", "30"):
        assert main(base + ["--max-steps", max_steps, "--resume"]) == 0
        text = capsys.readouterr().out
        assert f"nothing trained: the checkpoint to resume ({out / 'checkpoint-30'}) is already at step 30" in text
        assert f"--max-steps {max_steps}" in text
        assert "mean train loss" not in text
    assert checkpoints(str(out)) == before
    assert (out / "checkpoint-30" / "trainer_state.json").read_text() == state_before


def test_summary_opens_tensorboard_with_the_environments_own(tmp_path, monkeypatch):
    from trainer.cli import _tensorboard_command

    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    assert _tensorboard_command() == "tensorboard"  # none there: the bare name, from PATH
    exe = bindir / ("tensorboard.exe" if os.name == "nt" else "tensorboard")
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    assert os.path.samefile(_tensorboard_command(), exe)


def test_only_world_rank_zero_prints_the_summary(capsys):
    # Under torchrun every rank runs `eventbus train`; the other ranks have no sinks,
    # and their summary said "sinks : none" and "0 events published".
    from types import SimpleNamespace

    from trainer.cli import _print_summary

    def rank(zero: bool) -> SimpleNamespace:
        return SimpleNamespace(is_world_process_zero=lambda: zero, state=None)

    _print_summary(rank(False), None, None, outcome="FAILED")
    assert capsys.readouterr().out == ""
    with pytest.raises(AttributeError):  # rank 0 goes on to read the state
        _print_summary(rank(True), None, None, outcome="FAILED")
