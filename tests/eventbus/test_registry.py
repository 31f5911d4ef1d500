"""Finding sinks by name: the eventbus.sinks entry-point group, in-process
registrations, clear errors, and transformers-style report_to."""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Iterator, Sequence

import pytest

from eventbus import MissingDependencyError, Sink, SinkConfigError, UnknownSinkError, registry
from eventbus.events import BaseEvent


class DummySink(Sink):
    """Found through a (test) entry point."""

    name = "dummy"  # type: ignore[misc]

    def __init__(self, level: int = 0) -> None:
        self.level = level

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        pass


class Unavailable(DummySink):
    name = "unavailable"  # type: ignore[misc]

    @classmethod
    def available(cls) -> bool:
        return False


def _ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=registry.ENTRY_POINT_GROUP)


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, importlib.metadata.EntryPoint]]:
    eps = {
        "dummy": _ep("dummy", "tests.eventbus.test_registry:DummySink"),
        "unavailable": _ep("unavailable", "tests.eventbus.test_registry:Unavailable"),
        "needs_sdk": _ep("needs_sdk", "eventbus_test_no_such_sdk_module:Sink"),
    }
    monkeypatch.setattr(registry, "_entry_points", lambda: dict(eps))
    yield eps


def test_installed_entry_points_list_the_project_sinks() -> None:
    names = registry.available_sinks()
    for name in ("tensorboard", "jsonl", "mlflow", "neptune", "comet_ml", "console"):
        assert name in names
    eps = registry._entry_points()
    assert eps["jsonl"].value == "sinks.jsonl:JSONLSink"


def test_entry_point_lookup_and_create(fake_entry_points: object) -> None:
    assert registry.load_sink_factory("dummy") is DummySink
    sink = registry.create_sink("dummy", level=3)
    assert isinstance(sink, DummySink) and sink.level == 3


def test_unknown_name_lists_the_known_ones(fake_entry_points: object) -> None:
    with pytest.raises(UnknownSinkError) as info:
        registry.load_sink_factory("tensorbored")
    msg = str(info.value)
    assert "tensorbored" in msg and "dummy" in msg and "needs_sdk" in msg
    assert isinstance(info.value, SinkConfigError) and isinstance(info.value, KeyError)


def test_missing_sdk_names_the_extra(fake_entry_points: object) -> None:
    with pytest.raises(MissingDependencyError) as info:
        registry.create_sink("needs_sdk")
    assert "pip install 'eventbus-telemetry[needs_sdk]'" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_missing_sdk_names_the_right_extra_for_comet(monkeypatch: pytest.MonkeyPatch) -> None:
    # The entry point is "comet_ml" (transformers' report_to name) but the extra is "comet".
    monkeypatch.setattr(registry, "_entry_points", lambda: {"comet_ml": _ep("comet_ml", "eventbus_test_no_comet:X")})
    with pytest.raises(MissingDependencyError, match=r"eventbus-telemetry\[comet\]"):
        registry.load_sink_factory("comet_ml")


def test_register_sink_in_process(fake_entry_points: object) -> None:
    registry.register_sink("mine", DummySink)
    try:
        assert "mine" in registry.available_sinks()
        assert isinstance(registry.create_sink("mine"), DummySink)
        with pytest.raises(SinkConfigError, match="bad options"):
            registry.create_sink("mine", nope=1)
        registry.register_sink("not_a_sink", lambda: object())
        with pytest.raises(SinkConfigError, match="not a Sink"):
            registry.create_sink("not_a_sink")
    finally:
        registry.unregister_sink("mine")
        registry.unregister_sink("not_a_sink")
    assert "mine" not in registry.available_sinks()
    with pytest.raises(SinkConfigError):
        registry.register_sink("", DummySink)


@pytest.mark.parametrize(
    "report_to, expected",
    [
        (None, []),
        ("none", []),
        ([], []),
        ("", []),
        ("all", ["all"]),
        (["all"], ["all"]),
        ("jsonl", ["jsonl"]),
        ("jsonl, tensorboard", ["jsonl", "tensorboard"]),
        (["jsonl", "tensorboard", "jsonl"], ["jsonl", "tensorboard"]),
        (("console",), ["console"]),
    ],
)
def test_normalize_report_to(report_to: object, expected: list[str]) -> None:
    assert registry.normalize_report_to(report_to) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["all,jsonl", ["none", "jsonl"], "jsonl,none", ["all", "none"]])
def test_report_to_combinations_are_rejected(bad: object) -> None:
    with pytest.raises(SinkConfigError, match="cannot be combined"):
        registry.normalize_report_to(bad)  # type: ignore[arg-type]


def test_sinks_from_report_to(fake_entry_points: object) -> None:
    sinks = registry.sinks_from_report_to("dummy", dummy={"level": 2})
    assert len(sinks) == 1 and sinks[0].level == 2  # type: ignore[attr-defined]
    assert registry.sinks_from_report_to("none") == []
    # "all": every sink that imports and says it is available; the others are left out.
    assert [type(s) for s in registry.sinks_from_report_to("all")] == [DummySink]
    with pytest.raises(MissingDependencyError):
        registry.sinks_from_report_to(["dummy", "needs_sdk"])
    with pytest.raises(UnknownSinkError):
        registry.sinks_from_report_to("nope")


@pytest.mark.parametrize(("name", "module", "extra"), [("neptune", "neptune", "neptune"), ("comet_ml", "comet_ml", "comet"), ("tensorboard", "tensorboard", "tensorboard")])
def test_a_shipped_sink_whose_sdk_is_missing_is_an_error_when_it_is_created(
    monkeypatch: pytest.MonkeyPatch, name: str, module: str, extra: str
) -> None:
    # Not when the bus opens it, hours into training with nothing logged: at report_to.
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=rf"pip install 'eventbus-telemetry\[{extra}\]'"):
        registry.sinks_from_report_to(["jsonl", name])
    with pytest.raises(MissingDependencyError):
        registry.create_sink(name)
    assert name not in [s.name for s in registry.sinks_from_report_to("all")]
