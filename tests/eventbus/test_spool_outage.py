"""The spool during an outage: the queue's overflow goes to the spool (not dropped),
the disk keeps publish order also at close, one spool directory is one run's (an
earlier run's leftovers are moved aside, a second live bus gets its own directory),
stats() keeps its identity while spooling, and a failed fsync is not a loss."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from typing import Sequence

import anyio
import pytest

import eventbus.spool as spool_module
from eventbus import EventBus, Log, Overflow, RunInfo, Sink, TransientSinkError
from eventbus.events import BaseEvent
from eventbus.spool import Spool, read_spool
from tests.conftest import wait_for


def identity(st) -> bool:
    return st.received == st.delivered + st.dropped + st.spooled + st.queue_depth


def logs(start: int, n: int, run_id: str = "") -> list[Log]:
    return [Log(run_id=run_id, step=i, values={"loss": float(i)}) for i in range(start, start + n)]


class Gated(Sink):
    """Down. Its first write blocks until ``release`` is set, then fails: a batch in
    flight (being retried, say) while the queue overflows behind it. The circuit then
    stays open: the sink is still down at close."""

    name = "gated"
    events = (Log,)
    capacity = 20
    max_batch_size = 10
    max_delay = 0.01
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 3600

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.entered.set()
        while not self.release.is_set():
            await anyio.sleep(0.005)
        raise TransientSinkError("down")


def _outage(sink: Gated, out: str, n: int = 200) -> tuple[EventBus, object]:
    """Steps 0..9 in flight, 10..n-1 arrive meanwhile (the queue holds 20), then the
    batch in flight fails; closed while the sink is still down."""
    bus = EventBus([sink], run=RunInfo(output_dir=out), flush_interval=0.01, close_timeout=5).start()
    for ev in logs(0, 10):
        bus.publish(ev)
    assert sink.entered.wait(10)
    for ev in logs(10, n - 10):
        bus.publish(ev)
    wait_for(lambda: bus.stats().sinks[sink.name].received == n)
    sink.release.set()
    wait_for(lambda: bus.stats().sinks[sink.name].circuit_open)
    st = bus.close().sinks[sink.name]
    return bus, st


# -- 1. the overflow of a sink with a spool goes to the spool ---------------------------


def test_spool_sink_spools_its_queue_overflow_during_an_outage_instead_of_dropping(tmp_path):
    sink = Gated()
    sink.spool = True  # type: ignore[misc]  # overflow stays DROP_OLDEST: the spool takes it
    assert sink.overflow is Overflow.DROP_OLDEST
    _, st = _outage(sink, str(tmp_path))
    assert (st.received, st.dropped, st.overflow, st.failed, st.spooled) == (200, 0, 0, 0, 200)
    assert [e.step for e in read_spool(tmp_path / "spool" / "gated")] == list(range(200))


def test_a_sink_without_a_spool_keeps_its_overflow_policy_and_logs_the_drops(tmp_path, caplog):
    sink = Gated()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        _, st = _outage(sink, str(tmp_path), n=100)
    # 10 in flight (failed), 20 in the queue at close (abandoned), the rest dropped.
    assert (st.received, st.overflow, st.spooled) == (100, 70, 0)
    assert st.received == st.delivered + st.dropped
    drops = [r.getMessage() for r in caplog.records if "is full" in r.getMessage()]
    assert drops and "'gated'" in drops[0] and "capacity 20" in drops[0], caplog.text
    assert not (tmp_path / "spool").exists()


# -- 2. the disk holds publish order at close --------------------------------------------


def test_overflow_spool_sink_closed_while_down_leaves_the_spool_in_publish_order(tmp_path):
    sink = Gated()
    sink.overflow = Overflow.SPOOL
    _, st = _outage(sink, str(tmp_path))
    assert (st.received, st.dropped, st.spooled) == (200, 0, 200)
    # The failed batch 0..9 was held in memory while 10..199 were on disk: at close it
    # goes in front of them, not behind.
    assert [e.step for e in read_spool(tmp_path / "spool" / "gated")] == list(range(200))
    assert [e.step for e in read_spool(tmp_path / "spool" / "gated", from_cursor=False)] == list(range(200))


def test_prepend_puts_events_in_front_of_the_pending_ones(tmp_path):
    sp = Spool(tmp_path, max_file_bytes=1024)
    for i in range(10, 40):
        sp.append(logs(i, 1))
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".spool")]) > 1
    sp.consume(sp.read(5))  # 10..14 delivered: the cursor is inside the first file
    sp.prepend(logs(0, 5))
    sp.append(logs(40, 2))  # the open file is still appendable
    assert sp.pending == 5 + 25 + 2
    assert [e.step for e in sp.read(100).events] == list(range(0, 5)) + list(range(15, 42))
    sp.close()
    assert [e.step for e in read_spool(tmp_path)] == list(range(0, 5)) + list(range(15, 42))
    assert Spool(tmp_path).pending == 32


# -- 3a. an earlier run's leftovers are not delivered into a new run ---------------------


class Tracker(Sink):
    name = "tracker"
    spool = True
    max_retries = 0
    max_delay = 0.01
    circuit_threshold = 1
    circuit_cooldown = 3600

    def __init__(self, down: bool) -> None:
        self.down = down
        self.got: list[tuple[str, int]] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        if self.down:
            raise TransientSinkError("down")
        self.got += [(e.run_id, e.step) for e in batch]


def test_a_new_run_moves_an_earlier_runs_leftovers_aside_for_replay(tmp_path, caplog):
    out = str(tmp_path)
    with EventBus([Tracker(down=True)], run=RunInfo(output_dir=out, run_id="run1"), flush_interval=0.01) as bus:
        for ev in logs(1, 3, "run1"):
            bus.publish(ev)
        wait_for(lambda: bus.stats().sinks["tracker"].spooled == 3)

    second = Tracker(down=False)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with EventBus([second], run=RunInfo(output_dir=out, run_id="run2"), flush_interval=0.01) as bus2:
            for ev in logs(1, 3, "run2"):
                bus2.publish(ev)
    assert second.got == [("run2", 1), ("run2", 2), ("run2", 3)]
    st = bus2.stats().sinks["tracker"]
    assert (st.received, st.delivered, st.spooled) == (3, 3, 0)
    aside = tmp_path / "spool" / "tracker.run1"
    assert [(e.run_id, e.step) for e in read_spool(aside)] == [("run1", 1), ("run1", 2), ("run1", 3)]
    assert f"eventbus replay {aside} --to tracker" in caplog.text

    # A resume of a run still gets its own leftovers first.
    with EventBus([Tracker(down=True)], run=RunInfo(output_dir=out, run_id="run3"), flush_interval=0.01) as bus3:
        for ev in logs(1, 2, "run3"):
            bus3.publish(ev)
        wait_for(lambda: bus3.stats().sinks["tracker"].spooled == 2)
    resumed = Tracker(down=False)
    with EventBus([resumed], run=RunInfo(output_dir=out, run_id="run3", resumed=True), flush_interval=0.01) as bus4:
        bus4.publish(Log(run_id="run3", step=3))
    assert resumed.got == [("run3", 1), ("run3", 2), ("run3", 3)]


# -- 3b. two live buses on one output_dir ------------------------------------------------


def test_a_second_live_bus_on_the_same_spool_directory_uses_its_own(tmp_path, caplog):
    out = str(tmp_path)
    a, b = Tracker(down=True), Tracker(down=True)
    a.circuit_cooldown = b.circuit_cooldown = 0.2
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        A = EventBus([a], run=RunInfo(output_dir=out, run_id="runA"), flush_interval=0.01, close_timeout=3).start()
        B = EventBus([b], run=RunInfo(output_dir=out, run_id="runB"), flush_interval=0.01, close_timeout=3).start()
    try:
        # Both in this process: the warning says so (a Trainer's bridge not closed yet, say).
        assert "in use by another bus of this process" in caplog.text
        for i in range(50):
            A.publish(Log(run_id="runA", step=i))
            B.publish(Log(run_id="runB", step=i))
        wait_for(lambda: A.stats().sinks["tracker"].spooled == 50 and B.stats().sinks["tracker"].spooled == 50)
        a.down = False
        wait_for(lambda: A.stats().sinks["tracker"].delivered == 50)
        time.sleep(0.3)
    finally:
        sa = A.close(3).sinks["tracker"]
        sb = B.close(3).sinks["tracker"]
    assert a.got == [("runA", i) for i in range(50)]
    assert (sa.received, sa.delivered, sa.spooled, sa.dropped) == (50, 50, 0, 0)
    assert (sb.received, sb.delivered, sb.spooled, sb.dropped) == (50, 0, 50, 0)
    assert [e.step for e in read_spool(tmp_path / "spool" / "tracker.runB")] == list(range(50))
    # Both closed: the directory is free again (no warning for the next bus).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with EventBus([Tracker(down=False)], run=RunInfo(output_dir=out, run_id="runA", resumed=True)):
            pass
    assert "in use by" not in caplog.text


def test_a_bus_that_never_started_does_not_hold_the_spool_directory(tmp_path, caplog):
    out = str(tmp_path)
    idle = EventBus([Tracker(down=False)], run=RunInfo(output_dir=out, run_id="r"))  # noqa: F841 (kept alive)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with EventBus([Tracker(down=False)], run=RunInfo(output_dir=out, run_id="r")) as bus:
            bus.publish(Log(run_id="r", step=1))
    assert "in use by another live bus" not in caplog.text


def test_records_the_bus_did_not_write_never_make_its_counts_negative_nor_spin(tmp_path):
    """Another writer (a process without the lock) added records to the spool: the
    bus delivers them too, counts them as received, and its counts stay >= 0 (a
    negative pending read as "pending" and spun the worker without awaiting)."""
    sink = Tracker(down=True)
    sink.circuit_cooldown = 0.1
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path), run_id="r"), flush_interval=0.01, close_timeout=3).start()
    try:
        for ev in logs(0, 10, "r"):
            bus.publish(ev)
        wait_for(lambda: bus.stats().sinks["tracker"].spooled == 10)
        other = Spool(tmp_path / "spool" / "tracker")
        other.append(logs(100, 5, "x"))
        other._fd and os.close(other._fd)  # leave its file as a killed writer would
        sink.down = False
        wait_for(lambda: len(sink.got) == 15)
        time.sleep(0.2)
        w = bus._workers[0]
        assert w.spool.pending == 0
        c0 = time.process_time()
        time.sleep(0.5)
        assert time.process_time() - c0 < 0.3  # idle, not spinning
    finally:
        t0 = time.monotonic()
        st = bus.close(3).sinks["tracker"]
    assert time.monotonic() - t0 < 2.5
    assert (st.received, st.delivered, st.spooled, st.dropped) == (15, 15, 0, 0)


def test_consume_never_makes_pending_negative(tmp_path):
    sp = Spool(tmp_path)
    sp.append(logs(0, 3))
    sp.pending = 1  # counted fewer than the disk holds (another writer's records)
    assert sp.consume(sp.read(10)) == 0
    assert sp.pending == 0


# -- 4. stats() while spooling ------------------------------------------------------------


def test_stats_identity_holds_while_a_spill_is_being_written(tmp_path, monkeypatch):
    """Seen from inside the spool write (the moment a reader on another thread would
    catch for the length of the write): the counters and the queue still agree."""
    sink = Tracker(down=True)
    sink.events = (Log,)  # type: ignore[misc]
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path), run_id="r"), flush_interval=0.01)
    seen: list[bool] = []
    real_append = Spool.append

    def append(self, events):
        w = bus._workers[0]
        st = w.stats
        seen.append(st.received == st.delivered + st.dropped + st.spooled + len(w.queue) + len(w.in_flight))
        return real_append(self, events)

    monkeypatch.setattr(Spool, "append", append)
    with bus:
        for burst in range(3):
            for ev in logs(burst * 3000, 3000, "r"):
                bus.publish(ev)
            wait_for(lambda: bus.stats().sinks["tracker"].received == (burst + 1) * 3000)
            assert identity(bus.stats().sinks["tracker"])
    assert len(seen) >= 2 and all(seen), seen
    assert bus.stats().sinks["tracker"].spooled == 9000


# -- 5. a failed fsync is a durability warning, not a loss --------------------------------


def test_a_failed_fsync_after_a_written_append_is_not_counted_as_lost(tmp_path, monkeypatch, caplog):
    real_fsync = os.fsync
    failing = {"on": True}

    def fsync(fd):
        if failing["on"]:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    sink = Tracker(down=True)
    sink.spool_fsync_interval = 0  # type: ignore[attr-defined]
    sink.circuit_cooldown = 0.1
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path), run_id="r"), flush_interval=0.01, close_timeout=5)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with bus:
            for ev in logs(0, 50, "r"):
                bus.publish(ev)
                time.sleep(0.001)  # several appends, each fsynced (and failing)
            wait_for(lambda: bus.stats().sinks["tracker"].spooled == 50)
            st = bus.stats().sinks["tracker"]
            assert (st.failed, st.dropped) == (0, 0)
            failing["on"] = False
            sink.down = False
            wait_for(lambda: bus.stats().sinks["tracker"].delivered == 50)
    st = bus.stats().sinks["tracker"]
    assert (st.received, st.delivered, st.failed, st.dropped, st.spooled) == (50, 50, 0, 0, 0)
    assert [s for _, s in sink.got] == list(range(50))
    warned = [r for r in caplog.records if "fsync" in r.getMessage()]
    assert len(warned) == 1, caplog.text  # once per failing streak
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


@pytest.mark.parametrize("interval", [0, 3600])
def test_spool_append_survives_a_failing_fsync(tmp_path, monkeypatch, interval):
    monkeypatch.setattr(spool_module.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    sp = Spool(tmp_path, max_file_bytes=1024, fsync_interval=interval)
    for i in range(30):  # rotations fsync too
        sp.append(logs(i, 1))
    assert sp.pending == 30
    monkeypatch.undo()
    sp.close()
    assert [e.step for e in read_spool(tmp_path)] == list(range(30))


def test_the_lock_is_released_at_close_even_with_a_forked_child_alive(tmp_path):
    """A process forked while the bus ran (a DataLoader worker) shares the lock file:
    close() must still free the directory for the next bus of this process."""
    sp = Spool(tmp_path)
    assert sp.lock()
    assert not Spool(tmp_path).lock()  # held
    pid = os.fork()
    if pid == 0:  # the child: holds the inherited descriptor for a while, then exits
        time.sleep(3)
        os._exit(0)
    try:
        sp.close()
        nxt = Spool(tmp_path)
        assert nxt.lock()
        nxt.close()
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


def test_no_header_only_file_is_left_once_everything_is_delivered(tmp_path, monkeypatch):
    """A file rotated in just before the disk filled up holds a header only; once the
    rest is delivered, close() leaves no spool file behind."""
    sp = Spool(tmp_path, max_file_bytes=1024)
    while len([n for n in os.listdir(tmp_path) if n.endswith(".spool")]) < 2:
        sp.append(logs(0, 1))
    sp.consume(sp.read(10**6))  # the second file (now open) holds one record
    full = {"on": True}
    real = Spool._write

    def write(self, fd, data):
        if full["on"] and len(data) > len(spool_module.MAGIC) + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fd, data)

    monkeypatch.setattr(Spool, "_write", write)
    sp._size = sp.max_file_bytes  # the next append rotates: the header fits, the record does not
    with pytest.raises(OSError):
        sp.append(logs(1, 1))
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".spool"))[-1] == "00000003.spool"
    assert sp.pending == 0
    sp.close()
    assert [n for n in os.listdir(tmp_path) if n.endswith(".spool")] == []


class Recording(Sink):
    """Down for steps above ``down_from`` (when set); records what it got."""

    name = "rec"
    events = (Log,)
    spool = True
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 3600
    max_delay = 0.01

    def __init__(self, down_from: int | None = None) -> None:
        self.down_from = down_from
        self.got: list[tuple[str, int]] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        if self.down_from is not None and any(e.step > self.down_from for e in batch):
            raise TransientSinkError("down")
        self.got.extend((e.run_id, e.step) for e in batch)


def _spooled_run(out: str, run_id: str, delivered: int, spooled: int) -> None:
    """A run whose sink got steps 1..``delivered`` and then went down: the next
    ``spooled`` steps are in its spool, its mark at ``delivered``."""
    sink = Recording(down_from=delivered)
    bus = EventBus([sink], run=RunInfo(run_id=run_id, output_dir=out), flush_interval=0.01).start()
    for ev in logs(1, delivered, run_id):
        bus.publish(ev)
    wait_for(lambda: bus.stats().sinks["rec"].delivered == delivered)
    for ev in logs(delivered + 1, spooled, run_id):
        bus.publish(ev)
    wait_for(lambda: bus.stats().sinks["rec"].spooled == spooled)
    bus.close(5)


def test_a_resume_of_another_run_moves_the_spooled_run_s_leftovers_aside_and_ignores_its_marks(tmp_path, caplog):
    # Run B spooled steps 26..30 (its sink had 1..25); then run A is resumed from its
    # own checkpoint at step 20 in the same output_dir (resume_from_checkpoint=True
    # picks A's). B's events must not reach A's run, nor B's mark hold A's steps back.
    _spooled_run(str(tmp_path), "B", 25, 5)
    sink = Recording()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with EventBus([sink], run=RunInfo(run_id="A", output_dir=str(tmp_path), resumed=True), resume_marks={"rec": 20}) as bus:
            for ev in logs(21, 10, "A"):
                bus.publish(ev)
    assert sink.got == [("A", s) for s in range(21, 31)]
    assert [e.step for e in read_spool(tmp_path / "spool" / "rec.B")] == list(range(26, 31))
    assert any("eventbus replay" in r.getMessage() and "rec.B" in r.getMessage() for r in caplog.records)


def test_a_second_training_phase_of_the_same_run_is_not_held_back_by_its_spool_marks(tmp_path):
    # Trainer.train() twice on one Trainer: one run id, steps from 1 again, not a resume.
    _spooled_run(str(tmp_path), "R", 5, 0)
    sink = Recording()
    with EventBus([sink], run=RunInfo(run_id="R", output_dir=str(tmp_path))) as bus:
        for ev in logs(1, 5, "R"):
            bus.publish(ev)
    assert sink.got == [("R", s) for s in range(1, 6)]
    # A resume of that run still skips what its sink had.
    again = Recording()
    with EventBus([again], run=RunInfo(run_id="R", output_dir=str(tmp_path), resumed=True)) as bus:
        for ev in logs(4, 4, "R"):
            bus.publish(ev)
    assert again.got == [("R", 6), ("R", 7)]


def test_a_forked_child_that_exits_normally_does_not_release_the_parents_lock(tmp_path):
    # A child of os.fork() that exits through sys.exit runs the finalizers it
    # inherited, the lock's release among them: it must leave the parent's lock alone.
    import subprocess
    import sys
    import textwrap

    src = os.path.dirname(os.path.dirname(spool_module.__file__))
    script = textwrap.dedent(
        f"""
        import os, subprocess, sys
        sys.path.insert(0, {src!r})
        from eventbus.spool import Spool
        sp = Spool({str(tmp_path)!r})
        assert sp.lock()
        probe = "import sys; sys.path.insert(0, {src!r}); from eventbus.spool import Spool; print(Spool({str(tmp_path)!r}).lock())"
        pid = os.fork()
        if pid == 0:
            sys.exit(0)
        os.waitpid(pid, 0)
        print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip())
        sp.close()
        print(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip())
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]  # held after the child's exit; free after close


