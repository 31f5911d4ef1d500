"""The file sinks (JSONL, TensorBoard) on a disk that misbehaves: a full disk (os.write
made to fail, after taking part of a write, for the sink's own file) and a file
deleted while the run writes it. What the bus counts must be what the file holds:
a batch counted failed is not in it, not even once the disk has room again, one
counted delivered is, once; the file never ends in a torn record."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import time
from typing import Callable

import pytest

from eventbus import EventBus, RunInfo
from eventbus.events import Log, Save, TrainBegin
from sinks.jsonl import JSONLSink, read_jsonl
from tests.conftest import require_module

RUN_ID = "diskrun"


class FullDisk:
    """``os.write`` for the file ``target()`` names: while :attr:`full`, it takes
    :attr:`room` more bytes (a short write, as a nearly full disk does) and then
    fails with ENOSPC. Other files are written as usual."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, target: Callable[[], str | None]) -> None:
        self._real = os.write
        self._target = target
        self.full = False
        self.room = 0
        self.refused = 0
        monkeypatch.setattr(os, "write", self)

    def fill(self, room: int = 0) -> None:
        self.full, self.room = True, room

    def free(self) -> None:
        self.full = False

    def _is_target(self, fd: int) -> bool:
        path = self._target()
        try:
            return path is not None and os.path.samestat(os.fstat(fd), os.stat(path))
        except OSError:
            return False

    def __call__(self, fd: int, data: bytes) -> int:
        if self.full and self._is_target(fd):
            if self.room > 0:
                n = min(len(data), self.room)
                self.room -= n
                return self._real(fd, bytes(data[:n]))
            self.refused += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._real(fd, data)


def logs(first: int, last: int) -> list[Log]:
    return [Log(run_id=RUN_ID, step=s, values={"loss": 1.0 / s, "pad": "x" * 50}) for s in range(first, last + 1)]


def wait_written(bus: EventBus, name: str, total: int) -> None:
    """Until the bus has delivered or failed ``total`` events of sink ``name``."""
    deadline = time.monotonic() + 60
    while True:
        st = bus.stats().sinks[name]
        if st.delivered + st.failed + st.dropped >= total:
            return
        assert time.monotonic() < deadline, f"the bus did not get through {total} events: {st}"
        time.sleep(0.01)


def jsonl_steps(path: str) -> list[int]:
    """Every line of the file read with plain json.loads (pandas' way: one bad line
    fails the file), and with read_jsonl; the steps of the Log lines."""
    data = open(path, "rb").read()
    assert not data or data.endswith(b"\n"), f"the file ends in a torn line: {data[-60:]!r}"
    steps = [json.loads(line)["step"] for line in data.splitlines() if line.strip()]
    assert [e.step for e in read_jsonl(path, strict=True)] == steps
    return steps


# -- JSONL: a full disk ---------------------------------------------------------------------


