"""A ThreadedSink write that outlasts ``write_timeout``: the bus's retry of the batch
waits for the call still running on the sink's thread instead of writing the batch a
second time (a stalled NFS mount under a jsonl or in-process TensorBoard sink wrote
every event of the batch twice)."""

from __future__ import annotations

import collections
import glob
import json
import os
import threading
from typing import Sequence

from eventbus import EventBus, Log, RunInfo, ThreadedSink, TransientSinkError
from eventbus.events import BaseEvent
from sinks.jsonl import JSONLSink
from sinks.tensorboard import TensorBoardSink
from tests.conftest import wait_for

STEPS = 40


def fast_retries(sink: ThreadedSink, max_retries: int = 1000) -> None:
    """A short write timeout, almost no backoff, and retries that do not run out
    while a test holds a write: the bus times the held call out and retries it many
    times over."""
    sink.write_timeout = 0.1
    sink.retry_backoff = 0.01
    sink.retry_backoff_max = 0.01
    sink.max_retries = max_retries
    sink.max_delay = 0.0


class StallOnce:
    """Holds the first write it is given (after the sink did its work, as a flush to a
    stalled filesystem blocks) until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.stalled = threading.Event()

    def __call__(self) -> None:
        if not self.stalled.is_set():
            self.stalled.set()
            assert self.release.wait(60)


def hold_until_retried(bus: EventBus, name: str, stall: StallOnce, retries: int = 2) -> None:
    """Publish the steps, and let the stalled write return only once the bus timed it
    out and retried it (``retries`` times) while it was still running."""
    for step in range(1, STEPS + 1):
        bus.publish(Log(step=step, values={"loss": float(step)}))
    wait_for(stall.stalled.is_set, 60, what="the stalled write")
    wait_for(lambda: bus.stats().sinks[name].retries >= retries, 60, what="the bus to retry the stalled write")
    stall.release.set()


class StallingJSONL(JSONLSink):
    def __init__(self, stall: StallOnce, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stall = stall

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        super().write_sync(batch)
        self.stall()


def test_jsonl_write_that_outlasts_the_timeout_is_written_once(tmp_path: os.PathLike[str]) -> None:
    stall = StallOnce()
    sink = StallingJSONL(stall, dir=str(tmp_path), flush_secs=0)
    sink.isolate = False
    fast_retries(sink)
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path), run_id="dup"))
    bus.start()
    try:
        hold_until_retried(bus, "jsonl", stall)
    finally:
        stats = bus.close(30).sinks["jsonl"]
    assert sink.path is not None
    with open(sink.path, "rb") as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert collections.Counter(steps) == collections.Counter(range(1, STEPS + 1))  # each step once
    assert (stats.delivered, stats.failed, stats.dropped) == (STEPS, 0, 0)
    assert stats.retries >= 2


class StallingTensorBoard(TensorBoardSink):
    def __init__(self, stall: StallOnce, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stall = stall

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        super().write_sync(batch)
        self.stall()


def test_in_process_tensorboard_write_that_outlasts_the_timeout_is_written_once(tmp_path: os.PathLike[str]) -> None:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    stall = StallOnce()
    log_dir = os.path.join(str(tmp_path), "logs")
    sink = StallingTensorBoard(stall, log_dir=log_dir, flush_secs=0.0)
    sink.isolate = False
    fast_retries(sink)
    bus = EventBus([sink], run=RunInfo(output_dir=str(tmp_path), run_id="dup"))
    bus.start()
    try:
        hold_until_retried(bus, "tensorboard", stall)
    finally:
        stats = bus.close(30).sinks["tensorboard"]
    points: collections.Counter[int] = collections.Counter()
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for ev in EventFileLoader(path).Load():
            for value in ev.summary.value:
                if value.tag == "train/loss":
                    points[ev.step] += 1
    assert points == collections.Counter(range(1, STEPS + 1))  # each step once
    assert (stats.delivered, stats.failed, stats.dropped) == (STEPS, 0, 0)


class Recording(ThreadedSink):
    """Records what each ``write_sync`` call got and the calls that completed; the
    first call is held until ``release`` is set, and then ``first`` happens."""

    name = "recording"  # type: ignore[misc]

    def __init__(self, first: str = "returns") -> None:
        self.first = first
        self.stall = StallOnce()
        self.calls: list[list[int]] = []
        self.written: list[int] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def open_sync(self, run: RunInfo) -> None:
        pass

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        steps = [ev.step for ev in batch]  # type: ignore[attr-defined]
        with self.lock:
            self.calls.append(steps)
            first = len(self.calls) == 1
        self.stall()
        if first and self.first == "raises":
            raise TransientSinkError("the held write failed after all")
        with self.lock:
            self.written.extend(steps)

    def close_sync(self) -> None:
        self.closed.set()


def test_a_held_write_that_then_fails_is_written_again_by_the_retry() -> None:
    sink = Recording(first="raises")
    fast_retries(sink)
    bus = EventBus([sink])
    bus.start()
    try:
        hold_until_retried(bus, "recording", sink.stall)
    finally:
        stats = bus.close(30).sinks["recording"]
    assert sorted(sink.written) == list(range(1, STEPS + 1))  # each step once
    assert sink.calls[1] == sink.calls[0]  # the retry wrote the failed batch again
    assert (stats.delivered, stats.failed) == (STEPS, 0)


def test_a_write_that_never_returns_times_every_retry_out_and_later_batches_never_run() -> None:
    """The retries of a hung call time out as the first attempt did (the bus gives the
    batch up), and batches given up on before the thread got to them never run, even
    once the hung call returns: only the hung call reached ``write_sync``."""
    sink = Recording()
    fast_retries(sink, max_retries=2)
    sink.max_batch_size = 10
    bus = EventBus([sink])
    bus.start()
    try:
        for step in range(1, STEPS + 1):
            bus.publish(Log(step=step, values={"loss": float(step)}))
        wait_for(lambda: bus.stats().sinks["recording"].failed == STEPS, 60, what="the bus to give every batch up")
        sink.stall.release.set()
    finally:
        stats = bus.close(30).sinks["recording"]
    assert sink.closed.wait(30)  # close_sync ran after the hung call returned
    assert len(sink.calls) == 1
    assert (stats.delivered, stats.failed, stats.dropped) == (0, STEPS, STEPS)
    assert stats.retries >= 2


def test_the_close_deadline_cuts_off_a_retry_waiting_for_a_hung_write() -> None:
    sink = Recording()
    fast_retries(sink)
    bus = EventBus([sink])
    bus.start()
    try:
        for step in range(1, STEPS + 1):
            bus.publish(Log(step=step, values={"loss": float(step)}))
        wait_for(sink.stall.stalled.is_set, 60, what="the stalled write")
        wait_for(lambda: bus.stats().sinks["recording"].retries >= 2, 60, what="the bus to retry the stalled write")
        stats = bus.close(0.2).sinks["recording"]  # returns although the write still hangs
        assert not sink.closed.is_set()
    finally:
        sink.stall.release.set()
    assert stats.delivered + stats.abandoned == STEPS and stats.abandoned > 0
    assert sink.closed.wait(30)  # the released thread ran close_sync once the call returned
    assert len(sink.calls) == 1
