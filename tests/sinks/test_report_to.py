"""report_to -> sinks through the real ``eventbus.sinks`` entry points (the package is
installed, so pyproject's entry points exist)."""

from __future__ import annotations

import os

import importlib.metadata
import sys

import pytest

from eventbus import EventBus, RunInfo
from eventbus.errors import MissingDependencyError, SinkConfigError, UnknownSinkError
from eventbus.events import Log, TrainEnd
from eventbus.registry import available_sinks, sinks_from_report_to
from sinks.console import ConsoleSink, ProgressSink
from sinks.jsonl import JSONLSink, read_jsonl
from sinks.tensorboard import TensorBoardSink
from tests.conftest import tb_run_dir


def test_our_sinks_are_registered_as_entry_points():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="eventbus.sinks")}
    assert eps["tensorboard"] == "sinks.tensorboard:TensorBoardSink"
    assert eps["jsonl"] == "sinks.jsonl:JSONLSink"
    assert eps["console"] == "sinks.console:ConsoleSink"
    assert eps["progress"] == "sinks.console:ProgressSink"


def test_list_of_names_builds_those_sinks_in_order():
    sinks = sinks_from_report_to(["tensorboard", "jsonl"])
    assert [type(s) for s in sinks] == [TensorBoardSink, JSONLSink]
    sinks = sinks_from_report_to("jsonl, console,progress")
    assert [type(s) for s in sinks] == [JSONLSink, ConsoleSink, ProgressSink]


def test_options_reach_each_sink(tmp_path):
    sinks = sinks_from_report_to(["tensorboard", "jsonl"], tensorboard={"log_dir": str(tmp_path / "tb")}, jsonl={"flush_secs": 0})
    assert sinks[0].log_dir == str(tmp_path / "tb")
    assert sinks[1].flush_secs == 0


def test_none_and_empty_build_nothing():
    assert sinks_from_report_to("none") == []
    assert sinks_from_report_to(None) == []
    assert sinks_from_report_to([]) == []


def test_all_picks_installed_backends_not_observers():
    names = [s.name for s in sinks_from_report_to("all")]
    assert "tensorboard" in names and "jsonl" in names
    assert "console" not in names and "progress" not in names


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownSinkError) as info:
        sinks_from_report_to(["tensorboard", "tensorbored"])
    msg = str(info.value)
    assert "'tensorbored'" in msg
    for known in ("tensorboard", "jsonl", "console", "progress"):
        assert known in msg
    assert set(available_sinks()) >= {"tensorboard", "jsonl", "console", "progress"}


def test_missing_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'eventbus-telemetry\[tensorboard\]'"):
        sinks_from_report_to(["tensorboard"])
    # With tensorboard missing, "all" leaves it out instead of failing.
    assert "tensorboard" not in [s.name for s in sinks_from_report_to("all")]


def test_bad_option_names_the_sink():
    with pytest.raises(SinkConfigError, match="jsonl"):
        sinks_from_report_to(["jsonl"], jsonl={"pth": "x"})


def test_report_to_sinks_run_on_a_bus(tmp_path):
    sinks = sinks_from_report_to(["tensorboard", "jsonl"])
    bus = EventBus(sinks, run=RunInfo(run_id="r2", output_dir=str(tmp_path)))
    bus.start()
    bus.publish(Log(step=1, values={"loss": 0.5}))
    bus.publish(TrainEnd(step=1))
    stats = bus.close(timeout=30)
    assert stats.sinks["tensorboard"].delivered == 2 and stats.sinks["jsonl"].delivered == 2
    assert [e.step for e in read_jsonl(tmp_path / "events-r2.jsonl")] == [1, 1]
    assert any(n.startswith("events.out.tfevents.") for n in os.listdir(tb_run_dir(tmp_path / "logs", "r2")))