def test_jsonl_a_batch_counted_failed_is_not_in_the_file_even_once_the_disk_frees(tmp_path, monkeypatch):
    sink = JSONLSink(dir=str(tmp_path), flush_secs=0)
    sink.circuit_threshold = 10**6  # every batch is tried: no cooldown to wait for
    disk = FullDisk(monkeypatch, lambda: sink.path)
    bus = EventBus([sink], run=RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    bus.start()
    try:
        for ev in logs(1, 50):
            bus.publish(ev)
        wait_written(bus, "jsonl", 50)
        disk.fill(room=70)  # the first failed flush writes a line and a part of one
        for ev in logs(51, 100):
            bus.publish(ev)
        wait_written(bus, "jsonl", 100)
        disk.free()
        for ev in logs(101, 150):
            bus.publish(ev)
    finally:
        st = bus.close(timeout=30).sinks["jsonl"]
    assert disk.refused > 0
    assert st.received == 150 and st.received == st.delivered + st.failed
    assert st.failed > 0 and sink.path in (st.last_error or "")
    steps = jsonl_steps(sink.path)
    assert len(steps) == len(set(steps)) == st.delivered
    assert set(range(1, 51)) <= set(steps) and set(range(101, 151)) <= set(steps)


def test_jsonl_lines_counted_delivered_stay_for_the_next_flush_and_a_retry_is_written_once(tmp_path, monkeypatch, caplog):
    sink = JSONLSink(path=str(tmp_path / "run.jsonl"), flush_secs=3600)
    disk = FullDisk(monkeypatch, lambda: sink.path)
    sink.open_sync(RunInfo(run_id=RUN_ID))
    try:
        sink.write_sync(logs(1, 3))  # buffered: the bus counts it delivered
        disk.fill(room=40)
        failed = logs(4, 5) + [Save(run_id=RUN_ID, step=5, checkpoint_dir="c")]
        with caplog.at_level(logging.WARNING, logger="sinks.jsonl"), pytest.raises(OSError, match="run.jsonl"):
            sink.write_sync(failed)  # urgent: the flush fails, the file is cut back
        assert jsonl_steps(sink.path) == []
        with pytest.raises(OSError):
            sink.write_sync(logs(6, 6))  # while failing, every batch is flushed (and fails)
        warnings = [r.getMessage() for r in caplog.records if "could not write" in r.getMessage()]
        assert len(warnings) == 1 and sink.path in warnings[0] and "Free space" in warnings[0]
        disk.free()
        sink.write_sync(failed)  # the bus's retry (or a replay) of the failed batch
        assert jsonl_steps(sink.path) == [1, 2, 3, 4, 5, 5]  # the Save is a line at step 5 as well
    finally:
        sink.close_sync()
    lines = [json.loads(line) for line in open(sink.path, "rb").read().splitlines()]
    assert [(d["type"], d["step"]) for d in lines] == [("Log", 1), ("Log", 2), ("Log", 3), ("Log", 4), ("Log", 5), ("Save", 5)]


def test_jsonl_an_isolated_childs_flush_that_fails_leaves_its_batch_out(tmp_path, monkeypatch):
    # The child calls flush_sync after each write and reports the batch failed when it
    # raises: that batch must not reach the file later.
    sink = JSONLSink(path=str(tmp_path / "run.jsonl"), flush_secs=3600)
    disk = FullDisk(monkeypatch, lambda: sink.path)
    sink.open_sync(RunInfo(run_id=RUN_ID))
    try:
        sink.write_sync(logs(1, 2))
        sink.flush_sync()
        disk.fill(room=10)
        sink.write_sync(logs(3, 4))
        with pytest.raises(OSError):
            sink.flush_sync()
        disk.free()
        sink.write_sync(logs(5, 6))
        sink.flush_sync()
        assert jsonl_steps(sink.path) == [1, 2, 5, 6]
    finally:
        sink.close_sync()
    assert jsonl_steps(sink.path) == [1, 2, 5, 6]


def test_jsonl_a_close_on_a_full_disk_leaves_no_torn_line_and_says_what_is_lost(tmp_path, monkeypatch, caplog):
    sink = JSONLSink(path=str(tmp_path / "run.jsonl"), flush_secs=3600)
    disk = FullDisk(monkeypatch, lambda: sink.path)
    sink.open_sync(RunInfo(run_id=RUN_ID))
    sink.write_sync(logs(1, 2) + [Save(run_id=RUN_ID, step=2, checkpoint_dir="c")])  # flushed
    sink.write_sync(logs(3, 10))  # buffered, counted delivered
    disk.fill(room=100)
    with caplog.at_level(logging.WARNING, logger="sinks.jsonl"), pytest.raises(OSError):
        sink.close_sync()
    disk.free()
    assert jsonl_steps(sink.path) == [1, 2, 2]
    lost = [r.getMessage() for r in caplog.records if "at close" in r.getMessage()]
    assert len(lost) == 1 and "last 8 events" in lost[0] and sink.path in lost[0]


# -- JSONL: the file deleted -----------------------------------------------------------------


def test_jsonl_file_deleted_mid_run_is_recreated_with_one_warning(tmp_path, caplog):
    out = tmp_path / "out"
    sink = JSONLSink(dir=str(out), flush_secs=0)
    bus = EventBus([sink], run=RunInfo(run_id=RUN_ID, output_dir=str(out)))
    bus.start()
    try:
        for ev in logs(1, 30):
            bus.publish(ev)
        wait_written(bus, "jsonl", 30)
        shutil.rmtree(out)  # a cleanup job
        with caplog.at_level(logging.WARNING, logger="sinks.jsonl"):
            for ev in logs(31, 60):
                bus.publish(ev)
            wait_written(bus, "jsonl", 60)
            for ev in logs(61, 90):
                bus.publish(ev)
            wait_written(bus, "jsonl", 90)
    finally:
        st = bus.close(timeout=30).sinks["jsonl"]
    assert (st.delivered, st.failed, st.errors) == (90, 0, 0)
    assert jsonl_steps(str(out / f"events-{RUN_ID}.jsonl")) == list(range(31, 91))
    deleted = [r.getMessage() for r in caplog.records if "was deleted" in r.getMessage()]
    assert len(deleted) == 1 and sink.path in deleted[0]


# -- TensorBoard ------------------------------------------------------------------------------


def _tb():
    require_module("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from sinks.tensorboard import TensorBoardSink

    return ea, EventFileLoader, TensorBoardSink


def whole_records(path: str) -> int:
    """The records of an event file, checking that it holds nothing else (no torn tail)."""
    data = open(path, "rb").read()
    offset = count = 0
    while offset < len(data):
        assert offset + 12 <= len(data), f"{path} ends in a torn record header"
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        offset += 12 + length + 4
        assert offset <= len(data), f"{path} ends in a torn record"
        count += 1
    return count


def tb_events(log_dir: str) -> list:
    """Every event of every event file in ``log_dir``, read with tensorboard's loader."""
    _, EventFileLoader, _ = _tb()
    out = []
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        events = list(EventFileLoader(path).Load())
        assert len(events) == whole_records(path)
        assert events[0].file_version == "brain.Event:2"
        out += events
    return out


def loss_steps(log_dir: str) -> list[int]:
    return [ev.step for ev in tb_events(log_dir) for v in ev.summary.value if v.tag == "train/loss"]


def test_tensorboard_a_batch_counted_failed_is_not_in_the_file_even_once_the_disk_frees(tmp_path, monkeypatch):
    _, _, TensorBoardSink = _tb()
    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"), flush_secs=0)
    sink.isolate = False
    sink.circuit_threshold = 10**6
    disk = FullDisk(monkeypatch, lambda: sink.path)
    bus = EventBus([sink], run=RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    bus.start()
    try:
        for ev in logs(1, 50):
            bus.publish(ev)
        wait_written(bus, "tensorboard", 50)
        disk.fill(room=90)
        for ev in logs(51, 100):
            bus.publish(ev)
        wait_written(bus, "tensorboard", 100)
        disk.free()
        for ev in logs(101, 150):
            bus.publish(ev)
    finally:
        st = bus.close(timeout=30).sinks["tensorboard"]
    assert disk.refused > 0
    assert st.received == 150 and st.received == st.delivered + st.failed and st.failed > 0
    steps = loss_steps(str(tmp_path / "tb"))
    assert len(steps) == len(set(steps)) == st.delivered
    assert set(range(1, 51)) <= set(steps) and set(range(101, 151)) <= set(steps)


def test_tensorboard_a_retried_batch_is_written_once_with_its_points(tmp_path, monkeypatch):
    # The sink skips a point it wrote already (same tag, step and value): a batch whose
    # flush failed is not in the file, so its retry must write its points, once.
    ea, _, TensorBoardSink = _tb()
    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"), flush_secs=3600)
    disk = FullDisk(monkeypatch, lambda: sink.path)
    sink.open_sync(RunInfo(run_id=RUN_ID))
    try:
        sink.write_sync(logs(1, 2))  # buffered, counted delivered
        disk.fill(room=30)
        # One step: the retry's point is the one the sink would take as written already.
        batch = logs(3, 3) + [Save(run_id=RUN_ID, step=3, checkpoint_dir="c")]
        with pytest.raises(OSError, match="tfevents"):
            sink.write_sync(batch)
        assert loss_steps(sink.log_dir) == []
        disk.free()
        sink.write_sync(batch)
    finally:
        sink.close_sync()
    acc = ea.EventAccumulator(sink.log_dir)
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == [(s, round(1.0 / s, 6)) for s in (1, 2, 3)]
    assert loss_steps(sink.log_dir) == [1, 2, 3]


def test_tensorboard_an_isolated_childs_flush_that_fails_leaves_its_batch_out_and_its_retry_in(tmp_path, monkeypatch):
    # The child writes a batch, then flush_sync; when that raises, the batch is
    # reported failed: it must not reach the file later, and its retry must.
    _, _, TensorBoardSink = _tb()
    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"), flush_secs=3600)
    disk = FullDisk(monkeypatch, lambda: sink.path)
    sink.open_sync(RunInfo(run_id=RUN_ID))
    try:
        sink.write_sync(logs(1, 1))
        sink.flush_sync()
        disk.fill(room=20)
        sink.write_sync(logs(2, 2))
        with pytest.raises(OSError):
            sink.flush_sync()
        assert loss_steps(sink.log_dir) == [1]
        disk.free()
        sink.write_sync(logs(2, 2))
        sink.flush_sync()
        assert loss_steps(sink.log_dir) == [1, 2]
    finally:
        sink.close_sync()
    assert loss_steps(sink.log_dir) == [1, 2]


def test_tensorboard_a_close_on_a_full_disk_leaves_whole_records(tmp_path, monkeypatch, caplog):
    _, _, TensorBoardSink = _tb()
    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"), flush_secs=3600)
    disk = FullDisk(monkeypatch, lambda: sink.path)
    sink.open_sync(RunInfo(run_id=RUN_ID))
    sink.write_sync(logs(1, 2) + [Save(run_id=RUN_ID, step=2, checkpoint_dir="c")])
    sink.write_sync(logs(3, 9))
    disk.fill(room=50)
    with caplog.at_level(logging.WARNING, logger="sinks.tensorboard"), pytest.raises(OSError):
        sink.close_sync()
    disk.free()
    assert loss_steps(sink.log_dir) == [1, 2]
    lost = [r.getMessage() for r in caplog.records if "at close" in r.getMessage()]
    assert len(lost) == 1 and "last 7 events" in lost[0]


def test_tensorboard_log_dir_deleted_mid_run_goes_on_in_a_new_readable_event_file(tmp_path, caplog):
    ea, _, TensorBoardSink = _tb()
    from tensorboard.plugins.hparams import metadata as hp_metadata

    log_dir = tmp_path / "out" / "logs"
    sink = TensorBoardSink(log_dir=str(log_dir), flush_secs=0)
    sink.isolate = False
    bus = EventBus([sink], run=RunInfo(run_id=RUN_ID, output_dir=str(tmp_path / "out")))
    bus.start()
    try:
        bus.publish(TrainBegin(run_id=RUN_ID, step=0, config={"learning_rate": 0.1}, hparams={"learning_rate": 0.1}))
        for ev in logs(1, 30):
            bus.publish(ev)
        wait_written(bus, "tensorboard", 31)
        first = sink.path
        shutil.rmtree(tmp_path / "out")  # a cleanup job
        with caplog.at_level(logging.WARNING, logger="sinks.tensorboard"):
            for ev in logs(31, 60):
                bus.publish(ev)
            wait_written(bus, "tensorboard", 61)
            for ev in logs(61, 90):
                bus.publish(ev)
            wait_written(bus, "tensorboard", 91)
    finally:
        st = bus.close(timeout=30).sinks["tensorboard"]
    assert (st.delivered, st.failed, st.errors) == (91, 0, 0)
    assert loss_steps(str(log_dir)) == list(range(31, 91))
    deleted = [r.getMessage() for r in caplog.records if "was deleted" in r.getMessage()]
    assert len(deleted) == 1 and first in deleted[0]
    acc = ea.EventAccumulator(str(log_dir))
    acc.Reload()
    assert hp_metadata.SESSION_START_INFO_TAG in acc.summary_metadata  # the HParams session is in the new file


def test_tensorboard_file_deleted_before_its_first_flush_holds_train_begin_once(tmp_path):
    # The TrainBegin record is still in the buffer when the file goes: the new file
    # gets it from there, not a second time as its opening record.
    _, _, TensorBoardSink = _tb()
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import metadata as hp_metadata

    log_dir = tmp_path / "out" / "logs"
    sink = TensorBoardSink(log_dir=str(log_dir), flush_secs=3600)
    sink.isolate = False
    bus = EventBus([sink], run=RunInfo(run_id=RUN_ID, output_dir=str(tmp_path / "out")))
    bus.start()
    try:
        bus.publish(TrainBegin(run_id=RUN_ID, step=0, config={"learning_rate": 0.1}, hparams={"learning_rate": 0.1}))
        for ev in logs(1, 10):
            bus.publish(ev)
        wait_written(bus, "tensorboard", 11)
        shutil.rmtree(tmp_path / "out")
        bus.publish(Save(run_id=RUN_ID, step=10, checkpoint_dir="c"))  # flushes
        wait_written(bus, "tensorboard", 12)
    finally:
        bus.close(timeout=30)
    [path] = log_dir.iterdir()
    tags = [v.tag for ev in EventFileLoader(str(path)).Load() for v in ev.summary.value]
    assert tags.count(hp_metadata.SESSION_START_INFO_TAG) == 1 and tags.count("args/text_summary") == 1
    assert loss_steps(str(log_dir)) == list(range(1, 11))


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "in-a-child-process"])
def test_an_open_that_cannot_succeed_fails_its_batches_at_once_naming_the_path(tmp_path, caplog, isolate):
    # The sink's file path is a directory (or read-only, or a file where a folder
    # goes): retrying as for a network outage cost every batch its retries and
    # backoff, and held the end of training up to the close deadline. The error
    # names the path (an OSError's repr leaves it out).
    from sinks.jsonl import JSONLSink

    target = tmp_path / "events.jsonl"
    target.mkdir()
    sink = JSONLSink(path=str(target))
    sink.isolate = isolate
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with EventBus([sink], run=RunInfo(run_id="r")) as bus:
            for step in range(1, 21):
                bus.publish(Log(step=step, values={"loss": 1.0}))
    st = bus.stats().sinks["jsonl"]
    assert (st.received, st.delivered, st.failed, st.retries) == (20, 0, 20, 0)
    assert "IsADirectoryError" in st.last_error and str(target) in st.last_error
    assert str(target) in bus.open_errors()["jsonl"]
    assert any(str(target) in r.getMessage() for r in caplog.records if "failed in open" in r.getMessage())
