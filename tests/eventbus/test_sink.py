"""Sink and ThreadedSink: defaults, hooks, and the threaded sink's own ordered thread."""

from __future__ import annotations

import threading
from typing import Sequence

import pytest

from eventbus import EventBus, Log, Overflow, RunInfo, Sink, StepEnd, ThreadedSink, TransientSinkError
from eventbus.events import EVENT_TYPES, BaseEvent


class Threaded(ThreadedSink):
    name = "threaded"  # type: ignore[misc]
    max_delay = 0.0
    max_batch_size = 3

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, object]] = []

    def open_sync(self, run: RunInfo) -> None:
        self.calls.append(("open", threading.current_thread().name, run.run_id))

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        self.calls.append(("write", threading.current_thread().name, [e.step for e in batch]))

    def close_sync(self) -> None:
        self.calls.append(("close", threading.current_thread().name, None))


def test_threaded_sink_runs_its_hooks_in_order_on_its_own_thread() -> None:
    sink = Threaded()
    bus = EventBus([sink], run=RunInfo(run_id="abc"), flush_interval=0.01)
    with bus:
        for i in range(10):
            bus.publish(StepEnd(step=i))
    kinds = [c[0] for c in sink.calls]
    assert kinds[0] == "open" and kinds[-1] == "close" and set(kinds[1:-1]) == {"write"}
    assert sink.calls[0][2] == "abc"
    steps = [s for c in sink.calls if c[0] == "write" for s in c[2]]  # type: ignore[union-attr]
    assert steps == list(range(10))
    assert all(len(c[2]) <= 3 for c in sink.calls if c[0] == "write")  # type: ignore[arg-type]
    threads = {c[1] for c in sink.calls}
    assert len(threads) == 1 and threads.pop().startswith("eventbus-sink-threaded")
    assert bus.stats().sinks["threaded"].delivered == 10


def test_threaded_sink_thread_stops_after_close() -> None:
    sink = Threaded()
    with EventBus([sink]) as bus:
        bus.publish(StepEnd())
    names = {c[1] for c in sink.calls}
    for t in threading.enumerate():
        if t.name in names:
            t.join(5)
            assert not t.is_alive()


def test_sink_defaults() -> None:
    s = Sink()
    assert s.events == EVENT_TYPES and s.overflow is Overflow.DROP_OLDEST
    assert s.capacity > 0 and s.max_batch_size > 0 and s.max_delay >= 0
    assert s.is_transient(TransientSinkError("x")) and s.is_transient(ConnectionError()) and s.is_transient(TimeoutError())
    assert not s.is_transient(ValueError())
    assert Sink.available() and "sink" in repr(s)
    run = RunInfo()
    assert len(run.run_id) == 12 and run.rank == 0 and run.world_size == 1 and RunInfo().run_id != run.run_id


def test_write_not_implemented_is_counted_as_a_failure() -> None:
    class NoWrite(Sink):
        name = "nowrite"  # type: ignore[misc]
        max_delay = 0.0

    with EventBus([NoWrite()], flush_interval=0.01) as bus:
        bus.publish(StepEnd())
    st = bus.stats().sinks["nowrite"]
    assert st.failed == 1 and st.errors == 1 and "NotImplementedError" in (st.last_error or "")


def test_exceptions_in_threaded_hooks_reach_the_bus() -> None:
    class Boom(ThreadedSink):
        name = "boom"  # type: ignore[misc]
        max_delay = 0.0
        max_retries = 0

        def write_sync(self, batch: Sequence[BaseEvent]) -> None:
            raise ConnectionError("sdk down")

    with EventBus([Boom()], flush_interval=0.01) as bus:
        bus.publish(StepEnd())
    st = bus.stats().sinks["boom"]
    assert st.failed == 1 and "sdk down" in (st.last_error or "")


@pytest.mark.parametrize("attr, value", [("max_batch_size", 0), ("max_delay", "1"), ("max_retries", -1), ("write_timeout", 0), ("max_delay", -0.5), ("retry_backoff", -1), ("circuit_cooldown", None), ("sampled", "StepEnd"), ("sampled", [StepEnd])])
def test_bad_sink_settings_are_rejected_with_the_setting_named(attr: str, value: object) -> None:
    from eventbus import SinkConfigError

    s = Threaded()
    setattr(s, attr, value)
    with pytest.raises(SinkConfigError, match=attr):
        EventBus([s])


