"""A slow spool disk (NFS, Lustre, a busy device: an fsync that takes many seconds)
never stalls the bus: the interval fsync runs off the bus loop, so a healthy sink
beside a spooling one gets its events on time; close() keeps its one deadline, and
what it could not deliver is written to the spool and counted as spooled, its fsync
finishing in the background."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterator, Sequence

import anyio
import pytest

import eventbus.spool as spool_module
from eventbus import Evaluate, EventBus, Log, RunInfo, Sink
from eventbus.events import BaseEvent
from eventbus.spool import Spool, read_spool
from tests.eventbus.test_spool_outage import Gated as _OutageGated
from tests.conftest import wait_for

SLOW_FSYNC = 30.0
"""Seconds a "slow" fsync takes unless the test lets it go earlier: far beyond every
bound asserted below, so the old behaviour (the loop waiting for it) cannot pass."""


def logs(start: int, n: int, run_id: str = "") -> list[Log]:
    return [Log(run_id=run_id, step=i, values={"loss": float(i)}) for i in range(start, start + n)]


class _Release(threading.Event):
    """Set to let the slow fsyncs finish; ``entered`` counts the fsyncs started."""

    entered = 0


@pytest.fixture
def slow_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Release]:
    """Every fsync of the spool module takes SLOW_FSYNC seconds, or until the event
    returned is set (at teardown at the latest, so no thread is left waiting)."""
    real = os.fsync
    release = _Release()

    def fsync(fd: int) -> None:
        release.entered += 1
        release.wait(SLOW_FSYNC)
        real(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    yield release
    release.set()


class Down(Sink):
    """A backend that is down: everything goes to the spool."""

    name = "down"
    spool = True
    spool_fsync_interval = 0.05
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 3600
    max_delay = 0.01

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        raise ConnectionError("tracking server unreachable")


class Healthy(Sink):
    name = "healthy"
    max_delay = 0.01

    def __init__(self) -> None:
        self.got: list[BaseEvent] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.got.extend(batch)


def test_a_slow_spool_fsync_never_delays_a_healthy_sink(tmp_path, slow_fsync):
    healthy = Healthy()
    bus = EventBus([Down(), healthy], run=RunInfo(output_dir=str(tmp_path), run_id="r"), flush_interval=0.01).start()
    try:
        for i, ev in enumerate(logs(0, 200, "r")):
            bus.publish(ev)
            if i % 20 == 0:
                time.sleep(0.06)  # past the interval: the spool starts an fsync (30 s)
        bus.publish(Evaluate(run_id="r", step=199, metrics={"eval_loss": 0.5}))
        # The healthy sink gets everything while the spool's fsync is still running.
        wait_for(lambda: len(healthy.got) == 201, timeout=10)
        wait_for(lambda: bus.stats().sinks["down"].spooled == 201, timeout=10)
        assert slow_fsync.entered > 0 and not slow_fsync.is_set()  # an fsync is still running
    finally:
        slow_fsync.set()
        bus.close(10)


@pytest.mark.parametrize("interval", [0.05, 0], ids=["interval", "every-append"])
def test_close_keeps_its_deadline_with_a_slow_fsync_and_spools_everything(tmp_path, slow_fsync, caplog, interval):
    down = Down()
    down.spool_fsync_interval = interval  # type: ignore[misc]
    healthy = Healthy()
    bus = EventBus([down, healthy], run=RunInfo(output_dir=str(tmp_path), run_id="r"), flush_interval=0.01).start()
    for i, ev in enumerate(logs(0, 300, "r")):
        bus.publish(ev)
        if i % 50 == 0:
            time.sleep(0.06)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        t0 = time.monotonic()
        stats = bus.close(2)
        took = time.monotonic() - t0
    assert took < 10, f"close(2) took {took:.1f} s"
    st = stats.sinks["down"]
    # Everything the backend did not get is on disk and counted as spooled: nothing
    # abandoned (the old code counted the events routed after it gave up as such).
    assert (st.received, st.spooled, st.abandoned, st.dropped) == (300, 300, 0, 0)
    assert stats.sinks["healthy"].delivered == 300 and len(healthy.got) == 300
    # Written, though the fsync still runs (a reader sees every event, in order).
    assert slow_fsync.entered > 0 and not slow_fsync.is_set()  # an fsync is still running
    assert [e.step for e in read_spool(tmp_path / "spool" / "down", from_cursor=True)] == list(range(300))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]  # no "a sink is blocking its loop"
    late = [r.getMessage() for r in caplog.records if "did not finish by the close deadline" in r.getMessage()]
    assert len(late) == 1 and str(tmp_path / "spool" / "down") in late[0] and "spool_dir" in late[0], caplog.text


class Gated(_OutageGated):
    """test_spool_outage's gated sink (down; its first write blocks until released,
    then fails), with a spool fsynced only at rotation and close."""

    spool = True
    spool_fsync_interval = 3600


def test_close_puts_older_events_in_front_on_disk_by_its_deadline_with_a_slow_fsync(tmp_path, slow_fsync):
    sink = Gated()
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path), run_id="r"), flush_interval=0.01).start()
    for ev in logs(0, 10, "r"):
        bus.publish(ev)
    assert sink.entered.wait(10)
    for ev in logs(10, 190, "r"):
        bus.publish(ev)
    wait_for(lambda: bus.stats().sinks["gated"].spooled == 190)
    sink.release.set()
    wait_for(lambda: bus.stats().sinks["gated"].circuit_open)
    t0 = time.monotonic()
    st = bus.close(2).sinks["gated"]
    took = time.monotonic() - t0
    assert took < 10, f"close(2) took {took:.1f} s"
    assert (st.received, st.spooled, st.abandoned, st.dropped) == (200, 200, 0, 0)
    assert [e.step for e in read_spool(tmp_path / "spool" / "gated", from_cursor=True)] == list(range(200))


def test_the_interval_fsync_runs_off_the_appending_thread_and_close_keeps_a_deadline(tmp_path, slow_fsync):
    sp = Spool(tmp_path, max_file_bytes=1024, fsync_interval=0.01)
    t0 = time.monotonic()
    for i in range(40):  # interval fsyncs, and rotations (which fsync too)
        sp.append(logs(i, 1))
        assert time.monotonic() - t0 < 10  # not 30 s per fsync
        time.sleep(0.02)
    sp.deadline = time.monotonic() + 1
    t0 = time.monotonic()
    sp.close()
    assert time.monotonic() - t0 < 10
    assert slow_fsync.entered > 0 and not slow_fsync.is_set()  # an fsync is still running
    assert [e.step for e in read_spool(tmp_path)] == list(range(40))
    # The fsyncs finish in the background once the disk lets them.
    slow_fsync.set()
    sp._syncer.join(10)
    assert sp._syncer.join(0)


class Hung(Sink):
    """A backend that hangs (the network): the close deadline cuts it off."""

    name = "hung"
    spool = True
    max_delay = 0.01

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        await anyio.sleep(3600)


def test_spooling_at_the_close_deadline_on_an_ordinary_disk_is_no_slow_disk_warning(tmp_path, caplog):
    # The usual end of a run whose backend is down: the close deadline cuts the sink
    # off and its events are spooled then, their fsync started at the deadline. That
    # is no slow disk, and must not be reported as one.
    bus = EventBus([Hung()], run=RunInfo(output_dir=str(tmp_path), run_id="r"), flush_interval=0.01).start()
    for ev in logs(0, 100, "r"):
        bus.publish(ev)
    wait_for(lambda: bus.stats().sinks["hung"].received == 100, timeout=10)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        stats = bus.close(0.5)
    assert stats.sinks["hung"].spooled == 100
    assert [e.step for e in read_spool(tmp_path / "spool" / "hung", from_cursor=True)] == list(range(100))
    assert not [r.getMessage() for r in caplog.records if "did not finish by the close deadline" in r.getMessage()]
