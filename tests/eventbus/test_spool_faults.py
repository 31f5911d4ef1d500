"""The fault matrix rows that involve the spool, with exact counts: a sink that is
down and comes back, a sink 100x slower than the producer (Overflow.SPOOL), a full
disk, a spool file corrupted in the middle. In every case publish never blocks, the
other sinks get every event, and received == delivered + dropped + spooled + queue_depth."""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from typing import Sequence

import anyio
import pytest

from eventbus import EventBus, Log, Overflow, RunInfo, Sink, StepEnd
from eventbus.events import BaseEvent
from eventbus.spool import MAGIC, Spool, read_spool
from tests.conftest import wait_for


class Recorder(Sink):
    """Records every event it is written; healthy."""

    name = "recorder"
    max_delay = 0.01

    def __init__(self, name: str = "recorder") -> None:
        self.name = name  # type: ignore[misc]
        self.got: list[BaseEvent] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.got.extend(batch)


class Flaky(Recorder):
    """Raises ConnectionError while ``down``; spools (sink.spool = True) meanwhile."""

    spool = True
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 0.05
    max_batch_size = 10

    def __init__(self, name: str = "flaky") -> None:
        super().__init__(name)
        self.down = True
        self.failures = 0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        if self.down:
            self.failures += 1
            raise ConnectionError("backend unreachable")
        self.got.extend(batch)


def identity(bus: EventBus) -> None:
    for s in bus.stats().sinks.values():
        assert s.received == s.delivered + s.dropped + s.spooled + s.queue_depth, s


def steps(events: Sequence[BaseEvent]) -> list[int]:
    return [e.step for e in events]


