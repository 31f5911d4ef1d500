"""The bus end to end: order per sink, fan-out, subscriptions, batching, urgency,
lifecycle. Helpers here (Recorder, wait_for, assert_identity) are shared by the other
bus tests."""

from __future__ import annotations

import errno
import math
import re
import socket
import threading
import time
from typing import Any, Callable, Sequence

import pytest

from eventbus import (
    BusStateError,
    EventBus,
    Evaluate,
    Log,
    RunInfo,
    Save,
    Sink,
    SinkConfigError,
    StepEnd,
    ThreadedSink,
    TrainEnd,
)
from eventbus.events import EVENT_TYPES, BaseEvent
from eventbus.stats import BusStats
from eventbus.values import Snapshot
from tests.conftest import wait_for


class Recorder(Sink):
    """An async sink that keeps every batch it is given."""

    def __init__(self, name: str = "rec", events: Sequence[type[BaseEvent]] = EVENT_TYPES, **opts: Any) -> None:
        self.name = name  # type: ignore[misc]
        self.events = tuple(events)  # type: ignore[misc]
        self.batches: list[list[BaseEvent]] = []
        self.opened_with: RunInfo | None = None
        self.closed = False
        for k, v in opts.items():
            setattr(self, k, v)

    async def open(self, run: RunInfo) -> None:
        self.opened_with = run

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.batches.append(list(batch))

    async def close(self) -> None:
        self.closed = True

    @property
    def got(self) -> list[BaseEvent]:
        return [e for b in self.batches for e in b]

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self.got]


class GateSink(ThreadedSink):
    """A blocking sink whose writes wait until the test releases them."""

    def __init__(self, name: str = "gate", **opts: Any) -> None:
        self.name = name  # type: ignore[misc]
        self.entered = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[BaseEvent]] = []
        for k, v in opts.items():
            setattr(self, k, v)

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        self.entered.set()
        self.release.wait(30)
        self.batches.append(list(batch))

    @property
    def steps(self) -> list[int]:
        return [e.step for b in self.batches for e in b]


def assert_identity(stats: BusStats) -> None:
    """received == delivered + dropped + spooled + queue_depth, for every sink."""
    assert stats.sinks, "no sinks in stats"
    for s in stats.sinks.values():
        assert s.received == s.delivered + s.dropped + s.spooled + s.queue_depth, s
        if not s.spooled:
            # Without a spool, every drop has exactly one reason.
            assert s.dropped == s.overflow + s.failed + s.abandoned + getattr(s, "skipped", 0), s
        assert s.queue_depth <= s.queue_high_water or s.queue_high_water == 0, s
    assert stats.ingress_dropped + stats.ingress_depth <= stats.published, stats


def settled(bus: EventBus, name: str, received: int) -> bool:
    """The pump has handed ``received`` events to sink ``name`` and finished offering them
    (the queue's high-water mark, updated last, included: stats are read unlocked)."""
    s = bus.stats()
    st = s.sinks[name]
    return (
        s.ingress_depth == 0
        and st.received == received
        and st.received == st.delivered + st.dropped + st.spooled + st.queue_depth
        and st.queue_high_water >= st.queue_depth
    )


def _publish_step_end(bus: EventBus, step: int) -> None:
    bus.publish(StepEnd(step=step))


def _publish_log(bus: EventBus, step: int) -> None:
    bus.publish_log("", 0, step, None, Snapshot(loss=1.0))


PUBLISHERS = pytest.mark.parametrize("publish", [_publish_step_end, _publish_log], ids=["publish", "publish_log"])
"""The two ways onto the ingress (publish_log has its own copy of publish's body)."""


def test_order_per_sink_is_publish_order_and_batches_respect_max_batch_size() -> None:
    rec = Recorder(max_batch_size=7, max_delay=0.01)
    with EventBus([rec], flush_interval=0.01) as bus:
        for i in range(2000):
            bus.publish(StepEnd(step=i))
    assert rec.steps == list(range(2000))
    assert max(len(b) for b in rec.batches) <= 7
    stats = bus.stats()
    assert stats.sinks["rec"].delivered == 2000
    assert stats.sinks["rec"].dropped == 0
    assert_identity(stats)


