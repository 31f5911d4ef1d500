"""The event bus: a bounded ingress on the publishing side, one anyio event loop on a
background thread that fans events out to each sink's bounded queue and worker.

``publish()`` is what the training thread pays: a length check and a
``deque.append`` (atomic under the GIL, so any thread may publish). No lock, no
syscall, no logging; for the few urgent event types (and when the ingress reaches an
eighth of its capacity) one ``call_soon_threadsafe`` wakes the pump at once.
Everything else happens on the bus thread.

The pump otherwise wakes every ``flush_interval`` (0.2 s by default). Each wake of an
idle thread is paid in CPU on a busy machine (on the 2-core development VM, 250-400
µs of cold-cache Python per wake of the event loop, with the GIL held), so the
interval is a cost per second, not per event: 0.05 s cost the training process about
10 µs of CPU per 1 ms step with no sink at all (docs/benchmarks.md).
"""

from __future__ import annotations

import collections
import errno
import logging
import math
import operator
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import msgspec

from eventbus import _marks
from eventbus import values as _values
from eventbus.errors import BusStateError, SinkConfigError, SinkError, SpoolError
from eventbus.events import BaseEvent, Evaluate, Log, Predict, Save, TrainEnd
from eventbus.overflow import Overflow
from eventbus.sink import RunInfo, Sink, retry_after_seconds
from eventbus.stats import BusStats, LagRecorder, SinkStats

if TYPE_CHECKING:
    import asyncio

    import anyio
else:  # the event loop's modules: imported when the first bus starts, on its thread
    from eventbus._lazy import LazyModule

    asyncio = LazyModule("asyncio", __name__)
    anyio = LazyModule("anyio", __name__)

__all__ = ["EventBus", "DEFAULT_URGENT"]

logger = logging.getLogger("eventbus")

_METRIC_EVENTS = (Log, Evaluate, Predict)  # step-keyed: what the high-water mark tracks
# For per-event checks: `type(ev) in` a frozenset is ~14x cheaper than isinstance() against
# msgspec Struct classes when the event does not match (measured: 56 vs 790 ns). Events
# are routed by exact type, so the two agree.
_METRIC_TYPES = frozenset(_METRIC_EVENTS)
_metric_names = _marks.names_of  # a metric event's names: "Log/loss", "Evaluate/eval_loss"

DEFAULT_URGENT: tuple[type[BaseEvent], ...] = (Evaluate, Save, TrainEnd)
"""Event types that wake the pump at once instead of waiting for the flush interval."""