@pytest.mark.parametrize("attr, value", [("max_batch_size", 0), ("max_batch_size", "5"), ("capacity", 0.5), ("overflow", "spool")])
def test_settings_changed_after_attaching_are_checked_when_the_bus_starts(attr: str, value: object) -> None:
    """A sink's settings may be changed after it is attached, before the bus starts:
    start() checks them again (max_batch_size = 0 would make the sink's worker spin,
    "5" would crash the bus thread)."""
    from eventbus import BusStateError, SinkConfigError

    s = Threaded()
    other = Threaded()
    other.name = "other"  # type: ignore[misc]
    bus = EventBus([s, other], flush_interval=0.01)
    good = getattr(s, attr)
    setattr(s, attr, value)
    with pytest.raises(SinkConfigError, match=f"sink 'threaded': {attr} must be"):
        bus.start()
    assert not bus.running
    setattr(s, attr, good)  # fixed: the bus starts
    with bus:
        bus.publish(StepEnd(step=1))
    assert [c[2] for c in s.calls if c[0] == "write"] == [[1]]
    with pytest.raises(BusStateError):
        bus.start()


def test_subscriptions_changed_after_attaching_apply_when_the_bus_starts() -> None:
    s = Threaded()
    bus = EventBus([s], flush_interval=0.01)
    s.events = (Log,)  # type: ignore[misc]
    with bus:
        bus.publish(StepEnd(step=1))
        bus.publish(Log(step=2))
    assert [c[2] for c in s.calls if c[0] == "write"] == [[2]]


def test_a_sampled_event_must_be_one_the_sink_subscribes_to() -> None:
    from eventbus import SinkConfigError

    s = Threaded()
    s.events = (StepEnd,)  # type: ignore[misc]
    s.sampled = (Log,)  # type: ignore[misc]
    with pytest.raises(SinkConfigError, match=r"sampled must be a tuple of event classes among its events \('StepEnd',\)"):
        EventBus([s])
    s.sampled = (StepEnd,)  # type: ignore[misc]
    s.max_delay = 0.5
    assert EventBus([s]).sample_interval(StepEnd) == 0.5


def test_sink_thread_skips_calls_given_up_on_and_survives_a_closed_loop() -> None:
    """The thread a ThreadedSink's hooks run on: a call whose caller gave up before it
    started (write_timeout, the close deadline) never runs; one given up on while it
    runs finishes there and its result is dropped; later calls still run in order; a
    call that ends after the bus loop closed does not take the thread down."""
    import asyncio

    from eventbus.sink import _SinkThread

    worker = _SinkThread("test")
    ran: list[str] = []
    release = threading.Event()

    def blocking(tag: str) -> str:
        ran.append(tag)
        release.wait(10)
        return tag

    async def scenario() -> list[str]:
        first = asyncio.ensure_future(worker.call(blocking, "running"))
        await asyncio.sleep(0.05)  # the thread is inside the first call now
        queued = asyncio.ensure_future(worker.call(ran.append, "queued"))
        await asyncio.sleep(0)
        first.cancel()
        queued.cancel()  # gave up before the thread got to it
        release.set()
        assert await worker.call(lambda: "after") == "after"
        with pytest.raises(ValueError, match="boom"):
            await worker.call(int, "boom")
        return ran

    assert asyncio.run(scenario()) == ["running"]  # "queued" never ran

    release.clear()
    loop = asyncio.new_event_loop()
    pending = loop.create_task(worker.call(blocking, "outlives the loop"))
    loop.run_until_complete(asyncio.sleep(0.05))
    pending.cancel()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    release.set()  # completes on the thread: the loop is gone, nothing to settle
    done = asyncio.run(asyncio.wait_for(worker.call(lambda: "still serving"), 5))
    assert done == "still serving"
    worker.stop()
    worker._thread.join(5)
    assert not worker._thread.is_alive()
