"""The benchmark scripts run as documented (smoke runs; no figure is judged)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import require_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("options", [[], ["--precision", "fp16"]])
def test_gpu_sync_says_what_it_needs_and_exits_0_without_a_gpu(options: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_sync.py"), "--quick", *options], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if torch.cuda.is_available():
        assert "no GPU sync on the step path" in proc.stdout
    else:
        assert "no CUDA device here" in proc.stdout


def test_gpu_sync_reads_every_logged_step_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read-back gpu_sync.py judges a GPU run by, on a CPU run of the same trainer
    and sinks: it passes when every step logged a finite loss and grad_norm, and names
    what is missing or wrong otherwise."""
    require_module("tensorboard")
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_sync
    from _common import TinyModel, log_every_step_args, make_dataset

    from trainer import PrinterCallback, ProgressCallback, Trainer

    steps = 12
    trainer = Trainer(
        TinyModel(gpu_sync.DIM, 32), log_every_step_args(str(tmp_path), steps, 8),
        train_dataset=make_dataset(steps * 8, dim=gpu_sync.DIM), sinks=gpu_sync._sinks(str(tmp_path)),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    assert gpu_sync.logged_values_problems(str(tmp_path), steps) == []
    assert gpu_sync.logged_values_problems(str(tmp_path), steps + 2) == [
        f"2 logged steps missing from the jsonl file (first: [{steps + 1}, {steps + 2}])"
    ]
    # A value that did not resolve to a finite number is named with its step.
    from eventbus.events import Log
    from sinks.jsonl import encode_line

    bad = tmp_path / "bad"
    (bad / "jsonl").mkdir(parents=True)
    lines = [encode_line(Log(step=s, values={"loss": 0.5, "grad_norm": float("nan") if s == 2 else 1.0})) for s in (1, 2)]
    (bad / "jsonl" / "events-x.jsonl").write_bytes(b"".join(lines))
    assert gpu_sync.logged_values_problems(str(bad), 2) == ["step 2: grad_norm = nan, not a finite float"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_sync_reads_back_every_step_of_a_mixed_precision_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """What ``gpu_sync.py --precision`` checks on a GPU, on the CPU: under autocast
    (and fp16's scaler) every step still logs a finite loss and grad_norm."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_sync
    from _common import TinyModel, log_every_step_args, make_dataset

    from trainer import PrinterCallback, ProgressCallback, Trainer

    steps = 8
    trainer = Trainer(
        TinyModel(gpu_sync.DIM, 32), log_every_step_args(str(tmp_path), steps, 8, **{precision: True}),
        train_dataset=make_dataset(steps * 8, dim=gpu_sync.DIM), sinks=gpu_sync._sinks(str(tmp_path)),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    scaled = precision == "fp16"
    assert (trainer.scaler is not None) == scaled
    assert gpu_sync.logged_values_problems(str(tmp_path), steps, scaled=scaled) == []
    if scaled:
        # The first steps overflow at the initial scale (65536) and log a non-finite
        # grad_norm; judged as a full-precision run, those would be errors.
        assert gpu_sync.logged_values_problems(str(tmp_path), steps)


def test_overhead_script_is_the_bench_command(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "overhead.py"), "--quick", "--configs", "a", "--no-transformers", "--no-imports",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# python benchmarks/overhead.py --quick")
    import json

    data = json.loads(out.read_text())
    assert [(r["config"], r["logging_steps"]) for r in data["rows"]] == [("a", 1), ("a", 50)]
    assert data["rows"][0]["theirs"] is None


def test_training_script_prints_steps_per_second_and_the_ratio() -> None:
    for mod in ("tensorboard", "neptune", "comet_ml"):
        require_module(mod)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "training.py"), "--quick", "--steps", "40", "--repeats", "2", "--no-transformers", "--busy-neighbour"],
        capture_output=True, text=True, timeout=600,
        # The loopback stand-in, even where `make test` names a real mlflow server.
        env={k: v for k, v in os.environ.items() if k != "EVENTBUS_MLFLOW_BIN"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "ours, no sinks" in out and "ours, all sinks" in out
    assert "target: all sinks within 5% of no sinks at logging_steps=1:" in out
    assert "mlflow -> loopback HTTP server" in out
    # The control run: no sinks beside a process that only burns CPU.
    assert "ours, no sinks, a busy process beside (nice 10)" in out
    assert "(no sinks, a busy process beside the loop:" in out
    # Every sink but the progress bar in a child process: the isolate_sinks choice.
    assert "ours, all sinks, all but progress isolated" in out
    assert re.search(r"\(every sink but progress isolated instead: \d\.\d{3}x;", out), out
    assert re.search(r"full garbage collections inside our runs' timed windows: \d+", out), out
    # With repeats, the ratio within each repeat too (the machine drifts between them).
    assert re.search(r"\(paired, all sinks / no sinks within each repeat: median \d\.\d{3} \[\d\.\d{3}-\d\.\d{3}\]\)", out), out


def test_gpu_sync_guard_leaves_the_loops_tensors_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard implements on_log: were the handler to read the logged tensors for it
    (as for any callback that wants plain numbers), a GPU run would sync every step and
    fail in the "error" sync debug mode. It declares it takes them as they are."""
    monkeypatch.syspath_prepend(str(BENCH))
    import gpu_sync
    from _common import TinyModel, log_every_step_args, make_dataset

    from trainer import Trainer

    trainer = Trainer(
        TinyModel(gpu_sync.DIM, 32), log_every_step_args(str(tmp_path), 4, 8),
        train_dataset=make_dataset(32, dim=gpu_sync.DIM), callbacks=[gpu_sync.SyncGuard(4)],
    )
    assert trainer.callback_handler.wants_plain_logs is False
