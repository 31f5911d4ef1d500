"""Import hygiene: the training loop and the event bus never pull in a backend SDK;
only asking for a sink does. Checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

from eventbus._bench import BACKEND_MODULES, trainer_backend_imports


def _leaked(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {BACKEND_MODULES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_import_trainer_imports_no_backend_sdk() -> None:
    assert trainer_backend_imports() == []


def test_import_eventbus_imports_no_backend_sdk() -> None:
    assert _leaked("import eventbus") == []


def test_building_the_cli_imports_no_backend_sdk() -> None:
    """Every subcommand (train, replay, bench) registers without loading an SDK."""
    assert _leaked("from eventbus.cli import _build_parser\n_build_parser()") == []


def test_the_probe_sees_an_sdk_when_one_is_imported() -> None:
    """The check can fail: asking for the tensorboard sink does import tensorboard."""
    assert "tensorboard" in _leaked("from sinks.tensorboard import TensorBoardSink\nTensorBoardSink()")


# The event loop's modules and importlib.metadata: the bulk of what ``import eventbus``
# would otherwise load; needed only once a bus runs (or a sink is looked up by name).
_DEFERRED = ("asyncio", "anyio", "importlib.metadata")


def _loaded(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {_DEFERRED!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    last = out.splitlines()[-1] if out else ""
    return [m for m in last.split(",") if m]


def test_import_eventbus_loads_no_event_loop_module() -> None:
    assert _loaded("import eventbus") == []


def test_a_bus_started_after_import_loads_the_event_loop_and_delivers() -> None:
    """The stand-ins become the real modules on first use, in both modules that hold
    them, and an async sink and a threaded sink both get their events."""
    code = """
import sys, eventbus
from eventbus import EventBus, Sink, ThreadedSink, StepBegin
import eventbus.bus as bus_module, eventbus.sink as sink_module

got = []

class Async(Sink):
    name = "async"
    async def write(self, events):
        got.extend(("async", e.step) for e in events)

class Threaded(ThreadedSink):
    name = "threaded"
    def write_sync(self, events):
        got.extend(("threaded", e.step) for e in events)

bus = EventBus([Async(), Threaded()])
bus.start()
for step in range(3):
    bus.publish(StepBegin(step=step))
stats = bus.close(timeout=30)
assert sorted(got) == [("async", 0), ("async", 1), ("async", 2), ("threaded", 0), ("threaded", 1), ("threaded", 2)], got
assert bus_module.anyio is sys.modules["anyio"] and bus_module.asyncio is sys.modules["asyncio"]
assert sink_module.asyncio is sys.modules["asyncio"]
print("ok")
"""
    assert _loaded(code) == ["asyncio", "anyio"]


def test_looking_a_sink_up_by_name_loads_entry_points() -> None:
    """The registry still finds the project's sinks through their entry points."""
    assert "importlib.metadata" in _loaded("import eventbus\nassert 'jsonl' in eventbus.available_sinks()")