def test_fan_out_every_sink_gets_every_event_in_order() -> None:
    sinks = [Recorder(f"r{i}", max_delay=0.01) for i in range(3)]
    with EventBus(sinks) as bus:
        for i in range(500):
            bus.publish(StepEnd(step=i) if i % 2 else Log(step=i, values={"loss": float(i)}))
    for s in sinks:
        assert s.steps == list(range(500))
        assert s.opened_with is bus.run and s.closed
    stats = bus.stats()
    assert stats.delivered == 1500
    assert_identity(stats)


def test_subscription_filtering_and_wants() -> None:
    logs = Recorder("logs", events=(Log,), max_delay=0.01)
    steps = Recorder("steps", events=(StepEnd, Evaluate), max_delay=0.01)
    bus = EventBus([logs, steps])
    assert bus.wants(Log) and bus.wants(StepEnd) and bus.wants(Evaluate)
    assert not bus.wants(Save) and not bus.wants(TrainEnd)
    with bus:
        for i in range(10):
            bus.publish(Log(step=i, values={"x": i}))
            bus.publish(StepEnd(step=i))
            bus.publish(Save(step=i, checkpoint_dir="c"))  # nobody subscribes
    assert [type(e) for e in logs.got] == [Log] * 10
    assert [type(e) for e in steps.got] == [StepEnd] * 10
    stats = bus.stats()
    assert stats.sinks["logs"].received == 10 and stats.sinks["steps"].received == 10
    assert stats.published == 30
    assert_identity(stats)
    assert not EventBus().wants(StepEnd)


def test_sample_interval_only_when_every_subscriber_samples() -> None:
    """A type is sampled (one per the shortest max_delay of its sinks) only when every
    sink subscribed to it says so; one sink that needs each event turns it off."""
    bar = Recorder("bar", events=(StepEnd, Log), max_delay=0.2, sampled=(StepEnd,))
    slow_bar = Recorder("slow_bar", events=(StepEnd,), max_delay=0.5, sampled=(StepEnd,))
    every = Recorder("every", events=(StepEnd,), max_delay=0.5)
    assert EventBus([bar, slow_bar]).sample_interval(StepEnd) == 0.2
    assert EventBus([bar, slow_bar, every]).sample_interval(StepEnd) == 0.0
    assert EventBus([bar]).sample_interval(Log) == 0.0  # subscribed, not sampled
    assert EventBus([bar]).sample_interval(Save) == 0.0  # nobody subscribes
    assert EventBus().sample_interval(StepEnd) == 0.0


def test_max_delay_holds_a_partial_batch_until_it_fills() -> None:
    rec = Recorder(max_batch_size=4, max_delay=60.0)
    with EventBus([rec], flush_interval=0.01) as bus:
        for i in range(3):
            bus.publish(StepEnd(step=i))
        wait_for(lambda: settled(bus, "rec", 3), what="3 events queued")
        time.sleep(0.2)
        assert rec.batches == []  # the batch is not full and max_delay is far away
        bus.publish(StepEnd(step=3))
        wait_for(lambda: len(rec.got) == 4, what="the full batch")
        assert [len(b) for b in rec.batches] == [4]
        bus.close(timeout=5)


def test_short_max_delay_writes_a_partial_batch() -> None:
    rec = Recorder(max_batch_size=1000, max_delay=0.05)
    with EventBus([rec], flush_interval=0.01) as bus:
        for i in range(3):
            bus.publish(StepEnd(step=i))
        wait_for(lambda: rec.steps == [0, 1, 2], what="a partial batch after max_delay")


@pytest.mark.parametrize("urgent_event", [Save(checkpoint_dir="ck"), Evaluate(metrics={"eval_loss": 1.0}), TrainEnd()])
def test_urgent_events_flush_at_once(urgent_event: BaseEvent) -> None:
    # Both the pump's flush interval and the sink's max_delay are far away: only the
    # urgent event can get these written before the bus closes.
    rec = Recorder(max_batch_size=1000, max_delay=60.0)
    with EventBus([rec], flush_interval=60.0) as bus:
        bus.publish(StepEnd(step=1))
        bus.publish(StepEnd(step=2))
        bus.publish(urgent_event)
        wait_for(lambda: len(rec.got) == 3, what="urgent flush")
        assert [type(e) for e in rec.got] == [StepEnd, StepEnd, type(urgent_event)]
        bus.close(timeout=5)


