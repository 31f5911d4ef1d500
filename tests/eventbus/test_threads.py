"""publish() from several threads at once: nothing lost, nothing duplicated, per
thread order kept, totals exact."""

from __future__ import annotations

import threading

from eventbus import EventBus, StepEnd
from tests.eventbus.test_bus import Recorder, assert_identity

THREADS = 4
PER_THREAD = 10_000


def _publish_concurrently(bus: EventBus) -> None:
    barrier = threading.Barrier(THREADS)

    def producer(rank: int) -> None:
        barrier.wait()
        for i in range(PER_THREAD):
            bus.publish(StepEnd(step=i, rank=rank))

    threads = [threading.Thread(target=producer, args=(r,)) for r in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_publish_from_several_threads_exact_totals_and_order() -> None:
    sinks = [Recorder(f"r{i}", capacity=THREADS * PER_THREAD, max_delay=0.005) for i in range(2)]
    bus = EventBus(sinks, ingress_capacity=THREADS * PER_THREAD, flush_interval=0.005).start()
    _publish_concurrently(bus)
    stats = bus.close(timeout=30)
    assert stats.published == THREADS * PER_THREAD and stats.ingress_dropped == 0
    for sink in sinks:
        got = sink.got
        assert len(got) == THREADS * PER_THREAD
        for rank in range(THREADS):
            assert [e.step for e in got if e.rank == rank] == list(range(PER_THREAD))
        assert stats.sinks[sink.name].delivered == THREADS * PER_THREAD
    assert_identity(stats)


def test_concurrent_publish_into_a_small_ingress_counts_every_event() -> None:
    rec = Recorder(capacity=THREADS * PER_THREAD, max_delay=0.005)
    bus = EventBus([rec], ingress_capacity=64, flush_interval=0.005).start()
    _publish_concurrently(bus)
    stats = bus.close(timeout=30)
    assert stats.published == THREADS * PER_THREAD
    assert stats.ingress_dropped > 0
    assert stats.ingress_dropped + stats.sinks["rec"].received == THREADS * PER_THREAD
    assert len(rec.got) == stats.sinks["rec"].delivered
    for rank in range(THREADS):
        steps = [e.step for e in rec.got if e.rank == rank]
        assert steps == sorted(steps)  # what got through is still in order
    assert_identity(stats)