def test_locking_does_not_count_a_large_spool_twice_unless_it_changed(tmp_path, monkeypatch):
    Spool(tmp_path).append(logs(0, 5))
    loads = []
    real = Spool._load
    monkeypatch.setattr(Spool, "_load", lambda self: (loads.append(1), real(self))[1])
    sp = Spool(tmp_path)
    assert sp.lock() and sp.pending == 5 and len(loads) == 1  # counted once
    sp.close()
    # Another writer appended between the count and the lock: counted again.
    sp = Spool(tmp_path)
    other = Spool(tmp_path)
    other.append(logs(5, 3))
    other.close()
    assert sp.lock() and sp.pending == 8
    sp.close()


def test_the_stand_in_of_a_busy_spool_directory_is_removed_when_it_holds_nothing(tmp_path, caplog):
    out = str(tmp_path)
    a, b = Tracker(down=False), Tracker(down=False)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        A = EventBus([a], run=RunInfo(output_dir=out, run_id="runA"), flush_interval=0.01).start()
        with EventBus([b], run=RunInfo(output_dir=out, run_id="runB"), flush_interval=0.01) as B:
            assert (tmp_path / "spool" / "tracker.runB").is_dir()
            B.publish(Log(run_id="runB", step=1))
        A.close(3)
    assert b.got == [("runB", 1)]
    assert sorted(os.listdir(tmp_path / "spool")) == ["tracker"]