def test_urgent_set_is_configurable() -> None:
    rec = Recorder(max_batch_size=1000, max_delay=60.0)
    with EventBus([rec], flush_interval=60.0, urgent=(StepEnd,)) as bus:
        bus.publish(StepEnd(step=1))
        wait_for(lambda: rec.steps == [1], what="custom urgent type")


@PUBLISHERS
def test_an_ingress_an_eighth_full_wakes_the_pump_before_the_flush_interval(publish: Callable[[EventBus, int], None]) -> None:
    # A burst must reach the sinks' queues (where each sink's overflow policy applies)
    # rather than wait a whole flush interval in the ingress, whose overflow drops.
    rec = Recorder(max_batch_size=8, max_delay=0.0)
    with EventBus([rec], ingress_capacity=64, flush_interval=60.0) as bus:
        for step in range(1, 8):  # below 64 // 8 = 8 waiting events: the pump sleeps on
            publish(bus, step)
        time.sleep(0.3)
        assert rec.got == []
        for step in range(8, 10):  # the 9th finds 8 waiting and wakes it
            publish(bus, step)
        wait_for(lambda: rec.steps == list(range(1, 10)), what="the pump woken by a deep ingress")
        # One wake per deep ingress, not one per event published while it is deep
        # (each wake is a syscall on the publishing thread); and after the pump drained
        # it, the next deep ingress wakes it again.
        assert bus._loop is not None
        real = bus._loop.call_soon_threadsafe
        wakes = []

        def counting(*args: Any, **kwargs: Any) -> Any:
            wakes.append(args[0])
            return real(*args, **kwargs)

        bus._loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        for step in range(10, 40):
            publish(bus, step)
        wait_for(lambda: rec.steps == list(range(1, 40)), what="the second deep ingress")
        assert 1 <= len(wakes) <= 3  # a drain between publishes may allow another
        assert bus.stats().ingress_dropped == 0
        bus.close(timeout=5)


def test_close_delivers_everything_queued_and_closes_sinks() -> None:
    rec = Recorder(max_batch_size=1000, max_delay=60.0)
    bus = EventBus([rec], flush_interval=60.0).start()
    for i in range(100):
        bus.publish(StepEnd(step=i))
    stats = bus.close(timeout=5)
    assert rec.steps == list(range(100)) and rec.closed
    assert stats.sinks["rec"].delivered == 100 and not stats.running
    assert_identity(stats)


def test_events_published_before_start_are_delivered() -> None:
    rec = Recorder(max_delay=0.01)
    bus = EventBus([rec])
    bus.publish(StepEnd(step=7))
    with bus:
        pass
    assert rec.steps == [7]


@PUBLISHERS
def test_publish_after_close_is_counted_not_raised(publish: Callable[[EventBus, int], None]) -> None:
    rec = Recorder()
    bus = EventBus([rec]).start()
    publish(bus, 1)
    bus.close(timeout=5)
    publish(bus, 2)  # must not raise
    publish(bus, 3)
    stats = bus.stats()
    assert stats.ingress_dropped == 2
    assert stats.published == 3
    assert rec.steps == [1]
    assert_identity(stats)
    assert bus.close() is not None  # closing twice is harmless


def test_close_without_start_counts_what_was_published() -> None:
    bus = EventBus([Recorder()])
    bus.publish(StepEnd())
    stats = bus.close()
    assert stats.ingress_dropped == 1 and stats.published == 1
    with pytest.raises(BusStateError):
        bus.start()


