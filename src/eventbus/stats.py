"""Counters the bus keeps per sink, and the snapshot ``bus.stats()`` returns."""

from __future__ import annotations

import collections
from typing import Any, Iterable, Sequence

import msgspec

__all__ = ["SinkStats", "BusStats", "LagRecorder"]


class SinkStats(msgspec.Struct, kw_only=True):
    """One sink's counters.

    Identity, always: ``received == delivered + dropped + spooled + queue_depth``.
    ``dropped`` counts every event that sink will never get: ``overflow`` (its queue was
    full), ``failed`` (its write kept failing with no spool to keep it, its spool could
    not be written, e.g. a full disk, its spooled copy turned out unreadable, or it was
    a metric event whose ``step`` is not an int),
    ``abandoned`` (still queued when the close deadline passed) and ``skipped`` (a
    metric event below the sink's resume high-water mark, or at it with only names the
    sink got there: the sink already has it, so it is not sent twice).
    ``spooled`` is what is on disk now, not yet delivered: an event that goes to the
    spool adds one, and leaves it again when drained to the sink (then counted in
    ``delivered`` or ``skipped``) or found unreadable (``failed``). Events an earlier
    run left in the spool count as ``received`` (and ``spooled``) when the bus starts.
    ``errors`` counts exceptions its hooks raised; ``retries`` the write attempts
    repeated after a transient error. ``lag_p50_ms``/``lag_p99_ms``: from the event's
    ``time_ns`` to the end of the write that delivered it.
    """

    name: str
    received: int = 0
    delivered: int = 0
    dropped: int = 0
    overflow: int = 0
    failed: int = 0
    abandoned: int = 0
    skipped: int = 0
    spooled: int = 0
    errors: int = 0
    retries: int = 0
    queue_depth: int = 0
    queue_high_water: int = 0
    lag_p50_ms: float | None = None
    lag_p99_ms: float | None = None
    circuit_open: bool = False
    last_error: str | None = None


class BusStats(msgspec.Struct, kw_only=True):
    """The bus's totals and each sink's :class:`SinkStats`.

    ``published`` counts every ``publish()`` call; ``ingress_dropped`` those refused
    because the ingress was full (or the bus was already closed); ``ingress_depth``
    those not yet taken by the pump.
    """

    published: int = 0
    ingress_dropped: int = 0
    ingress_depth: int = 0
    ingress_high_water: int = 0
    running: bool = False
    sinks: dict[str, SinkStats] = msgspec.field(default_factory=dict)

    @property
    def delivered(self) -> int:
        """Events delivered, summed over sinks."""
        return sum(s.delivered for s in self.sinks.values())

    @property
    def dropped(self) -> int:
        """Events dropped, summed over sinks, plus those the ingress refused."""
        return self.ingress_dropped + sum(s.dropped for s in self.sinks.values())

    def to_dict(self) -> dict:
        """Plain builtins, e.g. for ``json.dumps``."""
        return msgspec.to_builtins(self)

    def format_table(self) -> str:
        """A small human-readable table, one row per sink."""
        head = f"{'sink':<14}{'received':>10}{'delivered':>10}{'dropped':>9}{'spooled':>9}{'failed':>8}{'p99 ms':>9}"
        rows = [head]
        for s in self.sinks.values():
            p99 = "-" if s.lag_p99_ms is None else f"{s.lag_p99_ms:.1f}"
            rows.append(
                f"{s.name:<14}{s.received:>10}{s.delivered:>10}{s.dropped:>9}{s.spooled:>9}{s.failed:>8}{p99:>9}"
            )
        return "\n".join(rows)


class LagRecorder:
    """A bounded reservoir of the most recent lag samples (milliseconds)."""

    __slots__ = ("_samples",)

    def __init__(self, size: int = 4096) -> None:
        self._samples: collections.deque[float] = collections.deque(maxlen=size)

    per_batch = 64
    """At most this many samples per delivered batch, evenly spaced through it, so the
    cost per write stays bounded however large the batch (lag rises monotonically
    through a batch, so a strided sample keeps the distribution's shape)."""

    def add_many(self, samples: Iterable[float]) -> None:
        """Record lag samples in milliseconds."""
        self._samples.extend(samples)

    def add_batch(self, done_ns: int, batch: Sequence[Any]) -> None:
        """Record the lag of the events in ``batch`` (``time_ns`` to ``done_ns``)."""
        stride = len(batch) // self.per_batch + 1
        self._samples.extend([(done_ns - ev.time_ns) / 1e6 for ev in batch[::stride]])

    def percentile(self, q: float) -> float | None:
        """The ``q`` quantile (0..1) of the recent samples, or ``None`` before any."""
        if not self._samples:
            return None
        data = sorted(self._samples)
        idx = min(len(data) - 1, max(0, round(q * (len(data) - 1))))
        return data[idx]
