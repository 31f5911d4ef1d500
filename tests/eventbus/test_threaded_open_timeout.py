"""A ThreadedSink whose ``open_sync`` outlasts ``write_timeout`` (a mkdir on a hung
NFS mount): the bus's open retries must not queue another ``open_sync`` behind the
running one, which then ran twice (two files opened, the first one leaked) once the
mount came back."""

from __future__ import annotations

import threading
import time
from typing import Sequence

from eventbus import EventBus, Log, ThreadedSink
from eventbus.events import BaseEvent

from tests.conftest import wait_for


class SlowOpen(ThreadedSink):
    """Its first ``open_sync`` blocks until ``gate`` is set; counts opens and writes."""

    name = "slow_open"  # type: ignore[misc]
    events = (Log,)  # type: ignore[misc]
    write_timeout = 0.2
    retry_backoff = 0.01
    retry_backoff_max = 0.01
    circuit_threshold = 1_000_000
    max_delay = 0.0

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.opens = 0
        self.steps: list[int] = []

    def open_sync(self, run) -> None:
        self.opens += 1
        if not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(60)

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        self.steps.extend(ev.step for ev in batch)  # type: ignore[attr-defined]


def test_an_open_that_outlasts_the_timeout_runs_once_and_its_retries_queue_nothing() -> None:
    sink = SlowOpen()
    bus = EventBus([sink]).start()
    try:
        bus.publish(Log(step=1, values={"loss": 1.0}))
        wait_for(timeout=60, what="the open that hangs", predicate=sink.entered.is_set)
        # Several open attempts time out while open_sync hangs.
        wait_for(timeout=60, what="retries of the open", predicate=lambda: bus.stats().sinks["slow_open"].errors >= 3)
        assert sink._thread is not None and sink._thread.queued == 0
        sink.gate.set()
        for step in range(2, 6):
            bus.publish(Log(step=step, values={"loss": 1.0}))
        wait_for(timeout=60, what="the later events", predicate=lambda: 5 in sink.steps)
    finally:
        bus.close(10)
    assert sink.opens == 1
    assert sink.steps == sorted(set(sink.steps)) and sink.steps[-1] == 5


class Closing(SlowOpen):
    name = "closing"  # type: ignore[misc]

    def __init__(self) -> None:
        super().__init__()
        self.closed = threading.Event()

    def close_sync(self) -> None:
        self.closed.set()


def test_an_open_given_up_on_that_succeeds_after_the_bus_closed_is_closed_on_its_thread() -> None:
    sink = Closing()
    bus = EventBus([sink]).start()
    bus.publish(Log(step=1, values={"loss": 1.0}))
    wait_for(timeout=60, what="the open that hangs", predicate=sink.entered.is_set)
    bus.close(0.5)  # the bus never saw the sink open
    assert not sink.closed.is_set()
    sink.gate.set()  # the mount comes back: the open succeeds, then the sink is closed
    assert sink.closed.wait(10), "the sink opened after the bus gave up was never closed"
    assert sink.opens == 1


class NeverOpens(SlowOpen):
    name = "never_opens"  # type: ignore[misc]

    def __init__(self) -> None:
        super().__init__()
        self.closes = 0

    def open_sync(self, run) -> None:
        super().open_sync(run)
        raise ConnectionError("the mount came back read-only")

    def close_sync(self) -> None:
        self.closes += 1


def test_an_open_given_up_on_that_then_fails_is_not_closed() -> None:
    sink = NeverOpens()
    bus = EventBus([sink]).start()
    bus.publish(Log(step=1, values={"loss": 1.0}))
    wait_for(timeout=60, what="the open that hangs", predicate=sink.entered.is_set)
    bus.close(0.5)
    sink.gate.set()
    time.sleep(0.5)  # the thread ran the failing open, and then decided not to close
    assert sink.closes == 0 and sink.opens == 1