def test_lifecycle_state_and_configuration_errors() -> None:
    bus = EventBus([Recorder("a")])
    assert not bus.running and "new" in repr(bus)
    with pytest.raises(SinkConfigError, match="already attached"):
        bus.add_sink(Recorder("a"))
    with pytest.raises(SinkConfigError, match="capacity"):
        bus.add_sink(Recorder("b", capacity=0))
    with pytest.raises(SinkConfigError, match="overflow"):
        bus.add_sink(Recorder("c", overflow="drop_oldest"))
    with pytest.raises(SinkConfigError, match="events"):
        bus.add_sink(Recorder("d", events=(int,)))
    with pytest.raises(SinkConfigError, match="Sink instance"):
        bus.add_sink(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ingress_capacity"):
        EventBus(ingress_capacity=0)
    with pytest.raises(ValueError, match="flush_interval"):
        EventBus(flush_interval=0)
    assert bus.start() is bus.start()  # idempotent
    assert bus.running
    with pytest.raises(BusStateError):
        bus.add_sink(Recorder("e"))
    bus.close(timeout=5)
    assert not bus.running and "closed" in repr(bus)


def test_sinks_run_on_rank_zero_unless_all_ranks() -> None:
    only0 = Recorder("only0")
    every = Recorder("every", all_ranks=True)
    bus = EventBus([only0, every], run=RunInfo(rank=1, world_size=2))
    assert bus.sinks == [every]
    assert not EventBus([Recorder("rank0_only")], run=RunInfo(rank=1, world_size=2)).wants(StepEnd)
    with bus:
        bus.publish(StepEnd(step=1, rank=1))
    assert every.steps == [1] and only0.got == []


def test_urgent_event_behind_more_than_one_batch_is_still_flushed_at_once() -> None:
    rec = Recorder(max_batch_size=4, max_delay=60.0)
    with EventBus([rec], flush_interval=60.0) as bus:
        for i in range(5):
            bus.publish(StepEnd(step=i))
        bus.publish(Save(step=5, checkpoint_dir="ck"))  # 6 queued: one full batch, then 2
        wait_for(lambda: len(rec.got) == 6, what="the whole backlog up to the urgent event")
        assert [len(b) for b in rec.batches] == [4, 2]
        bus.close(timeout=5)


def test_events_published_during_close_are_counted_not_left_queued():
    """A thread that keeps publishing while close() runs: after close, nothing is
    left in the ingress and every publish is accounted for."""
    import threading

    from eventbus import EventBus, Sink, StepEnd

    class Quiet(Sink):
        name = "quiet"

        async def write(self, batch):
            pass

    bus = EventBus([Quiet()]).start()
    stop = threading.Event()
    calls = 0

    def produce() -> None:
        nonlocal calls
        while not stop.is_set():
            bus.publish(StepEnd(step=calls))
            calls += 1

    t = threading.Thread(target=produce)
    t.start()
    stats = bus.close(timeout=5)
    stop.set()
    t.join()
    final = bus.stats()
    assert final.ingress_depth == 0
    assert final.published == calls
    sink = final.sinks["quiet"]
    assert sink.received == sink.delivered + sink.dropped + sink.spooled + sink.queue_depth
    assert final.published == sink.received + final.ingress_dropped
    assert stats.ingress_depth == 0


def test_a_metric_event_with_a_step_that_is_not_an_int_is_counted_and_breaks_nothing(caplog) -> None:
    """msgspec does not check types when an event is built: Log(step=None) (a callback
    logging before global_step is set) or step="7" reaches the bus. Such an event is
    counted as failed for each sink it was for, with one warning per kind; a numpy
    integer step goes on as an int. Nothing else changes: the other events, the
    marks (also a sink's resume mark, compared with each step) and the identity."""
    import numpy as np

    plain = Recorder("plain", max_delay=0.0)
    resumed = Recorder("resumed", events=(Log, Evaluate), max_delay=0.0)
    bus = EventBus([plain, resumed], flush_interval=0.01, resume_marks={"resumed": 0}).start()
    with caplog.at_level("WARNING", logger="eventbus"):
        bus.publish(Log(step=1, values={"loss": 1.0}))
        bus.publish(Log(step=None, values={"loss": 2.0}))  # type: ignore[arg-type]
        bus.publish(Log(step="7", values={"loss": 2.0}))  # type: ignore[arg-type]
        bus.publish(Log(step="8", values={"loss": 2.0}))  # type: ignore[arg-type]  # same kind: no second warning
        bus.publish(Evaluate(step=2.5, metrics={"eval_loss": 1.0}))  # type: ignore[arg-type]
        bus.publish_log("", 0, None, None, Snapshot(loss=3.0))  # type: ignore[arg-type]
        bus.publish(Log(step=np.int64(3), values={"loss": 1.0}))  # type: ignore[arg-type]
        bus.publish(StepEnd(step=3, time_ns=None))  # type: ignore[arg-type]  # not a metric: delivered, no lag
        bus.publish(("not", "an", "event"))  # type: ignore[arg-type]
        for i in range(4, 10):
            bus.publish(Log(step=i, values={"loss": 1.0}))
        wait_for(lambda: plain.steps[-1:] == [9] and resumed.steps[-1:] == [9], what="the events after the bad ones")
        assert bus.running
        stats = bus.close(timeout=5)
    assert plain.steps == [1, 3, 3] + list(range(4, 10))
    assert resumed.steps == [1, 3] + list(range(4, 10))
    assert all(type(e.step) is int for e in plain.got)
    assert (stats.sinks["plain"].failed, stats.sinks["resumed"].failed) == (5, 5)
    assert bus.high_water_marks() == {"plain": 9, "resumed": 9}
    assert_identity(stats)
    warnings = [r.getMessage() for r in caplog.records if "is not delivered" in r.getMessage()]
    assert len(warnings) == 4, warnings  # Log/None (publish and publish_log), Log/str, Evaluate/float, the tuple
    assert any("Log event with step=None (NoneType)" in w for w in warnings)
    assert any("step='7' (str)" in w for w in warnings)
    assert any("Evaluate event with step=2.5 (float)" in w for w in warnings)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ingress_capacity": "1000"}, "ingress_capacity must be an int >= 1, got '1000'"),
        ({"ingress_capacity": 0}, "ingress_capacity must be an int >= 1, got 0"),
        ({"flush_interval": "0.2"}, "flush_interval must be a number of seconds > 0, got '0.2'"),
        ({"flush_interval": 0}, "flush_interval must be a number of seconds > 0, got 0"),
        ({"close_timeout": "5"}, "close_timeout must be a number of seconds, got '5'"),
        ({"close_timeout": None}, "close_timeout must be a number of seconds, got None"),
        ({"urgent": Save}, "urgent must be an iterable of event classes"),
        ({"urgent": ("Save",)}, "urgent must be an iterable of event classes"),
        ({"run": {"output_dir": "x"}}, "run must be an eventbus.RunInfo or None, got dict"),
    ],
)
def test_bus_options_of_the_wrong_type_are_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SinkConfigError, match="EventBus: " + re.escape(message)):
        EventBus([Recorder()], **kwargs)


