"""A ThreadedSink whose ``write_sync`` hangs (a jsonl file on a hard NFS mount whose
server died): the writes the bus tries meanwhile must not pile up on the sink's thread.
Each attempt used to queue a job of its own behind the hung call, each holding its
whole batch, for as long as the hang lasted (and after the bus closed): the training
process's memory grew by a batch every attempt."""

from __future__ import annotations

import asyncio
import collections
import gc
import threading
import time
from typing import Sequence

import pytest

from eventbus import EventBus, Log, ThreadedSink
from eventbus.events import BaseEvent
from eventbus.sink import _Write

from tests.conftest import wait_for




class Hanging(ThreadedSink):
    """Its first ``write_sync`` call blocks until ``gate`` is set (when ``hang``);
    records the steps of every call that returned."""

    name = "hanging"  # type: ignore[misc]
    events = (Log,)  # type: ignore[misc]

    def __init__(self, hang: bool = True) -> None:
        self.hang = hang
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.lock = threading.Lock()
        self.calls: list[list[int]] = []

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        steps = [ev.step for ev in batch]  # type: ignore[attr-defined]
        if self.hang and not self.entered.is_set():
            self.entered.set()
            assert self.gate.wait(60)
        with self.lock:
            self.calls.append(steps)


def jobs_holding_a_batch(sink: ThreadedSink) -> list[_Write]:
    """The write jobs still alive that keep a batch of ``sink``'s (the thread's queue,
    the sink's own references, the call the thread is in)."""
    gc.collect()
    return [
        obj
        for obj in gc.get_objects()
        if type(obj) is _Write and obj.batch is not None and getattr(obj.write_sync, "__self__", None) is sink
    ]


def test_a_hung_write_queues_no_more_writes_and_keeps_no_batches_given_up_on() -> None:
    sink = Hanging()
    sink.write_timeout = 0.2
    sink.retry_backoff = 0.01
    sink.retry_backoff_max = 0.01
    sink.max_retries = 1  # each batch is given up on quickly: the bus moves on to the next
    sink.circuit_threshold = 1_000_000  # every batch is tried on the sink (no circuit breaker)
    sink.max_delay = 0.0
    sink.max_batch_size = 50
    bus = EventBus([sink])
    bus.start()
    step = 0
    try:
        step += 1
        bus.publish(Log(step=step, values={"loss": 1.0}))
        wait_for(timeout=60, what="the write that hangs", predicate=sink.entered.is_set)
        # Publish while the call hangs: several batches are tried, timed out and given
        # up on, each attempt bounded by write_timeout.
        most_queued = 0
        start = time.monotonic()
        while time.monotonic() - start < 3.0 or bus.stats().sinks["hanging"].failed < 150:
            assert time.monotonic() - start < 60, "the bus gave up on no batches"
            for _ in range(25):
                step += 1
                bus.publish(Log(step=step, values={"loss": 1.0}))
            thread = sink._thread
            assert thread is not None
            most_queued = max(most_queued, thread.queued)
            time.sleep(0.02)
        stats = bus.stats().sinks["hanging"]
        assert stats.delivered == 0 and stats.failed >= 150 and stats.retries >= 3
        # Nothing queued behind the hung call (the write being tried waits for it).
        assert most_queued <= 1
        # Only the hung call holds a batch: none given up on is kept.
        holding = jobs_holding_a_batch(sink)
        assert len(holding) <= 1, f"{len(holding)} write jobs keep their batches"
        del holding
        assert sink.calls == []  # the hung call has not returned, and nothing else ran

        # The mount comes back: the hung call returns, and later events are written,
        # each once (a slow machine must not time these out: the outage is over).
        sink.write_timeout = 30.0
        sink.max_retries = 5
        sink.gate.set()
        wait_for(timeout=60, what="the hung call to return", predicate=lambda: len(sink.calls) >= 1)
        later = range(step + 1, step + 201)
        for s in later:
            bus.publish(Log(step=s, values={"loss": 1.0}))
        wait_for(
            lambda: set(later) <= {s for call in list(sink.calls) for s in call}, 60, "the later events to be written"
        )
    finally:
        sink.gate.set()
        stats = bus.close(30).sinks["hanging"]
    written = collections.Counter(s for call in sink.calls for s in call)
    assert max(written.values()) == 1  # nothing written twice
    assert all(written[s] == 1 for s in later)
    assert sink.calls[0] == [1]  # the hung call was the first batch's
    assert stats.delivered >= len(later)
    assert jobs_holding_a_batch(sink) == []


def test_a_write_given_up_on_before_it_started_lets_go_of_its_batch() -> None:
    """The thread is busy (here with a job of its own) when a write times out: that
    write never runs, its job stays on the queue until the thread gets to it, but
    without the batch; the retry waits for the thread instead of queuing another."""
    sink = Hanging(hang=False)
    busy = threading.Event()
    release = threading.Event()

    def block() -> None:
        busy.set()
        release.wait(60)

    async def main() -> None:
        batch = [Log(step=1, values={"loss": 1.0})]
        sink._worker().post(block)
        assert await asyncio.get_running_loop().run_in_executor(None, busy.wait, 60)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sink.write(batch), 0.1)
        thread = sink._thread
        assert thread is not None
        assert thread.queued == 1
        assert jobs_holding_a_batch(sink) == []  # the queued job no longer keeps the batch
        with pytest.raises(asyncio.TimeoutError):  # the retry, while the thread is still busy
            await asyncio.wait_for(sink.write(batch), 0.1)
        assert thread.queued == 1  # the retry queued nothing behind the job given up on
        release.set()
        await asyncio.wait_for(sink.write(batch), 30)  # the thread is free: written, once
        assert sink.calls == [[1]]
        assert jobs_holding_a_batch(sink) == []

    try:
        asyncio.run(main())
    finally:
        release.set()
        sink._release(False)
