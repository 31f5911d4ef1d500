"""Process isolation for sinks: run a sink's hooks in a child process of its own.

A blocking SDK (Comet, Neptune) run on a thread of the training process still takes
the GIL from the training loop for every metric it books. A sink with
``isolate = True`` is wrapped by the bus in a :class:`ProcessSink`: a proxy with the
same name, subscriptions and queue/retry/spool settings (so the bus's queueing,
retries, circuit breaker, spool and stats work unchanged), whose hooks send each
batch, encoded once as msgpack, to a child process that runs the real sink's
``open``/``write``/``close``. The training process then pays an encode and a pipe
write per batch, not the SDK's Python.

The child:

- is started with ``subprocess`` (fork + exec, never a bare fork: the parent has
  threads) running this interpreter, and imports only ``eventbus`` and the module of
  the sink's class (not the parent's ``__main__``, so not torch, unless the sink class
  is defined in ``__main__``, which is then imported as ``__mp_main__`` as
  ``multiprocessing``'s spawn does: guard its training code with
  ``if __name__ == "__main__":``);
- gets the sink *instance* pickled (its constructor already validated its options
  in the parent; an instance that cannot be pickled is a ``SinkConfigError`` when it
  is attached) and the parent's ``sys.path``;
- runs at a lower CPU priority than the parent (``Sink.isolate_nice``, ``os.nice``
  +10 by default), so that it uses the CPU training leaves idle;
- runs in a session of its own, so a signal to the training process's group
  (torchrun stopping its workers, a scheduler's preemption, `timeout`) does not
  kill it with what its SDK buffers: the parent handles the signal and closes the
  sink in order; it also ignores SIGINT sent to it directly; it writes
  to the parent's stdout/stderr, forwards its log records to the parent's loggers
  (the parent's logger levels apply), and exits when the parent dies (closing the
  sink first, within ``ORPHAN_CLOSE_TIMEOUT`` seconds, so an SDK can save what it has),
  also while one of the sink's hooks hangs (a thread checks every second that the
  parent is alive; the close then runs on a thread of its own).
  The parent's ``warnings`` filters are not carried over.

POSIX only (Linux, macOS). The child's start costs its imports (an SDK such as
``comet_ml`` takes a second or two of CPU), once per run; ``ProcessSink.opened``
tells when it is done.

Errors come back as the sink's own: the child classifies each with the sink's
``is_transient`` and the proxy raises :class:`~eventbus.errors.TransientSinkError`
(with its ``retry_after``) or :class:`~eventbus.errors.SinkError` carrying the
exception's type and message (already redacted by the sink). A batch the bus retries
reaches the sink as the very list that failed, as it would in-process (see
:meth:`Sink.write <eventbus.Sink.write>`). A child that dies is a
``ConnectionError`` (transient): the bus retries the batch and the proxy starts and
opens a new child first. A write or close cancelled by ``write_timeout`` or by the
bus's close deadline terminates the child (SIGTERM, then SIGKILL after
``KILL_GRACE`` seconds) and the next attempt starts a new one.

An ``open`` that fails with a transient error (the backend is down) keeps its child,
alive and idle: the bus's next attempt opens the sink in that child again, as it would
call ``open`` again on an in-process sink, instead of paying a new interpreter and the
SDK's imports for every retry of an outage. The child is replaced when its ``open``
failed otherwise (a configuration error), timed out, or the child died; and it is
stopped when the bus stops trying (the bus's task that opened it ends, or the bus
releases the sink) or when the sink, changed in the parent since, pickles otherwise.

After ``open`` and ``close``, the public plain attributes (``str``, ``int``,
``float``, ``bool``, ``None``) the sink set in the child are copied back onto the
parent's instance, so that, e.g., ``CometSink.archive_path`` reads as it would
in-process. Any other state lives in the child.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from typing import Any, Sequence

import anyio
import anyio.to_thread
import msgspec

from eventbus.errors import (
    MissingDependencyError,
    SinkConfigError,
    SinkError,
    TransientSinkError,
)
from eventbus.events import BaseEvent, Event, encode_lenient
from eventbus.sink import RunInfo, Sink, ThreadedSink, retry_after_seconds

__all__ = ["ProcessSink", "KILL_GRACE", "ORPHAN_CLOSE_TIMEOUT"]

logger = logging.getLogger("eventbus.isolation")

KILL_GRACE = 1.0
"""Seconds a terminated child gets to exit before it is killed."""

ORPHAN_CLOSE_TIMEOUT = 10.0
"""Seconds a child whose parent died gives its sink's ``close`` before exiting."""