class _RateLimitedLog:
    """Log a sink's errors at most once per ``interval`` seconds, counting the rest."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._last = -math.inf
        self._suppressed = 0

    def __call__(self, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += f" ({self._suppressed} similar messages suppressed)"
            self._suppressed = 0
        self._last = now
        logger.log(level, msg, *args, exc_info=exc_info)


def resolve_event(event: BaseEvent) -> BaseEvent:
    """Return ``event`` with tensor snapshots in its value mapping turned into numbers."""
    if isinstance(event, Log):
        resolved = _values.resolve_mapping(event.values)
        return event if resolved is None else msgspec.structs.replace(event, values=resolved)
    if isinstance(event, (Evaluate, Predict)):
        resolved = _values.resolve_mapping(event.metrics)
        return event if resolved is None else msgspec.structs.replace(event, metrics=resolved)
    return event


_LOCAL_OS_ERRORS = (IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def _fails_for_good(exc: BaseException | None) -> bool:
    """Whether an open failed in a way retrying the batch cannot fix: a configuration
    error, or a local path that is a directory where a file goes (or a file where a
    directory goes), not permitted, or on a read-only filesystem. Anything else (an
    SDK's connection error, DNS, a server error) may be an outage, retried as one."""
    if isinstance(exc, SinkConfigError):
        return True
    return isinstance(exc, OSError) and (isinstance(exc, _LOCAL_OS_ERRORS) or exc.errno == errno.EROFS)


def _describe(exc: BaseException) -> str:
    """``repr(exc)``, with the file an ``OSError`` names (its repr leaves it out:
    ``IsADirectoryError(21, 'Is a directory')`` says nothing of which path)."""
    text = repr(exc)
    if isinstance(exc, OSError):
        for name in (exc.filename, exc.filename2):
            if name is not None and str(name) not in text:
                text += f": {name}"
    return text


class _SinkWorker:
    """Owns one sink on the loop: its bounded queue, counters, retries and circuit."""

    def __init__(self, sink: Sink, bus: EventBus) -> None:
        self.sink = sink
        self.bus = bus
        self.name = sink.name
        self.queue: collections.deque[BaseEvent] = collections.deque()
        self.in_flight: list[BaseEvent] = []
        self.stats = SinkStats(name=sink.name)
        self.lag = LagRecorder()
        self.log = _RateLimitedLog()
        self.log_drop = _RateLimitedLog()  # queue overflow drops: not hidden behind write errors
        self.opened = False
        self.open_exc: Exception | None = None  # why the last open failed (None: it did not)
        self.spool_instead = False  # spooling to a directory of its own: its own was busy
        self.closing = False
        self.finished = False  # run() got to the end: the sink was closed (or never opened)
        self.broken = False  # run() failed unexpectedly: see run()
        self.abandoned = False  # close() gave up on the bus thread: see abandon()
        self.released = False  # see release()
        self.is_transient_failed = False  # sink.is_transient() raised (logged once)
        self.urgent = False
        self.waiting_for_batch = False
        self.consecutive_failures = 0
        self.circuit_until = 0.0
        self.wakeup: anyio.Event | None = None
        self.done: anyio.Event | None = None
        # The sink's disk spool (eventbus.spool.Spool) when it has one: see EventBus.add_sink.
        self.spool: Any = None
        self.spool_batch: Any = None  # read from the spool, not yet delivered
        self.spool_failing = False  # the last spool append failed (logged once per streak)
        self.leftover = 0  # records an earlier run left in the spool, still to drain
        # No duplicates: metric events (Log/Evaluate/Predict) below ``floor`` are
        # skipped (a resumed run's or a replay's starting mark), and so are those at
        # ``floor`` whose names (eventbus._marks) are all in ``floor_names`` (None: not
        # known, all of them). ``mark`` is the highest step of such an event delivered
        # so far; ``mark_names`` is ``(step, names)``: the names delivered at that step,
        # set before ``mark`` moves, in one assignment (read from other threads: see
        # EventBus.high_water_names). None, or an older step: not known.
        self.floor: int | None = None
        self.floor_names: frozenset[str] | None = None
        self.mark: int | None = None
        self.mark_names: tuple[int, frozenset[str]] | None = None

    # -- on the loop, called by the pump -------------------------------------------

    def offer(self, events: list[BaseEvent], urgent: bool) -> None:
        st = self.stats
        if self.broken or self.abandoned:
            # Its worker failed (see run), or close() gave up on it: nothing will deliver these.
            st.received += len(events)
            st.dropped += len(events)
            if self.broken:
                st.failed += len(events)
            else:
                st.abandoned += len(events)
            return
        q = self.queue
        spool = self.spool
        n = len(events)
        if len(q) + n <= self.sink.capacity and (spool is None or spool.pending <= 0):
            # Room for all of them (the usual case): one C-level extend, no per-event loop.
            st.received += n
            q.extend(events)
        elif spool is not None:
            # The spool holds events (these go behind them), or the queue overflows.
            self._spill(events)
        else:
            st.received += n
            self._overflow(events)
        depth = len(q) + len(self.in_flight)
        if depth > st.queue_high_water:
            st.queue_high_water = depth
        if urgent:
            self.urgent = True
        # An idle worker wakes for anything; one that is letting a batch fill wakes
        # early only for an urgent event or a full batch.
        if self.wakeup is not None and (
            not self.waiting_for_batch or urgent or len(q) >= self.sink.max_batch_size
        ):
            self.wakeup.set()

    def _spill(self, events: list[BaseEvent]) -> None:
        """``events`` (just arrived) to the spool, in publish order. While the spool
        holds events they go behind them (whatever the queue holds then is older than
        the spool's: see _give_up). Else the queue overflows: what it holds goes first,
        then ``events``, and the queue is empty; the worker drains the spool from there.
        A batch in flight is older still: should it fail, _give_up keeps it in front."""
        if self.spool.pending > 0:
            self._to_spool(events, received=len(events))
            return
        q = self.queue
        # Counted only once written (received for ``events``, spooled for all): a
        # stats() reader meanwhile sees the queue and the counters as they were.
        if self._to_spool(list(q) + events, count_failed=len(events), received=len(events)):
            q.clear()

    def _overflow(self, events: list[BaseEvent]) -> None:
        """A queue without a spool is full: its overflow policy, counted and logged."""
        q = self.queue
        cap = self.sink.capacity
        st = self.stats
        oldest = self.sink.overflow is Overflow.DROP_OLDEST
        before = st.overflow
        for ev in events:
            if len(q) < cap:
                q.append(ev)
            elif oldest:
                q.popleft()
                q.append(ev)
                st.overflow += 1
                st.dropped += 1
            else:
                st.overflow += 1
                st.dropped += 1
        self.log_drop(
            logging.WARNING,
            "eventbus: the queue of sink %r is full (capacity %d): %d events dropped (%s), %d in all; the sink is "
            "down or slower than the training loop (give it a larger capacity, or spool=True to keep them on disk)",
            self.name,
            cap,
            st.overflow - before,
            "the oldest" if oldest else "the newest",
            st.overflow,
        )

    def _unspool(self, n: int) -> None:
        """``n`` spooled events left the spool (delivered, skipped or lost; the caller
        counts that). Never below 0: records this bus did not count (another writer's)
        are counted as received now, so that the identity holds."""
        st = self.stats
        if n > st.spooled:
            st.received += n - st.spooled
            st.spooled = 0
        else:
            st.spooled -= n

    def _to_spool(
        self, events: Sequence[BaseEvent], count_failed: int | None = None, *, received: int = 0, front: bool = False
    ) -> bool:
        """Append ``events`` to the spool (``front``: in front of what it holds, for
        events older than those) and count them as spooled, and the last ``received``
        of them (new arrivals) as received, once written. When that fails, count
        ``count_failed`` of them (default: all) as failed and dropped."""
        try:
            if front:
                self.spool.prepend(events)
            else:
                self.spool.append(events)
        except Exception as exc:  # a full disk must not stop training: count it
            self.stats.errors += 1
            self.stats.last_error = f"spool: {exc!r}"
            if not self.spool_failing:  # once per failing streak, not once per event
                self.spool_failing = True
                from eventbus.spool import SpoolFullError, is_disk_full

                why = "the disk is full" if is_disk_full(exc) else str(exc) if isinstance(exc, SpoolFullError) else repr(exc)
                logger.error(
                    "eventbus: cannot write the spool of sink %r in %s: %s. Its undeliverable events are "
                    "counted as failed (bus.stats()) until the spool can be written again; training continues.",
                    self.name,
                    self.spool.directory,
                    why,
                )
            lost = len(events) if count_failed is None else count_failed
            self.stats.received += received
            self.stats.failed += lost
            self.stats.dropped += lost
            return False
        self.spool_failing = False
        self.stats.spooled += len(events)
        self.stats.received += received
        return True

    async def _wait_circuit(self) -> None:
        """Sleep until the circuit half-opens, or the bus closes."""
        with anyio.move_on_after(max(0.0, self.circuit_until - time.monotonic())):
            while not self.closing:
                await self._wait()

    async def _drain_spool(self) -> None:
        """Deliver the oldest spooled batch (the sink is back), or wait out the circuit."""
        if time.monotonic() < self.circuit_until:
            await self._wait_circuit()
            return
        if self.spool_batch is None:
            try:
                self.spool_batch = self.spool.read(self.sink.max_batch_size)
            except SpoolError:  # closed: close() gave up on this thread meanwhile
                self.abandoned = True
                return
            except OSError as exc:
                # The spool cannot be read back (removed, permissions): what it holds is
                # lost to this run (counted as failed), and the sink goes on without it.
                self._record_error("spool read", exc)
                st = self.stats
                lost, self.spool.pending, self.leftover = max(0, self.spool.pending), 0, 0
                st.failed += lost
                st.dropped += lost
                self._unspool(lost)
                return
        batch = self.spool_batch
        # Counted as delivered and no longer spooled together (see _attempt).
        if batch.events and not await self._attempt(batch.events, spooled=True):
            return  # still on disk; tried again after the backoff/circuit
        if self.abandoned:
            # close() gave up on this thread meanwhile and closed the spool: what it
            # holds stays there, as the final stats count it.
            return
        self.spool_batch = None
        st = self.stats
        lost = self.spool.consume(batch)
        if lost:  # records the spool counted but could not read back (corruption)
            st.failed += lost
            st.dropped += lost
            self._unspool(lost)
        if self.leftover:
            self.leftover = max(0, self.leftover - len(batch.events) - lost)
            if not self.leftover and self.floor is not None and self.mark is not None:
                # An earlier run's spool is delivered: this run's replays of those
                # steps would be duplicates.
                if self.mark > self.floor:
                    self.floor, self.floor_names = self.mark, self._names_at_mark()
                elif self.mark == self.floor and self.floor_names is not None:
                    self.floor_names = self._names_at_mark()

    def set_leftover(self, n: int) -> None:
        """What an earlier run left in the spool: ``n`` records, counted as received
        and spooled (replacing an earlier count)."""
        n = max(0, n)
        d = n - self.leftover
        self.leftover = n
        self.stats.spooled += d
        self.stats.received += d

    def claim_spool(self) -> None:
        """At start, before the bus thread runs: lock the spool directory for this bus.

        - Another live bus holds it (a second run launched with the same output_dir):
          this one spools to a directory of its own, ``<dir>.<run_id>``, with a warning.
        - It holds an earlier run's leftovers and this run is not a resume of that
          run (``run.resumed``, or the same run id): they are not this run's to
          deliver. They are moved to ``<dir>.<their run id>``, for ``eventbus
          replay``, with a warning that names the command.
        """
        from eventbus.spool import Spool

        spool = self.spool
        run = self.bus.run
        base = spool.directory
        tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(run.run_id))[:64] or "run"
        for k in range(1, 101):
            try:
                if spool.lock():
                    break
            except (OSError, SpoolError) as exc:
                logger.warning(
                    "eventbus: cannot lock the spool directory %s of sink %r (%r); it is used without a lock",
                    spool.directory,
                    self.name,
                    exc,
                )
                break
            other = base.with_name(f"{base.name}.{tag}" + ("" if k == 1 else f".{k}"))
            if k == 1:
                from eventbus.spool import locked_here

                holder = (
                    "another bus of this process (an earlier Trainer's, or a bridge's not closed yet: close it "
                    "before the next run)"
                    if locked_here(base)
                    else "another live bus (another run with the same output_dir?)"
                )
                logger.warning(
                    "eventbus: the spool %s of sink %r is in use by %s; this run (%s) spools to %s instead "
                    "(removed at close if nothing is left in it)",
                    base,
                    self.name,
                    holder,
                    run.run_id,
                    other,
                )
            spool = self.spool = Spool(other, max_file_bytes=spool.max_file_bytes, fsync_interval=spool.fsync_interval)
            self.spool_instead = True
        # Whose leftovers: state.json says, else the first pending event. Another
        # run's are not delivered into this one, resumed or not (a resume from another
        # run's checkpoint in the same output_dir is a resume of that run, not of the
        # one that spooled); only a resume cannot tell unlabelled ones apart.
        source = spool.run_id or (spool.first_run_id() if spool.pending > 0 else None)
        foreign = source is not None and source != run.run_id
        if spool.pending > 0 and (foreign or (source is None and not run.resumed)):
            n = spool.pending
            try:
                aside = spool.move_aside(source or "unknown-run")
            except (OSError, SpoolError) as exc:
                logger.error(
                    "eventbus: sink %r: %d events an earlier run (%s) left in the spool %s could not be moved "
                    "aside (%r); they are delivered to this run",
                    self.name,
                    spool.pending,
                    source,
                    spool.directory,
                    exc,
                )
            else:
                logger.warning(
                    "eventbus: sink %r: the spool %s held %d events of another run (%s), which this run (%s) "
                    "does not deliver; they were moved to %s. To send them: eventbus replay %s --to %s",
                    self.name,
                    spool.directory,
                    n,
                    source or "unknown",
                    run.run_id,
                    aside,
                    aside,
                    self.name,
                )
        if spool.run_id != run.run_id:
            if foreign or not run.resumed:
                # Another run's marks are not this run's (see EventBus.add_sink).
                spool.marks.clear()
                spool.mark_names.clear()
                spool.replayed_ns.clear()
            spool.run_id = run.run_id
        self.set_leftover(spool.pending)

    def _names_at_mark(self) -> frozenset[str] | None:
        mn = self.mark_names
        return mn[1] if mn is not None and mn[0] == self.mark else None

    # -- the worker task --------------------------------------------------------------

    async def run(self) -> None:
        self.wakeup = anyio.Event()
        sink = self.sink
        try:
            await self._try_open()
            while True:
                if self.abandoned:
                    # close() gave up on this thread (a sink blocked the loop) and
                    # accounted for what it held; the spool is closed: touch nothing.
                    break
                if not self.queue:
                    if self.spool is not None and self.spool.pending > 0:
                        if self.closing and time.monotonic() < self.circuit_until:
                            break  # still down: the spool keeps them for a replay
                        await self._drain_spool()
                        continue
                    if self.closing:
                        break
                    await self._wait()
                    continue
                if self.spool is not None and self.spool.pending > 0 and time.monotonic() < self.circuit_until:
                    # Queued events older than the spooled ones wait in memory (see
                    # _give_up) for the sink to come back.
                    if self.closing:
                        break
                    await self._wait_circuit()
                    continue
                if not (self.urgent or self.closing) and len(self.queue) < sink.max_batch_size:
                    # Give the batch up to max_delay to fill, as BatchSpanProcessor does.
                    self.waiting_for_batch = True
                    with anyio.move_on_after(sink.max_delay):
                        while not (self.urgent or self.closing) and len(self.queue) < sink.max_batch_size:
                            await self._wait()
                    self.waiting_for_batch = False
                    if not self.queue:  # spilled to the spool meanwhile (see offer)
                        continue
                n = min(len(self.queue), sink.max_batch_size)
                q = self.queue
                if n == len(q):  # caught up: take it all at C speed
                    batch = list(q)
                    q.clear()
                    # Only now is every urgent event taken; clearing the flag earlier
                    # would leave one queued behind a full batch waiting max_delay.
                    self.urgent = False
                else:
                    batch = [q.popleft() for _ in range(n)]
                self.in_flight = batch
                # Not in a finally: when the close deadline cancels a write, the batch
                # must stay in in_flight so that abandon() counts (or spools) it.
                await self._deliver(batch)
                self.in_flight = []
            if not self.abandoned:  # else release() saw to the sink
                await self._close_sink()
                self.finished = True
        except Exception:
            # Not a sink's error (those are counted where they are raised) but a bug, or
            # a sink misbehaving in a way not foreseen: it takes this sink out, never the
            # bus thread and the other sinks.
            logger.exception("eventbus: the worker of sink %r failed; its events are counted as failed from now on", self.name)
            self.broken = True
            left = self.in_flight + list(self.queue)
            self.queue.clear()
            self.in_flight = []
            self.stats.failed += len(left)
            self.stats.dropped += len(left)
        finally:
            if self.done is not None:
                self.done.set()

    async def _wait(self) -> None:
        assert self.wakeup is not None
        await self.wakeup.wait()
        self.wakeup = anyio.Event()

    @property
    def open_error(self) -> str | None:
        """Why the last open failed, as logged; None when it did not."""
        return None if self.open_exc is None else _describe(self.open_exc)

    async def _try_open(self) -> bool:
        if self.opened:
            return True
        try:
            with anyio.fail_after(self.sink.write_timeout):
                await self.sink.open(self.bus.run)
        except Exception as exc:
            self._record_error("open", exc)
            self.open_exc = exc
            return False
        self.opened = True
        self.open_exc = None
        return True

    async def _close_sink(self) -> None:
        if not self.opened:
            return
        try:
            await self.sink.close()
        except Exception as exc:
            self._record_error("close", exc)

    def _record_error(self, what: str, exc: BaseException) -> None:
        self.stats.errors += 1
        text = _describe(exc)
        self.stats.last_error = f"{what}: {text}"
        self.log(logging.WARNING, "eventbus: sink %r failed in %s: %s", self.name, what, text)

    def _backoff(self, attempt: int, exc: BaseException) -> float:
        retry_after = retry_after_seconds(exc)
        if retry_after is not None:
            return retry_after
        base = min(self.sink.retry_backoff_max, self.sink.retry_backoff * (2 ** (attempt - 1)))
        return base * random.uniform(0.5, 1.0)

    def _is_transient(self, exc: BaseException) -> bool:
        """``sink.is_transient(exc)``; a classifier that raises (e.g. reads
        ``exc.response`` of an exception without one) means not transient, logged."""
        try:
            return bool(self.sink.is_transient(exc))
        except Exception as bug:
            if not self.is_transient_failed:  # a bug in the sink: once is enough
                self.is_transient_failed = True
                logger.warning(
                    "eventbus: sink %r: is_transient() raised %r for %r; such errors are treated as not transient",
                    self.name,
                    bug,
                    exc,
                )
            return False

    async def _deliver(self, batch: list[BaseEvent]) -> None:
        now = time.monotonic()
        if now < self.circuit_until or not await self._attempt(batch):
            self._give_up(batch)

    async def _attempt(self, events: list[BaseEvent], spooled: bool = False) -> bool:
        """Write ``events`` (less the duplicates: see ``floor``) with retries; count
        them on success (``spooled``: read from the spool, so no longer counted as
        spooled). On failure count nothing and return False."""
        sink = self.sink
        st = self.stats
        batch = events
        floor = self.floor
        if floor is not None:
            known = self.floor_names
            if known is None:
                batch = [ev for ev in events if not (type(ev) in _METRIC_TYPES and ev.step <= floor)]
            else:
                # Names are looked at only for the events at the floor's own step.
                batch = [
                    ev
                    for ev in events
                    if not (
                        type(ev) in _METRIC_TYPES
                        and (ev.step < floor or (ev.step == floor and _metric_names(ev) <= known))
                    )
                ]
        if spooled and self.spool is not None:
            # Events without a step that an `eventbus replay` of this spool to this
            # sink already delivered (it keeps the time of the last one it read).
            replayed = self.spool.replayed_ns.get(self.name)
            if replayed is not None:
                batch = [ev for ev in batch if type(ev) in _METRIC_TYPES or not (type(ev.time_ns) is int and ev.time_ns <= replayed)]
        attempt = 0
        while True:
            try:
                if batch:
                    if not await self._try_open():
                        if _fails_for_good(self.open_exc):
                            # Retrying cannot fix it (a path that is a directory, a bad
                            # option): the batch fails at once, and the open is tried
                            # again with the next one.
                            raise SinkError(f"sink {self.name!r} could not be opened: {self.open_error}")
                        # Anything else may be an outage (an SDK's own connection or
                        # DNS error): retried as one.
                        raise ConnectionError(f"sink {self.name!r} could not be opened: {st.last_error}")
                    with anyio.fail_after(sink.write_timeout):
                        await sink.write(batch)
            except Exception as exc:
                self._record_error("write", exc)
                if isinstance(exc, TimeoutError) or self._is_transient(exc):
                    if attempt < sink.max_retries and not self.abandoned:
                        attempt += 1
                        st.retries += 1
                        await anyio.sleep(self._backoff(attempt, exc))
                        continue
                self.consecutive_failures += 1
                if self.consecutive_failures >= sink.circuit_threshold:
                    self.circuit_until = time.monotonic() + sink.circuit_cooldown
                    st.circuit_open = True
                return False
            if self.abandoned:
                return True  # close() gave up on this thread and counted (or spooled) these already
            skipped = len(events) - len(batch)
            st.delivered += len(batch)
            st.skipped += skipped
            st.dropped += skipped
            if spooled:
                self._unspool(len(events))
            self.consecutive_failures = 0
            st.circuit_open = False
            done_ns = time.time_ns()
            try:
                self.lag.add_batch(done_ns, batch)
            except Exception:  # a time_ns that is not a number (events are not type-checked when built)
                self.lag.add_batch(done_ns, [ev for ev in batch if type(ev.time_ns) is int])
            metric = [ev for ev in batch if type(ev) in _METRIC_TYPES]
            if metric:
                self._raise_mark(metric)
            return True

    def _raise_mark(self, metric: list[BaseEvent]) -> None:
        """Raise the mark after ``metric`` (a delivered batch's metric events) were
        delivered: to their top step, or add the names delivered at the mark's step.
        Names are computed only for the events at the top step."""
        # The pump lets only int steps through to here (EventBus._bad_step).
        top = max([ev.step for ev in metric])
        mark = self.mark
        if mark is not None and top < mark:
            return
        names: set[str] = set()
        for ev in metric:
            if ev.step == top:
                names |= _metric_names(ev)
        if mark is None or top > mark:
            self.mark_names = (top, frozenset(names))  # first: see __init__
            self.mark = top
        else:
            had = self.mark_names
            if had is None or had[0] != top or names <= had[1]:
                return  # names at the mark not known (an int mark): they stay so
            self.mark_names = (top, had[1] | names)
        if self.spool is not None and not self.abandoned:
            self.spool.marks[self.name] = top
            self.spool.mark_names[self.name] = _marks.names_entry(self.mark_names)
            try:
                self.spool.save_state()
            except OSError as exc:
                self._record_error("spool state", exc)

    def _give_up(self, batch: list[BaseEvent]) -> None:
        if self.abandoned:
            return  # abandon() counted (or spooled) it already, as in_flight
        if self.spool is not None and self.spool.pending > 0:
            # Newer events are on disk already: these older ones stay in memory, in
            # front, and are tried again first (the queue takes nothing new meanwhile;
            # at close, abandon() puts them in front on disk).
            self.queue.extendleft(reversed(batch))
            return
        if self.spool is not None:
            # The queued events are newer than ``batch``: they go to disk behind it, and
            # everything is drained from there, in order, once the sink is back.
            spill = batch + list(self.queue)
            if self._to_spool(spill, count_failed=len(batch)):
                self.queue.clear()
            return  # on failure only ``batch`` is lost; the queue waits for the sink
        self.stats.failed += len(batch)
        self.stats.dropped += len(batch)

    def abandon(self) -> int:
        """Count what is still queued as dropped (the close deadline passed). The
        worker does nothing more afterwards, should its thread ever run again."""
        self.abandoned = True
        left = self.in_flight + list(self.queue)
        self.queue.clear()
        self.in_flight = []
        n = len(left)
        if not n:
            return 0
        if self.spool is not None:
            # Spooling is local: worth doing even past the deadline (a failed write is
            # counted as failed by _to_spool). These are older than anything the spool
            # holds (see _give_up and _spill): they go in front, in publish order.
            self._to_spool(left, front=self.spool.pending > 0)
        else:
            self.stats.abandoned += n
            self.stats.dropped += n
        return n

    def release(self) -> None:
        """Once the worker is stopped: a sink it did not close (the close deadline cut
        it off, or it failed) is told to let go of its thread or child process
        (``Sink._release``), without waiting for it."""
        if self.finished or self.released:
            return
        self.released = True
        try:
            self.sink._release(self.opened)
        except Exception as exc:
            self._record_error("release", exc)

    def close_spool(self) -> None:
        """fsync and close the spool (what it holds stays for a replay or a resume)."""
        if self.spool is not None:
            try:
                self.spool.close()
                if self.spool_instead:
                    self.spool.remove_if_empty()  # the stand-in of a busy directory
            except Exception as exc:
                self._record_error("spool close", exc)

    def snapshot(self) -> SinkStats:
        # The bus thread moves events between the queue, in_flight and the counters
        # a few bytecodes apart (received before the queue grows, the queue emptied
        # before in_flight is set, delivered counted before in_flight is cleared), and
        # a reader on another thread copies the counters and reads the queue at two
        # moments: no order of those steps keeps the identity for every interleaving.
        # So the reader checks it and, in the rare case it fell between two such
        # steps, lets the bus thread finish them and reads again. The bus thread pays
        # nothing for it.
        # Each wait is twice the last (up to the interpreter's switch interval): on a
        # loaded machine the bus thread may not run again for milliseconds.
        wait = _SNAPSHOT_RETRY_WAIT
        deadline = time.monotonic() + _SNAPSHOT_PATIENCE
        while True:
            st = msgspec.structs.replace(self.stats)
            st.queue_depth = len(self.queue) + len(self.in_flight)
            if st.received == st.delivered + st.dropped + st.spooled + st.queue_depth or time.monotonic() > deadline:
                break
            time.sleep(wait)
            wait = min(2 * wait, _SNAPSHOT_MAX_WAIT)
        st.lag_p50_ms = self.lag.percentile(0.50)
        st.lag_p99_ms = self.lag.percentile(0.99)
        st.circuit_open = time.monotonic() < self.circuit_until
        return st


