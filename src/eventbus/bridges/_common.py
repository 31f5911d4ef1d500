"""What both bridges share: owning (and re-creating) a bus, and making configs safe
to log. Framework-free: importing this module imports neither transformers nor
lightning."""

from __future__ import annotations

import atexit
import enum
import functools
import importlib
import logging
import math
import os
import threading
import weakref
from typing import Any, Iterable, Mapping, Sequence

from eventbus.bus import EventBus
from eventbus.errors import BusStateError, MissingDependencyError, SinkConfigError
from eventbus.events import EVENT_TYPES, BaseEvent
from eventbus.redact import redact, redact_str
from eventbus.registry import sinks_from_report_to
from eventbus.sink import RunInfo, Sink
from eventbus.stats import BusStats

__all__ = ["BusHolder", "import_framework", "jsonable", "safe_config", "scalar_params"]

logger = logging.getLogger("eventbus.bridges")


def import_framework(module: str, extra: str) -> Any:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"this bridge needs {module!r}, which could not be imported ({exc}); "
            f"install it with: pip install 'eventbus-telemetry[{extra}]'"
        ) from exc


class BusHolder:
    """Owns the bus a bridge publishes to.

    A bridge is built before the run is known (output dir, rank), so the bus is
    created on first use with the run's :class:`RunInfo`. A closed bus cannot
    restart: after :meth:`close`, the next use creates a fresh bus over the same sinks
    and the same ``run_id`` (the sinks are opened again for the same run: the Comet
    sink continues its experiment, the Neptune sink its run where Neptune allows it,
    online). A bridge that expects more events for the same run (transformers'
    ``trainer.evaluate()`` after ``trainer.train()``) calls :meth:`flush` instead, and
    the bus is closed by :meth:`close`, when the holder is garbage-collected (the
    bridge was dropped without a close: a sweep or a notebook building a fresh bridge
    per run), or at interpreter exit.

    A bus passed in by the caller is the caller's: it is started if needed but never
    closed here.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] | Sink | None = None,
        *,
        report_to: str | Sequence[str] | None = None,
        bus: EventBus | None = None,
        sink_options: Mapping[str, Mapping[str, Any]] | None = None,
        close_timeout: float = 30.0,
    ) -> None:
        if isinstance(sinks, Sink):
            sinks = [sinks]
        sink_list = list(sinks or ())
        for s in sink_list:
            if not isinstance(s, Sink):
                raise SinkConfigError(
                    f"sinks must be eventbus.Sink instances, got {type(s).__name__}: {s!r}; "
                    "build one (e.g. sinks.jsonl.JSONLSink(...)) or pass report_to=['jsonl']"
                )
        self._given = list(sink_list)
        self._report_to = report_to
        self._sink_options = dict(sink_options or {})
        sink_list += sinks_from_report_to(report_to, **self._sink_options)
        if bus is not None:
            if not isinstance(bus, EventBus):
                raise SinkConfigError(f"bus must be an eventbus.EventBus, got {type(bus).__name__}")
            if sink_list:
                raise SinkConfigError(
                    "pass either bus= (an EventBus you configured and will close) or sinks=/report_to=, not both; "
                    "add the sinks to that bus with bus.add_sink(...) before it starts"
                )
        if close_timeout < 0:
            raise ValueError(f"close_timeout must be >= 0 seconds, got {close_timeout}")
        self.sinks = sink_list
        self.close_timeout = close_timeout
        self.owns = bus is None
        self.bus: EventBus | None = bus
        self.run: RunInfo | None = bus.run if bus is not None else None
        # Until a bus exists, what the sinks subscribe to; afterwards what the bus
        # routes (on a rank > 0 that is usually nothing, so nothing gets built).
        if bus is not None:
            self.wanted: frozenset[type[BaseEvent]] = frozenset(t for t in EVENT_TYPES if bus.wants(t))
        else:
            self.wanted = frozenset(t for s in sink_list for t in s.events)
        self.last_stats: BusStats | None = None
        self.pending = False
        """A bus was created by :meth:`prepare` and is not started yet."""
        self._lock = threading.Lock()
        self._exit_hook: Any = None
        self._dropped: weakref.finalize | None = None

    def prepare(self, run: RunInfo) -> EventBus:
        """The bus for ``run``, created (or re-created after a close) but not started
        yet: until :meth:`ensure` starts it, ``bus.run`` may still be completed (e.g.
        with the trainer's output folder, learned after the bus was asked for)."""
        with self._lock:
            bus = self.bus
            if not self.owns:
                assert bus is not None
                return bus
            if bus is not None and (self.pending or bus.running):
                return bus
            # The same run_id across re-created buses: sinks see one run.
            if self.run is not None:
                run.run_id = self.run.run_id
            self.run = run
            bus = EventBus(self.sinks, run=run, close_timeout=self.close_timeout)
            self.wanted = frozenset(t for t in EVENT_TYPES if bus.wants(t))
            self.bus = bus
            self.pending = True
            return bus

    def ensure(self, run: RunInfo) -> EventBus:
        """A running bus: the prepared one, or one created (or re-created after a
        close) for ``run``."""
        bus = self.bus
        if bus is not None and bus.running:
            return bus
        bus = self.prepare(run)
        with self._lock:
            if not self.owns:
                try:
                    bus.start()  # idempotent while running
                except BusStateError:
                    pass  # the caller closed it: publishes are counted as dropped there
                self.wanted = frozenset(t for t in EVENT_TYPES if bus.wants(t))
                return bus
            if self.pending:
                bus.start()
                self.pending = False
                # A run that crashes never reaches on_train_end/finalize, and a bus
                # left open for a later evaluate() is closed by nobody else: deliver
                # what was published and close the sinks, within the deadline, at exit.
                # The hook holds the bus itself (its thread keeps it alive anyway), not
                # this holder. A holder dropped by the user (a fresh bridge per run in
                # a sweep, never closed) closes its bus when it is collected, rather
                # than keeping its threads and sink processes until exit.
                hook = functools.partial(_close_at_exit, bus, self.close_timeout)
                atexit.register(hook)
                self._exit_hook = hook
                dropped = weakref.finalize(self, _close_dropped, bus, self.close_timeout, hook)
                dropped.atexit = False  # at exit the hook above closes it, in order
                self._dropped = dropped
            return bus

    @property
    def running(self) -> bool:
        """Whether the bus exists and is running."""
        return self.bus is not None and self.bus.running

    def flush(self, timeout: float | None = None) -> BusStats | None:
        """Wait, within ``timeout`` (default ``close_timeout``) seconds, until the
        sinks were handed everything published so far (written, or dropped/spooled
        as the bus decides), without closing anything: the sinks keep their files,
        experiments and runs open for what comes next. Returns the stats then (also
        kept as ``last_stats``).

        What a sink buffers inside itself is its own: the file sinks flush on
        ``TrainEnd``/``Evaluate``; an SDK sink finishes its experiment (Comet's
        offline archive, Neptune's last operations) when the bus closes."""
        bus = self.bus
        if bus is None:
            return self.last_stats
        if not self.owns or not bus.running:
            return bus.stats() if not self.owns else self.last_stats
        stats = bus.wait_handed(self.close_timeout if timeout is None else timeout)
        if stats is None:
            logger.warning("eventbus: flush: the sinks were not handed everything within the deadline")
            stats = bus.stats()
        self.last_stats = stats
        return stats

    def close(self, timeout: float | None = None) -> BusStats | None:
        """Close the bus if this holder owns it and it runs; returns its final stats."""
        bus = self.bus
        if bus is None:
            return self.last_stats
        if not self.owns:
            return bus.stats()
        if bus.running or self.pending:
            # A prepared bus never started: closing it counts what was published.
            self.pending = False
            self.last_stats = bus.close(self.close_timeout if timeout is None else timeout)
        hook, self._exit_hook = self._exit_hook, None
        if hook is not None:
            atexit.unregister(hook)
        dropped, self._dropped = self._dropped, None
        if dropped is not None:
            dropped.detach()
        return self.last_stats

    def close_run(self, timeout: float | None = None) -> BusStats | None:
        """Close the bus (as :meth:`close`) and forget the run: the next bus is for a
        new run, with a ``run_id`` of its own (a bridge reused for another trainer).
        The ``report_to`` sinks are built anew, so that they resolve their files and
        folders for that run (a sink keeps what it resolved at its first open); sinks
        passed as objects are kept as they are."""
        stats = self.close(timeout)
        if self.owns:
            named = sinks_from_report_to(self._report_to, **self._sink_options) if self._report_to else []
            with self._lock:
                self.run = None
                if named:
                    self.sinks = self._given + named
        return stats


def _close_at_exit(bus: EventBus, timeout: float) -> None:
    if bus.running:
        bus.close(timeout)


def _close_dropped(bus: EventBus, timeout: float, hook: Any) -> None:
    """Close the bus of a holder that was garbage-collected while the bus ran.

    Called by the garbage collector, so on whatever thread collected the holder (maybe
    a thread of this very bus, or one holding a lock the close needs): the close runs
    on a thread of its own. Not a daemon: interpreter exit waits for it (within the
    close deadline), before the exit hooks run."""

    def run() -> None:
        try:
            if bus.running:
                bus.close(timeout)
        except Exception:  # pragma: no cover - close() reports sink failures itself
            logger.exception("eventbus: could not close the bus of a dropped bridge")
        finally:
            atexit.unregister(hook)

    try:
        threading.Thread(target=run, name="eventbus-close-dropped", daemon=False).start()
    except RuntimeError:  # interpreter shutdown: the exit hook closes the bus
        pass


def jsonable(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain JSON-able data (dict/list/str/int/float/bool/None).

    Configs hold enums, paths, dtypes and arbitrary objects; sinks encode events with
    msgspec, which refuses those, so anything unknown becomes its ``str``.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value, _depth + 1)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if _depth > 8:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v, _depth + 1) for v in value]
    # An object of its own: its str, with any credential it shows masked.
    return redact_str(str(value))


def safe_config(value: Mapping[str, Any]) -> dict[str, Any]:
    """A redacted, JSON-able copy of a config mapping."""
    return jsonable(redact(dict(value)))  # type: ignore[no-any-return]


def scalar_params(value: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Flatten nested mappings (``a/b``) and keep values a hyperparameter table can show
    (bool, int, float, str; anything else as its ``str``), secrets redacted."""
    out: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, sub in v.items():
                walk(f"{prefix}{sep}{k}" if prefix else str(k), sub)
            return
        v = jsonable(v)
        out[prefix] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)

    walk("", redact(dict(value)))
    return out