_EXIT_WAIT = 5.0  # seconds a closed child gets to exit on its own before it is killed

# The settings the bus reads from a sink: the proxy reads and writes the wrapped
# sink's, so ``sink.capacity = 100`` after attaching still applies.
_FORWARDED = (
    "name",
    "events",
    "sampled",
    "overflow",
    "capacity",
    "max_batch_size",
    "max_delay",
    "write_timeout",
    "max_retries",
    "retry_backoff",
    "retry_backoff_max",
    "circuit_threshold",
    "circuit_cooldown",
    "all_ranks",
    "spool",
    "spool_dir",
    "spool_max_file_bytes",
    "spool_fsync_interval",
)

# Requests, parent -> child: one kind byte, then the payload.
_OPEN, _WRITE, _CLOSE = b"O", b"W", b"C"

_batch_decoder = msgspec.msgpack.Decoder(list[Event])  # type: ignore[valid-type]

# Runs first in the child, with only the standard library: ignore Ctrl-C, read the
# parent's sys.path, then import eventbus (from that path) and serve.
_BOOT = (
    "import signal,sys,pickle;signal.signal(signal.SIGINT,signal.SIG_IGN);"
    "from multiprocessing.connection import Connection;c=Connection(int(sys.argv[1]));"
    "i=pickle.loads(c.recv_bytes());sys.path[:]=i['sys_path'];"
    "from eventbus.isolation import _child_main;_child_main(c,i)"
)