class EventBus:
    """The bounded, asynchronous event bus.

    Usage::

        with EventBus([JSONLSink()], run=RunInfo(output_dir="runs/x")) as bus:
            bus.publish(Log(step=1, values={"loss": loss_tensor}))
        print(bus.stats().format_table())

    ``publish()`` may be called from any thread, before or after ``start()``; it never
    blocks and never raises once the bus is started. ``close(timeout)`` is one deadline
    for the whole shutdown: whatever a sink has not received by then is counted (and
    spooled where the sink has a spool).

    ``rank``: sinks run on world rank 0 only, unless a sink sets ``all_ranks``.

    Spool (``eventbus.spool``): a sink has one when its ``overflow`` is
    ``Overflow.SPOOL`` or it sets ``spool = True``; it lives in ``sink.spool_dir``, else
    ``<run.output_dir>/spool/<sink.name>``. Its events go there when its queue is full
    (whatever its ``overflow``: the queue goes with them, so the disk keeps publish
    order), when a write still fails after the retries, and while its circuit is open
    (the sink is down). While the spool holds events, newer ones are appended behind
    them, and the worker drains the spool to the sink, in order, before anything
    newer, once the sink is back. What the run (or the run it resumes) left in the
    spool is delivered first (counted as received); another run's leftovers are moved
    to ``<spool dir>.<its run id>`` for ``eventbus replay``, with a warning. A running
    bus locks its spool directory: a second live bus on the same one spools to
    ``<spool dir>.<run id>`` instead. Whatever is still spooled at close stays on disk
    for ``eventbus replay`` or a resumed run.

    ``resume_marks``: per sink name, the high-water mark a resumed run starts from:
    the step :meth:`high_water_marks` returned when the checkpoint was saved, or the
    ``{"step": int, "names": [...]}`` entry :meth:`high_water_names` returned. Metric
    events below that step are not delivered again to that sink, nor those at the step
    whose names it already got (all of them for a bare step). A sink with a spool also
    keeps its mark in the spool's ``state.json``, used when ``run.resumed`` (or the
    run id matches); the higher mark wins, the names of equal ones are united.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        *,
        run: RunInfo | None = None,
        ingress_capacity: int = 65_536,
        flush_interval: float = 0.2,
        urgent: Iterable[type[BaseEvent]] = DEFAULT_URGENT,
        close_timeout: float = 30.0,
        resume_marks: dict[str, int | dict[str, Any]] | None = None,
    ) -> None:
        if isinstance(ingress_capacity, bool) or not isinstance(ingress_capacity, int) or ingress_capacity < 1:
            raise SinkConfigError(f"EventBus: ingress_capacity must be an int >= 1, got {ingress_capacity!r}")
        if not _is_number(flush_interval) or not 0 < flush_interval < math.inf:
            raise SinkConfigError(f"EventBus: flush_interval must be a number of seconds > 0, got {flush_interval!r}")
        _check_timeout("EventBus: close_timeout", close_timeout)
        if run is not None and not isinstance(run, RunInfo):
            raise SinkConfigError(f"EventBus: run must be an eventbus.RunInfo or None, got {type(run).__name__}: {run!r}")
        try:
            urgent_types = frozenset(urgent)
        except TypeError:
            urgent_types = None
        if urgent_types is None or not all(isinstance(t, type) and issubclass(t, BaseEvent) for t in urgent_types):
            raise SinkConfigError(f"EventBus: urgent must be an iterable of event classes, e.g. (Evaluate, Save), got {urgent!r}")
        self.run = run or RunInfo()
        self.close_timeout = close_timeout
        self._ingress: collections.deque[BaseEvent] = collections.deque()
        self._ingress_capacity = ingress_capacity
        self._flush_interval = flush_interval
        # The pump also wakes as soon as the ingress holds this many events, so that a
        # burst fills the sinks' queues instead of the ingress while it sleeps.
        self._wake_depth = max(1, ingress_capacity // 8)
        self._deep_wake = False  # a wake for a deep ingress is pending
        self._urgent = urgent_types
        self._log_urgent = Log in self._urgent
        self._workers: list[_SinkWorker] = []
        self._skipped: list[Sink] = []
        self._routes: dict[type[BaseEvent], tuple[_SinkWorker, ...]] = {}
        self._drop_lock = threading.Lock()
        self._ingress_dropped = 0
        self._taken = 0
        self._ingress_high_water = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: anyio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._closing = False
        self._close_on_exit = False  # close() was called on the bus thread: see close()
        self._closed = False
        self._deadline = math.inf
        self._final_stats: BusStats | None = None
        self._resume_marks = _check_marks(resume_marks)
        self._bad_steps: set[tuple[type, type]] = set()  # (event type, step type) warned about
        for sink in sinks:
            self.add_sink(sink)

    # -- configuration -------------------------------------------------------------

    @property
    def sinks(self) -> list[Sink]:
        """The sinks attached to this bus (on this rank)."""
        return [w.sink for w in self._workers]

    def add_sink(self, sink: Sink) -> None:
        """Attach a sink. Only before :meth:`start`."""
        if self._thread is not None:
            raise BusStateError("add sinks before the bus starts: EventBus.add_sink() was called on a running bus")
        if not isinstance(sink, Sink):
            raise SinkConfigError(f"expected an eventbus.Sink instance, got {type(sink).__name__}: {sink!r}")
        _validate_sink(sink)
        if any(w.name == sink.name for w in self._workers):
            raise SinkConfigError(
                f"a sink named {sink.name!r} is already attached; give the second one another name (sink.name = ...)"
            )
        if self.run.rank != 0 and not sink.all_ranks:
            self._skipped.append(sink)
            return
        if sink.isolate:
            sink = _isolated(sink)
        worker = _SinkWorker(sink, self)
        mark = self._resume_marks.get(sink.name)  # (step, names): eventbus._marks
        if sink.overflow is Overflow.SPOOL or getattr(sink, "spool", False) is True:
            from eventbus.spool import Spool

            spool = worker.spool = Spool.for_sink(sink, self.run)
            # An earlier run left events here: they are this sink's oldest, drained
            # first, and counted as received (and spooled) by this bus. Checked again
            # at start(), once the directory is locked (see _SinkWorker.claim_spool).
            worker.set_leftover(spool.pending)
            saved = _marks.combine(
                _marks.parse(spool.marks.get(sink.name)), _marks.parse_names_entry(spool.mark_names.get(sink.name))
            )
            # What this run delivered before it was interrupted (a resume of it):
            # not another run's marks, nor a mark that holds back a new training
            # phase of the same run (a second train(): its steps count from 0 again).
            if saved is not None and self.run.resumed and spool.run_id in (None, self.run.run_id):
                mark = _marks.merge(mark, saved)
        if mark is not None:
            step, names = mark
            self.run.resume_marks[sink.name] = step
            worker.floor, worker.floor_names = step, names
            worker.mark_names = None if names is None else (step, names)
            worker.mark = step
        elif self.run.resumed:
            worker.floor = -1  # raised to the earlier run's mark once its spool is drained
        self._workers.append(worker)
        self._build_routes()

    def _build_routes(self) -> None:
        routes: dict[type[BaseEvent], list[_SinkWorker]] = {}
        for w in self._workers:
            for t in w.sink.events:
                routes.setdefault(t, []).append(w)
        self._routes = {t: tuple(ws) for t, ws in routes.items()}

    def wants(self, event_type: type[BaseEvent]) -> bool:
        """Whether any sink subscribes to ``event_type`` (so the event is worth building)."""
        return event_type in self._routes

    def sample_interval(self, event_type: type[BaseEvent]) -> float:
        """Seconds between the ``event_type`` events worth publishing: when every sink
        subscribed to it lists it in :attr:`Sink.sampled <eventbus.Sink.sampled>`, the
        shortest ``max_delay`` among them (one per batch is all they use); 0.0 when
        some sink needs each one, or none subscribes."""
        workers = self._routes.get(event_type, ())
        if not workers or not all(event_type in w.sink.sampled for w in workers):
            return 0.0
        return min(w.sink.max_delay for w in workers)

    # -- the hot path --------------------------------------------------------------

    def publish(self, event: BaseEvent) -> None:
        """Hand ``event`` to the bus. O(1), never blocks, never raises once started."""
        ingress = self._ingress
        depth = len(ingress)
        if self._closed or depth >= self._ingress_capacity:
            with self._drop_lock:  # only on the overload path
                self._ingress_dropped += 1
            return
        ingress.append(event)
        deep = depth >= self._wake_depth and not self._deep_wake
        if (deep or type(event) in self._urgent) and self._loop is not None:
            if deep:
                self._deep_wake = True  # one wake per deep ingress, not one per event
            try:
                self._loop.call_soon_threadsafe(self._wake_pump)
            except RuntimeError:  # the loop is closing; the final drain takes it
                pass

    def publish_log(
        self, run_id: str, rank: int, step: int, epoch: float | None, values: _values.Snapshot, settle: dict[str, Any] | None = None
    ) -> None:
        """``publish(Log(run_id=..., rank=..., step=..., epoch=..., values=values))``,
        with the event built on the bus thread: for a loop that logs every step. The
        caller hands ``values`` over (a :class:`~eventbus.values.Snapshot` it never
        changes afterwards, its tensors captured); the event's ``time_ns`` is taken now.
        Built there, the event is made once, its values already read, instead of once
        on the training thread and again when the bus reads its tensors.

        ``settle``: a dict holding some of the same tensors (a ``state.log_history``
        entry), into which the bus thread writes each value it read, in place of the
        tensor, once read: the caller's record holds numbers from then on, not
        tensors (device memory, on an accelerator), without reading them itself."""
        if self._log_urgent:
            # (``settle`` is not written then: reading the values here would be work,
            # maybe a device wait, on the caller's thread; the caller reads them later.)
            self.publish(Log(run_id=run_id, rank=rank, step=step, epoch=epoch, values=values))
            return
        # publish()'s body for an event that is never urgent (the test above).
        ingress = self._ingress
        depth = len(ingress)
        if self._closed or depth >= self._ingress_capacity:
            with self._drop_lock:
                self._ingress_dropped += 1
            return
        # A tuple is not an event: _route builds the Log.
        ingress.append((run_id, rank, step, epoch, time.time_ns(), values, settle))
        if depth >= self._wake_depth and not self._deep_wake and self._loop is not None:
            self._deep_wake = True
            try:
                self._loop.call_soon_threadsafe(self._wake_pump)
            except RuntimeError:
                pass

    # -- lifecycle -----------------------------------------------------------------

    @property
    def flush_interval(self) -> float:
        """Seconds between the pump's deliveries to the sinks' queues."""
        return self._flush_interval

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`close`."""
        return self._thread is not None and not self._closed

    def start(self) -> EventBus:
        """Start the bus thread and open every sink on it. Idempotent while the bus
        runs; a closed bus does not start again (:class:`BusStateError`). Each sink's
        settings are checked again first, as :meth:`add_sink` checks them: they may be
        changed after attaching (:class:`SinkConfigError`, and the bus stays unstarted)."""
        if self._closing or self._closed:
            raise BusStateError("this EventBus was closed; create a new one")
        if self._thread is not None:
            return self
        for w in self._workers:
            _validate_sink(w.sink)
        self._build_routes()  # ``events`` may have changed too
        for w in self._workers:
            if w.spool is not None:
                w.claim_spool()
        self._thread = threading.Thread(target=self._thread_main, name="eventbus", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise BusStateError(f"the event bus thread failed to start: {self._start_error!r}") from self._start_error
        return self

    def __enter__(self) -> EventBus:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self, timeout: float | None = None) -> BusStats:
        """Deliver what is queued, close every sink, and stop, all within ``timeout``
        seconds (default ``close_timeout``; ``math.inf``: no deadline). Returns the
        final :meth:`stats`; events a sink did not get by the deadline are counted in
        its ``dropped``/``abandoned`` (or ``spooled``) and named in a warning. A sink
        the deadline cut off is told to let go of its thread or child process
        (a ``ThreadedSink``'s ``close_sync`` then runs on its thread once its hung
        call returns; an isolated sink's idle child closes the sink and exits, a busy
        one is terminated).

        Called on the bus thread itself (from a sink's hook), it cannot wait for that
        thread: it only starts the close, with the same deadline, and returns the
        current :meth:`stats` at once; the bus stops once that hook returns."""
        if timeout is not None:
            _check_timeout("EventBus.close(): timeout", timeout)
        if self._final_stats is not None:
            return self.stats()
        timeout = self.close_timeout if timeout is None else timeout
        on_bus_thread = self._thread is not None and self._thread is threading.current_thread()
        if not self._closing:
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._close_on_exit = on_bus_thread
            # One deadline for the spools too: no fsync (a slow disk) holds the loop or
            # this thread past it; what they spooled is written, and synced behind.
            for w in self._workers:
                if w.spool is not None:
                    w.spool.deadline = None if self._deadline == math.inf else self._deadline
            self._closing = True
        if self._thread is None:
            self._closed = True
            self._final_stats = self._finish_without_thread()
            return self._final_stats
        if on_bus_thread:
            self._wake_pump()
            return self.stats()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake_pump)
            except RuntimeError:
                pass
        left = self._deadline - time.monotonic()
        self._thread.join(None if left == math.inf else max(0.0, left) + 0.25)
        self._closed = True
        if self._thread.is_alive():
            # A sink blocked the loop itself (sync work inside an async write). The
            # thread is a daemon: abandon it and account for what it held.
            logger.error(
                "eventbus: the bus thread did not stop by the close deadline: a sink (or a write to a spool's disk) is "
                "blocking its loop"
            )
            self._abandon_all()
        return self._finish()

    def _finish(self) -> BusStats:
        """The final stats, once (by close(), or by the bus thread when a sink closed
        the bus from it)."""
        with self._drop_lock:
            if self._final_stats is not None:
                return self._final_stats
            self._closed = True
        # Published from another thread after the final drain: no sink will get
        # these any more, so they are counted as refused rather than left "queued".
        self._drop_ingress()
        stats = self.stats()
        stats.running = False
        lost = {n: s.abandoned for n, s in stats.sinks.items() if s.abandoned}
        with self._drop_lock:
            if self._final_stats is not None:  # the other caller was first
                return self._final_stats
            self._final_stats = stats
        if lost:
            logger.warning("eventbus: close deadline passed; events not delivered per sink: %s", lost)
        return stats

    def _finish_without_thread(self) -> BusStats:
        # Never started: what was published can go nowhere.
        self._drop_ingress()
        return self.stats()

    def _drop_ingress(self) -> None:
        n = len(self._ingress)
        self._ingress.clear()
        with self._drop_lock:
            self._ingress_dropped += n

    def _abandon_all(self) -> None:
        for w in self._workers:
            w.abandon()
            w.close_spool()
            w.release()

    # -- the bus thread ------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            anyio.run(self._main, backend="asyncio")
        except BaseException as exc:  # never kill the process from the bus thread
            if not self._started.is_set():
                self._start_error = exc
                self._started.set()
            else:
                logger.exception("eventbus: the bus thread crashed")
            self._abandon_all()
        if self._close_on_exit:  # a sink closed the bus from this thread: nobody joins it
            self._finish()

    def _wake_pump(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = anyio.Event()
        for w in self._workers:
            w.done = anyio.Event()
        async with anyio.create_task_group() as tg:
            for w in self._workers:
                tg.start_soon(w.run, name=f"eventbus-sink-{w.name}")
            self._started.set()
            await self._pump()
            for w in self._workers:
                w.closing = True
                if w.wakeup is not None:
                    w.wakeup.set()
            with anyio.move_on_after(max(0.0, self._deadline - time.monotonic())):
                for w in self._workers:
                    assert w.done is not None
                    await w.done.wait()
            tg.cancel_scope.cancel()
        self._abandon_all()

    async def _pump(self) -> None:
        while True:
            with anyio.move_on_after(self._flush_interval):
                assert self._wake is not None
                await self._wake.wait()
            if self._wake is not None and self._wake.is_set():
                self._wake = anyio.Event()
            self._drain()
            if self._closing:
                self._drain()
                return

    def _drain(self) -> None:
        self._deep_wake = False
        ingress = self._ingress
        n = len(ingress)
        if not n:
            return
        if n > self._ingress_high_water:
            self._ingress_high_water = n
        # In chunks: holding a whole drained ingress while the producer refills it
        # would double the worst-case memory. Only the n present now: a producer that
        # keeps publishing cannot keep the pump here forever.
        while n > 0:
            k = min(n, _DRAIN_CHUNK)
            self._route(k)
            n -= k

    def _route(self, n: int) -> None:
        # Take the chunk first, so that a concurrent stats() sees these n events as
        # taken (not as vanished) for microseconds rather than for the whole routing.
        popleft = self._ingress.popleft
        taken = [popleft() for _ in range(n)]
        self._taken += n
        urgent: set[_SinkWorker] = set()
        routes = self._routes
        urgent_types = self._urgent
        routed: list[tuple[BaseEvent, tuple[_SinkWorker, ...]]] = []
        for ev in taken:
            t = type(ev)
            if t is tuple:  # publish_log's: the Log is built here, its values read
                workers = routes.get(Log)
                if workers:
                    ev = _pending_log(ev)
                    if ev is not None and (type(ev.step) is int or (ev := self._bad_step(ev, workers)) is not None):
                        routed.append((ev, workers))
                continue
            workers = routes.get(t)
            if not workers:
                continue
            if not ev.run_id:
                # Published without one (a bus used on its own): the bus's run, so
                # that what sinks write (a JSONL line, a spool record) says which run.
                ev = _with_run_id(ev, self.run.run_id)
            if t in _VALUE_TYPES:
                # The metric events: their step is compared with each sink's marks.
                if type(ev.step) is not int and (ev := self._bad_step(ev, workers)) is None:
                    continue
                try:
                    ev = resolve_event(ev)
                except Exception as exc:
                    logger.warning("eventbus: could not resolve the tensor values of %s: %r", t.__name__, exc)
                    ev = _unresolvable(ev)
            if t in urgent_types:
                urgent.update(workers)
            routed.append((ev, workers))
        if not routed:
            return
        first = routed[0][1]
        if all(ws == first for _, ws in routed):
            # The common case (every event here goes to the same sinks): one list,
            # copied per sink at C speed, instead of an append per event per sink.
            evs = [ev for ev, _ in routed]
            for w in first:
                w.offer(list(evs), w in urgent)
            return
        for w in self._workers:
            mine = [ev for ev, ws in routed if w in ws]
            if mine:
                w.offer(mine, w in urgent)

    def _bad_step(self, ev: BaseEvent, workers: tuple[_SinkWorker, ...]) -> BaseEvent | None:
        """A metric event whose ``step`` is not an int (msgspec does not check types
        when an event is built): one whose step is an integer of another type (a numpy
        int) goes on with it as an int; any other (``None``, ``"7"``, ``7.5``) is
        counted as failed for each sink it was for, with one warning per event type
        and kind of value. Such a step cannot be compared with a sink's high-water
        mark, and no sink could log it at a step."""
        step = ev.step
        if not isinstance(step, bool):
            try:
                return msgspec.structs.replace(ev, step=operator.index(step))
            except Exception:
                pass
        kind = (type(ev), type(step))
        if kind not in self._bad_steps:
            self._bad_steps.add(kind)
            logger.warning(
                "eventbus: a %s event with step=%r (%s) is not delivered: step must be an int. It is counted as "
                "failed for each sink it was for; further %s events with a %s step are counted without a warning",
                type(ev).__name__,
                step,
                type(step).__name__,
                type(ev).__name__,
                type(step).__name__,
            )
        for w in workers:
            st = w.stats
            st.received += 1
            st.failed += 1
            st.dropped += 1
        return None

    # -- introspection ---------------------------------------------------------------

    def high_water_marks(self) -> dict[str, int]:
        """Per sink, the highest step of a metric event (``Log``, ``Evaluate``,
        ``Predict``) it has been delivered, counting the ``resume_marks`` it started
        from. Store it with the checkpoint and pass it back as
        ``EventBus(resume_marks=...)`` on resume: metric events at or below a sink's
        mark are then skipped for that sink (counted in ``skipped``), so no step is
        logged twice; with the names of :meth:`high_water_names`, those at the mark
        only when the sink got all of their names. Sinks with a spool also keep it in their spool's ``state.json``.
        What each sink got at that step: :meth:`high_water_names`."""
        return {w.name: w.mark for w in self._workers if w.mark is not None}

    def open_errors(self) -> dict[str, str]:
        """Per sink not open because its ``open()`` failed, that failure (the last
        attempt's: a sink whose open failed is tried again with its next batch)."""
        return {w.name: w.open_error for w in self._workers if not w.opened and w.open_error is not None}

    def high_water_names(self) -> dict[str, dict[str, Any]]:
        """Per sink whose mark's names are known, ``{"step": int, "names": [...]}``:
        the names (``"Log/loss"``, ``"Evaluate/eval_loss"``: the event type and a value
        key) of the metric events it was delivered at ``step``, its mark (or a step
        this call saw it move to: each entry is consistent on its own). Store it next
        to :meth:`high_water_marks` and pass the entry back as the sink's
        ``resume_marks`` value: the resumed run's metric events at that step are then
        skipped only when the sink got all of their names (a crash during the
        evaluation at a step whose training ``Log`` was delivered still gets the
        evaluation to the sink). A sink whose names are not known (a bare step it
        resumed from, not moved since) is left out: all of that step counts as sent."""
        out: dict[str, dict[str, Any]] = {}
        for w in self._workers:
            entry = _marks.names_entry(w.mark_names)
            if entry is not None:
                out[w.name] = entry
        return out

    def wait_handed(self, timeout: float) -> BusStats | None:
        """Wait, up to ``timeout`` seconds, until the sinks were handed everything
        published before the call (written, or dropped/spooled as the bus decides;
        a sink whose circuit is open keeps its queue), without closing anything.
        Returns the stats then, or ``None`` when the deadline came first. Not from
        the bus thread (it would wait for itself)."""
        deadline = time.monotonic() + timeout
        stats = self.stats()
        target = stats.published - stats.ingress_dropped  # accepted before this call
        settled: int | None = None
        while True:
            taken = stats.published - stats.ingress_dropped - stats.ingress_depth
            idle = taken >= target and all(s.queue_depth == 0 or s.circuit_open for s in stats.sinks.values())
            received = sum(s.received for s in stats.sinks.values())
            if idle and settled == received:
                return stats  # idle twice in a row: nothing was between the pump and a queue
            settled = received if idle else None
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.002 if idle else 0.01)
            stats = self.stats()

    def stats(self) -> BusStats:
        """A snapshot of the bus's and every sink's counters (safe from any thread;
        each sink's identity holds in it, see :class:`~eventbus.stats.SinkStats`)."""
        final = self._final_stats
        depth = len(self._ingress)
        return BusStats(
            published=self._taken + self._ingress_dropped + depth,
            ingress_dropped=self._ingress_dropped,
            ingress_depth=depth,
            ingress_high_water=self._ingress_high_water,
            running=self.running,
            # After close the sinks' counters are frozen as they were at the deadline
            # (an abandoned thread may still touch the live ones); the bus's own
            # counters stay live so that a publish after close is seen as a drop.
            sinks=dict(final.sinks) if final is not None else {w.name: w.snapshot() for w in self._workers},
        )

    def __repr__(self) -> str:
        names = ", ".join(w.name for w in self._workers)
        state = "running" if self.running else ("closed" if self._closed else "new")
        return f"<EventBus {state} sinks=[{names}]>"


