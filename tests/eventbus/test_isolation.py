"""A sink that raises, hangs or is slow never delays publish() or the other sinks, and
close(timeout) returns by its deadline whatever the sinks do."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

import anyio
import pytest

from eventbus import EventBus, Sink, StepEnd, ThreadedSink, TransientSinkError
from eventbus.events import BaseEvent
from tests.eventbus.test_bus import Recorder, assert_identity, settled, wait_for


class Raising(Sink):
    """Raises ``exc`` on its first ``fail_times`` writes (forever by default)."""

    def __init__(self, name: str, exc: BaseException, fail_times: int = 10**9, **opts: Any) -> None:
        self.name = name  # type: ignore[misc]
        self.exc = exc
        self.fail_times = fail_times
        self.calls = 0
        self.batches: list[list[BaseEvent]] = []
        for k, v in opts.items():
            setattr(self, k, v)

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.calls += 1
        if self.calls <= self.fail_times:
            raise self.exc
        self.batches.append(list(batch))


class HangingAsync(Sink):
    name = "hang_async"  # type: ignore[misc]

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        await anyio.sleep_forever()


class HangingThreaded(ThreadedSink):
    name = "hang_threaded"  # type: ignore[misc]

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        self.entered.set()
        self.release.wait(60)  # "forever" as far as the bus can tell; released at teardown


class LoopBlocker(Sink):
    """Wrongly does blocking work inside an async write: the bus's loop itself stalls."""

    name = "loop_blocker"  # type: ignore[misc]

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.entered.set()
        self.release.wait(60)


N = 50


def test_raising_sink_is_isolated_and_its_circuit_opens() -> None:
    good = Recorder("good", max_delay=0.0)
    bad = Raising("bad", ValueError("boom"), max_batch_size=1, max_delay=0.0, circuit_threshold=3, circuit_cooldown=60.0)
    with EventBus([good, bad], flush_interval=0.01) as bus:
        for i in range(N):
            bus.publish(StepEnd(step=i))
    stats = bus.stats()
    assert good.steps == list(range(N))
    b = stats.sinks["bad"]
    # ValueError is not transient: no retries; after 3 failed batches in a row the
    # circuit opens and the sink is not called again during the cooldown.
    assert bad.calls == 3
    assert b.errors == 3 and b.retries == 0
    assert b.failed == N and b.dropped == N and b.delivered == 0
    assert b.circuit_open
    assert "boom" in (b.last_error or "")
    assert stats.sinks["good"].delivered == N and stats.sinks["good"].errors == 0
    assert_identity(stats)


def test_transient_errors_are_retried_with_backoff_then_delivered() -> None:
    sink = Raising(
        "flaky", TransientSinkError("503", retry_after=0.01), fail_times=2, max_delay=0.0, max_batch_size=1000,
        retry_backoff=0.01,
    )
    with EventBus([sink], flush_interval=0.01) as bus:
        for i in range(10):
            bus.publish(StepEnd(step=i))
        wait_for(lambda: bus.stats().sinks["flaky"].delivered == 10, what="delivery after retries")
    st = bus.stats().sinks["flaky"]
    assert st.retries == 2 and st.errors == 2 and st.failed == 0
    assert [e.step for b in sink.batches for e in b] == list(range(10))  # once each, in order
    assert_identity(bus.stats())


def test_transient_errors_give_up_after_max_retries() -> None:
    sink = Raising("down", ConnectionError("refused"), max_batch_size=1, max_delay=0.0, max_retries=2,
                   retry_backoff=0.001, retry_backoff_max=0.002, circuit_threshold=100)
    with EventBus([sink], flush_interval=0.01) as bus:
        for i in range(4):
            bus.publish(StepEnd(step=i))
    st = bus.stats().sinks["down"]
    assert sink.calls == 4 * 3  # each batch: one try and two retries
    assert st.retries == 4 * 2 and st.failed == 4 and st.delivered == 0
    assert not st.circuit_open
    assert_identity(bus.stats())