class ProcessSink(Sink):
    """Runs ``sink`` in a child process; the bus attaches this proxy in its place
    when ``sink.isolate`` is true (see the module docstring).

    The proxy has the wrapped sink's name, events and every queue, retry and spool
    setting (read through to ``sink``); other attributes read through to the parent's
    copy of ``sink`` as well. ``pid`` is the child's process id while one runs.
    """

    isolate = False  # the proxy itself is never wrapped again

    def __init__(self, sink: Sink) -> None:
        if not isinstance(sink, Sink):
            raise SinkConfigError(f"ProcessSink wraps an eventbus.Sink instance, got {type(sink).__name__}")
        if os.name != "posix":
            raise SinkConfigError(f"sink {sink.name!r}: isolate=True needs a POSIX system (Linux, macOS); set isolate=False")
        object.__setattr__(self, "sink", sink)
        self._main = _main_module_for(sink)
        self._pickle()  # now, so that an unpicklable sink is an error when it is attached
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._run: RunInfo | None = None
        self._opened = False
        self._busy = False  # a request is on its way (its answer not read yet)
        # The pickled sink a live child was started with, while that child is kept after
        # a transient open failure (see _start); None otherwise.
        self._kept: bytes | None = None
        self._guard: asyncio.Task[Any] | None = None  # see _guard_kept

    def _pickle(self) -> bytes:
        sink = self.sink
        try:
            return pickle.dumps(sink, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SinkConfigError(
                f"sink {sink.name!r} ({type(sink).__name__}) cannot run in a child process: the instance cannot be "
                f"pickled ({type(exc).__name__}: {exc}). Set isolate=False for it (or leave it out of "
                f"isolate_sinks), or make it picklable (no open files, modules or locks as attributes before open())"
            ) from None

    # -- the proxy's settings are the wrapped sink's ----------------------------------

    def __getattr__(self, attr: str) -> Any:
        # Only called for what the proxy itself lacks: read through to the sink.
        if attr == "sink":
            raise AttributeError(attr)
        return getattr(self.sink, attr)

    @property
    def pid(self) -> int | None:
        """The child's process id, or ``None`` when no child runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def opened(self) -> bool:
        """Whether a child runs with the sink opened in it (false before open, after
        close, and from a child's death until the next one is open)."""
        return self._opened

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The current child process (``None`` before open or after it was reaped)."""
        return self._proc

    def __repr__(self) -> str:
        return f"<ProcessSink name={self.name!r} sink={self.sink!r} pid={self.pid}>"

    # -- hooks ----------------------------------------------------------------------

    async def open(self, run: RunInfo) -> None:
        """Start the child and open the sink in it."""
        self._run = run
        await self._start()

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        """Send ``batch`` to the child and wait (off the loop) for its answer; a dead
        child is started again (and the sink opened in it) first."""
        if self._conn is None or not self._opened:
            await self._start()
        await self._request(_WRITE + encode_lenient(batch))

    async def close(self) -> None:
        """Close the sink in the child and wait for the child to exit."""
        self._opened = False
        if self._kept is not None:
            # A child whose open failed: the sink is not open there, so there is nothing
            # to close (as for a sink whose open failed in-process).
            self._stop_child()
            return
        if self._conn is None:
            return
        try:
            await self._request(_CLOSE, attrs=True)
        finally:
            proc, self._proc, self._conn = self._proc, None, None
            if proc is not None:
                # Off the loop: a child that does not exit in time is killed.
                await anyio.to_thread.run_sync(_reap, proc, _EXIT_WAIT, abandon_on_cancel=True)

    # -- the child --------------------------------------------------------------------

    async def _start(self) -> None:
        kept, self._kept = self._kept, None
        pickled = b""
        try:
            if self._run is None:
                raise SinkError(f"sink {self.name!r}: write before open")
            # Pickled again at each attempt: options set after attaching, and what an
            # earlier child copied back (e.g. the file it writes to), carry over.
            pickled = self._pickle()
            proc = self._proc
            # The child kept after a transient open failure, still alive and given the
            # sink as it is now, opens the sink again: a new one would cost a fresh
            # interpreter and the SDK's imports at every retry of an outage.
            if not (kept == pickled and proc is not None and proc.poll() is None and self._conn is not None):
                self._stop_child()
                # Assigned here, not in the thread: a start abandoned on cancel must not
                # leave its (unopened) child behind as the current one.
                self._proc, self._conn = await anyio.to_thread.run_sync(self._spawn, pickled, abandon_on_cancel=True)
            await self._request(_OPEN + msgspec.msgpack.encode(self._run), attrs=True)
            self._opened = True
        except TransientSinkError:
            # The child answered: its sink's open failed in a way worth retrying (the
            # backend is down). The bus retries the open; the child is kept for that.
            proc = self._proc
            if proc is not None and proc.poll() is None and self._guard_kept():
                self._kept = pickled
            else:
                self._stop_child()
            raise
        except BaseException:
            # Otherwise (a configuration error, a timeout or cancel, a child that died)
            # the child is not kept: the next attempt starts anew.
            self._stop_child()
            raise

    def _guard_kept(self) -> bool:
        """Stop a kept child when the task that tried to open it (the bus's worker of
        this sink) ends: the bus stops trying, and does not close a sink whose open
        failed. False when there is no asyncio task to tie it to: then it is not kept."""
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not on an asyncio loop
            return False
        if task is None:
            return False
        if self._guard is not task:  # once per task, not once per failed attempt
            self._guard = task
            task.add_done_callback(self._task_done)
        return True

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if self._guard is task:
            self._guard = None
            if self._kept is not None:
                self._stop_child()

    def _spawn(self, pickled: bytes) -> tuple[subprocess.Popen[bytes], Connection]:
        """Start the child and hand it the sink (in a worker thread: blocking)."""
        parent, child = Pipe(duplex=True)
        fd = child.fileno()
        try:
            proc = subprocess.Popen(
                [sys.executable, *subprocess._args_from_interpreter_flags(), "-c", _BOOT, str(fd)],  # type: ignore[attr-defined]
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # A session of its own: a signal to the training process's group
                # (torchrun's killpg of a worker, SLURM, `timeout`, a terminal's
                # Ctrl-C or hangup) is the parent's to handle, which then closes the
                # sink in order; a child killed with it would lose what its SDK buffers.
                # The parent-watch thread still ends a child whose parent is gone.
                start_new_session=True,
            )
        finally:
            # The parent keeps no copy of the child's end: a dead child is then an EOF.
            child.close()
        init = {
            "sys_path": list(sys.path),
            "main": self._main,
            "ppid": os.getpid(),
            "levels": _logger_levels(),
            "nice": self.sink.isolate_nice,
            "sink": pickled,
        }
        try:
            parent.send_bytes(pickle.dumps(init, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            pass  # the child died at once: the first request says so
        return proc, parent

    async def _request(self, payload: bytes, attrs: bool = False) -> None:
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise ConnectionError(f"sink {self.name!r}: no child process")
        self._busy = True
        try:
            reply = await anyio.to_thread.run_sync(_roundtrip, conn, payload, abandon_on_cancel=True)
        except (EOFError, OSError):
            # The child died (killed, crashed, out of memory): transient; the next
            # attempt starts a new child.
            self._stop_child()
            code = proc.poll()
            raise ConnectionError(
                f"sink {self.name!r}: its child process (pid {proc.pid}) exited"
                + (f" with status {code}" if code is not None else "")
                + "; a new one is started on the next attempt"
            ) from None
        except BaseException:
            # Cancelled (write_timeout or the close deadline): the child may still be
            # busy with this request, so its next answer would be this one's. Stop it.
            self._stop_child()
            raise
        finally:
            self._busy = False
        if reply[0] == "ok":
            if attrs and len(reply) > 1:
                self._copy_back(reply[1])
            return
        _, kind, transient, retry_after, message = reply
        text = f"{kind}: {message}" if message else kind
        if transient:
            raise TransientSinkError(text, retry_after=retry_after)
        error = _ERRORS.get(kind, SinkError)
        raise error(text)

    def _copy_back(self, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            try:
                setattr(self.sink, k, v)
            except Exception:  # a read-only property: the child's value stays there
                pass

    def _release(self, opened: bool) -> None:
        """The bus stopped without closing the sink (the close deadline passed during a
        retry backoff, say): a child that is idle is asked to close the sink and exit,
        in the background (terminated when that takes over ``ORPHAN_CLOSE_TIMEOUT``
        seconds); a busy one is terminated at once."""
        proc, conn = self._proc, self._conn
        if proc is None or conn is None or self._busy or not self._opened:
            self._stop_child()
            return
        self._proc, self._conn, self._opened = None, None, False
        threading.Thread(target=_close_late, args=(proc, conn), name=f"eventbus-close-{self.name}", daemon=True).start()

    def _stop_child(self) -> None:
        """Terminate the child, if any, without waiting (a thread reaps it)."""
        proc, self._proc = self._proc, None
        self._opened = False
        self._kept = None
        # Dropped, not closed: a worker thread abandoned on cancel may still be
        # reading it; the descriptor closes when the last reference goes, so a new
        # pipe can never get its number while that thread reads.
        self._conn = None
        if proc is None or proc.poll() is not None:
            return
        try:
            proc.terminate()
        except OSError:
            return
        threading.Thread(target=_reap, args=(proc, KILL_GRACE), name="eventbus-reap", daemon=True).start()


def _forward(attr: str) -> property:
    def get(self: ProcessSink) -> Any:
        return getattr(self.sink, attr)

    def set_(self: ProcessSink, value: Any) -> None:
        setattr(self.sink, attr, value)

    return property(get, set_, doc=f"The wrapped sink's ``{attr}``.")


for _attr in _FORWARDED:
    setattr(ProcessSink, _attr, _forward(_attr))
del _attr


_ERRORS: dict[str, type[SinkError]] = {
    "SinkConfigError": SinkConfigError,
    "MissingDependencyError": MissingDependencyError,
    # A local path the sink cannot use: retrying the batch cannot fix it (the bus fails
    # it at once and tries the open again with the next one), as in-process.
    "IsADirectoryError": SinkConfigError,
    "NotADirectoryError": SinkConfigError,
    "PermissionError": SinkConfigError,
    "FileExistsError": SinkConfigError,
}
"""Permanent errors whose type the proxy keeps (others become ``SinkError``)."""


def _roundtrip(conn: Connection, payload: bytes) -> tuple[Any, ...]:
    """Send one request and return the child's answer, re-emitting its log records
    on the way (runs in a worker thread)."""
    conn.send_bytes(payload)
    while True:
        msg = conn.recv()
        if msg[0] == "log":
            _emit(msg[1])
            continue
        return msg  # type: ignore[no-any-return]


def _emit(fields: dict[str, Any]) -> None:
    record = logging.makeLogRecord(fields)
    target = logging.getLogger(None if record.name == "root" else record.name)
    if target.isEnabledFor(record.levelno):
        target.handle(record)


def _close_late(proc: subprocess.Popen[bytes], conn: Connection) -> None:
    """Ask an idle child to close its sink, wait up to ``ORPHAN_CLOSE_TIMEOUT`` seconds
    for that, then for it to exit (in a thread: see ``ProcessSink._release``)."""
    answered = False
    try:
        conn.send_bytes(_CLOSE)
        deadline = time.monotonic() + ORPHAN_CLOSE_TIMEOUT
        while conn.poll(max(0.0, deadline - time.monotonic())):
            msg = conn.recv()
            if msg[0] != "log":
                answered = True
                break
            _emit(msg[1])
    except (EOFError, OSError):
        pass  # it died meanwhile
    finally:
        conn.close()
    if not answered and proc.poll() is None:
        try:
            proc.terminate()
        except OSError:
            pass
    _reap(proc, _EXIT_WAIT if answered else KILL_GRACE)


def _reap(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Wait up to ``grace`` seconds for ``proc`` to exit, then kill it."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _logger_levels() -> dict[str, int]:
    """The parent's explicitly set logger levels, for the child to filter alike."""
    levels = {"": logging.getLogger().level}
    for name, lg in logging.Logger.manager.loggerDict.items():
        if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET:
            levels[name] = lg.level
    return levels


def _main_module_for(sink: Sink) -> dict[str, str] | None:
    """How the child can import ``__main__`` when the sink's class lives there."""
    if type(sink).__module__ != "__main__":
        return None
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    if spec_name and not (spec_name == "__main__" or spec_name.endswith(".__main__")):
        return {"name": spec_name}
    path = getattr(main, "__file__", None)
    if path:
        return {"path": os.path.abspath(path)}
    raise SinkConfigError(
        f"sink {sink.name!r}: its class {type(sink).__name__} is defined in an interactive session, which a child "
        f"process cannot import; define it in a module, or set isolate=False"
    )


# -- in the child ------------------------------------------------------------------------


class _PipeLogHandler(logging.Handler):
    """Sends each log record to the parent (thread-safe: SDK threads log too)."""

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn = conn
        self.send_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = dict(record.__dict__)
            fields["msg"] = record.getMessage()
            fields["args"] = None
            if record.exc_info:
                fields["exc_text"] = self.formatter.formatException(record.exc_info) if self.formatter else (
                    logging.Formatter().formatException(record.exc_info)
                )
            fields["exc_info"] = None
            fields.pop("message", None)
            data = pickle.dumps(("log", fields), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return
        try:
            with self.send_lock:
                self.conn.send_bytes(data)
        except OSError:
            pass  # the parent is gone


def _load_main(main: dict[str, str]) -> None:
    import importlib
    import runpy
    import types

    if "name" in main:
        module = importlib.import_module(main["name"])
    else:
        module = types.ModuleType("__mp_main__")
        module.__dict__.update(runpy.run_path(main["path"], run_name="__mp_main__"))
    sys.modules["__main__"] = sys.modules["__mp_main__"] = module


class _Runner:
    """Calls the sink's hooks in the child: a ThreadedSink's sync hooks directly,
    async hooks on one event loop kept for the child's life."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.loop: asyncio.AbstractEventLoop | None = None
        cls = type(sink)
        threaded = isinstance(sink, ThreadedSink)
        self.sync_open = threaded and cls.open is ThreadedSink.open
        self.sync_write = threaded and cls.write is ThreadedSink.write
        self.sync_close = threaded and cls.close is ThreadedSink.close

    def _run(self, coro: Any) -> Any:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        return self.loop.run_until_complete(coro)

    def open(self, run: RunInfo) -> None:
        if self.sync_open:
            self.sink.open_sync(run)  # type: ignore[attr-defined]
        else:
            self._run(self.sink.open(run))

    def write(self, batch: list[BaseEvent]) -> None:
        if self.sync_write:
            self.sink.write_sync(batch)  # type: ignore[attr-defined]
            # Out of this process's buffers before the bus counts the batch delivered.
            self.sink.flush_sync()  # type: ignore[attr-defined]
        else:
            self._run(self.sink.write(batch))

    def close(self) -> None:
        loop = self.loop
        if loop is not None and loop.is_running():
            # Orphaned while the main thread is stuck in a hook on that loop: the close
            # runs on this thread, an async one on a loop of its own.
            if self.sync_close:
                self.sink.close_sync()  # type: ignore[attr-defined]
            else:
                asyncio.run(self.sink.close())
            return
        try:
            if self.sync_close:
                self.sink.close_sync()  # type: ignore[attr-defined]
            else:
                self._run(self.sink.close())
        finally:
            if self.loop is not None:
                self.loop.close()
                self.loop = None


def _public_attrs(sink: Sink) -> dict[str, Any]:
    skip = set(_FORWARDED) | {"isolate", "isolate_optional", "isolate_nice"}
    return {
        k: v
        for k, v in vars(sink).items()
        if not k.startswith("_") and k not in skip and (v is None or type(v) in (str, int, float, bool))
    }


def _error_reply(sink: Sink, exc: BaseException) -> tuple[Any, ...]:
    try:
        transient = bool(sink.is_transient(exc)) or isinstance(exc, TimeoutError)
    except Exception:
        transient = False
    return ("error", type(exc).__name__, transient, retry_after_seconds(exc), str(exc))


def _apply_levels(levels: dict[str, int]) -> None:
    for name, level in levels.items():
        logging.getLogger(name or None).setLevel(level)


def _child_main(conn: Connection, init: dict[str, Any]) -> None:
    """The child's loop: load the sink, then answer one request at a time."""
    if init.get("nice"):
        try:
            # Below the training process: telemetry takes the CPU training leaves idle.
            os.nice(init["nice"])
        except OSError:  # not permitted here: run at the parent's priority
            pass
    handler = _PipeLogHandler(conn)
    root = logging.getLogger()
    root.addHandler(handler)
    _apply_levels(init["levels"])
    ppid = init["ppid"]
    try:
        if init["main"]:
            _load_main(init["main"])
        sink: Sink = pickle.loads(init["sink"])
    except BaseException as exc:
        # Answer the first request (open) with why the sink could not be loaded.
        reply: tuple[Any, ...] = (
            "error",
            "SinkConfigError",
            False,
            None,
            f"the child process could not load the sink: {type(exc).__name__}: {exc}",
        )
        _serve_error(conn, reply, ppid)
        return
    runner = _Runner(sink)
    life = _Lifeline(runner, root, handler)
    # The request loop sees the parent go only between requests: a thread watches it
    # during a hook that hangs (a write or an open to a stuck server) as well.
    threading.Thread(target=life.watch, args=(ppid,), name="eventbus-parent-watch", daemon=True).start()
    # The batch of the last write that failed, with its encoding: when the bus retries
    # it, the sink gets the very same list again, as it would in-process (Sink.write).
    failed: tuple[bytes, list[BaseEvent]] | None = None
    while True:
        try:
            data = _next_request(conn, ppid)
        except EOFError:
            break
        kind, payload = data[:1], data[1:]
        try:
            if kind == _WRITE:
                batch = failed[1] if failed is not None and failed[0] == payload else _batch_decoder.decode(payload)
                failed = (payload, batch)  # until it succeeds
                runner.write(batch)
                failed = None
                reply = ("ok",)
            elif kind == _OPEN:
                runner.open(msgspec.msgpack.decode(payload, type=RunInfo))
                life.opened = True
                # An SDK imported by open() may have set its loggers' levels: the
                # parent's explicit choices win, as they would in-process.
                _apply_levels(init["levels"])
                reply = ("ok", _public_attrs(sink))
            elif kind == _CLOSE:
                life.opened = False
                life.closing = True
                try:
                    runner.close()
                finally:
                    life.closed.set()
                reply = ("ok", _public_attrs(sink))
            else:
                reply = ("error", "SinkError", False, None, f"unknown request {kind!r}")
        except Exception as exc:
            reply = _error_reply(sink, exc)
        try:
            with handler.send_lock:
                conn.send(reply)
        except OSError:
            break
        if kind == _CLOSE:
            root.removeHandler(handler)
            return
    life.parent_gone()


_PARENT_POLL = 1.0
"""Seconds between a child's checks that its parent is alive."""


class _Lifeline:
    """What a child does when its parent is gone, decided once, by whichever thread
    sees it first: the request loop (the pipe closed, or the parent died while the
    child was idle) or the watcher thread (it died while a hook hangs)."""

    def __init__(self, runner: _Runner, root: logging.Logger, handler: logging.Handler) -> None:
        self.runner = runner
        self.root = root
        self.handler = handler
        self.opened = False  # the sink is open: it is closed before the child exits
        self.closing = False  # the parent asked for the close, which runs now
        self.closed = threading.Event()  # ... and is done
        self._once = threading.Lock()

    def watch(self, ppid: int) -> None:
        # Reparented: the parent died (its pipe may live on in a fork of it).
        while os.getppid() == ppid:
            time.sleep(_PARENT_POLL)
        self.parent_gone()

    def parent_gone(self) -> None:
        """Give the sink a bounded chance to save what it has, then exit. Never returns."""
        if not self._once.acquire(blocking=False):
            while True:  # the other thread does it, and ends the process
                time.sleep(3600)
        self.root.removeHandler(self.handler)
        if self.closing:
            self.closed.wait(ORPHAN_CLOSE_TIMEOUT)
        elif self.opened:
            # On a thread of its own: the close may hang too, and the thread that
            # called this may be stuck in a hook.
            t = threading.Thread(target=_quiet_close, args=(self.runner,), daemon=True)
            t.start()
            t.join(ORPHAN_CLOSE_TIMEOUT)
        os._exit(0)


def _quiet_close(runner: _Runner) -> None:
    try:
        runner.close()
    except BaseException:
        pass


def _next_request(conn: Connection, ppid: int) -> bytes:
    """The next request; EOFError when the parent closed the pipe or died."""
    while not conn.poll(1.0):
        if os.getppid() != ppid:  # reparented: the parent died (its pipe may live on in a fork of it)
            raise EOFError
    return conn.recv_bytes()


def _serve_error(conn: Connection, reply: tuple[Any, ...], ppid: int) -> None:
    try:
        _next_request(conn, ppid)
        conn.send(reply)
    except (EOFError, OSError):
        pass

