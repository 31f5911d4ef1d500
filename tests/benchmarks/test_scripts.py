"""The benchmark scripts run as documented (smoke runs; no figure is judged)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import require_module

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_gpu_sync_says_what_it_needs_and_exits_0_without_a_gpu() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_sync.py"), "--quick"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if torch.cuda.is_available():
        assert "no GPU sync on the step path" in proc.stdout
    else:
        assert "no CUDA device here" in proc.stdout


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
    # With repeats, the ratio within each repeat too (the machine drifts between them).
    assert re.search(r"\(paired, all sinks / no sinks within each repeat: median \d\.\d{3} \[\d\.\d{3}-\d\.\d{3}\]\)", out), out