def test_backoff_is_exponential_capped_and_jittered() -> None:
    from eventbus.bus import _SinkWorker

    sink = Recorder(retry_backoff=0.1, retry_backoff_max=0.35)
    w = _SinkWorker(sink, EventBus())
    for attempt, full in [(1, 0.1), (2, 0.2), (3, 0.35), (10, 0.35)]:
        for _ in range(20):
            assert full * 0.5 <= w._backoff(attempt, ValueError()) <= full
    assert w._backoff(1, TransientSinkError("429", retry_after=7.0)) == 7.0


def test_retry_after_is_a_non_negative_number_of_seconds_or_ignored() -> None:
    from eventbus.bus import _SinkWorker

    w = _SinkWorker(Recorder(retry_backoff=0.1, retry_backoff_max=0.1), EventBus())
    # A Retry-After header passed on as it came: a number in a string counts.
    assert w._backoff(1, TransientSinkError("429", retry_after="5")) == 5.0  # type: ignore[arg-type]
    assert w._backoff(1, TransientSinkError("429", retry_after=0)) == 0.0
    for bad in ("Wed, 21 Oct 2015 07:28:00 GMT", "-1", -3, float("nan"), float("inf"), True, b"x", object()):
        assert 0.05 <= w._backoff(1, TransientSinkError("429", retry_after=bad)) <= 0.1, bad  # type: ignore[arg-type]


class Misbehaving(Sink):
    """A sink whose error handling is itself broken: ``is_transient`` raises, or its
    ``TransientSinkError`` carries a ``retry_after`` that is not a number."""

    def __init__(self, mode: str) -> None:
        self.name = "bad"  # type: ignore[misc]
        self.mode = mode
        self.max_delay = 0.0
        self.retry_backoff = 0.001
        self.max_retries = 2
        self.calls = 0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.calls += 1
        if self.mode == "is_transient":
            raise ValueError("HTTP 400: bad metric name")
        raise TransientSinkError("HTTP 429", retry_after="soon")  # type: ignore[arg-type]

    def is_transient(self, exc: BaseException) -> bool:
        if self.mode == "is_transient":
            return exc.response.status_code >= 500  # type: ignore[attr-defined]  # AttributeError
        return super().is_transient(exc)


