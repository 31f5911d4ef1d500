"""The event bus: a bounded ingress on the publishing side, one anyio event loop on a
background thread that fans events out to each sink's bounded queue and worker.

``publish()`` is what the training thread pays: a length check and a
``deque.append`` (atomic under the GIL, so any thread may publish). No lock, no
syscall, no logging; for the few urgent event types one ``call_soon_threadsafe``
wakes the pump at once. Everything else happens on the bus thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import random
import threading
import time
from typing import Any, Iterable, Sequence

import anyio
import msgspec

from eventbus import values as _values
from eventbus.errors import BusStateError, SinkConfigError
from eventbus.events import BaseEvent, Evaluate, Log, Predict, Save, TrainEnd
from eventbus.overflow import Overflow
from eventbus.sink import RunInfo, Sink
from eventbus.stats import BusStats, LagRecorder, SinkStats

__all__ = ["EventBus", "DEFAULT_URGENT"]

logger = logging.getLogger("eventbus")

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
        self.opened = False
        self.closing = False
        self.urgent = False
        self.waiting_for_batch = False
        self.consecutive_failures = 0
        self.circuit_until = 0.0
        self.wakeup: anyio.Event | None = None
        self.done: anyio.Event | None = None
        self.spool: Any = None  # set when the sink's overflow is SPOOL (eventbus.spool)

    # -- on the loop, called by the pump -------------------------------------------

    def offer(self, events: list[BaseEvent], urgent: bool) -> None:
        st = self.stats
        st.received += len(events)
        q = self.queue
        cap = self.sink.capacity
        policy = self.sink.overflow
        for ev in events:
            if len(q) < cap:
                q.append(ev)
            elif policy is Overflow.DROP_OLDEST:
                q.popleft()
                q.append(ev)
                st.overflow += 1
                st.dropped += 1
            elif policy is Overflow.SPOOL and self.spool is not None:
                self._to_spool([ev])
            else:
                st.overflow += 1
                st.dropped += 1
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

    def _to_spool(self, events: Sequence[BaseEvent]) -> bool:
        try:
            self.spool.append(events)
        except Exception as exc:  # a full disk must not stop training: count it
            self.stats.errors += 1
            self.stats.last_error = f"spool: {exc!r}"
            self.log(logging.ERROR, "eventbus: spool of sink %r failed: %r", self.name, exc)
            self.stats.failed += len(events)
            self.stats.dropped += len(events)
            return False
        self.stats.spooled += len(events)
        return True

    # -- the worker task --------------------------------------------------------------

    async def run(self) -> None:
        self.wakeup = anyio.Event()
        sink = self.sink
        try:
            await self._try_open()
            while True:
                if not self.queue:
                    if self.closing:
                        break
                    await self._wait()
                    continue
                if not (self.urgent or self.closing) and len(self.queue) < sink.max_batch_size:
                    # Give the batch up to max_delay to fill, as BatchSpanProcessor does.
                    self.waiting_for_batch = True
                    with anyio.move_on_after(sink.max_delay):
                        while not (self.urgent or self.closing) and len(self.queue) < sink.max_batch_size:
                            await self._wait()
                    self.waiting_for_batch = False
                self.urgent = False
                n = min(len(self.queue), sink.max_batch_size)
                batch = [self.queue.popleft() for _ in range(n)]
                self.in_flight = batch
                try:
                    await self._deliver(batch)
                finally:
                    self.in_flight = []
            await self._close_sink()
        finally:
            if self.done is not None:
                self.done.set()

    async def _wait(self) -> None:
        assert self.wakeup is not None
        await self.wakeup.wait()
        self.wakeup = anyio.Event()

    async def _try_open(self) -> bool:
        if self.opened:
            return True
        try:
            with anyio.fail_after(self.sink.write_timeout):
                await self.sink.open(self.bus.run)
        except Exception as exc:
            self._record_error("open", exc)
            return False
        self.opened = True
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
        self.stats.last_error = f"{what}: {exc!r}"
        self.log(logging.WARNING, "eventbus: sink %r failed in %s: %r", self.name, what, exc)

    def _backoff(self, attempt: int, exc: BaseException) -> float:
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None and retry_after >= 0:
            return float(retry_after)
        base = min(self.sink.retry_backoff_max, self.sink.retry_backoff * (2 ** (attempt - 1)))
        return base * random.uniform(0.5, 1.0)

    async def _deliver(self, batch: list[BaseEvent]) -> None:
        sink = self.sink
        st = self.stats
        now = time.monotonic()
        if now < self.circuit_until:
            self._give_up(batch)
            return
        attempt = 0
        while True:
            try:
                if not await self._try_open():
                    raise ConnectionError(f"sink {self.name!r} could not be opened: {st.last_error}")
                with anyio.fail_after(sink.write_timeout):
                    await sink.write(batch)
            except Exception as exc:
                self._record_error("write", exc)
                if sink.is_transient(exc) or isinstance(exc, TimeoutError):
                    if attempt < sink.max_retries:
                        attempt += 1
                        st.retries += 1
                        await anyio.sleep(self._backoff(attempt, exc))
                        continue
                self.consecutive_failures += 1
                if self.consecutive_failures >= sink.circuit_threshold:
                    self.circuit_until = time.monotonic() + sink.circuit_cooldown
                    st.circuit_open = True
                self._give_up(batch)
                return
            st.delivered += len(batch)
            self.consecutive_failures = 0
            st.circuit_open = False
            done_ns = time.time_ns()
            self.lag.add_many((done_ns - ev.time_ns) / 1e6 for ev in batch)
            return

    def _give_up(self, batch: list[BaseEvent]) -> None:
        if self.spool is not None and self._to_spool(batch):
            return
        self.stats.failed += len(batch)
        self.stats.dropped += len(batch)

    def abandon(self) -> int:
        """Count what is still queued as dropped (the close deadline passed)."""
        left = self.in_flight + list(self.queue)
        self.queue.clear()
        self.in_flight = []
        n = len(left)
        if not n:
            return 0
        if self.spool is not None:
            # Spooling is a local append: worth doing even past the deadline (a failed
            # append is counted as failed by _to_spool).
            self._to_spool(left)
        else:
            self.stats.abandoned += n
            self.stats.dropped += n
        return n

    def snapshot(self) -> SinkStats:
        st = msgspec.structs.replace(self.stats)
        st.queue_depth = len(self.queue) + len(self.in_flight)
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
    """

    def __init__(
        self,
        sinks: Iterable[Sink] = (),
        *,
        run: RunInfo | None = None,
        ingress_capacity: int = 65_536,
        flush_interval: float = 0.05,
        urgent: Iterable[type[BaseEvent]] = DEFAULT_URGENT,
        close_timeout: float = 30.0,
    ) -> None:
        if ingress_capacity < 1:
            raise ValueError(f"ingress_capacity must be >= 1, got {ingress_capacity}")
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {flush_interval}")
        self.run = run or RunInfo()
        self.close_timeout = close_timeout
        self._ingress: collections.deque[BaseEvent] = collections.deque()
        self._ingress_capacity = ingress_capacity
        self._flush_interval = flush_interval
        self._urgent = frozenset(urgent)
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
        self._closed = False
        self._deadline = math.inf
        self._final_stats: BusStats | None = None
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
        worker = _SinkWorker(sink, self)
        if sink.overflow is Overflow.SPOOL:
            from eventbus.spool import Spool

            worker.spool = Spool.for_sink(sink, self.run)
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

    # -- the hot path --------------------------------------------------------------

    def publish(self, event: BaseEvent) -> None:
        """Hand ``event`` to the bus. O(1), never blocks, never raises once started."""
        ingress = self._ingress
        if self._closed or len(ingress) >= self._ingress_capacity:
            with self._drop_lock:  # only on the overload path
                self._ingress_dropped += 1
            return
        ingress.append(event)
        if type(event) in self._urgent and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake_pump)
            except RuntimeError:  # the loop is closing; the final drain takes it
                pass

    # -- lifecycle -----------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`close`."""
        return self._thread is not None and not self._closed

    def start(self) -> EventBus:
        """Start the bus thread and open every sink on it. Idempotent."""
        if self._thread is not None:
            return self
        if self._closed:
            raise BusStateError("this EventBus was closed; create a new one")
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
        seconds (default ``close_timeout``). Returns the final :meth:`stats`; events a
        sink did not get by the deadline are counted in its ``dropped``/``abandoned``
        (or ``spooled``) and named in a warning."""
        if self._final_stats is not None:
            return self._final_stats
        timeout = self.close_timeout if timeout is None else timeout
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._closing = True
        if self._thread is None:
            self._closed = True
            self._final_stats = self._finish_without_thread()
            return self._final_stats
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wake_pump)
            except RuntimeError:
                pass
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 0.25)
        self._closed = True
        if self._thread.is_alive():
            # A sink blocked the loop itself (sync work inside an async write). The
            # thread is a daemon: abandon it and account for what it held.
            logger.error("eventbus: the bus thread did not stop by the close deadline; a sink is blocking its loop")
            self._abandon_all()
        stats = self.stats()
        stats.running = False
        lost = {n: s.abandoned for n, s in stats.sinks.items() if s.abandoned}
        if lost:
            logger.warning("eventbus: close deadline passed; events not delivered per sink: %s", lost)
        self._final_stats = stats
        return stats

    def _finish_without_thread(self) -> BusStats:
        # Never started: what was published can go nowhere.
        n = len(self._ingress)
        self._ingress.clear()
        with self._drop_lock:
            self._ingress_dropped += n
        return self.stats()

    def _abandon_all(self) -> None:
        for w in self._workers:
            w.abandon()

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
        for w in self._workers:
            w.abandon()

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
        ingress = self._ingress
        n = len(ingress)
        if not n:
            return
        if n > self._ingress_high_water:
            self._ingress_high_water = n
        batches: dict[_SinkWorker, list[BaseEvent]] = {}
        urgent: set[_SinkWorker] = set()
        routes = self._routes
        urgent_types = self._urgent
        for _ in range(n):
            ev = ingress.popleft()
            workers = routes.get(type(ev))
            if not workers:
                continue
            try:
                ev = resolve_event(ev)
            except Exception as exc:
                logger.warning("eventbus: could not resolve the tensor values of %s: %r", type(ev).__name__, exc)
                ev = _unresolvable(ev)
            is_urgent = type(ev) in urgent_types
            for w in workers:
                batches.setdefault(w, []).append(ev)
                if is_urgent:
                    urgent.add(w)
        self._taken += n
        for w, evs in batches.items():
            w.offer(evs, w in urgent)

    # -- introspection ---------------------------------------------------------------

    def stats(self) -> BusStats:
        """A snapshot of the bus's and every sink's counters (safe from any thread)."""
        if self._final_stats is not None:
            return self._final_stats
        depth = len(self._ingress)
        return BusStats(
            published=self._taken + self._ingress_dropped + depth,
            ingress_dropped=self._ingress_dropped,
            ingress_depth=depth,
            ingress_high_water=self._ingress_high_water,
            running=self.running,
            sinks={w.name: w.snapshot() for w in self._workers},
        )

    def __repr__(self) -> str:
        names = ", ".join(w.name for w in self._workers)
        state = "running" if self.running else ("closed" if self._closed else "new")
        return f"<EventBus {state} sinks=[{names}]>"


def _unresolvable(event: BaseEvent) -> BaseEvent:
    def safe(mapping: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in mapping.items():
            try:
                out[k] = _values.resolve(v)
            except Exception:
                out[k] = float("nan")
        return out

    if isinstance(event, Log):
        return msgspec.structs.replace(event, values=safe(event.values))
    if isinstance(event, (Evaluate, Predict)):
        return msgspec.structs.replace(event, metrics=safe(event.metrics))
    return event


def _validate_sink(sink: Sink) -> None:
    name = getattr(sink, "name", None)
    if not isinstance(name, str) or not name:
        raise SinkConfigError(f"{type(sink).__name__}.name must be a non-empty string, got {name!r}")

    def check(attr: str, kind: type | tuple[type, ...], positive: bool = True, allow_none: bool = False) -> None:
        value = getattr(sink, attr)
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, kind) or (positive and value <= 0):
            raise SinkConfigError(
                f"sink {name!r}: {attr} must be a positive {getattr(kind, '__name__', 'number')}, got {value!r}"
            )

    check("capacity", int)
    check("max_batch_size", int)
    check("max_delay", (int, float), positive=False)
    check("write_timeout", (int, float), allow_none=True)
    check("max_retries", int, positive=False)
    check("circuit_threshold", int)
    if not isinstance(sink.overflow, Overflow):
        raise SinkConfigError(
            f"sink {name!r}: overflow must be an eventbus.Overflow ({', '.join(o.name for o in Overflow)}), "
            f"got {sink.overflow!r}"
        )
    events = sink.events
    if not isinstance(events, tuple) or not all(isinstance(t, type) and issubclass(t, BaseEvent) for t in events):
        raise SinkConfigError(f"sink {name!r}: events must be a tuple of event classes, got {events!r}")
