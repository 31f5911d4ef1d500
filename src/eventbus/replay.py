"""Send what a past run spooled, or its JSON-lines file, to a sink later.

Command line::

    eventbus replay runs/x/spool/mlflow --to mlflow --option tracking_uri=http://127.0.0.1:5000
    eventbus replay runs/x/events.jsonl --to tensorboard --option log_dir=runs/x/tb

Python::

    from eventbus.replay import replay
    result = replay("runs/x/spool/mlflow", create_sink("mlflow"))

The events go through a fresh :class:`~eventbus.EventBus`, so the sink sees them as it
would in a live run (batches, retries). No duplicates: metric events (``Log``,
``Evaluate``, ``Predict``) below the sink's high-water mark are skipped, and those at
the mark that it already got (by name, when the marks file knows the names delivered
at that step: see :mod:`eventbus._marks`; all of them for ``resume_mark``). The mark
comes from ``resume_mark``, else from the marks file: the spool's ``state.json`` for a
spool directory, ``<file>.marks.json`` next to a spool or JSONL file. After the replay
the new mark is written back there, so replaying twice sends nothing twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec

from eventbus import _marks
from eventbus.errors import EventBusError, SinkConfigError, SinkError, SpoolError
from eventbus.events import Event, TrainBegin, decode_json
from eventbus.overflow import Overflow
from eventbus.sink import RunInfo, Sink
from eventbus.spool import MAGIC, STATE_FILE, _spool_files, read_spool, write_json_atomic

__all__ = ["replay", "ReplayResult", "read_events", "decode_jsonl_line", "add_parser"]

logger = logging.getLogger("eventbus.replay")


class ReplayResult(msgspec.Struct, kw_only=True):
    """What a replay did. ``read`` events were read; of those ``sent`` reached the
    sink, ``skipped`` were held back by its high-water mark (it already had them) and
    ``failed`` could not be delivered. ``superseded`` were not sent because a resumed
    run redid their step later in the same file (see :func:`replay`). ``unreadable``
    counts records or lines that did not decode (warned about, never fatal). ``mark``
    is the sink's mark afterwards."""

    sink: str
    read: int = 0
    sent: int = 0
    skipped: int = 0
    superseded: int = 0
    failed: int = 0
    unreadable: int = 0
    mark: int | None = None


