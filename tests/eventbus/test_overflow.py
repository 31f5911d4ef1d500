"""Each overflow policy drops exactly what it should, counted exactly.

The sink's write blocks on a threading.Event, so the queue's content while it is full
is fully determined: one event in flight, ``capacity`` queued, the rest overflowed."""

from __future__ import annotations

from typing import Callable

import pytest

from eventbus import EventBus, Overflow, StepEnd
from tests.eventbus.test_bus import PUBLISHERS, GateSink, Recorder, assert_identity, settled, wait_for

CAP = 5
EXTRA = 12  # published while the first event is stuck in write


def _fill(policy: Overflow) -> tuple[EventBus, GateSink]:
    sink = GateSink(capacity=CAP, max_batch_size=1, max_delay=0.0, overflow=policy)
    bus = EventBus([sink], flush_interval=0.01).start()
    bus.publish(StepEnd(step=0))
    assert sink.entered.wait(10), "the sink never got its first write"
    for i in range(1, EXTRA + 1):
        bus.publish(StepEnd(step=i))
    wait_for(lambda: settled(bus, "gate", EXTRA + 1), what="the pump to offer everything")
    return bus, sink


@pytest.mark.parametrize(
    "policy, kept",
    [
        (Overflow.DROP_NEWEST, list(range(1, CAP + 1))),  # history kept, late arrivals refused
        (Overflow.DROP_OLDEST, list(range(EXTRA - CAP + 1, EXTRA + 1))),  # latest values win
    ],
)
def test_overflow_policy_drops_exactly(policy: Overflow, kept: list[int]) -> None:
    bus, sink = _fill(policy)
    try:
        st = bus.stats().sinks["gate"]
        assert st.received == EXTRA + 1
        assert st.queue_depth == CAP + 1  # CAP queued + 1 in flight
        assert st.overflow == EXTRA - CAP and st.dropped == EXTRA - CAP
        assert st.queue_high_water == CAP + 1
        assert st.delivered == 0
        assert_identity(bus.stats())
    finally:
        sink.release.set()
    stats = bus.close(timeout=10)
    assert sink.steps == [0] + kept
    st = stats.sinks["gate"]
    assert st.delivered == CAP + 1 and st.dropped == EXTRA - CAP and st.queue_depth == 0
    assert_identity(stats)


@PUBLISHERS
def test_ingress_overflow_is_counted_and_never_raises(publish: Callable[[EventBus, int], None]) -> None:
    rec = Recorder(capacity=1000)
    bus = EventBus([rec], ingress_capacity=10)
    for i in range(15):  # not started yet: nothing drains the ingress
        publish(bus, i)
    s = bus.stats()
    assert s.published == 15 and s.ingress_dropped == 5 and s.ingress_depth == 10
    with bus:
        pass
    assert rec.steps == list(range(10))  # the first ten fitted; the rest were refused
    s = bus.stats()
    assert s.sinks["rec"].received == 10 and s.dropped == 5
    assert_identity(s)


def test_no_overflow_when_the_queue_keeps_up() -> None:
    rec = Recorder(capacity=3, max_delay=0.0)
    with EventBus([rec], flush_interval=0.01) as bus:
        for i in range(3):
            bus.publish(StepEnd(step=i))
        wait_for(lambda: rec.steps == [0, 1, 2])
    assert bus.stats().sinks["rec"].dropped == 0
