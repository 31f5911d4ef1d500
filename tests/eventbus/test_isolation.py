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
