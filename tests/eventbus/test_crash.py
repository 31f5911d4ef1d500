"""SIGKILL mid-publish: everything published before the last fsync is recovered by
replay; a torn final record is detected and skipped with a warning, never a crash."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Sequence

import pytest

from eventbus import Log, RunInfo, Sink
from eventbus.events import BaseEvent
from eventbus.replay import replay
from eventbus.spool import Spool

# The child: a sink whose backend is down, so every event goes to its spool, fsynced
# after every append (fsync_interval=0). It reports how many events are on disk, as
# bus.stats() counts them only after the append and its fsync returned.
CHILD = textwrap.dedent(
    """
    import sys, time
    from eventbus import EventBus, Log, RunInfo, Sink

    class Down(Sink):
        name = "remote"
        spool = True
        spool_fsync_interval = 0
        spool_max_file_bytes = 4096  # several files: recovery crosses rotations
        max_retries = 0
        circuit_threshold = 1
        circuit_cooldown = 3600

        async def write(self, batch):
            raise ConnectionError("tracking server unreachable")

    bus = EventBus([Down()], run=RunInfo(run_id="crash", output_dir=sys.argv[1]), flush_interval=0.002)
    bus.start()
    step = 0
    while True:
        for _ in range(7):
            bus.publish(Log(step=step, values={"loss": 1.0 / (step + 1), "lr": 0.001}))
            step += 1
        # Small appends (one burst each), so the spool rotates through several files.
        while bus.stats().sinks["remote"].spooled < step:
            time.sleep(0.001)
        print("spooled", bus.stats().sinks["remote"].spooled, flush=True)
    """
)


class Recorder(Sink):
    name = "recorder"
    max_delay = 0.01

    def __init__(self) -> None:
        self.got: list[BaseEvent] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.got.extend(batch)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """Run the child until a few hundred events are on disk, then SIGKILL it mid-publish."""
    out = tmp_path_factory.mktemp("killed")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    durable = 0
    deadline = time.monotonic() + 60
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            durable = int(line.split()[1])
            if durable >= 400 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)  # while it keeps publishing
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    assert durable >= 400, "the child did not get going"
    return out / "spool" / "remote", durable


def test_replay_after_sigkill_recovers_everything_fsynced_in_order(killed_run, tmp_path):
    spool_dir, durable = killed_run
    d = tmp_path / "copy"
    shutil.copytree(spool_dir, d)
    assert len(list(d.glob("*.spool"))) > 1
    rec = Recorder()
    res = replay(d, rec)
    steps = [e.step for e in rec.got]
    # Every event reported durable is back, in publish order, none twice.
    assert len(steps) >= durable
    assert steps == list(range(len(steps)))
    assert rec.got[10].values == {"loss": 1.0 / 11, "lr": 0.001}
    assert res.sent == len(steps) and res.failed == 0


def test_resumed_run_finds_the_killed_runs_spool(killed_run, tmp_path):
    spool_dir, durable = killed_run
    d = tmp_path / "copy"
    shutil.copytree(spool_dir, d)
    sp = Spool(d)
    assert sp.pending >= durable
    assert [e.step for e in sp.read(10**6).events] == list(range(sp.pending))


def test_torn_final_record_after_a_crash_is_skipped_with_one_warning(killed_run, tmp_path, caplog):
    spool_dir, durable = killed_run
    d = tmp_path / "copy"
    shutil.copytree(spool_dir, d)
    last = sorted(d.glob("*.spool"))[-1]
    total = Spool(d).pending
    # A crash in the middle of a write: the last record is cut short.
    size = last.stat().st_size
    with open(last, "r+b") as f:
        f.truncate(size - 3)
    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        res = replay(d, rec)
    steps = [e.step for e in rec.got]
    assert steps == list(range(total - 1))
    assert len(steps) >= durable - 1
    torn = [r for r in caplog.records if "torn" in r.getMessage()]
    assert len(torn) == 1, caplog.text
    assert res.unreadable == 1


def test_a_resumed_bus_drains_a_torn_spool_without_crashing(killed_run, tmp_path, caplog):
    spool_dir, _ = killed_run
    out = tmp_path / "run"
    shutil.copytree(spool_dir, out / "spool" / "remote")
    last = sorted((out / "spool" / "remote").glob("*.spool"))[-1]
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 3)
    total = Spool(out / "spool" / "remote").pending

    from eventbus import EventBus

    class Back(Recorder):
        name = "remote"
        spool = True

    sink = Back()
    bus = EventBus([sink], run=RunInfo(run_id="crash", output_dir=str(out), resumed=True), flush_interval=0.01)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with bus:
            bus.publish(Log(step=10**6))
            deadline = time.monotonic() + 30
            while not sink.got or sink.got[-1].step != 10**6:
                assert time.monotonic() < deadline
                time.sleep(0.01)
    st = bus.stats().sinks["remote"]
    assert [e.step for e in sink.got] == list(range(total)) + [10**6]
    assert (st.received, st.delivered, st.spooled, st.dropped) == (total + 1, total + 1, 0, 0)
    assert len([r for r in caplog.records if "torn" in r.getMessage()]) == 1
