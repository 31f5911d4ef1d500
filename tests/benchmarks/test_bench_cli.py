"""``eventbus bench``: the overhead table (ours, and transformers' handler beside it)
and the per-callback profiler, run for real with tiny sizes. Nothing here is timed:
the tests check what is measured and printed, never how fast."""

from __future__ import annotations

import re
import sys
import subprocess
import os
import time
from typing import Any

import pytest

from eventbus import _bench
from eventbus.cli import main
from tests.conftest import require_module
from trainer import TrainerCallback


class SlowStepEnd(TrainerCallback):
    """A user's callback for the profiler to find: slow in on_step_end, cheap in on_log."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(0.001)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        pass


class NeedsArgs(TrainerCallback):
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold


def _rows(out: str) -> dict[tuple[str, int], list[str]]:
    """Table rows by (config, logging_steps) -> the rest of the row's fields."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^\((\w)\)\s+(\d+)\s+(.*)$", line)
        if m:
            rows[(m.group(1), int(m.group(2)))] = m.group(3).split()
    return rows


def test_bench_prints_each_config_and_logging_interval(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--quick", "--configs", "a,b", "--no-transformers", "--no-imports"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ours us/step [min-max]" in out and "transformers us/step [min-max]" in out and "ratio" in out
    rows = _rows(out)
    assert set(rows) == {("a", 1), ("a", 50), ("b", 1), ("b", 50)}
    for fields in rows.values():
        # ours: median [min-max] (cpu); transformers: "-" when not run
        assert re.fullmatch(r"[\d.,]+", fields[0]) and fields[1].startswith("[")
        assert fields[-1] == "-"
    assert "(b) ours at logging_steps=1" in out  # the target line, with its verdict
    assert re.search(r"<= 3\s+(ok|MISSED)", out)


def test_bench_runs_transformers_handler_beside_ours(capsys: pytest.CaptureFixture[str]) -> None:
    require_module("transformers")
    rc = main(["bench", "--configs", "b", "--logging-steps", "1", "--steps", "30", "--repeats", "1", "--gap-us", "0", "--no-imports"])
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"# transformers: \d+\.\d+", out)
    fields = _rows(out)[("b", 1)]
    assert re.fullmatch(r"\d[\d,]*x", fields[-1]), fields  # the ratio theirs / ours


