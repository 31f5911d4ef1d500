"""JSON lines sink: the run's events as one JSON document per line, one file per run.

The embedded default: it needs nothing beyond the package itself. Each line is
``eventbus.events.encode_json(event)``, so :func:`eventbus.events.decode_json` reads it
back to the same event type, with metric names exactly as they were published.

Non-finite numbers: JSON has no NaN or infinity (msgspec writes them as ``null``,
which would lose them). A line whose event holds one writes it as the string
``"NaN"``, ``"Infinity"`` or ``"-Infinity"`` and lists where it did so under an extra
top-level key, ``"_nonfinite"``: a list of paths (each a list of keys and list
indices). :func:`read_jsonl` turns exactly those strings back into floats, so a
string value that happens to read ``"NaN"`` stays a string. Other readers (``jq``,
pandas) see the strings. ``decode_json`` ignores the extra key, so it still reads
such a line, but gives the strings; :func:`decode_line` gives the floats back (and
is needed when a typed float field such as ``TrainEnd.best_metric`` is NaN).

The file only ever ends in a whole line (:class:`sinks._common.AppendFile`): a write
that fails (a full disk) cuts it back to its last whole line, and the batch the bus
counts failed is not in it, not even once the disk has room again; what the bus
counts delivered is.
A file deleted while the run writes it (the output directory removed) is noticed at
the next flush: a warning names it, and the rest of the run goes to a new file at the
same path (its directory created again).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterator, Sequence

import msgspec

from eventbus._marks import names_of
from eventbus.errors import SinkConfigError
from eventbus.events import (
    EVENT_BY_NAME,
    EVENT_TYPES,
    BaseEvent,
    Evaluate,
    Event,
    OptimizerStep,
    PredictionStep,
    PreOptimizerStep,
    Save,
    StepBegin,
    StepEnd,
    SubstepEnd,
    TrainBegin,
    TrainEnd,
    encode_json,
    encode_json_lines,
    lenient,
)
from eventbus.sink import RunInfo, ThreadedSink

from sinks._common import BATCH_SIZE, AppendFile, check_option_types

__all__ = ["JSONLSink", "read_jsonl", "iter_jsonl", "encode_line", "encode_lines", "decode_line", "NONFINITE_KEY"]

logger = logging.getLogger("sinks.jsonl")

NONFINITE_KEY = "_nonfinite"
"""The top-level key listing where a line holds NaN/inf written as strings."""

_TOKENS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_URGENT = (TrainBegin, Evaluate, Save, TrainEnd)
PER_BATCH_EVENTS = (StepBegin, SubstepEnd, PreOptimizerStep, OptimizerStep, StepEnd, PredictionStep)
"""Left out by default: one per hook per batch, with nothing but the step."""
DEFAULT_EVENTS = tuple(e for e in EVENT_TYPES if e not in PER_BATCH_EVENTS)
# For values msgspec cannot encode (an object left in a config dict): their text,
# rather than losing the whole batch.
_lenient_encoder = msgspec.json.Encoder(enc_hook=lenient)


def _token(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    return "Infinity" if x > 0 else "-Infinity"


def _has_nonfinite(obj: Any) -> bool:
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, dict):
        return any(_has_nonfinite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_nonfinite(v) for v in obj)
    return False


def _replace_nonfinite(obj: Any, path: list[Any], found: list[list[Any]]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        found.append(list(path))
        return _token(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            path.append(k)
            out[k] = _replace_nonfinite(v, path, found)
            path.pop()
        return out
    if isinstance(obj, (list, tuple)):
        items = []
        for i, v in enumerate(obj):
            path.append(i)
            items.append(_replace_nonfinite(v, path, found))
            path.pop()
        return items
    return obj


def encode_line(event: BaseEvent) -> bytes:
    """One line of the file for ``event``, newline included (see the module docstring)."""
    try:
        line = encode_json(event)
    except (TypeError, msgspec.EncodeError):
        line = None
    # msgspec writes NaN and infinity as null: a line without "null" has none, and needs
    # no walk through the event (most lines; the walk cost twice the encode).
    if line is not None and (b"null" not in line or not any(_has_nonfinite(getattr(event, f)) for f in event.__struct_fields__)):
        return line + b"\n"
    # The rare slow path: a plain-data copy with the non-finite floats made strings.
    data = msgspec.to_builtins(event, enc_hook=lenient)
    found: list[list[Any]] = []
    data = _replace_nonfinite(data, [], found)
    if found:
        data[NONFINITE_KEY] = found
    return _lenient_encoder.encode(data) + b"\n"


def encode_lines(events: Sequence[BaseEvent]) -> bytes:
    """:func:`encode_line` of each event, joined. A batch whose encoding holds no
    ``null`` (no NaN or inf, nor any None) is one C call, not a Python call per event;
    any other takes the per-event path."""
    try:
        data = encode_json_lines(events)
    except (TypeError, msgspec.EncodeError):
        data = None
    if data is not None and b"null" not in data:
        return data
    return b"".join(encode_line(ev) for ev in events)


def decode_line(line: bytes | str) -> Event:
    """The event one line of a JSON lines file holds, NaN and inf restored."""
    data = msgspec.json.decode(line)
    if not isinstance(data, dict) or data.get("type") not in EVENT_BY_NAME:
        raise ValueError(f"not an eventbus event line: {bytes(line[:80]) if isinstance(line, bytes) else line[:80]!r}")
    for path in data.pop(NONFINITE_KEY, ()):
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = _TOKENS[parent[path[-1]]]
    return msgspec.convert(data, Event)


def read_jsonl(path: str | os.PathLike[str], *, purge_orphans: bool = True, strict: bool = False) -> list[Event]:
    """Read back a file written by :class:`JSONLSink`.

    With ``purge_orphans`` (the default), a resumed run's ``TrainBegin`` (its
    ``resumed_from`` set, at step ``S``) drops what the interrupted run wrote after
    step ``S`` and the resumed run wrote again (same event type and step; for a
    ``Log``, ``Evaluate`` or ``Predict``, with all of its value keys), as TensorBoard
    does with its event files: each step appears once. What the resumed run did not
    write again is kept: a Trainer resume skips the metric steps a sink already has
    (its high-water mark), and at the mark's step the metrics it already has (the
    training loss of a step whose evaluation the interrupted run died in), so those
    lines are the only copy.
    A line that does not decode (torn when a process died mid-write) is skipped with
    a warning, or raises with ``strict=True``.
    """
    events: list[Event] = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ev = decode_line(line)
        except ValueError as exc:  # msgspec.DecodeError is a ValueError
            if strict:
                raise ValueError(f"{os.fspath(path)}:{lineno}: {exc}") from exc
            logger.warning("jsonl: skipping line %d of %s that does not decode (%s)", lineno, os.fspath(path), exc)
            continue
        events.append(ev)
    if not purge_orphans:
        return events
    # Backwards: an event is dropped when it is an orphan of a later resume (after that
    # resume's step) and a line at or after that resume holds the same (type, step).
    kept: list[Event] = []
    # (type, step) written at or after the resume -> the names written there (metric
    # events: "Log/loss", see eventbus._marks; None for the others).
    later: dict[tuple[type, int], set[str] | None] = {}
    resume_step: int | None = None  # the lowest step of a resume met so far (backwards)
    for ev in reversed(events):
        key = (type(ev), ev.step)
        keys = names_of(ev)
        if resume_step is not None and ev.step > resume_step and key in later:
            seen = later[key]
            if keys is None or seen is None or keys <= seen:
                continue
        kept.append(ev)
        if isinstance(ev, TrainBegin) and ev.resumed_from:
            resume_step = ev.step if resume_step is None else min(resume_step, ev.step)
        if keys is None or key not in later:
            later[key] = keys if keys is None else set(keys)
        elif later[key] is not None:
            later[key] |= keys  # type: ignore[operator]
    kept.reverse()
    return kept


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[Event]:
    """Stream the events of a file written by :class:`JSONLSink`, as written
    (no orphan purging)."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield decode_line(line)