def _is_spool_file(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


_NONFINITE_KEY = "_nonfinite"
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def decode_jsonl_line(line: bytes) -> Event:
    """One line of the JSONL sink's file back to its event. That file writes NaN and
    infinities as the strings ``"NaN"``/``"Infinity"``/``"-Infinity"`` and lists their
    paths under a top-level ``"_nonfinite"`` key; exactly those become floats again."""
    if _NONFINITE_KEY.encode() not in line:
        return decode_json(line)
    data = msgspec.json.decode(line)
    if not isinstance(data, dict):
        raise msgspec.ValidationError(f"expected a JSON object, got {type(data).__name__}")
    for path in data.pop(_NONFINITE_KEY, ()) or ():
        try:
            parent = data
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = _NONFINITE[parent[path[-1]]]
        except (KeyError, IndexError, TypeError) as exc:
            raise msgspec.ValidationError(f"bad {_NONFINITE_KEY} path {path!r}") from exc
    return msgspec.convert(data, Event)


def read_events(
    path: str | os.PathLike[str], *, on_unreadable: Callable[[], None] | None = None, warn: bool = True
) -> Iterator[Event]:
    """The events stored at ``path``: a spool directory (from its cursor on), a spool
    file, or a JSON-lines file as the ``jsonl`` sink writes it (one
    ``encode_json(event)`` per line, see :func:`decode_jsonl_line`). Lines that do not
    decode are skipped with a warning (and reported to ``on_unreadable``)."""
    p = Path(path)
    _check_source(p)
    if p.is_dir() or _is_spool_file(p):
        yield from read_spool(p, warn=warn)
        return
    with open(p, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield decode_jsonl_line(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                if warn:
                    logger.warning("eventbus: %s line %d is not an event (%s); skipped", p, lineno, exc)
                if on_unreadable is not None:
                    on_unreadable()


def _replayable_under(directory: Path, limit: int = 8) -> list[str]:
    """What under ``directory`` (a run's output dir, or a spool root) could be
    replayed: JSON-lines files of the jsonl sink and spool directories, shortest
    paths first."""
    found: list[str] = []
    try:
        for root, dirs, files in os.walk(directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith("checkpoint-"))
            here = Path(root)
            if root != str(directory) and (STATE_FILE in files or _spool_files(here)):
                found.append(str(here))
                dirs[:] = []
                continue
            found.extend(str(here / f) for f in sorted(files) if f.endswith(".jsonl"))
            if len(here.relative_to(directory).parts) >= 3:
                dirs[:] = []
    except OSError:
        return found
    return sorted(found, key=lambda s: (s.count(os.sep), s))[:limit]


def _check_source(p: Path) -> None:
    """A clear error when ``p`` is nothing :func:`read_events` can read, naming what
    to give instead."""
    if not p.exists():
        parent = next((q for q in p.parents if q.is_dir()), None)
        near = _replayable_under(parent) if parent is not None and parent != Path(p.anchor) else []
        hint = f"; found under {parent}: {', '.join(near)}" if near else ""
        raise SpoolError(f"nothing to replay at {p}: no such file or directory (give a spool directory, a .spool file or a .jsonl file){hint}")
    if p.is_dir() and not _spool_files(p) and not (p / STATE_FILE).exists():
        near = _replayable_under(p)
        hint = f"; replay one of: {', '.join(near)}" if near else "; it holds no spool files or .jsonl files either"
        raise SpoolError(f"{p} is not a spool directory (a run's spool is <output_dir>/spool/<sink name>){hint}")


def _superseded(path: Path) -> Callable[[int, Event], bool]:
    """Whether the i-th event was superseded by a resumed run: a later ``TrainBegin``
    with ``resumed_from`` at step S restarts from S, so what came before it with a step
    above S and was written again after it (the same event type and step; for a metric
    event, each of its names: ``"Log/loss"``) was redone, as TensorBoard purges
    orphaned steps. What the resumed run did not write again is kept: a Trainer resume
    skips the metric steps a sink already has (its high-water mark), and at the mark's
    step the metrics it has, so those are the only copy."""
    points: list[tuple[int, int]] = []
    # (type, step) or (step, name) -> the last index it occurs at, from the first
    # resume point on.
    last_at: dict[tuple[Any, int], int] = {}
    for i, ev in enumerate(read_events(path, warn=False)):
        if isinstance(ev, TrainBegin) and ev.resumed_from:
            points.append((i, ev.step))
        if points:
            for key in _keys(ev):
                last_at[key] = i
    if not points:
        return lambda i, ev: False
    suffix_min = [s for _, s in points]
    for k in range(len(points) - 2, -1, -1):
        suffix_min[k] = min(suffix_min[k], suffix_min[k + 1])
    state = {"k": 0}

    def check(i: int, ev: Event) -> bool:
        k = state["k"]
        while k < len(points) and points[k][0] <= i:
            k += 1
        state["k"] = k
        if k >= len(points) or ev.step <= suffix_min[k]:
            return False
        start = points[k][0]
        return all(last_at.get(key, -1) >= start for key in _keys(ev))

    return check


def _keys(ev: Event) -> list[tuple[Any, int]]:
    names = _marks.names_of(ev)
    if names is None:
        return [(type(ev), ev.step)]
    return [(name, ev.step) for name in names]


_REPLAYED_KEY = "replayed_ns"
"""The marks file's key for, per sink name, the ``time_ns`` of the last event a
replay that delivered everything read: its non-metric events are not sent again (by
a later replay, nor by a resumed run draining the spool: see ``Spool.replayed_ns``)."""


def _source_run(path: Path) -> tuple[str | None, str | None]:
    """The run id of the run that wrote ``path`` (a spool's ``state.json``, else its
    first event's, else the one in a jsonl sink's file name), and its name when its
    ``TrainBegin`` config has one."""
    run_id: str | None = None
    if path.is_dir():
        state = _load_marks(path / STATE_FILE)
        run_id = state.get("run_id") if isinstance(state.get("run_id"), str) else None
    run_name: str | None = None
    if run_id is None and path.is_file():
        # The jsonl sink's own file name carries the run id (events-<run id>[-rankN].jsonl),
        # also for events published without one (a bus used on its own).
        m = re.fullmatch(r"events-([0-9A-Za-z_\-]+?)(?:-rank\d+)?\.jsonl", path.name)
        named = m.group(1) if m else None
    else:
        named = None
    for ev in read_events(path, warn=False):
        run_id = run_id or ev.run_id or None
        if isinstance(ev, TrainBegin):
            name = ev.config.get("run_name")
            run_name = name if isinstance(name, str) and name else None
            break
        if run_id or named:
            break
    return run_id or named, run_name


def _marks_path(path: Path) -> Path:
    return path / STATE_FILE if path.is_dir() else path.with_name(path.name + ".marks.json")


def _load_marks(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("eventbus: unreadable marks file %s (%s); replaying without a mark", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def replay(
    path: str | os.PathLike[str],
    sink: Sink,
    *,
    resume_mark: int | None = None,
    save_mark: bool = True,
    timeout: float = 300.0,
) -> ReplayResult:
    """Send the events stored at ``path`` (see :func:`read_events`) to ``sink``, in
    order, through a fresh bus. Metric events below the sink's high-water mark
    (``resume_mark``, else the one kept next to ``path``) are skipped, and at it those
    the sink already got (all of them for ``resume_mark``; by name for a mark kept
    with the names it got there). When the file
    holds a resumed run (a ``TrainBegin`` with ``resumed_from`` at step S), events the
    interrupted run wrote before it with a step above S are not sent: the resumed run
    redid those steps. ``timeout``
    bounds the whole replay, sink close included. Returns a :class:`ReplayResult`.
    A spool a live run's bus holds (it still delivers what it holds) is a
    :class:`~eventbus.errors.SpoolError`."""
    if not isinstance(sink, Sink):
        raise SinkConfigError(f"replay needs an eventbus.Sink instance, got {type(sink).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"replay's timeout must be a positive number of seconds, got {timeout!r}")
    p = Path(path)
    _check_source(p)  # before a bus opens the sink: the first error is the one to read
    held = _lock_spool(p)
    try:
        return _replay(p, sink, resume_mark=resume_mark, save_mark=save_mark, timeout=timeout)
    finally:
        if held is not None:
            held.unlock()


def _lock_spool(p: Path) -> Any:
    """For a spool (a directory, or a file in one), its directory's lock, taken for
    the replay: a live run's bus holds it while it may still deliver what the spool
    holds (it would all be sent twice). ``None`` for a JSONL file."""
    from eventbus.spool import Spool

    directory = p if p.is_dir() else p.parent if _is_spool_file(p) else None
    if directory is None:
        return None
    spool = Spool(directory)
    if not spool.lock():
        raise SpoolError(
            f"the spool {directory} is in use by a live run (its bus holds the lock and will deliver what it "
            "holds once its sink is back); replay it after that run has ended"
        )
    return spool


def _replay(p: Path, sink: Sink, *, resume_mark: int | None, save_mark: bool, timeout: float) -> ReplayResult:
    from eventbus.bus import EventBus

    marks_file = _marks_path(p) if p.exists() else None
    state = _load_marks(marks_file) if marks_file is not None else {}
    start: Any = resume_mark
    if resume_mark is None:
        saved = _marks.from_saved(state.get("marks"), state.get("mark_names")).get(sink.name)
        if saved is not None:
            start = _marks.to_value(saved)
    # A replay is the catch-up itself: no spool of its own, and backpressure below
    # keeps the queue from overflowing.
    sink.spool = False  # type: ignore[misc]
    if sink.overflow is Overflow.SPOOL:
        sink.overflow = Overflow.DROP_NEWEST
    result = ReplayResult(sink=sink.name)

    def unreadable() -> None:
        result.unreadable += 1

    # Events other than metrics carry no step a mark could hold back: a replay to this
    # sink name that delivered everything keeps the time of the last event it read,
    # and a later one skips the non-metric events up to it.
    replayed_ns = state.get(_REPLAYED_KEY) if isinstance(state.get(_REPLAYED_KEY), dict) else {}
    done_ns = replayed_ns.get(sink.name) if resume_mark is None else None
    if not isinstance(done_ns, int) or isinstance(done_ns, bool):
        done_ns = None
    already = 0
    last_ns = 0
    marks = {sink.name: start} if start is not None else None
    deadline = time.monotonic() + timeout
    # The source's run: a replay continues it where the sink can (an MLflow sink finds
    # the run tagged with its id), instead of starting a run of its own.
    run_id, run_name = _source_run(p)
    run = RunInfo(run_id=run_id, run_name=run_name or "replay", resumed=True) if run_id else RunInfo(run_name="replay")
    # A short flush interval: the replay loop waits on the pump for backpressure.
    bus = EventBus([sink], run=run, resume_marks=marks, close_timeout=timeout, flush_interval=0.005)
    window = max(1, min(sink.capacity, 4 * sink.max_batch_size) // 2)
    with bus:
        sent_to_bus = 0
        superseded = _superseded(p)
        for i, ev in enumerate(read_events(p, on_unreadable=unreadable)):
            result.read += 1
            last_ns = max(last_ns, ev.time_ns)
            if superseded(i, ev):
                result.superseded += 1
                continue
            if done_ns is not None and ev.time_ns <= done_ns and _marks.names_of(ev) is None:
                already += 1
                continue
            bus.publish(ev)
            sent_to_bus += 1
            if sent_to_bus % window == 0:
                # Backpressure: a replay must not outrun the sink's bounded queue.
                while time.monotonic() < deadline:
                    st = bus.stats()
                    s = st.sinks[sink.name]
                    if st.ingress_depth + s.queue_depth < window:
                        break
                    time.sleep(0.005)
        stats = bus.close(max(0.0, deadline - time.monotonic()))
    s = stats.sinks[sink.name]
    open_error = bus.open_errors().get(sink.name)
    if open_error is not None and not s.delivered:
        # Nothing was sent and no mark moves: an error, not a count of failures.
        raise SinkError(
            f"the {sink.name} sink could not be opened, so nothing was replayed: {open_error}; "
            "check its options (--option key=value) and that its backend is reachable"
        )
    result.sent = s.delivered
    result.skipped = s.skipped + already
    result.failed = s.dropped - s.skipped + stats.ingress_dropped
    result.unreadable += _spool_unreadable(p)
    result.mark = bus.high_water_marks().get(sink.name)
    delivered_all = not result.failed and last_ns > 0
    if save_mark and marks_file is not None and (result.mark is not None or delivered_all):
        if result.mark is not None:
            if not isinstance(state.get("marks"), dict):
                state["marks"] = {}
            state["marks"][sink.name] = result.mark
            names = bus.high_water_names().get(sink.name)
            if not isinstance(state.get("mark_names"), dict):
                state["mark_names"] = {}
            if names is not None:
                state["mark_names"][sink.name] = names
            else:
                state["mark_names"].pop(sink.name, None)
        if delivered_all:
            replayed_ns[sink.name] = max(last_ns, done_ns or 0)
            state[_REPLAYED_KEY] = replayed_ns
        try:
            write_json_atomic(marks_file, state, fsync=True)
        except OSError as exc:
            logger.warning("eventbus: could not save the high-water mark to %s: %s", marks_file, exc)
    return result


def _spool_unreadable(path: Path) -> int:
    # read_spool warns about bad records as it goes; counting them means a second,
    # quiet pass (cheap next to sending the events).
    from eventbus.spool import _frames

    if path.is_dir():
        files = [path / n for n in _spool_files(path)]
    elif path.is_file() and _is_spool_file(path):
        files = [path]
    else:
        return 0
    n = 0
    for f in files:
        try:
            n += sum(1 for payload, _ in _frames(f, 0, warn=False) if payload is None)
        except SpoolError:
            n += 1
    return n


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option takes key=value, got {text!r}")
    try:
        value: Any = json.loads(raw)  # numbers, booleans, lists; anything else is a string
    except ValueError:
        value = raw
    return key.strip(), value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"a positive number of seconds, got {text!r}")
    return value


def add_parser(subparsers: Any) -> Callable[[argparse.Namespace], int]:
    """Add ``eventbus replay`` to the CLI; returns its handler."""
    p = subparsers.add_parser(
        "replay",
        help="send a past run's spool or JSONL file to a sink",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("path", help="a spool directory, a .spool file, or a JSON-lines events file")
    p.add_argument("--to", required=True, metavar="NAME", help="the sink to send to (a registered sink name)")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        type=_parse_option,
        metavar="KEY=VALUE",
        help="a sink option (repeatable); VALUE is parsed as JSON when it can be",
    )
    p.add_argument("--resume-mark", type=int, default=None, help="skip metric events at or below this step, instead of the mark kept next to PATH for this sink name "
        "(-1: send everything, e.g. to another destination of the same sink)")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds for the whole replay (default 300)")
    return _run


def _run(args: argparse.Namespace) -> int:
    from eventbus.redact import is_secret_key, redact_text
    from eventbus.registry import create_sink

    options = dict(args.option)
    # Options may carry an API key: it must not reach the terminal in an error.
    secrets = [str(v) for k, v in options.items() if is_secret_key(k)]
    try:
        sink = create_sink(args.to, **options)
        result = replay(args.path, sink, resume_mark=args.resume_mark, timeout=args.timeout)
    except EventBusError as exc:
        print(f"eventbus replay: error: {redact_text(str(exc), *secrets)}", file=sys.stderr)
        return 2
    print(
        f"replayed {args.path} to {result.sink}: read {result.read}, sent {result.sent}, "
        f"skipped {result.skipped} (already delivered), superseded {result.superseded}, failed {result.failed}, unreadable {result.unreadable}"
        + ("" if result.mark is None else f"; high-water mark now step {result.mark}")
    )
    return 1 if result.failed else 0