@pytest.mark.parametrize("mode", ["is_transient", "retry_after"])
def test_a_sink_whose_error_handling_raises_takes_down_neither_the_bus_nor_the_other_sinks(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    bad = Misbehaving(mode)
    good = Recorder("good", max_delay=0.0)
    bus = EventBus([bad, good], flush_interval=0.01).start()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        bus.publish(StepEnd(step=0))
        wait_for(lambda: bus.stats().sinks["bad"].failed == 1, what="the first batch to fail")
        for i in range(1, 50):
            bus.publish(StepEnd(step=i))
        wait_for(lambda: good.steps == list(range(50)), what="the good sink to get every event")
        wait_for(lambda: settled(bus, "bad", 50), what="the bad sink's events to be accounted for")
        assert bus.running and any(t.name == "eventbus" for t in threading.enumerate())
        stats = bus.close(timeout=5)
    b = stats.sinks["bad"]
    assert b.delivered == 0 and b.failed == 50
    if mode == "is_transient":
        # The classifier raised: not transient, so not retried; the log says why.
        assert b.retries == 0
        assert "is_transient() raised AttributeError" in caplog.text
    else:
        # Transient, retried with the computed backoff instead of the bad retry_after.
        assert b.retries == 2 * bad.calls // 3
    assert stats.sinks["good"].delivered == 50
    assert_identity(stats)


def test_sink_errors_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    bad = Raising("bad", ValueError("boom"), max_batch_size=1, max_delay=0.0, circuit_threshold=10**6)
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with EventBus([bad], flush_interval=0.01) as bus:
            for i in range(20):
                bus.publish(StepEnd(step=i))
    assert bad.calls == 20 and bus.stats().sinks["bad"].errors == 20
    failures = [r for r in caplog.records if "failed in write" in r.getMessage()]
    assert len(failures) == 1


def _close_with_deadline(bus: EventBus, timeout: float) -> tuple[float, Any]:
    t0 = time.monotonic()
    stats = bus.close(timeout=timeout)
    return time.monotonic() - t0, stats


@pytest.mark.parametrize("kind", ["async", "threaded", "loop_blocker"])
def test_hanging_sink_close_deadline_is_honoured(kind: str) -> None:
    hang = {"async": HangingAsync, "threaded": HangingThreaded, "loop_blocker": LoopBlocker}[kind]()
    hang.max_delay = 0.0
    hang.max_batch_size = 4
    good = Recorder("good", max_delay=0.0)
    bus = EventBus([good, hang], flush_interval=0.01).start()
    try:
        for i in range(10):
            bus.publish(StepEnd(step=i))
        if kind != "loop_blocker":
            # The hang blocks neither publish() nor the other sink.
            wait_for(lambda: good.steps == list(range(10)), what="the good sink")
            wait_for(lambda: settled(bus, hang.name, 10), what="all events offered")
        else:
            hang.entered.wait(10)
        t0 = time.monotonic()
        for i in range(10, 1010):
            bus.publish(StepEnd(step=i))
        assert time.monotonic() - t0 < 5.0  # generous: publish never waits for a sink
        elapsed, stats = _close_with_deadline(bus, 0.5)
        assert elapsed < 0.5 + 2.0, f"close took {elapsed:.2f}s for a 0.5s deadline"
        st = stats.sinks[hang.name]
        assert st.delivered == 0
        assert st.abandoned > 0 and st.abandoned == st.dropped - st.overflow
        assert_identity(stats)
        if kind != "loop_blocker":
            assert good.steps == list(range(1010))
            assert st.received == 1010
    finally:
        if hasattr(hang, "release"):
            hang.release.set()


def test_slow_sink_does_not_delay_a_fast_one() -> None:
    class Slow(Sink):
        name = "slow"  # type: ignore[misc]
        max_delay = 0.0
        max_batch_size = 1

        async def write(self, batch: Sequence[BaseEvent]) -> None:
            await anyio.sleep(0.2)

    fast = Recorder("fast", max_delay=0.0)
    with EventBus([Slow(), fast], flush_interval=0.01) as bus:
        for i in range(100):
            bus.publish(StepEnd(step=i))
        # 100 writes of 0.2 s each would take 20 s: the fast sink must not wait for them.
        wait_for(lambda: fast.steps == list(range(100)), timeout=10, what="the fast sink")
        stats = bus.close(timeout=0.3)
    assert stats.sinks["slow"].delivered < 100
    assert_identity(stats)


def test_sink_whose_open_fails_is_counted_and_retried() -> None:
    class OpenFails(Recorder):
        tries = 0

        async def open(self, run: Any) -> None:
            self.tries += 1
            if self.tries == 1:
                raise ConnectionError("server not up yet")

    sink = OpenFails("late", max_delay=0.0, retry_backoff=0.001)
    with EventBus([sink], flush_interval=0.01) as bus:
        bus.publish(StepEnd(step=1))
    st = bus.stats().sinks["late"]
    assert sink.steps == [1] and st.errors >= 1 and st.delivered == 1
    assert_identity(bus.stats())


def test_a_threaded_sink_the_close_deadline_cut_off_is_closed_on_its_thread_which_then_ends() -> None:
    """The deadline passes during a retry backoff (the backend answers 503): close()
    returns on time, and the sink's thread is not left waiting for work forever: it
    runs close_sync and ends."""

    class Unavailable(ThreadedSink):
        name = "unavailable"  # type: ignore[misc]
        max_delay = 0.0
        retry_backoff = 30.0

        def __init__(self) -> None:
            self.closed_on: str | None = None

        def write_sync(self, batch: Sequence[BaseEvent]) -> None:
            raise TransientSinkError("HTTP 503")

        def close_sync(self) -> None:
            self.closed_on = threading.current_thread().name

    sink = Unavailable()
    bus = EventBus([sink], flush_interval=0.01).start()
    for i in range(5):
        bus.publish(StepEnd(step=i))
    wait_for(lambda: bus.stats().sinks["unavailable"].retries == 1, what="the first retry backoff")
    thread = sink._thread._thread  # type: ignore[union-attr]
    elapsed, stats = _close_with_deadline(bus, 0.5)
    assert elapsed < 0.5 + 2.0
    assert stats.sinks["unavailable"].abandoned == 5
    assert_identity(stats)
    thread.join(10)
    assert not thread.is_alive()
    assert sink.closed_on == thread.name