_SNAPSHOT_RETRY_WAIT = 50e-6
_SNAPSHOT_MAX_WAIT = 5e-3
_SNAPSHOT_PATIENCE = 0.5
"""A stats() reader that caught the bus thread between two steps of moving events
reads a sink's counters again after 50 µs, then twice as long each time (at most
5 ms apart), for at most half a second (see snapshot())."""

_DRAIN_CHUNK = 4096
"""Events the pump routes at a time (bounds its temporary lists)."""

_VALUE_TYPES = frozenset({Log, Evaluate, Predict})
"""The event types whose payload may hold tensor snapshots to resolve."""


def _safe_values(mapping: dict[str, Any]) -> dict[str, Any]:
    """``mapping`` resolved value by value, NaN for any value that cannot be read."""
    out = {}
    for k, v in mapping.items():
        try:
            out[k] = _values.plain_array(_values.resolve(v))
        except Exception:
            out[k] = float("nan")
    return out


def _unresolvable(event: BaseEvent) -> BaseEvent:
    try:
        if isinstance(event, Log):
            return msgspec.structs.replace(event, values=_safe_values(event.values))
        if isinstance(event, (Evaluate, Predict)):
            return msgspec.structs.replace(event, metrics=_safe_values(event.metrics))
    except Exception:  # not a mapping at all: the sinks get it as it is (and may fail on it)
        pass
    return event