class JSONLSink(ThreadedSink):
    """Writes the run's events as JSON lines (report_to name ``"jsonl"``).

    Options:

    - ``path``: the file to append to. Default: ``<dir>/events-<run_id>.jsonl``
      (on a rank other than 0, with ``all_ranks``: ``events-<run_id>-rank<N>.jsonl``).
    - ``dir``: the directory for the default file name; default the run's
      ``output_dir``.
    - ``flush_secs``: the longest time written lines may sit in the buffer while
      events keep arriving (default 1 s). ``TrainBegin``, ``Evaluate``, ``Save`` and
      ``TrainEnd`` flush at once, as does close; in a child process of its own
      (``sink.isolate = True``) every batch is flushed before the bus counts it delivered.
    - ``events``: the event type names to write, or ``"all"``. Default: every type
      but the per-batch hooks (``StepBegin``, ``SubstepEnd``, ``PreOptimizerStep``,
      ``OptimizerStep``, ``StepEnd``, ``PredictionStep``), which carry nothing but
      their step and would cost the training thread an event per hook per step
      (each ``Log``, ``Evaluate`` and ``Save`` already names its step).

    A resumed run with the same ``run_id`` appends to the same file; see
    :func:`read_jsonl` for how the reader keeps each step once.
    """

    name = "jsonl"
    events = DEFAULT_EVENTS
    max_batch_size = BATCH_SIZE

    def __init__(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        dir: str | os.PathLike[str] | None = None,  # noqa: A002 - the option's natural name
        flush_secs: float = 1.0,
        events: Sequence[str] | str | None = None,
        buffer_size: int = 1 << 20,
    ) -> None:
        check_option_types(self.name, JSONLSink.__init__, locals())
        if path is not None and dir is not None:
            raise SinkConfigError("jsonl sink: pass either path= (the file) or dir= (its directory), not both")
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or flush_secs < 0:
            raise SinkConfigError(f"jsonl sink: flush_secs must be a number of seconds >= 0, got {flush_secs!r}")
        if events == "all":
            self.events = EVENT_TYPES
        elif events is not None:
            if isinstance(events, str):
                events = [e.strip() for e in events.split(",") if e.strip()]
            unknown = [e for e in events if e not in EVENT_BY_NAME]
            if unknown:
                raise SinkConfigError(f"jsonl sink: unknown event types {unknown}; known: {', '.join(EVENT_BY_NAME)}")
            self.events = tuple(EVENT_BY_NAME[e] for e in events)
        self.path: str | None = os.fspath(path) if path is not None else None
        """The file written (resolved when the sink is opened)."""
        self.dir = os.fspath(dir) if dir is not None else None
        self.flush_secs = float(flush_secs)
        self.buffer_size = int(buffer_size)
        self._file: AppendFile | None = None

    def resolve_path(self, run: RunInfo) -> str:
        """The file this sink writes for ``run``; on a rank other than 0 (a sink with
        ``all_ranks``), ``-rank<N>`` goes before its extension: ranks never share a file."""
        if self.path:
            path = os.path.expanduser(self.path)
        else:
            base = self.dir or run.output_dir
            if not base:
                raise SinkConfigError("jsonl sink: no directory to write to; pass JSONLSink(dir=...) or path=..., or give the run an output_dir")
            path = os.path.join(os.path.expanduser(base), f"events-{run.run_id}.jsonl")
        stem, ext = os.path.splitext(path)
        # Once only: open keeps the resolved file in path for the next open.
        if run.rank and not stem.endswith(f"-rank{run.rank}"):
            path = f"{stem}-rank{run.rank}{ext}"
        return path

    def open_sync(self, run: RunInfo) -> None:
        """Open (append to) the run's file."""
        path = self.path = self.resolve_path(run)
        self._file = AppendFile(path, owner=f"{self.name} sink", unit="line", reopen=self._reopened, log=logger, head=_line_end(path))

    def _reopened(self) -> tuple[str, bytes]:
        """The file was deleted: the rest of the run goes to a new one at its path."""
        assert self.path is not None
        return self.path, _line_end(self.path)

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        """Append one line per event; flush on urgent events, when the interval passed
        or the buffer is full, and after every batch while flushes fail (see
        :class:`AppendFile`: a batch whose flush fails is not in the file)."""
        f = self._file
        if f is None:
            raise SinkConfigError("jsonl sink: write before open (the bus opens sinks before writing)")
        data = encode_lines(batch)
        f.begin(len(batch))
        f.write(data)
        if any(isinstance(ev, _URGENT) for ev in batch) or f.due(self.flush_secs, self.buffer_size):
            f.flush()

    def flush_sync(self) -> None:
        """Write the buffered lines out to the file (an isolated child calls it after
        every batch). On failure the last batch written is not in the file."""
        if self._file is not None:
            self._file.flush()

    def close_sync(self) -> None:
        """Flush and close the file."""
        f, self._file = self._file, None
        if f is not None:
            f.close()


def _line_end(path: str) -> bytes:
    """``b"\\n"`` when ``path`` ends in a torn line (a process died mid-write), so that
    the first line written after it is not glued to it; else nothing."""
    try:
        with open(path, "rb") as existing:
            if existing.seek(0, os.SEEK_END) == 0:
                return b""
            existing.seek(-1, os.SEEK_END)
            return b"" if existing.read(1) == b"\n" else b"\n"
    except FileNotFoundError:
        return b""