def test_close_checks_its_timeout_before_doing_anything() -> None:
    rec = Recorder(max_delay=0.0)
    bus = EventBus([rec], flush_interval=0.01).start()
    bus.publish(StepEnd(step=1))
    for bad in ("5", float("nan"), True):
        with pytest.raises(SinkConfigError, match=r"close\(\): timeout must be a number of seconds"):
            bus.close(bad)  # type: ignore[arg-type]
    assert bus.running
    bus.publish(StepEnd(step=2))
    stats = bus.close(math.inf)  # no deadline
    assert rec.steps == [1, 2] and not bus.running
    assert_identity(stats)


def test_start_after_close_is_an_error() -> None:
    bus = EventBus([Recorder()]).start()
    bus.close(timeout=5)
    with pytest.raises(BusStateError, match="this EventBus was closed; create a new one"):
        bus.start()
    assert not bus.running


def test_close_from_a_sink_on_the_bus_thread_starts_the_close_and_returns() -> None:
    """A sink's hook runs on the bus thread, which close() cannot join: it starts the
    close and returns the current stats at once; the bus stops after the hook."""

    class SelfCloser(Recorder):
        async def write(self, batch: Sequence[BaseEvent]) -> None:
            await super().write(batch)
            self.returned = self.bus.close(timeout=5)
            self.still_running = self.bus.running

    sink = SelfCloser("selfcloser", max_delay=0.0)
    bus = EventBus([sink], flush_interval=0.01).start()
    sink.bus = bus
    bus.publish(StepEnd(step=1))
    wait_for(lambda: not bus.running, what="the bus to stop")
    assert isinstance(sink.returned, BusStats) and sink.still_running
    assert sink.closed and sink.steps == [1]
    bus.publish(StepEnd(step=2))  # closed: counted as refused
    stats = bus.close(timeout=5)  # the final stats, at once
    assert stats.sinks["selfcloser"].delivered == 1 and stats.ingress_dropped == 1
    assert_identity(stats)