def test_sink_down_spools_then_drains_in_order_before_new_events_exactly_once(tmp_path):
    flaky, healthy = Flaky(), Recorder()
    bus = EventBus([flaky, healthy], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    with bus:
        for i in range(100):
            bus.publish(Log(step=i, values={"loss": float(i)}))
        wait_for(lambda: bus.stats().sinks["flaky"].spooled == 100)
        identity(bus)
        st = bus.stats().sinks["flaky"]
        assert (st.delivered, st.dropped, st.failed) == (0, 0, 0)
        assert flaky.failures >= 1
        # While it is down, new events go behind the spooled ones (on disk).
        for i in range(100, 120):
            bus.publish(Log(step=i, values={"loss": float(i)}))
        wait_for(lambda: bus.stats().sinks["flaky"].spooled == 120)
        flaky.down = False
        # New events published as it recovers must not overtake the spooled ones.
        for i in range(120, 150):
            bus.publish(Log(step=i, values={"loss": float(i)}))
        wait_for(lambda: bus.stats().sinks["flaky"].delivered == 150)
    st = bus.stats().sinks["flaky"]
    assert steps(flaky.got) == list(range(150))
    assert (st.received, st.delivered, st.spooled, st.dropped, st.failed, st.queue_depth) == (150, 150, 0, 0, 0, 0)
    assert steps(healthy.got) == list(range(150))
    identity(bus)
    # Everything delivered: no event file is left, and the mark is kept.
    spool_dir = tmp_path / "spool" / "flaky"
    assert [n for n in os.listdir(spool_dir) if n.endswith(".spool")] == []
    assert bus.high_water_marks() == {"flaky": 149, "recorder": 149}


def test_sink_still_down_at_close_keeps_everything_on_disk_counted_as_spooled(tmp_path):
    flaky = Flaky()
    flaky.circuit_cooldown = 3600
    bus = EventBus([flaky], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    with bus:
        for i in range(30):
            bus.publish(StepEnd(step=i))
        wait_for(lambda: bus.stats().sinks["flaky"].spooled == 30)
    st = bus.close()
    s = st.sinks["flaky"]
    assert (s.received, s.delivered, s.spooled, s.dropped) == (30, 0, 30, 0)
    assert Spool(tmp_path / "spool" / "flaky").pending == 30


class LoopBlocker(Recorder):
    """Wrongly blocks the bus loop in its async write (a synchronous HTTP call)."""

    spool = True
    max_delay = 0.0

    def __init__(self, block: float) -> None:
        super().__init__("blocker")
        self.block = block

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        time.sleep(self.block)
        self.got.extend(batch)


def test_a_loop_blocker_abandoned_at_close_does_not_drain_its_spool_again(tmp_path):
    """close() cannot stop a thread stuck in a sink's write: it spools what that sink
    held and closes the spool. When the write returns after all, the thread must not
    read that spool and send it again: it stays on disk, as the final stats say."""
    sink = LoopBlocker(block=1.5)
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01).start()
    for i in range(5):
        bus.publish(StepEnd(step=i))
        bus.publish(Log(step=i, values={}))
    time.sleep(0.3)  # the first batch is in the blocked write
    st = bus.close(timeout=0.5)
    s = st.sinks["blocker"]
    assert (s.received, s.delivered, s.spooled) == (10, 0, 10)
    time.sleep(2.5)  # the write returns; the abandoned thread runs on
    assert 0 < len(sink.got) <= 10
    on_disk = list(read_spool(tmp_path / "spool" / "blocker"))
    assert len(on_disk) == 10  # the in-flight batch too: whether it got through was unknown at close
    assert len({(type(e), e.step) for e in sink.got}) == len(sink.got)  # nothing delivered twice
    assert bus.stats() == st


class Slow(Recorder):
    """100x slower than the producer: each write takes a while."""

    overflow = Overflow.SPOOL
    capacity = 8
    max_batch_size = 4

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        await anyio.sleep(0.002)
        self.got.extend(batch)


def test_overflow_spool_with_a_slow_sink_loses_nothing_and_keeps_order(tmp_path, monkeypatch):
    appended = []
    real_append = Spool.append
    monkeypatch.setattr(Spool, "append", lambda self, evs: (appended.append(len(evs)), real_append(self, evs))[1])
    slow, healthy = Slow("slow"), Recorder()
    bus = EventBus([slow, healthy], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    n = 600
    with bus:
        t0 = time.monotonic()
        for i in range(n):
            bus.publish(Log(step=i, values={"x": i}))
        publish_s = time.monotonic() - t0
        wait_for(lambda: bus.stats().sinks["slow"].delivered == n, timeout=60)
    st = bus.stats().sinks["slow"]
    assert sum(appended) > 0  # the queue did overflow to disk
    assert st.queue_high_water <= slow.capacity + slow.max_batch_size
    assert steps(slow.got) == list(range(n))
    assert (st.received, st.delivered, st.dropped, st.overflow, st.spooled) == (n, n, 0, 0, 0)
    assert steps(healthy.got) == list(range(n))
    assert publish_s < 5.0  # generous: publish never waits for the slow sink
    identity(bus)


def test_full_disk_is_one_clear_error_counted_as_failed_and_publish_never_blocks(tmp_path, monkeypatch, caplog):
    def enospc(self, fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "_write", enospc)
    flaky, healthy = Flaky(), Recorder()
    bus = EventBus([flaky, healthy], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    n = 200
    with caplog.at_level(logging.ERROR, logger="eventbus"):
        with bus:
            t0 = time.monotonic()
            for i in range(n):
                bus.publish(Log(step=i, values={"loss": 1.0}))
            publish_s = time.monotonic() - t0
            wait_for(lambda: bus.stats().sinks["flaky"].failed == n)
            wait_for(lambda: len(healthy.got) == n)
    st = bus.stats().sinks["flaky"]
    assert (st.received, st.delivered, st.spooled, st.failed, st.dropped) == (n, 0, 0, n, n)
    assert "spool" in (st.last_error or "")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "disk is full" in r.getMessage()]
    assert len(errors) == 1, caplog.text
    assert "flaky" in errors[0].getMessage() and "training continues" in errors[0].getMessage()
    assert steps(healthy.got) == list(range(n))
    assert publish_s < 5.0
    identity(bus)


def test_full_disk_then_space_again_spools_the_rest(tmp_path, monkeypatch):
    full = {"on": True}
    real = Spool._write

    def maybe_full(self, fd, data):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fd, data)

    monkeypatch.setattr(Spool, "_write", maybe_full)
    flaky = Flaky()
    bus = EventBus([flaky], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    with bus:
        for i in range(10):
            bus.publish(Log(step=i))
        wait_for(lambda: bus.stats().sinks["flaky"].failed == 10)
        full["on"] = False
        for i in range(10, 25):
            bus.publish(Log(step=i))
        wait_for(lambda: bus.stats().sinks["flaky"].spooled == 15)
        flaky.down = False
        wait_for(lambda: bus.stats().sinks["flaky"].delivered == 15)
    st = bus.stats().sinks["flaky"]
    assert steps(flaky.got) == list(range(10, 25))
    assert (st.received, st.delivered, st.failed, st.dropped, st.spooled) == (25, 15, 10, 10, 0)
    identity(bus)


def _corrupt_record(path, index: int) -> None:
    data = bytearray(path.read_bytes())
    pos = len(MAGIC) + 1
    for _ in range(index):
        (length,) = struct.unpack_from("<I", data, pos + 4)
        pos += 12 + length
    data[pos + 12 + 2] ^= 0xFF  # a payload byte: the checksum no longer matches
    path.write_bytes(bytes(data))


def test_spool_corrupted_in_the_middle_while_the_sink_is_down(tmp_path, caplog):
    flaky, healthy = Flaky(), Recorder()
    bus = EventBus([flaky, healthy], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    spool_dir = tmp_path / "spool" / "flaky"
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with bus:
            for i in range(50):
                bus.publish(Log(step=i))
            wait_for(lambda: bus.stats().sinks["flaky"].spooled == 50)
            # Past the first batch (max_batch_size=10), which the worker may hold.
            (name,) = [n for n in os.listdir(spool_dir) if n.endswith(".spool")]
            _corrupt_record(spool_dir / name, 30)
            flaky.down = False
            wait_for(lambda: bus.stats().sinks["flaky"].spooled == 0)
    st = bus.stats().sinks["flaky"]
    assert steps(flaky.got) == [i for i in range(50) if i != 30]
    assert (st.received, st.delivered, st.failed, st.dropped, st.spooled) == (50, 49, 1, 1, 0)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert steps(healthy.got) == list(range(50))
    identity(bus)


def test_corrupt_leftover_spool_is_drained_on_the_next_run_around_the_bad_record(tmp_path, caplog):
    first = Flaky()
    first.circuit_cooldown = 3600
    bus = EventBus([first], run=RunInfo(run_id="r1", output_dir=str(tmp_path)), flush_interval=0.01)
    with bus:
        for i in range(20):
            bus.publish(StepEnd(step=i))
        wait_for(lambda: bus.stats().sinks["flaky"].spooled == 20)
    spool_dir = tmp_path / "spool" / "flaky"
    (name,) = [n for n in os.listdir(spool_dir) if n.endswith(".spool")]
    _corrupt_record(spool_dir / name, 7)

    second = Flaky()
    second.down = False
    # A resume of the run that left them (another run moves them aside: test_spool_outage).
    bus2 = EventBus([second], run=RunInfo(run_id="r1", output_dir=str(tmp_path), resumed=True), flush_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with bus2:
            bus2.publish(StepEnd(step=100))
            wait_for(lambda: bus2.stats().sinks["flaky"].delivered == 20)
    # The leftover (less the bad record) first, then the new run's events.
    assert steps(second.got) == [i for i in range(20) if i != 7] + [100]
    st = bus2.stats().sinks["flaky"]
    assert (st.received, st.delivered, st.spooled, st.dropped) == (20, 20, 0, 0)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    identity(bus2)


class SlowAndFlaky(Slow):
    """Slow, and one write in five fails: a batch from the queue fails while newer
    events are already on disk (it must stay in front), and spool batches fail too."""

    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 0.01

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.calls = 0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.calls += 1
        if self.calls % 5 == 2:  # call 2 is a queue batch older than the spooled events
            raise ConnectionError("blip")
        await super().write(batch)


def test_overflow_spool_with_a_slow_flaky_sink_keeps_order_exactly_once(tmp_path):
    sink = SlowAndFlaky("slowflaky")
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    n = 400
    with bus:
        for i in range(n):
            bus.publish(Log(step=i))
        wait_for(lambda: bus.stats().sinks["slowflaky"].delivered == n, timeout=60)
    st = bus.stats().sinks["slowflaky"]
    assert sink.calls >= 5
    assert steps(sink.got) == list(range(n))
    assert (st.received, st.delivered, st.dropped, st.spooled, st.failed) == (n, n, 0, 0, 0)
    identity(bus)


def test_a_short_write_of_a_state_file_raises_and_keeps_the_old_file(tmp_path, monkeypatch):
    # A nearly full disk: os.write takes part of the bytes, then ENOSPC. The good
    # state.json (the delivered marks) must stay, not be replaced by a cut one, and
    # no temp file be left beside it.
    import json

    from eventbus import spool as spool_mod

    path = tmp_path / "state.json"
    spool_mod.write_json_atomic(path, {"marks": {"a": 1}})
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "write", short_then_full)
    with pytest.raises(OSError) as info:
        spool_mod.write_json_atomic(path, {"marks": {f"sink{i}": i for i in range(200)}})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC and calls["n"] == 2
    assert json.loads(path.read_text()) == {"marks": {"a": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
