"""bus.stats(): counters, lag percentiles, high-water marks, and the identity
received == delivered + dropped + spooled + queue_depth in every scenario."""

from __future__ import annotations

import json
from typing import Any, Sequence

from eventbus import EventBus, Overflow, Sink, StepEnd
from eventbus.events import BaseEvent
from eventbus.stats import BusStats, LagRecorder, SinkStats
from tests.eventbus.test_bus import GateSink, Recorder, assert_identity, settled, wait_for


class FailEveryOther(Sink):
    name = "flaky"  # type: ignore[misc]
    max_batch_size = 1
    max_delay = 0.0
    circuit_threshold = 1000

    def __init__(self) -> None:
        self.calls = 0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.calls += 1
        if self.calls % 2:
            raise ValueError("odd call")


def test_identity_holds_in_a_mixed_scenario_at_every_stage() -> None:
    gate = GateSink(capacity=3, max_batch_size=2, max_delay=0.0, overflow=Overflow.DROP_OLDEST)
    rec = Recorder("rec", max_delay=0.0)
    flaky = FailEveryOther()
    bus = EventBus([gate, rec, flaky], flush_interval=0.01).start()
    assert_identity(bus.stats())
    bus.publish(StepEnd(step=0))
    assert gate.entered.wait(10)
    for i in range(1, 20):
        bus.publish(StepEnd(step=i))
    wait_for(lambda: settled(bus, "gate", 20), what="gate offered")
    wait_for(lambda: bus.stats().sinks["flaky"].delivered + bus.stats().sinks["flaky"].failed == 20, what="flaky")
    mid = bus.stats()
    assert_identity(mid)
    assert mid.sinks["gate"].queue_depth == 3 + 1 and mid.sinks["gate"].dropped == 16
    assert mid.sinks["flaky"].failed == 10 and mid.sinks["flaky"].delivered == 10
    gate.release.set()
    final = bus.close(timeout=10)
    assert_identity(final)
    assert final.sinks["rec"].delivered == 20
    assert final.sinks["gate"].delivered == 4 and final.sinks["gate"].queue_depth == 0
    assert final.delivered == 4 + 20 + 10
    assert final.dropped == 16 + 10


def test_lag_and_high_water_are_recorded() -> None:
    rec = Recorder(max_delay=0.0)
    with EventBus([rec], flush_interval=0.01) as bus:
        assert bus.stats().sinks["rec"].lag_p50_ms is None
        for i in range(100):
            bus.publish(StepEnd(step=i))
    st = bus.stats().sinks["rec"]
    assert st.lag_p50_ms is not None and st.lag_p99_ms is not None
    assert 0 <= st.lag_p50_ms <= st.lag_p99_ms
    assert 1 <= st.queue_high_water <= 100
    assert bus.stats().ingress_high_water >= 1


def test_lag_recorder_percentiles_and_bound() -> None:
    lag = LagRecorder(size=100)
    assert lag.percentile(0.5) is None
    lag.add_many(float(i) for i in range(1000))
    # Only the most recent 100 samples are kept: 900..999.
    assert lag.percentile(0.0) == 900.0
    assert lag.percentile(1.0) == 999.0
    assert lag.percentile(0.5) in (949.0, 950.0)


def test_stats_render_as_dict_json_and_table() -> None:
    stats = BusStats(
        published=5,
        ingress_dropped=1,
        sinks={"a": SinkStats(name="a", received=4, delivered=3, dropped=1, lag_p99_ms=2.5)},
    )
    d: dict[str, Any] = stats.to_dict()
    assert d["sinks"]["a"]["delivered"] == 3 and json.loads(json.dumps(d)) == d
    table = stats.format_table()
    assert "received" in table and "2.5" in table and table.splitlines()[1].startswith("a")
    assert stats.delivered == 3 and stats.dropped == 2


def test_lag_recorder_samples_a_large_batch_boundedly_across_its_whole_span() -> None:
    done = 10**12
    batch = [StepEnd(time_ns=done - i * 10**6) for i in range(1000)]  # lags 0..999 ms
    lag = LagRecorder(size=10_000)
    lag.add_batch(done, batch)
    assert 0 < len(lag._samples) <= LagRecorder.per_batch
    assert lag.percentile(0.0) == 0.0
    assert lag.percentile(1.0) >= 900.0  # the spread of the batch is kept
    small = LagRecorder()
    small.add_batch(done, batch[:10])
    assert sorted(small._samples) == [float(i) for i in range(10)]  # small batches: every event


def test_stats_read_from_another_thread_while_events_flow_always_keep_the_identity() -> None:
    """The bus thread moves events between a sink's queue and its counters in steps;
    a reader on another thread that falls between two of them must not see the
    identity broken (the thread switch interval is made tiny to make that likely)."""
    import sys
    import threading
    import time

    from eventbus import Log

    rec = Recorder("rec", max_batch_size=64, capacity=100_000, max_delay=0.0)
    bus = EventBus([rec], flush_interval=0.005).start()
    stop = threading.Event()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            bus.publish(Log(step=i, values={"a": 1.0}))
            i += 1
            if i % 200 == 0:
                time.sleep(0.001)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    producer = threading.Thread(target=produce)
    broken: list[SinkStats] = []
    polls = 0
    try:
        producer.start()
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            s = bus.stats().sinks["rec"]
            polls += 1
            if s.received != s.delivered + s.dropped + s.spooled + s.queue_depth:
                broken.append(s)
    finally:
        stop.set()
        producer.join()
        sys.setswitchinterval(interval)
    assert_identity(bus.close(timeout=10))
    assert polls > 100 and rec.got
    assert not broken, f"{len(broken)} of {polls} reads broke the identity, e.g. {broken[0]}"