def test_publish_log_writes_the_values_it_read_into_the_callers_record():
    # What the trainer's state.log_history entry holds: the same tensors (on an
    # accelerator the event holds their host copies) until the bus has read them.
    import torch

    from eventbus.values import Deferred

    loss, grad, device_side = torch.tensor(0.5), torch.tensor(2.0), torch.tensor(3.0)
    record = {"loss": loss, "grad_norm": grad, "other": device_side, "learning_rate": 1e-3, "step": 7}
    values = Snapshot(loss=loss, grad_norm=grad, other=Deferred(torch.tensor(3.0)), learning_rate=1e-3)
    record["grad_norm"] = 9.0  # the caller changed this one meanwhile: left as it is
    rec = Recorder(events=(Log,))
    with EventBus([rec], flush_interval=0.01) as bus:
        bus.publish_log("", 0, 7, None, values, record)
        wait_for(lambda: rec.got, what="the Log")
    assert rec.got[0].values == {"loss": 0.5, "grad_norm": 2.0, "other": 3.0, "learning_rate": 1e-3}
    assert record == {"loss": 0.5, "grad_norm": 9.0, "other": 3.0, "learning_rate": 1e-3, "step": 7}
    assert all(type(v) in (float, int) for v in record.values())


def test_an_event_published_without_a_run_id_gets_the_bus_s():
    # The README's "bus on its own": Log(step=1, ...) names no run; what sinks write
    # (a JSONL line, a spool record) must say which run it belongs to.
    rec = Recorder(events=(Log, StepEnd))
    with EventBus([rec], run=RunInfo(run_id="r42"), flush_interval=0.01) as bus:
        bus.publish(Log(step=1, values={"loss": 1.0}))
        bus.publish(StepEnd(run_id="other", step=2))
        wait_for(lambda: len(rec.got) == 2, what="both events")
    assert [(type(e).__name__, e.run_id) for e in rec.got] == [("Log", "r42"), ("StepEnd", "other")]
    assert rec.got[0].values == {"loss": 1.0}


class _OpensOnThirdTry(ThreadedSink):
    """Its open fails twice with an SDK's own network error (not a ConnectionError),
    then works."""

    name = "flaky-open"  # type: ignore[assignment]
    events = (StepEnd,)
    retry_backoff = 0.01
    max_delay = 0.0

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.opens = 0
        self.got: list[int] = []

    def open_sync(self, run: Any) -> None:
        self.opens += 1
        if self.opens <= 2:
            raise self.error

    def write_sync(self, batch: Any) -> None:
        self.got.extend(ev.step for ev in batch)


@pytest.mark.parametrize(
    "error",
    [socket.gaierror(-3, "Temporary failure in name resolution"), OSError(errno.ESTALE, "Stale file handle"), RuntimeError("connection lost")],
    ids=["dns", "stale-nfs", "sdk-error"],
)
def test_an_open_that_fails_for_a_while_is_retried_and_loses_nothing(error: Exception) -> None:
    # Only an open error retrying cannot fix (a bad option, a path that is a
    # directory) fails its batch at once; an SDK's connection or DNS error is an outage.
    sink = _OpensOnThirdTry(error)
    with EventBus([sink]) as bus:
        for i in range(5):
            bus.publish(StepEnd(step=i))
    st = bus.stats().sinks["flaky-open"]
    assert sink.got == [0, 1, 2, 3, 4]
    assert (st.delivered, st.failed) == (5, 0) and st.retries >= 1


def test_wait_handed_waits_for_what_is_still_in_the_ingress() -> None:
    # Published just now, the events are still in the ingress (the pump hands them
    # over every flush interval): waiting only on the sinks' queues would return at
    # once with nothing received.
    rec = Recorder(capacity=1000)
    with EventBus([rec], flush_interval=0.5) as bus:
        for i in range(200):
            bus.publish(StepEnd(step=i))
        stats = bus.wait_handed(30)
        assert stats is not None
        assert stats.sinks["rec"].received == 200 and stats.sinks["rec"].queue_depth == 0
        assert rec.steps == list(range(200))
