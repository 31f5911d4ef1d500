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

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        pass


NOT_A_CALLBACK = 42


def plain_function() -> None:
    pass


class EveryHook(TrainerCallback):
    """Counts the hooks of a run's schedule the profiler fires; implements on_predict,
    which the profiler never calls."""

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pass

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pass

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(0.002)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        assert isinstance(metrics, dict) and "eval_loss" in metrics
        time.sleep(0.002)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pass

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pass

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        pass


class ReadsObjects(TrainerCallback):
    """Reads the model, optimizer and scheduler the trainer passes to every hook."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    lr_scheduler: Any = None, **kwargs: Any) -> None:
        sum(float(p.detach().abs().sum()) for p in model.parameters())
        assert optimizer.param_groups[0]["lr"] > 0 and lr_scheduler.get_last_lr()


class RaisesInEvaluate(TrainerCallback):
    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        return self._check(metrics)

    def _check(self, metrics: Any) -> None:
        raise KeyError("eval_f1")


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


def test_bench_with_every_sink_and_the_slow_one(tmp_path: Any) -> None:
    for mod in ("tensorboard", "neptune", "comet_ml"):
        require_module(mod)
    # In a process of its own: the Neptune and Comet SDKs keep process-wide state
    # (loggers, error reporting) that must not leak into the tests that follow.
    # The loopback MLflow stand-in, even where `make test` names a real server: the
    # step-path figure does not depend on it.
    env = {k: v for k, v in os.environ.items() if k != "EVENTBUS_MLFLOW_BIN"}
    proc = subprocess.run(
        [sys.executable, "-m", "eventbus", "bench", "--configs", "c,d", "--logging-steps", "1", "--steps", "20",
         "--repeats", "2", "--gap-us", "0", "--no-transformers", "--no-imports", "--json", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=600, env=env,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_rows(out)) == {("c", 1), ("d", 1)}
    assert "# mlflow sink -> loopback HTTP server" in out
    assert "# sinks in a child process each (Sink.isolate): tensorboard, neptune, comet_ml, mlflow" in out  # the sinks' defaults
    # (c) and (d) were set up side by side and their blocks interleaved: paired.
    assert re.search(r"\(d\) vs \(c\), ours, logging_steps=1\s+[+-][\d.]+% paired\s+within 5%", out), out
    assert re.search(r"note: \(d\) vs \(c\), logging_steps=1, paired: the median change over 2 pairs of blocks", out), out
    assert "failed" not in out  # every sink opened, wrote and closed cleanly
    import json

    data = json.loads((tmp_path / "o.json").read_text())
    assert data["together"] == [["c", "d"]]
    assert [r["config"] for r in data["rows"]] == ["c", "d"]
    assert all(len(r["ours"]["walls"]) == 2 for r in data["rows"])


def test_configurations_measured_together() -> None:
    """(c) and (d) form one group wherever they come in the list; the rest stay alone."""
    assert _bench._groups(["a", "b", "c", "d"]) == [["a"], ["b"], ["c", "d"]]
    assert _bench._groups(["d", "a", "c"]) == [["d", "c"], ["a"]]
    assert _bench._groups(["c", "b"]) == [["c"], ["b"]]
    assert _bench._groups(["d"]) == [["d"]]


def test_d_vs_c_target_is_paired_block_by_block() -> None:
    """Measured together, (d) vs (c) is the median of the per-pair ratios, not a ratio
    of medians taken over different blocks; apart, the ratio of medians."""
    walls_c, walls_d = (2.0, 4.0, 3.0), (2.08, 4.16, 3.6)  # pairs: +4%, +4%, +20%

    def m(walls: tuple[float, ...]) -> Any:
        return _bench.Measure(sorted(walls)[1], min(walls), max(walls), 1.0, 10, len(walls), walls)

    rows = [_bench.Row("c", 1, m(walls_c)), _bench.Row("d", 1, m(walls_d))]
    paired = _bench.OverheadResult(rows=rows, gap_s=0.0, transformers=None, together=[["c", "d"]])
    value, _, ok = next(t[1:] for t in paired.targets() if t[0] == "(d) vs (c), ours, logging_steps=1")
    assert value == "+4.0% paired" and ok is True
    assert paired.pairing_notes() == [
        "(d) vs (c), logging_steps=1, paired: the median change over 3 pairs of blocks of the same repeat "
        "(+4%, +4%, +20%); of the medians: +20.0%"
    ]
    apart = _bench.OverheadResult(rows=rows, gap_s=0.0, transformers=None)
    value, _, ok = next(t[1:] for t in apart.targets() if t[0] == "(d) vs (c), ours, logging_steps=1")
    assert value == "+20.0%" and ok is False
    assert apart.pairing_notes() == []


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


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (f"{__name__}:NOT_A_CALLBACK", "NOT_A_CALLBACK is an object of type int (42), not a callback"),
        (f"{__name__}:plain_function", "plain_function is an object of type function"),
        ("json:JSONDecoder", "JSONDecoder is a class that implements none of TrainerCallback's hooks"),
        (f"{__name__}:SlowStepEnd.on_log", "not a callback"),
    ],
)
def test_bench_callbacks_rejects_what_is_not_a_callback(spec: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--callbacks", spec, "--steps", "5"])
    captured = capsys.readouterr()
    assert rc == 2
    assert message in captured.err
    assert "handler total" not in captured.out  # no table of DefaultFlowCallback alone


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def oops(:\n", "importing module 'eb_bad_module' failed at "),
        ("raise RuntimeError('module init failed')\n", "(RuntimeError: module init failed)"),
    ],
)
def test_bench_callbacks_module_that_fails_to_import(
    source: str, message: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "eb_bad_module.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "eb_bad_module", raising=False)
    rc = main(["bench", "--callbacks", "eb_bad_module:Anything", "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--callbacks 'eb_bad_module:Anything': importing module 'eb_bad_module' failed" in err
    assert message in err
    assert "Traceback" not in err


def test_bench_callbacks_fires_the_hooks_of_a_runs_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--callbacks", f"{__name__}:EveryHook", "--steps", "20", "--logging-steps", "5"])
    out = capsys.readouterr().out
    assert rc == 0
    calls = {tuple(line.split()[:2]): int(line.split()[2]) for line in out.splitlines() if line.startswith("EveryHook")}
    # 20 steps: a micro-batch before each; fewer than 100 steps: one evaluation (after
    # two prediction steps), one save and one epoch, at the end.
    assert calls == {
        ("EveryHook", "on_substep_end"): 20,
        ("EveryHook", "on_epoch_begin"): 1,
        ("EveryHook", "on_epoch_end"): 1,
        ("EveryHook", "on_evaluate"): 1,
        ("EveryHook", "on_save"): 1,
        ("EveryHook", "on_prediction_step"): 2,
    }
    assert "not exercised: EveryHook.on_predict" in out


def test_profile_callbacks_evaluates_and_saves_on_a_schedule() -> None:
    result = _bench.profile_callbacks([EveryHook()], steps=250, logging_steps=50)
    report = result.per_hook
    assert report[("EveryHook", "on_evaluate")]["calls"] == 3  # steps 100, 200 and the last
    assert report[("EveryHook", "on_save")]["calls"] == 3
    assert report[("EveryHook", "on_substep_end")]["calls"] == 250
    # The slow evaluation shows per call and per step.
    assert report[("EveryHook", "on_evaluate")]["mean_s"] >= 0.002
    assert result.not_exercised == {"EveryHook": ["on_predict"]}


def test_bench_callbacks_pass_a_model_optimizer_and_scheduler(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--callbacks", f"{__name__}:ReadsObjects", "--steps", "5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert re.search(r"^ReadsObjects\s+on_step_end\s+5\b", captured.out, re.M)


def test_bench_callbacks_a_raising_callback_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["bench", "--callbacks", f"{__name__}:RaisesInEvaluate", "--steps", "5"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "RaisesInEvaluate.on_evaluate raised at step 5: KeyError: 'eval_f1'" in captured.err
    assert "Traceback" not in captured.err


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
