"""Process isolation (``Sink.isolate``) while a sink's backend is down: an ``open`` that
fails with a transient error keeps its child, and the bus's retries open the sink in
that same child again, instead of starting (and importing an SDK in) a new interpreter
for every retry of the outage. A child that died, or whose open failed for good, is
replaced; a kept child does not outlive the bus.

The sinks here live in this module, which the child imports to unpickle them: it
imports nothing heavier than eventbus and pytest (no torch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from eventbus import EventBus, Log, RunInfo, Sink
from eventbus.events import BaseEvent
from eventbus.isolation import ProcessSink

from tests.conftest import wait_for

N = 20




class OpensLate(Sink):
    """An isolated sink whose ``open`` does, attempt after attempt, what ``plan`` says:
    ``"transient"`` raises ConnectionError (a server that refuses connections),
    ``"die"`` ends the child process, ``"config"`` raises PermissionError (a local path
    it may not use: an error the bus fails for good); past the plan, it opens.

    Each attempt is appended to ``<dir>/opens`` with the child's pid: the file, not the
    instance (one per child), counts them. Each event written is appended to
    ``<dir>/events`` as ``<step> <pid>``."""

    name = "opens-late"
    events = (Log,)
    isolate = True
    max_delay = 0.0
    retry_backoff = 0.01
    retry_backoff_max = 0.05
    max_retries = 50
    circuit_threshold = 1000

    def __init__(self, directory: str, plan: Sequence[str], **opts: Any) -> None:
        self.directory = directory
        self.plan = list(plan)
        for k, v in opts.items():
            setattr(self, k, v)

    async def open(self, run: RunInfo) -> None:
        path = os.path.join(self.directory, "opens")
        attempt = len(read_lines(path)) if os.path.exists(path) else 0
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        action = self.plan[attempt] if attempt < len(self.plan) else "ok"
        if action == "transient":
            raise ConnectionError("connection refused")
        if action == "die":
            os._exit(3)
        if action == "config":
            raise PermissionError(13, "Permission denied", self.directory)

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        with open(os.path.join(self.directory, "events"), "a") as f:
            f.writelines(f"{ev.step} {os.getpid()}\n" for ev in batch)


def read_lines(path: str | Path) -> list[str]:
    with open(path) as f:
        return f.read().split("\n")[:-1]


def opens(tmp_path: Path) -> list[int]:
    """The pid of the child that made each open attempt, in order."""
    return [int(p) for p in read_lines(tmp_path / "opens")]


def deliver(sink: OpensLate) -> tuple[Any, ProcessSink]:
    """Publish N events to ``sink`` on a real bus, wait for their delivery, close."""
    with EventBus([sink], flush_interval=0.01) as bus:
        [proxy] = bus.sinks
        assert isinstance(proxy, ProcessSink)
        for i in range(N):
            bus.publish(Log(step=i, values={"loss": float(i)}))
        wait_for(lambda: bus.stats().sinks[sink.name].delivered == N, what="delivery")
    assert proxy.process is None and not proxy.opened  # closed: the child exited and was reaped
    return bus.stats().sinks[sink.name], proxy


def assert_delivered_once_by(tmp_path: Path, stats: Any, pid: int) -> None:
    assert (stats.received, stats.delivered, stats.failed, stats.dropped) == (N, N, 0, 0)
    lines = [line.split() for line in read_lines(tmp_path / "events")]
    assert [int(s) for s, _ in lines] == list(range(N))  # each once, in order
    assert {int(p) for _, p in lines} == {pid}


def test_a_transient_open_failure_keeps_the_child_and_the_retries_open_in_it(tmp_path: Path) -> None:
    sink = OpensLate(str(tmp_path), ["transient"] * 3)
    stats, _ = deliver(sink)
    pids = opens(tmp_path)
    # Four attempts (three refused, one that opened), all in one child: not a new
    # interpreter per retry.
    assert len(pids) == 4
    assert len(set(pids)) == 1 and pids[0] != os.getpid()
    assert_delivered_once_by(tmp_path, stats, pids[0])
    assert "ConnectionError" in stats.last_error and "connection refused" in stats.last_error


def test_a_child_that_dies_in_open_is_replaced_on_the_next_attempt(tmp_path: Path) -> None:
    # Refused (the child is kept), then the kept child dies in open: the next attempt
    # starts a new child, which opens the sink and gets every event.
    sink = OpensLate(str(tmp_path), ["transient", "die"])
    stats, _ = deliver(sink)
    first, again, second = opens(tmp_path)
    assert first == again and second != first
    assert_delivered_once_by(tmp_path, stats, second)


def test_a_kept_child_that_was_killed_is_replaced_on_the_next_attempt(tmp_path: Path) -> None:
    # The open at the bus's start is refused and its child kept; the child is killed
    # before the next attempt (with the first events), which starts a new one instead
    # of writing to a dead pipe.
    sink = OpensLate(str(tmp_path), ["transient"])
    with EventBus([sink], flush_interval=0.01) as bus:
        [proxy] = bus.sinks
        assert isinstance(proxy, ProcessSink)
        wait_for(lambda: bus.stats().sinks[sink.name].errors >= 1, what="the first open to fail")
        kept = proxy.process
        assert kept is not None and kept.poll() is None and not proxy.opened
        assert kept.pid == opens(tmp_path)[0]
        kept.kill()
        kept.wait(10)
        for i in range(N):
            bus.publish(Log(step=i, values={}))
        wait_for(lambda: bus.stats().sinks[sink.name].delivered == N, what="delivery")
    first, second = opens(tmp_path)
    assert first == kept.pid and second != first
    assert_delivered_once_by(tmp_path, bus.stats().sinks[sink.name], second)


def test_a_child_whose_open_failed_for_good_is_replaced(tmp_path: Path) -> None:
    # A configuration error is not retried as an outage: its child is not kept, and the
    # next open (with the next batch) runs in a new one.
    sink = OpensLate(str(tmp_path), ["config"])
    stats, _ = deliver(sink)
    first, second = opens(tmp_path)
    assert second != first
    assert_delivered_once_by(tmp_path, stats, second)
    assert "PermissionError" in stats.last_error


def test_a_child_kept_after_a_failed_open_does_not_outlive_the_bus(tmp_path: Path) -> None:
    # The backend stays down until the end: the bus never opens the sink, so it never
    # closes it either; the kept child is stopped when the bus stops trying.
    sink = OpensLate(str(tmp_path), ["transient"] * 10**6, max_retries=2)
    bus = EventBus([sink], flush_interval=0.01).start()
    [proxy] = bus.sinks
    assert isinstance(proxy, ProcessSink)
    for i in range(N):
        bus.publish(Log(step=i, values={}))
    wait_for(lambda: (tmp_path / "opens").exists() and len(opens(tmp_path)) >= 2, what="two open attempts")
    kept = proxy.process
    assert kept is not None
    try:
        stats = bus.close(timeout=10).sinks[sink.name]
        wait_for(lambda: kept.poll() is not None, timeout=15, what="the kept child to exit")
    finally:
        if kept.poll() is None:
            kept.kill()
    assert proxy.process is None and not proxy.opened
    assert (stats.delivered, stats.failed, stats.abandoned) == (0, N, 0)
    assert set(opens(tmp_path)) == {kept.pid}