_malformed_log = _RateLimitedLog()


def _pending_log(item: tuple[str, int, int, float | None, int, Any, Any]) -> Log | None:
    """The Log event :meth:`EventBus.publish_log` queued as a tuple, its values read
    (``None``, with a warning, for a tuple that is not one: ``publish()`` given a tuple),
    and written into its ``settle`` dict."""
    try:
        run_id, rank, step, epoch, time_ns, values, settle = item
        try:
            resolved = _values.resolve_mapping(values)
        except Exception as exc:
            logger.warning("eventbus: could not resolve the tensor values of Log: %r", exc)
            resolved = _values.Snapshot(_safe_values(values))
        if resolved is not None:
            if settle is not None:
                _settle_from(settle, values, resolved)
            values = resolved
        return Log(run_id=run_id, rank=rank, step=step, epoch=epoch, time_ns=time_ns, values=values)
    except Exception as exc:
        _malformed_log(logging.WARNING, "eventbus: a Log that cannot be built from %.200r (%r) is not delivered", item, exc)
        return None


def _with_run_id(ev: BaseEvent, run_id: str) -> BaseEvent:
    try:
        return msgspec.structs.replace(ev, run_id=run_id)
    except Exception:  # not an event struct (publish() is not type-checked): as it is
        return ev


