"""Sink base classes: the consumers that run on the bus's event loop.

A :class:`Sink` is asynchronous and runs on the bus thread's event loop. A
:class:`ThreadedSink` wraps a blocking SDK: the same three hooks, synchronous, each
sink on a daemon thread of its own so that one slow SDK never blocks the loop, and
calls stay in order. Sinks only ever see frozen event snapshots; they cannot steer
training.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence, TypeVar

import msgspec

from eventbus.errors import TransientSinkError
from eventbus.events import EVENT_TYPES, BaseEvent
from eventbus.overflow import Overflow

if TYPE_CHECKING:
    import asyncio
else:  # imported when a sink first runs on a bus's event loop
    from eventbus._lazy import LazyModule

    asyncio = LazyModule("asyncio", __name__)

__all__ = ["RunInfo", "Sink", "ThreadedSink"]

T = TypeVar("T")

logger = logging.getLogger("eventbus")


class RunInfo(msgspec.Struct, kw_only=True):
    """What a sink learns about the run when it is opened."""

    run_id: str = msgspec.field(default_factory=lambda: uuid.uuid4().hex[:12])
    run_name: str | None = None
    output_dir: str | None = None
    logging_dir: str | None = None
    rank: int = 0
    world_size: int = 1
    resumed: bool = False
    resume_marks: dict[str, int] = msgspec.field(default_factory=dict)
    """Per sink name, the step of the high-water mark it starts from (the bus fills it
    in as sinks attach; see ``EventBus(resume_marks=...)``): this run's metric events
    below it are held back (the sink has them), and at it those whose names the sink
    got. A sink that marks a restart in its own storage (TensorBoard's
    ``SessionLog.START``, which hides what came before at or after its step) puts it
    after this step."""


class Sink:
    """An asynchronous consumer of events, running on the bus's event loop.

    Subclasses set ``name`` and ``events`` and implement :meth:`write`; :meth:`open`
    and :meth:`close` are optional. Class attributes are defaults that an instance may
    override (e.g. ``sink.capacity = 100``) before the bus starts (which checks them
    again, as attaching does).

    Queueing follows OpenTelemetry's BatchSpanProcessor: at most ``capacity`` events
    wait (``overflow`` says what happens past that), a write gets at most
    ``max_batch_size`` events, and waits at most ``max_delay`` seconds for a batch to
    fill (urgent events such as ``Save`` or ``TrainEnd`` are written at once).

    Failure handling: an exception for which :meth:`is_transient` is true is retried
    up to ``max_retries`` times with exponential backoff and jitter (or the
    ``retry_after`` a :class:`~eventbus.errors.TransientSinkError` carries). A batch
    that still fails is counted as failed (or spooled). After ``circuit_threshold``
    batches fail in a row the circuit opens for ``circuit_cooldown`` seconds: the sink
    is not called, its events go to the spool or are counted, and then one batch is
    tried again.
    """

    name: ClassVar[str] = "sink"
    events: ClassVar[tuple[type[BaseEvent], ...]] = EVENT_TYPES
    sampled: ClassVar[tuple[type[BaseEvent], ...]] = ()
    """Per-step events of which this sink needs a recent one, not each one (a progress
    bar's ``StepEnd``). When every sink subscribed to such a type samples it, the
    trainer's callback handler builds and publishes at most one per ``max_delay``
    seconds (:meth:`EventBus.sample_interval <eventbus.EventBus.sample_interval>`;
    the handler samples ``StepEnd``). Other publishers may still publish each one: a
    sink must accept every event it subscribes to."""
    overflow: Overflow = Overflow.DROP_OLDEST
    capacity: int = 10_000
    max_batch_size: int = 512
    max_delay: float = 1.0
    """Seconds a partial batch may wait to fill. Each write wakes the bus loop (and a
    ThreadedSink's thread) once, and each wake of an idle thread costs the training
    process CPU on a busy machine: with every sink at a thousand logged steps a
    second, 1 s instead of 0.2 s took the background CPU from ~71 to ~57 µs per step
    (docs/benchmarks.md), while a dashboard that refreshes every few seconds sees no
    difference. Urgent events (``Evaluate``, ``Save``, ``TrainEnd``) are written at
    once."""
    write_timeout: float | None = 120.0
    max_retries: int = 5
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    circuit_threshold: int = 5
    circuit_cooldown: float = 30.0
    all_ranks: bool = False
    """Run on every rank (tagging data with the rank) instead of world rank 0 only."""

    spool: bool = False
    """Keep a disk spool: events that cannot be delivered (the sink is down, its
    retries ran out, or the close deadline passed) are appended to it and delivered,
    in order, once the sink is back. Implied by ``overflow = Overflow.SPOOL``."""

    spool_dir: str | None = None
    """Where this sink's spool lives; ``None`` means ``<output_dir>/spool/<name>``."""

    spool_max_file_bytes: int = 16 * 1024 * 1024
    """The spool rotates to a new file past this size."""

    spool_max_bytes: int | None = 8 * 1024**3
    """The most the spool holds on disk (``None``: no cap). Past it, newer events
    that cannot be delivered are counted failed and dropped (with an ERROR saying
    why) instead of spooled; what the spool holds is kept and delivered. A WARNING
    when the spool passes half of it."""

    spool_min_free_fraction: float = 0.05
    """The spool starts no new file while less than this share of its disk is free
    (the room is left to the run's checkpoints); as at the cap, undeliverable events
    are then counted failed and dropped. 0: no floor."""

    spool_fsync_interval: float = 1.0
    """Seconds between fsyncs of the spool, run on a thread of the spool's own (0:
    after every append, and the bus loop waits for each); always at close, within its
    deadline."""

    isolate: bool = False
    """Run this sink in a child process of its own (``eventbus.isolation``): the bus
    attaches a ``ProcessSink`` proxy that sends it each batch as msgpack, so a blocking
    SDK's Python no longer competes with the training loop for the GIL. The instance
    must be picklable when it is attached; its ``open``/``write``/``close`` then run
    in the child. Queueing, retries, the circuit breaker, the spool and the stats stay
    in the bus, unchanged."""

    isolate_optional: bool = False
    """Whether ``isolate = True`` on the class is a preference rather than a
    requirement: when it is (and ``isolate`` was not set on the instance), an instance
    that cannot run in a child process (it cannot be pickled, or its class is defined
    in ``__main__``) runs in the training process instead, with an INFO log saying
    why, instead of being a ``SinkConfigError`` when attached. The library's SDK and
    HTTP sinks set it: isolation is their default, not something their user asked
    for."""

    isolate_nice: int = 10
    """How much lower the isolated child's CPU priority is than the training
    process's (``os.nice`` increment, 0 to 19). Telemetry then runs on CPU time that
    training leaves idle instead of taking a core from it when every core is busy;
    0 keeps the parent's priority."""

    @classmethod
    def available(cls) -> bool:
        """Whether ``report_to="all"`` should include this sink: its SDK is installed
        and it is configured (e.g. an API key or tracking URI is set)."""
        return True

    async def open(self, run: RunInfo) -> None:
        """Called once on the bus loop before the first write."""

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        """Consume a batch of events, in publish order. Raise to report a failure.

        When the failure is transient the bus retries the batch with the very same
        list (``batch is`` the one that failed, in a child process too): a sink that
        got part of it through can recognise the retry and resume, as the MLflow and
        Neptune sinks do."""
        raise NotImplementedError

    async def close(self) -> None:
        """Flush and release resources. Called once, within the bus's close deadline."""

    def is_transient(self, exc: BaseException) -> bool:
        """Whether a failed write is worth retrying (one that raises means no)."""
        return isinstance(exc, (TransientSinkError, ConnectionError, TimeoutError))

    def _release(self, opened: bool) -> None:
        """Called (from any thread, never awaited) when the bus stopped without closing
        this sink: the close deadline cut its worker off (a hung write, a retry
        backoff), or the worker failed. ``opened``: whether its ``open`` had
        succeeded. A sink with a thread or a process of its own lets it go here
        (:class:`ThreadedSink`, the isolation proxy); an asynchronous sink has nothing
        to release."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"


def retry_after_seconds(exc: BaseException) -> float | None:
    """The delay ``exc`` asks for before the next attempt (its ``retry_after``, as
    :class:`~eventbus.errors.TransientSinkError` carries it): a non-negative finite
    number of seconds, or a string of one (an HTTP ``Retry-After`` header passed as it
    came). Anything else (none, a date, a negative or non-finite value, a bool) is
    ``None``: the computed backoff applies."""
    try:
        value = getattr(exc, "retry_after", None)
        if value is None or isinstance(value, bool):
            return None
        seconds = float(value)  # also parses "5", as a header gives it
    except Exception:
        return None
    return seconds if 0.0 <= seconds < math.inf else None


# (the bus loop, the future the call settles, the function, its arguments)
_Job = tuple["asyncio.AbstractEventLoop", "asyncio.Future[Any]", Callable[..., Any], tuple[Any, ...]]


class _SinkThread:
    """One daemon thread that runs a sink's blocking calls in order.

    A daemon, not a ThreadPoolExecutor worker: a hung SDK call must not keep the
    interpreter from exiting after the bus's close deadline has passed.

    Each call hands the thread an asyncio future of the bus loop, which the thread
    completes with one ``call_soon_threadsafe``: every write of a ThreadedSink
    crosses threads twice, and on a busy machine each crossing wakes a thread from
    idle (hundreds of µs of CPU there), so the hand-off itself is kept to the least
    Python (``asyncio.wrap_future`` chains a second, concurrent future through
    callbacks on both sides: ~15% more CPU per write).
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"eventbus-sink-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        get, run_one = self._jobs.get, self._run_one
        while True:
            job = get()
            if job is None:
                return
            run_one(job)
            # No reference to the job is left while the thread waits for the next: an
            # idle thread keeps no batch (nor the result of a call) alive.
            del job

    @staticmethod
    def _run_one(job: _Job) -> None:
        loop, future, fn, args = job
        if future is None:  # posted: nobody waits for it (see post)
            fn(*args)
            return
        if future.cancelled():  # the caller gave up (a timeout, the close deadline) first
            return
        try:
            settle, outcome = _settle_result, fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            settle, outcome = _settle_exception, exc
        try:
            loop.call_soon_threadsafe(settle, future, outcome)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return await future

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the thread after the calls before it, waiting for nothing
        (``fn`` must not raise)."""
        self._jobs.put((None, None, fn, ()))  # type: ignore[arg-type]

    def stop(self) -> None:
        self._jobs.put(None)

    @property
    def queued(self) -> int:
        """How many jobs wait on the thread's queue, not counting the one it runs (for
        tests and diagnostics; approximate while other threads post)."""
        return self._jobs.qsize()


def _settle_result(future: asyncio.Future[Any], value: Any) -> None:
    if not future.cancelled():  # cancelled while the call ran: the result is dropped
        future.set_result(value)


def _settle_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.cancelled():
        future.set_exception(exc)


class _Write:
    """One ``write_sync`` call of a :class:`ThreadedSink`, which outlives a caller
    that gave up on it while it ran, so that the bus's retry of the same batch can
    wait for its outcome instead of writing the batch a second time (see
    :meth:`ThreadedSink.write`).

    ``claim`` decides, once, between the sink thread starting the call and the caller
    giving up on it: whichever takes it first wins. A call given up on before it
    started never runs (the retry submits the batch again: nothing was written), and
    the caller lets go of its batch at once (:meth:`drop`): the job itself stays on
    the thread's queue until the thread gets to it. One the thread started runs to
    its end, and its outcome is kept here for the retry. A lock taken without
    blocking is the one step both threads can race on and only one win: a flag read
    on one side and set on the other leaves a window in which the call runs while
    its caller thinks it never will.

    ``done`` says the thread is finished with the job: it ran the call (``error`` is
    its outcome) or, the caller having given up on it first, skipped it. Either
    reaches the loop through one ``call_soon_threadsafe`` and is recorded there, on
    the loop thread, as a waiter is set: the two never race.
    """

    __slots__ = ("batch", "claim", "done", "error", "loop", "waiter", "write_sync")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        write_sync: Callable[[Sequence[BaseEvent]], None],
        batch: Sequence[BaseEvent],
    ) -> None:
        self.loop = loop
        self.write_sync: Callable[[Sequence[BaseEvent]], None] | None = write_sync
        self.batch: Sequence[BaseEvent] | None = batch
        self.claim = threading.Lock()
        self.waiter: asyncio.Future[None] | None = None
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        """On the sink thread (posted: it must not raise)."""
        error: BaseException | None = None
        if self.claim.acquire(False):
            write_sync, batch = self.write_sync, self.batch  # dropped only by a claim's holder
            try:
                assert write_sync is not None and batch is not None
                write_sync(batch)
            except BaseException as exc:  # handed to the awaiting task
                error = exc
        # else the caller gave up (a timeout, the close deadline) before it started:
        # it is skipped, and the loop learns the thread is free for the next write.
        try:
            self.loop.call_soon_threadsafe(self._settle, error)
        except RuntimeError:  # the loop is closed: nobody waits for this any more
            pass

    def drop(self) -> None:
        """Let go of the batch and the sink's method: for a call that never runs, but
        whose job waits on the queue behind one that hangs (until it returns, if ever)."""
        self.batch = None
        self.write_sync = None

    def _settle(self, error: BaseException | None) -> None:
        """On the loop: record that the thread is done with the job, and the outcome
        of its call, and hand it to whoever waits for it now."""
        self.done = True
        self.error = error
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class ThreadedSink(Sink):
    """A sink for blocking SDKs: implement :meth:`open_sync`, :meth:`write_sync` and
    :meth:`close_sync`; each runs on this sink's own daemon thread, in order.

    A thread cannot be stopped, so for a ThreadedSink a write that outlasts
    ``write_timeout`` is not abandoned: the bus stops waiting for it (a
    ``TimeoutError``, retried as usual) while ``write_sync`` goes on on the thread,
    and the retry of that batch waits for that same call, for ``write_timeout``
    again, instead of writing the batch a second time: a call that then succeeds is
    the retry's success, one that fails is tried again, and one that never returns
    times every retry out, as it did the first attempt. A batch the bus gives up on
    for good (its retries ran out, the close deadline passed) while its call runs is
    counted as failed (or spooled) all the same, and may still reach the backend when
    the call returns; a call given up on before the thread started it never runs.

    While the thread is still in a call the bus gave up on, the write of the next
    batch waits for that call to return, for ``write_timeout`` too, before its own
    call is queued (and times out as the retries did while it does not return): at
    most one write is queued or running on the thread however long a call hangs (a
    stalled NFS mount), and the batches given up on meanwhile are not held in memory
    by the thread's queue.
    """

    _thread: _SinkThread | None = None
    _pending: _Write | None = None
    """The last write the bus gave up on while it ran on the thread: a retry of its
    batch (``batch is`` the same list, see :meth:`Sink.write`) waits for it."""
    _posted: _Write | None = None
    """The last write queued on the thread, until the thread is known to be done with
    it (it ran it, or skipped it as given up on): no other is queued before that."""
    _opening: asyncio.Future[None] | None = None
    """The open running on the thread that the bus gave up waiting for (see :meth:`open`)."""
    _open_here = False
    """Set on the thread when ``open_sync`` returned, cleared when ``close_sync`` ran:
    an open the bus gave up on that succeeded later is still closed (_release)."""

    def open_sync(self, run: RunInfo) -> None:
        """Blocking counterpart of :meth:`Sink.open`."""

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        """Blocking counterpart of :meth:`Sink.write`."""
        raise NotImplementedError

    def close_sync(self) -> None:
        """Blocking counterpart of :meth:`Sink.close`."""

    def flush_sync(self) -> None:
        """Hand what :meth:`write_sync` buffered to the operating system (a file's
        buffer written out, not fsynced). In a child process of its own
        (:attr:`Sink.isolate`) the child calls it after every write, before it tells
        the bus the batch was delivered: a child that is killed (the OOM killer) then
        loses nothing the bus counted as delivered. In-process the sink keeps its own
        flush interval: what the training process loses when it is killed is in its
        queues as well. The default does nothing (a sink that does not buffer)."""

    def _open_on_thread(self, run: RunInfo) -> None:
        self.open_sync(run)
        self._open_here = True  # read on this thread only (see _close_if_open)

    def _worker(self) -> _SinkThread:
        if self._thread is None:
            self._thread = _SinkThread(f"{self.name}-{os.getpid()}")
        return self._thread

    async def open(self, run: RunInfo) -> None:
        """Run :meth:`open_sync` on the thread. An open the bus gave up on (it outlasted
        ``write_timeout``) is not started again while it runs: the retry waits for it
        (within its own timeout), and one that has since succeeded counts as this
        open. ``open_sync`` never runs twice for one open, and a hung one has nothing
        queued behind it."""
        loop = asyncio.get_running_loop()
        call = self._opening
        if call is not None and call.get_loop() is loop and call.done():
            self._opening = None
            if not call.cancelled() and call.exception() is None:
                return  # the open given up on finished after all: the sink is open
            call = None  # it failed: open again
        if call is None or call.get_loop() is not loop:
            call = self._opening = asyncio.ensure_future(self._worker().call(self._open_on_thread, run))
        # Shielded: a timeout gives up waiting, not the call (the thread may be in it).
        await asyncio.shield(call)
        self._opening = None

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        """Run :meth:`write_sync` on the thread; a retry of a batch whose call the bus
        gave up on while it ran waits for that call instead (see the class docstring).
        Any other batch means the bus is done with that call: its outcome is dropped,
        and this batch's call is queued once the thread is done with it."""
        loop = asyncio.get_running_loop()
        job, self._pending = self._pending, None
        if job is None or job.batch is not batch or (job.done and job.error is not None):
            await self._thread_done(loop)
            job = self._posted = _Write(loop, self.write_sync, batch)
            self._worker().post(job.run)
        elif job.done:
            if self._posted is job:
                self._posted = None
            return  # the call the bus timed out on wrote the batch after all
        waiter = job.waiter = loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:  # a timeout, the close deadline
            if job.claim.acquire(False):  # it never runs: the queue need not keep its batch
                job.drop()
            else:  # the thread is in the call, or done with it
                self._pending = job
            raise
        finally:
            if job.done and self._posted is job:
                self._posted = None

    async def _thread_done(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait until the thread is done with the last write queued on it: one the bus
        gave up on while it ran returns (if ever: the caller's timeout cuts this short,
        as it does a retry waiting for it), one given up on before it started is
        skipped. The thread then takes the next write at once, and no more than one
        write waits on its queue behind a call that hangs."""
        last = self._posted
        if last is not None and not last.done and last.loop is loop:
            waiter = last.waiter = loop.create_future()
            try:
                await waiter
            except BaseException as exc:
                if not (last.done and exc is last.error):
                    raise  # a timeout, the close deadline
                # else the call failed: the bus gave that batch up, its outcome is dropped
        self._posted = None

    async def close(self) -> None:
        self._pending = self._posted = self._opening = None
        worker = self._worker()
        try:
            await worker.call(self._close_on_thread)
        finally:
            worker.stop()
            self._thread = None

    def _release(self, opened: bool) -> None:
        """The bus stopped without closing this sink (see :meth:`Sink._release`): its
        thread runs ``close_sync`` (when it was opened) once the call it is in returns,
        if ever, and then ends, instead of waiting for work forever."""
        worker, self._thread = self._thread, None
        self._pending = self._posted = self._opening = None
        if worker is None:
            return
        worker.post(functools.partial(self._close_if_open, opened))
        worker.stop()

    def _close_if_open(self, opened: bool) -> None:
        """On the thread, after the call it was in: close the sink when the bus had
        opened it, or when an open the bus gave up on succeeded meanwhile."""
        if opened or self._open_here:
            self._close_after_deadline()

    def _close_on_thread(self) -> None:
        try:
            self.close_sync()
        finally:
            self._open_here = False

    def _close_after_deadline(self) -> None:
        try:
            self._close_on_thread()
        except Exception as exc:
            logger.warning("eventbus: sink %r failed in close_sync after the close deadline: %r", self.name, exc)