def test_bench_with_every_sink_and_the_slow_one() -> None:
    for mod in ("tensorboard", "neptune", "comet_ml"):
        require_module(mod)
    # In a process of its own: the Neptune and Comet SDKs keep process-wide state
    # (loggers, error reporting) that must not leak into the tests that follow.
    # The loopback MLflow stand-in, even where `make test` names a real server: the
    # step-path figure does not depend on it.
    env = {k: v for k, v in os.environ.items() if k != "EVENTBUS_MLFLOW_BIN"}
    proc = subprocess.run(
        [sys.executable, "-m", "eventbus", "bench", "--configs", "c,d", "--logging-steps", "1", "--steps", "20",
         "--repeats", "1", "--gap-us", "0", "--no-transformers", "--no-imports"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_rows(out)) == {("c", 1), ("d", 1)}
    assert "# mlflow sink -> loopback HTTP server" in out
    assert "# sinks in a child process each (Sink.isolate): tensorboard, neptune, comet_ml, mlflow" in out  # the sinks' defaults
    assert "(d) vs (c), ours, logging_steps=1" in out
    assert "failed" not in out  # every sink opened, wrote and closed cleanly


def test_bench_callbacks_profiles_per_hook(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--callbacks", f"{__name__}:SlowStepEnd", "--steps", "20", "--logging-steps", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.split()[:1]}
    slow = lines[("SlowStepEnd", "on_step_end")]
    assert int(slow[2]) == 20  # calls
    assert int(lines[("SlowStepEnd", "on_log")][2]) == 4  # logged every 5 steps
    assert ("DefaultFlowCallback", "on_step_end") in lines
    # Most expensive first: the sleeping hook leads the table.
    first = next(line for line in out.splitlines() if line.startswith(("SlowStepEnd", "DefaultFlow")))
    assert first.split()[:2] == ["SlowStepEnd", "on_step_end"]
    assert "handler total:" in out


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:Foo", "cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:Missing", "has no attribute 'Missing'"),
        (f"{__name__}:NeedsArgs", "with no arguments failed"),
        ("justaname", "write it as module:Class"),
    ],
)
def test_bench_callbacks_bad_spec_is_a_clear_error(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--callbacks", spec, "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err


def test_bench_rejects_unknown_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--configs", "a,z", "--no-imports"]) == 2
    assert "choose among a, b, c, d" in capsys.readouterr().err


def test_targets_compare_against_transformers_with_tensorboard() -> None:
    """The 50x target divides transformers' (c) by ours, at logging_steps=1."""
    m = lambda us: _bench.Measure(us, us, us, us, 10, 1)  # noqa: E731
    result = _bench.OverheadResult(
        rows=[
            _bench.Row("b", 1, m(2.0), m(20.0)),
            _bench.Row("c", 1, m(2.5), m(250.0)),
            _bench.Row("d", 1, m(2.6), m(20250.0)),
        ],
        gap_s=0.0,
        transformers="5",
    )
    targets = {name: (value, ok) for name, value, _, ok in result.targets()}
    assert targets["(b) ours vs transformers' handler with TensorBoard, logging_steps=1"] == ("125x less", True)
    assert targets["(c) ours vs transformers' handler with TensorBoard, logging_steps=1"] == ("100x less", True)
    assert targets["(d) vs (c), ours, logging_steps=1"] == ("+4.0%", True)
    assert targets["(d) - (c), transformers, per logged step, logging_steps=1"][0] == "+20.0 ms"


def test_bench_plot_and_json(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    require_module("matplotlib")
    png, js = tmp_path / "o.png", tmp_path / "o.json"
    rc = main(["bench", "--quick", "--configs", "a", "--no-transformers", "--no-imports", "--plot", str(png), "--json", str(js)])
    assert rc == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    data = json.loads(js.read_text())
    assert {r["logging_steps"] for r in data["rows"]} == {1, 50}
    assert all(r["ours"]["blocks"] == 2 for r in data["rows"])  # --quick: 2 blocks per side


@pytest.mark.parametrize(("kind", "words"), [("compute", "200 us of CPU compute"), ("sleep", "200 us of sleep")])
def test_bench_gap_kinds(kind: str, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--configs", "a", "--logging-steps", "1", "--steps", "20", "--repeats", "1", "--gap-us", "200",
               "--gap-kind", kind, "--no-transformers", "--no-imports"])
    out = capsys.readouterr().out
    assert rc == 0
    assert words in out and set(_rows(out)) == {("a", 1)}


def test_gap_validates_its_arguments() -> None:
    from eventbus._bench import Gap

    with pytest.raises(ValueError, match="gap kind"):
        Gap(0.001, "spin")
    with pytest.raises(ValueError, match=">= 0"):
        Gap(-1.0)
    assert not Gap(0.0) and Gap(0.0002)


def test_isolate_option_names_exactly_the_isolated_sinks() -> None:
    from eventbus._bench_cli import _isolate_names

    assert _isolate_names(None) is None  # the sinks' own defaults
    assert _isolate_names("none") == []
    assert _isolate_names("neptune, comet_ml") == ["neptune", "comet_ml"]


def test_bench_isolate_unknown_sink_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    # Before anything is set up or measured: no traceback once (c)'s sinks are open.
    rc = main(["bench", "--quick", "--configs", "c", "--isolate", "tensorboard,bogus", "--no-transformers", "--no-imports"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--isolate 'tensorboard,bogus': bogus: not a sink of (c) or (d)" in err
    assert "'none'" in err and all(name in err for name in _bench.BENCH_SINK_NAMES)
    assert main(["bench", "--quick", "--configs", "c", "--isolate", ",", "--no-imports"]) == 2
    assert "no names given" in capsys.readouterr().err


def test_bench_sink_names_are_those_bench_sinks_builds() -> None:
    from sinks.comet import CometSink
    from sinks.console import ProgressSink
    from sinks.jsonl import JSONLSink
    from sinks.mlflow import MLflowSink
    from sinks.neptune import NeptuneSink
    from sinks.tensorboard import TensorBoardSink

    classes = (ProgressSink, TensorBoardSink, JSONLSink, NeptuneSink, CometSink, MLflowSink, _bench.SlowSink)
    assert _bench.BENCH_SINK_NAMES == tuple(c.name for c in classes)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--gap-us", "-1"], "--gap-us must be >= 0"),
        (["--logging-steps", "0"], "--logging-steps must be >= 1"),
    ],
)
def test_bench_bad_sizes_exit_2(option: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--no-imports", *option]) == 2
    assert message in capsys.readouterr().err
