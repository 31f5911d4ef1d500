"""How much does ``bus.publish()`` cost the training thread, how fast does the bus
deliver, and does memory stay bounded when sinks fall behind?

Run: ``python benchmarks/publish.py`` (about a minute; ``--quick`` for a smoke run).
Prints one table with the issue's targets beside the measured figures. The targets
are for a 2-core machine and are printed, not asserted: timing varies with load.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Sequence

import anyio

from eventbus import EventBus, Log, Sink, StepEnd
from eventbus.events import BaseEvent


class NoopSink(Sink):
    """Accepts every batch and does nothing: measures the bus, not a backend."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name  # type: ignore[misc]
        self.capacity = capacity
        self.max_delay = 0.01
        self.delivered = 0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.delivered += len(batch)


class SlowSink(Sink):
    """Consumes ``rate`` events per second (sleeping for the rest)."""

    def __init__(self, name: str, rate: float) -> None:
        self.name = name  # type: ignore[misc]
        self.per_event = 1.0 / rate
        self.max_delay = 0.01

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        await anyio.sleep(len(batch) * self.per_event)


def bench_publish(n: int, repeats: int, started: bool) -> dict[str, float]:
    """Median ns per publish over ``repeats`` runs of ``n`` publishes, for an event
    built beforehand and one built inline; wall clock and the publishing thread's CPU
    time (the latter ignores time this process was descheduled on a busy machine)."""
    prebuilt = [StepEnd(run_id="r", step=i, epoch=0.5) for i in range(n)]

    def once(inline: bool) -> tuple[float, float]:
        bus = EventBus([NoopSink("noop", capacity=n)], ingress_capacity=n + 1)
        if started:
            bus.start()
        publish = bus.publish
        gc.collect()
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        if inline:
            for i in range(n):
                publish(StepEnd(run_id="r", step=i, epoch=0.5))
        else:
            for ev in prebuilt:
                publish(ev)
        wall, cpu = time.perf_counter_ns() - t0, time.thread_time_ns() - c0
        bus.close(timeout=30)
        return wall / n, cpu / n

    out: dict[str, float] = {}
    for inline in (False, True):
        runs = [once(inline) for _ in range(repeats)]
        key = "inline" if inline else "prebuilt"
        out[key] = statistics.median(r[0] for r in runs)
        out[key + "_cpu"] = statistics.median(r[1] for r in runs)
    return out


def bench_end_to_end(n: int, n_sinks: int) -> tuple[float, int]:
    """Events/s from the first publish until every sink has every event (close returns)."""
    sinks = [NoopSink(f"noop{i}", capacity=n) for i in range(n_sinks)]
    events = [StepEnd(run_id="r", step=i) for i in range(n)]
    bus = EventBus(sinks, ingress_capacity=n + 1).start()
    publish = bus.publish
    t0 = time.perf_counter()
    for ev in events:
        publish(ev)
    stats = bus.close(timeout=120)
    dt = time.perf_counter() - t0
    delivered = min(s.delivered for s in stats.sinks.values())
    lost = n * n_sinks - sum(s.delivered for s in stats.sinks.values())
    return delivered / dt, lost


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_overload_memory(seconds: float, producer_rate: float, n_sinks: int = 2) -> tuple[float, int, int, int]:
    """Peak RSS growth (MB) while a producer publishes ``Log`` events at
    ``producer_rate``/s into sinks that consume a tenth of that.

    Run in a fresh process (see ``--memory-only``) so that earlier measurements do not
    set the baseline. RSS, not tracemalloc: tracing slows the bus thread far more than
    the producer and would measure a different system. A sampler thread records the
    peak every 10 ms.
    """
    sinks = [SlowSink(f"slow{i}", rate=producer_rate / 10) for i in range(n_sinks)]
    bus = EventBus(sinks).start()
    gc.collect()
    base = peak = _rss_mb()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.01):
            peak = max(peak, _rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    published = 0
    t0 = time.perf_counter()
    burst = 500
    while time.perf_counter() - t0 < seconds:
        for _ in range(burst):
            bus.publish(Log(step=published, values={"loss": 0.5, "learning_rate": 1e-4, "grad_norm": 1.0}))
            published += 1
        ahead = published / producer_rate - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(ahead)
    stop.set()
    sampler.join()
    peak = max(peak, _rss_mb())
    logging.getLogger("eventbus").setLevel(logging.ERROR)  # the deadline warning is expected here
    stats = bus.close(timeout=0.5)
    dropped = sum(s.dropped for s in stats.sinks.values()) + stats.ingress_dropped
    delivered = sum(s.delivered for s in stats.sinks.values())
    return peak - base, published, delivered, dropped


PRODUCER_RATE = 100_000
"""Events/s the overload producer publishes; its sinks consume a tenth of that."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few seconds: a smoke run")
    parser.add_argument("--memory-only", type=float, metavar="SECONDS", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_only:
        print(json.dumps(bench_overload_memory(args.memory_only, producer_rate=PRODUCER_RATE)))
        return 0
    n, repeats, e2e_n, mem_s = (20_000, 3, 50_000, 1.0) if args.quick else (200_000, 7, 400_000, 6.0)

    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: str, target: str, ok: bool | None) -> None:
        rows.append((name, value, target, "-" if ok is None else ("ok" if ok else "MISSED")))
        print(f"  .. {name}: {value}", file=sys.stderr, flush=True)

    r = bench_publish(n, repeats, started=True)
    pre, pre_cpu = r["prebuilt"], r["prebuilt_cpu"]
    row("publish StepEnd, prebuilt (ns, median, wall)", f"{pre:,.0f}", "<= 300", pre <= 300)
    row("publish StepEnd, prebuilt (ns, median, thread CPU)", f"{pre_cpu:,.0f}", "<= 300", pre_cpu <= 300)
    row("publish StepEnd, built inline (ns, median, wall)", f"{r['inline']:,.0f}", "-", None)
    row("publish StepEnd, built inline (ns, median, thread CPU)", f"{r['inline_cpu']:,.0f}", "-", None)
    row("ingress events/s (prebuilt, wall)", f"{1e9 / pre:,.0f}", ">= 1,000,000", 1e9 / pre >= 1_000_000)
    idle = bench_publish(n, repeats, started=False)
    row("publish prebuilt, bus not started (ns, median, wall)", f"{idle['prebuilt']:,.0f}", "-", None)
    for k in (1, 4):
        rate, lost = bench_end_to_end(e2e_n, k)
        row(f"end to end, {k} no-op sink(s) (events/s per sink)", f"{rate:,.0f}", ">= 200,000", rate >= 200_000 and not lost)
        if lost:
            row(f"  events lost with {k} sink(s)", f"{lost:,}", "0", False)
    out = subprocess.run(
        [sys.executable, __file__, "--memory-only", str(mem_s)], capture_output=True, text=True, check=True
    ).stdout
    growth, published, delivered, dropped = json.loads(out)
    row(f"peak RSS growth, {PRODUCER_RATE:,}/s into sinks 10x slower (MB)", f"{growth:,.1f}", "< 50", growth < 50)
    row("  (published / delivered / dropped, over 2 sinks)", f"{published:,} / {delivered:,} / {dropped:,}", "-", None)

    w = max(len(r[0]) for r in rows)
    print(f"{'measure':<{w}}  {'value':>28}  {'target':>14}  result")
    print("-" * (w + 54))
    for name, value, target, ok in rows:
        print(f"{name:<{w}}  {value:>28}  {target:>14}  {ok}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"({os.cpu_count()} CPUs, load average {load}: timings scale with load; memory is a bound)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