def _settle_from(settle: dict[str, Any], values: Mapping[str, Any], resolved: Mapping[str, Any]) -> None:
    """Write into ``settle`` the values read, for the keys where it still holds what
    ``values`` held or a tensor (the one whose copy ``values`` holds): each one a
    single dict assignment, which a reader on another thread sees whole."""
    for k, v in values.items():
        if resolved[k] is v:
            continue  # was a number already
        held = settle.get(k, _MISSING)
        if held is v or _values.is_tensor(held):
            settle[k] = resolved[k]


_MISSING = object()


def _isolated(sink: Sink) -> Sink:
    """The proxy that runs ``sink`` in a child process (``eventbus.isolation``).

    Isolation asked for must work: a sink that cannot run in a child is a
    :class:`SinkConfigError` when it is attached. Where it is only the class's
    preference (``isolate_optional``, and ``isolate`` not set on the instance), a sink
    whose class lives in ``__main__`` (the child would have to run the user's script
    to import it) or that cannot be pickled (a token provider that is a closure, a
    client object) runs in this process instead, and the log says why.
    """
    from eventbus.isolation import ProcessSink

    optional = sink.isolate_optional and "isolate" not in vars(sink)
    if optional and type(sink).__module__ == "__main__":
        logger.info(
            "eventbus: sink %r runs in this process: its class is defined in __main__, which a child process would "
            "have to run to import it (set isolate=True on it to run it in a child anyway)",
            sink.name,
        )
        return sink
    try:
        return ProcessSink(sink)
    except SinkConfigError as exc:
        if not optional:
            raise
        logger.info("eventbus: sink %r runs in this process: %s", sink.name, exc)
        return sink


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_timeout(what: str, timeout: Any) -> None:
    """A close deadline: a number of seconds (``math.inf``: no deadline; a negative
    one is 0)."""
    if not _is_number(timeout) or math.isnan(timeout):
        raise SinkConfigError(f"{what} must be a number of seconds, got {timeout!r}")


def _check_marks(marks: Any) -> dict[str, _marks.Mark]:
    if marks is None:
        return {}
    parsed = {k: _marks.parse(v) for k, v in marks.items()} if isinstance(marks, dict) else None
    if parsed is None or not all(isinstance(k, str) and m is not None for k, m in parsed.items()):
        raise SinkConfigError(
            "resume_marks must map sink names to steps (dict[str, int]), as bus.high_water_marks() returns, "
            f'or to {{"step": int, "names": [str, ...]}} entries, as bus.high_water_names() returns; got {marks!r}'
        )
    return parsed  # type: ignore[return-value]


def _validate_sink(sink: Sink) -> None:
    name = getattr(sink, "name", None)
    if not isinstance(name, str) or not name:
        raise SinkConfigError(f"{type(sink).__name__}.name must be a non-empty string, got {name!r}")

    def check(
        attr: str, kind: type | tuple[type, ...], positive: bool = True, allow_none: bool = False, most: float | None = None
    ) -> None:
        value = getattr(sink, attr)
        if value is None and allow_none:
            return
        # Non-negative where 0 means "none" (no delay, no retries), positive elsewhere.
        if (
            isinstance(value, bool)
            or not isinstance(value, kind)
            or value < 0
            or (positive and value == 0)
            or (most is not None and value > most)
        ):
            raise SinkConfigError(
                f"sink {name!r}: {attr} must be a {'positive' if positive else 'non-negative'} "
                f"{getattr(kind, '__name__', 'number')}{'' if most is None else f' up to {most}'}, got {value!r}"
            )

    check("capacity", int)
    check("max_batch_size", int)
    check("max_delay", (int, float), positive=False)
    check("write_timeout", (int, float), allow_none=True)
    check("max_retries", int, positive=False)
    check("retry_backoff", (int, float), positive=False)
    check("retry_backoff_max", (int, float), positive=False)
    check("circuit_threshold", int)
    check("circuit_cooldown", (int, float), positive=False)
    check("isolate_nice", int, positive=False, most=19)  # an os.nice increment
    for flag in ("isolate", "isolate_optional"):
        if not isinstance(getattr(sink, flag), bool):
            raise SinkConfigError(f"sink {name!r}: {flag} must be True or False, got {getattr(sink, flag)!r}")
    if not isinstance(sink.overflow, Overflow):
        raise SinkConfigError(
            f"sink {name!r}: overflow must be an eventbus.Overflow ({', '.join(o.name for o in Overflow)}), "
            f"got {sink.overflow!r}"
        )
    events = sink.events
    if not isinstance(events, tuple) or not all(isinstance(t, type) and issubclass(t, BaseEvent) for t in events):
        raise SinkConfigError(f"sink {name!r}: events must be a tuple of event classes, got {events!r}")
    sampled = sink.sampled
    if not isinstance(sampled, tuple) or not all(t in events for t in sampled):
        raise SinkConfigError(
            f"sink {name!r}: sampled must be a tuple of event classes among its events "
            f"{tuple(t.__name__ for t in events)}, got {sampled!r}"
        )
