"""The disk spool: an append-only, framed and checksummed log of one sink's events.

A spool is a directory of files ``00000001.spool``, ``00000002.spool``, ... (rotated
by size) plus ``state.json`` (the read cursor and the per-sink high-water marks).

File format (version 1)::

    header  = b"EBSPOOL" + bytes([FORMAT_VERSION])            8 bytes
    record  = RECORD_MARK (4 bytes) + length (u32 LE) + crc (u32 LE) + payload
    payload = eventbus.events.encode_msgpack(event)
    crc     = zlib.crc32(length bytes + payload)

The checksum covers the length, so a bad length is caught as surely as a bad payload.
A reader that meets a frame that does not check out searches forward for the next
``RECORD_MARK`` that starts a valid frame ("resync") and warns; when no valid frame
follows, the bad bytes are a torn final record (a write cut short by a crash) and
are skipped with one warning. Reading never raises for bad data; a file whose header
is bad or of another format version is skipped with a warning when a whole spool is
read, and is a :class:`~eventbus.errors.SpoolError` only when read alone.

Durability: every append is written to the OS at once (one ``write``), so a process
killed with SIGKILL loses nothing it appended; ``fsync`` runs every
``fsync_interval`` seconds (0: after every append), at rotation and at close, which
bounds what a machine crash can lose. The interval and rotation fsyncs run on a
thread of the spool's own (:class:`_Syncer`), never on the appending thread: on a
slow disk (NFS, a busy device: seconds per fsync) the bus loop, which every sink
shares, goes on while the disk catches up; one fsync is in flight at a time, so the
window a machine crash can lose is then the interval plus one fsync. With
``fsync_interval=0`` each append waits for its fsync (what 0 asks for). Once
:attr:`Spool.deadline` is set (the bus sets it when it closes), no call waits for
an fsync past it: the events are written, and the fsync finishes in the background.
Directories are created ``0o700`` and files ``0o600``: the spool holds the run's
metrics and config.

Size: a spool holds at most ``max_bytes`` on disk (``Sink.spool_max_bytes``), and
starts no new file while less than ``min_free_fraction`` of its filesystem is free
(``Sink.spool_min_free_fraction``): a tracking server down for days fills neither
the disk nor the room the run's checkpoints need. Past either limit an append raises
:class:`SpoolFullError` and holds nothing (the bus counts those events failed and
dropped, and says why once per streak); what the spool holds is kept and delivered.
A warning is logged once when the spool passes half its cap.

The spool is used from one thread at a time (the bus thread while the bus runs).
A bus locks its spool directory (``flock`` on ``.lock``, :meth:`Spool.lock`) while it
runs: two live buses never write one spool.
"""

from __future__ import annotations

import collections
import errno
import contextlib
import json
import logging
import os
import struct
import threading
import time
import weakref
import zlib
from pathlib import Path
from typing import Any, Callable, Generator, Iterator, NamedTuple, Sequence

try:
    import fcntl
except ImportError:  # not on POSIX: no lock (one bus per directory is then up to the user)
    fcntl = None  # type: ignore[assignment]

from eventbus.errors import SpoolError
from eventbus.events import BaseEvent, Event, decode_msgpack, encode_lenient

__all__ = [
    "Spool",
    "SpoolBatch",
    "SpoolPosition",
    "read_spool",
    "MAGIC",
    "FORMAT_VERSION",
    "RECORD_MARK",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_FSYNC_INTERVAL",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MIN_FREE_FRACTION",
    "SpoolFullError",
    "STATE_FILE",
    "LOCK_FILE",
    "write_json_atomic",
    "is_disk_full",
]

logger = logging.getLogger("eventbus.spool")

MAGIC = b"EBSPOOL"
FORMAT_VERSION = 1
_HEADER = MAGIC + bytes([FORMAT_VERSION])
RECORD_MARK = b"\xebS\x9f\x01"
_FRAME = struct.Struct("<4sII")
_MAX_RECORD = 64 * 1024 * 1024  # a length above this is corruption, not an event
_SUFFIX = ".spool"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"

DEFAULT_MAX_FILE_BYTES = 16 * 1024 * 1024
DEFAULT_FSYNC_INTERVAL = 1.0
DEFAULT_MAX_BYTES = 8 * 1024**3
DEFAULT_MIN_FREE_FRACTION = 0.05


class SpoolFullError(SpoolError):
    """The spool is at its size cap, or its disk is nearly full: nothing was appended."""


def _size_text(n: float) -> str:
    if n >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.1f} MiB" if n >= 1024**2 else f"{n / 1024:.1f} KiB"


def _disk_usage(path: Path) -> Any:
    """``shutil.disk_usage`` (the seam tests replace to simulate a nearly full disk)."""
    import shutil

    return shutil.disk_usage(path)
_SLOW_FSYNC = 2.0
"""Seconds: an fsync slower than this (a network or overloaded disk) is warned about,
once per spool: a machine crash can lose that much more than the interval says."""
_DEADLINE_POLL = 0.05
"""Seconds: how often a caller waiting for an fsync looks at a deadline set meanwhile."""
_LATE_FSYNC = 1.0
"""Seconds: an fsync waited for this long and not done at the close deadline is a slow
disk, warned about; one started just before (the close spooled what the deadline cut
off) is left to finish, in milliseconds on an ordinary disk, without a word."""
_SYNCER_IDLE = 0.5
"""Seconds the syncer thread waits for more work before it exits (with
``fsync_interval=0`` an fsync per append: not a thread per append)."""


class SpoolPosition(NamedTuple):
    """A place in a spool: a file name (``00000003.spool``) and a byte offset in it."""

    file: str
    offset: int


class SpoolBatch(NamedTuple):
    """Events read from a spool, and where the next read starts once they are consumed."""

    events: list[Event]
    end: SpoolPosition
    corrupt: int
    """How many bad regions (torn or corrupt records) were skipped to read them."""


def _file_name(seq: int) -> str:
    return f"{seq:08d}{_SUFFIX}"


def _seq(name: str) -> int:
    return int(name[: -len(_SUFFIX)])


def _check_header(path: Path, head: bytes) -> bool:
    """True for a good header, False for a file too short to have one (torn at birth)."""
    if len(head) < len(_HEADER):
        return False
    if head[: len(MAGIC)] != MAGIC:
        raise SpoolError(f"{path} is not an eventbus spool file (bad magic {head[:len(MAGIC)]!r})")
    version = head[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise SpoolError(
            f"{path} is spool format version {version}; this eventbus reads version {FORMAT_VERSION}: "
            "replay it with the eventbus version that wrote it"
        )
    return True


def _frame_at(data: bytes, pos: int) -> int | None:
    """End offset of a valid frame starting at ``pos`` in ``data``, else None."""
    if pos + _FRAME.size > len(data):
        return None
    mark, length, crc = _FRAME.unpack_from(data, pos)
    if mark != RECORD_MARK or length > _MAX_RECORD:
        return None
    end = pos + _FRAME.size + length
    if end > len(data):
        return None
    payload = data[pos + _FRAME.size : end]
    if zlib.crc32(payload, zlib.crc32(data[pos + 4 : pos + 8])) != crc:
        return None
    return end


_CHUNK = 256 * 1024


def _frames(path: Path, start: int, warn: bool = True) -> Generator[tuple[bytes | None, int], None, None]:
    """Yield ``(payload, end_offset)`` for each record of ``path`` from ``start``;
    ``(None, offset)`` after skipping a bad region (warned about when ``warn``).
    Reads in chunks, lazily: a caller that stops early reads little."""
    with open(path, "rb") as f:
        if start == 0:
            if not _check_header(path, f.read(len(_HEADER))):
                size = f.seek(0, os.SEEK_END)
                if size:
                    if warn:
                        logger.warning("eventbus: spool file %s has a torn header (%d bytes); skipped", path, size)
                    yield None, size
                return
            start = len(_HEADER)
        f.seek(start)
        buf = b""
        base = start  # file offset of buf[0]
        pos = 0
        eof = False
        while True:
            need = _FRAME.size
            if len(buf) - pos >= _FRAME.size:
                mark, length, _ = _FRAME.unpack_from(buf, pos)
                if mark == RECORD_MARK and length <= _MAX_RECORD:
                    need += length
            if len(buf) - pos < need and not eof:
                buf, base, pos = buf[pos:], base + pos, 0
                chunk = f.read(max(_CHUNK, need - len(buf)))
                if chunk:
                    buf += chunk
                else:
                    eof = True
                continue
            if pos >= len(buf):
                return
            end = _frame_at(buf, pos)
            if end is not None:
                yield buf[pos + _FRAME.size : end], base + end
                pos = end
                continue
            # A bad region (rare): take the rest of the file and look for the next
            # record marker that starts a valid frame.
            buf, base, pos, eof = buf[pos:] + f.read(), base + pos, 0, True
            nxt = buf.find(RECORD_MARK, 1)
            while nxt != -1 and _frame_at(buf, nxt) is None:
                nxt = buf.find(RECORD_MARK, nxt + 1)
            if nxt == -1:
                if warn:
                    logger.warning(
                        "eventbus: torn final record in spool file %s at offset %d (%d bytes): skipped; "
                        "everything before it was recovered",
                        path,
                        base,
                        len(buf),
                    )
                yield None, base + len(buf)
                return
            if warn:
                logger.warning(
                    "eventbus: corrupt spool record(s) in %s at offsets %d..%d: skipped, resumed at the next valid record",
                    path,
                    base,
                    base + nxt,
                )
            yield None, base + nxt
            pos = nxt


def _decode(payload: bytes, path: Path, offset: int, warn: bool) -> Event | None:
    try:
        return decode_msgpack(payload)
    except Exception as exc:  # a valid frame from a newer eventbus, say: skip, never crash
        if warn:
            logger.warning("eventbus: spool record in %s before offset %d does not decode (%s); skipped", path, offset, exc)
        return None


def _encode(events: Sequence[BaseEvent]) -> bytes:
    """``events`` as framed records, in order."""
    buf = bytearray()
    for ev in events:
        payload = encode_lenient(ev)
        length = struct.pack("<I", len(payload))
        buf += RECORD_MARK + length + struct.pack("<I", zlib.crc32(payload, zlib.crc32(length))) + payload
    return bytes(buf)


def _spool_files(directory: Path) -> list[str]:
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(_SUFFIX) and name[: -len(_SUFFIX)].isdigit():
            out.append(name)
    return sorted(out, key=_seq)


def read_spool(path: str | os.PathLike[str], *, from_cursor: bool = True, warn: bool = True) -> Iterator[Event]:
    """Every readable event of a spool directory (in order) or of one spool file.

    For a directory, ``from_cursor`` starts where the run that wrote it stopped
    delivering (its ``state.json`` cursor); ``False`` reads every file from the start.
    Bad records are skipped with a warning (``warn``), as the module docstring says;
    so is a whole file of a directory whose header is bad or of another format
    version. Given such a file alone, it is a :class:`SpoolError`.
    """
    p = Path(path)
    if p.is_dir():
        files = _spool_files(p)
        start = SpoolPosition(files[0], 0) if files else None
        if from_cursor:
            state = _load_state(p)
            cur = state.get("cursor")
            if cur and cur.get("file") in files:
                start = SpoolPosition(cur["file"], int(cur.get("offset", 0)))
        if start is None:
            return
        for name in files:
            if _seq(name) < _seq(start.file):
                continue
            offset = start.offset if name == start.file else 0
            try:
                yield from _events_of(p / name, offset, warn)
            except SpoolError as exc:
                # Not a spool file (a bad header) or another format version: skipped,
                # as the bus's own drain (Spool.read) skips it; the others are read.
                if warn:
                    logger.warning("eventbus: %s; skipped", exc)
    elif p.is_file():
        yield from _events_of(p, 0, warn)
    else:
        raise SpoolError(f"no spool at {p}: give a spool directory or a .spool file")


def _events_of(path: Path, offset: int, warn: bool = True) -> Iterator[Event]:
    for payload, end in _frames(path, offset, warn):
        if payload is None:
            continue
        ev = _decode(payload, path, end, warn)
        if ev is not None:
            yield ev


def _load_state(directory: Path) -> dict[str, Any]:
    try:
        with open(directory / STATE_FILE, "rb") as f:
            state = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("eventbus: unreadable spool state %s (%s); starting from the first spool file", directory / STATE_FILE, exc)
        return {}
    return state if isinstance(state, dict) else {}


def write_all(fd: int, data: bytes | bytearray, write: Callable[[int, Any], int] | None = None) -> None:
    """``os.write`` (or ``write``) until every byte of ``data`` is written, or an error:
    a nearly full disk takes part of a write before it fails, and a write that takes
    nothing is an ``OSError`` (EIO) rather than a loop forever. The rest is copied only
    after a short write, so no view of ``data`` outlives the call (a ``bytearray``
    stays resizable)."""
    write = os.write if write is None else write
    while data:
        n = write(fd, data)
        if n <= 0:
            raise OSError(errno.EIO, "the write wrote nothing")
        data = data[n:]


def write_json_atomic(path: Path, data: Any, *, fsync: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temp file + ``os.replace``),
    owner-only. ``fsync`` also makes it durable against a machine crash."""
    _write_json_atomic(path, data, _os_fsync if fsync else None)


def _os_fsync(fd: int) -> None:
    os.fsync(fd)  # looked up at each call: tests replace os.fsync


def _write_json_atomic(path: Path, data: Any, sync: Callable[[int], None] | None) -> None:
    """:func:`write_json_atomic`, with ``sync(fd)`` run on the temp file before it
    replaces ``path`` (a spool's: bounded by its deadline, see Spool._fsync_wait)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            # Every byte, or an error: a short write on a nearly full disk must not
            # replace a good file with a cut one.
            write_all(fd, json.dumps(data, sort_keys=True).encode())
            if sync is not None:
                sync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Syncer:
    """Runs one spool's fsyncs, in order, on a thread of their own, so that a slow
    disk (NFS, Lustre, a busy device: seconds per fsync) never stalls the thread that
    appends: the bus loop, which every sink shares. The thread lives while there is
    work (and a moment after) and then exits, so a spool that is dropped without
    close() leaves no thread behind. A daemon: an fsync that never returns (a hung mount)
    cannot keep the process from exiting (what it syncs is written already)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._running = False
        self._running_since: float | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> threading.Event:
        """Run ``job`` (which handles its own errors) after the ones before it; the
        event is set once it ran."""
        done = threading.Event()

        def run() -> None:
            try:
                job()
            finally:
                done.set()

        with self._cond:
            self._jobs.append((time.monotonic(), run))
            self._cond.notify_all()
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had (a process at its limit)
                    self._jobs.pop()
                else:
                    self._thread = thread
                    return done
            else:
                return done
        run()  # inline, then: slower, never lost
        return done

    def join(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: as long as it takes) until every job
        submitted so far ran. True when they did."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._running, timeout)

    def waiting_since(self) -> float | None:
        """When the oldest job not done yet was submitted (``time.monotonic()``), or
        None when there is none."""
        with self._cond:
            times = [t for t in (self._running_since, self._jobs[0][0] if self._jobs else None) if t is not None]
        return min(times) if times else None

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    self._cond.wait_for(lambda: bool(self._jobs), _SYNCER_IDLE)
                if not self._jobs:
                    self._thread = None
                    self._cond.notify_all()
                    return
                self._running_since, job = self._jobs.popleft()
                self._running = True
            try:
                job()
            except BaseException:  # jobs handle their errors: a bug, never the thread's end
                logger.exception("eventbus: a spool fsync failed unexpectedly")
            finally:
                with self._cond:
                    self._running = False
                    self._running_since = None
                    self._cond.notify_all()


class Spool:
    """One sink's spool directory: append events, read them back in order, consume.

    ``pending`` is the number of records appended (or found at open) and not yet
    consumed; ``marks`` the per-sink high-water marks kept in ``state.json`` (the
    highest step of a delivered ``Log``/``Evaluate``/``Predict`` event, per sink name),
    ``mark_names`` the names each sink got at that step (see :mod:`eventbus._marks`).

    ``deadline`` (a ``time.monotonic()`` value, None: none): past it, no call waits
    for an fsync (see the module docstring). The bus sets it to its close deadline.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        fsync_interval: float = DEFAULT_FSYNC_INTERVAL,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        min_free_fraction: float = DEFAULT_MIN_FREE_FRACTION,
    ) -> None:
        if not isinstance(max_file_bytes, int) or isinstance(max_file_bytes, bool) or max_file_bytes < 1024:
            raise SpoolError(f"spool max_file_bytes must be an int >= 1024, got {max_file_bytes!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1024):
            raise SpoolError(f"spool max_bytes must be an int >= 1024, or None for no cap; got {max_bytes!r}")
        if (
            isinstance(min_free_fraction, bool)
            or not isinstance(min_free_fraction, (int, float))
            or not 0 <= min_free_fraction < 1
        ):
            raise SpoolError(f"spool min_free_fraction must be a fraction in [0, 1), got {min_free_fraction!r}")
        self.max_bytes = max_bytes
        self.min_free_fraction = float(min_free_fraction)
        self.bytes = 0
        """What the pending records take on disk (see :meth:`_count_bytes`)."""
        self._half_warned = False
        if isinstance(fsync_interval, bool) or not isinstance(fsync_interval, (int, float)) or fsync_interval < 0:
            raise SpoolError(f"spool fsync_interval must be a number of seconds >= 0, got {fsync_interval!r}")
        self.directory = Path(directory)
        self.max_file_bytes = max_file_bytes
        self.fsync_interval = float(fsync_interval)
        self._fd: int | None = None
        self._file: str | None = None
        self._size = 0
        self._last_sync = time.monotonic()
        self._dirty = False
        self._closed = False
        self._sync_failing = False  # the last fsync failed (warned once per streak)
        self._sync_busy = False  # an interval fsync is in flight on the syncer (see _sync_soon)
        self._slow_warned = False
        self._syncer = _Syncer(f"eventbus-spool-sync-{self.directory.name}")
        self.deadline: float | None = None
        self._lock_fd: int | None = None
        self._unlock: Any = None  # weakref.finalize that closes _lock_fd
        self._load()

    def _load(self) -> None:
        """Read ``state.json`` and count the pending records (at open, and again once
        the directory is locked: see :meth:`lock`)."""
        self._loaded_as = self._fingerprint()
        state = _load_state(self.directory)
        self.run_id: str | None = state.get("run_id")
        self.marks: dict[str, int] = {
            str(k): int(v) for k, v in (state.get("marks") or {}).items() if isinstance(v, int) and not isinstance(v, bool)
        }
        # Alongside: per sink, the names it got at its mark's step ({"step", "names"};
        # eventbus._marks). Absent from a state.json of an older version.
        names = state.get("mark_names")
        self.mark_names: dict[str, Any] = dict(names) if isinstance(names, dict) else {}
        # Per sink name, the time_ns of the last event an `eventbus replay` of this
        # spool delivered in full (eventbus.replay): a drain skips the events without
        # a step up to it (metric events have the marks).
        replayed = state.get("replayed_ns")
        self.replayed_ns: dict[str, int] = {
            str(k): v for k, v in (replayed.items() if isinstance(replayed, dict) else ()) if type(v) is int
        }
        files = _spool_files(self.directory)
        cur = state.get("cursor") or {}
        if cur.get("file") in files:
            self.cursor = SpoolPosition(cur["file"], int(cur.get("offset", 0)))
        elif files:
            self.cursor = SpoolPosition(files[0], 0)
        else:
            self.cursor = SpoolPosition(_file_name(1), 0)
        # Count what an earlier process left here (quietly: the drain warns).
        self.pending = 0
        for name in files:
            if _seq(name) < _seq(self.cursor.file):
                continue
            path = self.directory / name
            try:
                for payload, end in _frames(path, self.cursor.offset if name == self.cursor.file else 0, warn=False):
                    if payload is not None and _decode(payload, path, end, False) is not None:
                        self.pending += 1
            except SpoolError as exc:
                logger.warning("eventbus: %s; that file is left as it is and not replayed", exc)
        self._next_seq = (_seq(files[-1]) + 1) if files else 1
        self._count_bytes()

    def _count_bytes(self) -> None:
        """What the pending records take: the files from the cursor's on, less the part
        of the cursor's file already delivered (kept on disk until the file is done,
        at most ``max_file_bytes``, but not counted against the cap)."""
        total = 0
        cursor = _seq(self.cursor.file)
        for name in _spool_files(self.directory):
            if _seq(name) < cursor:
                continue
            size = _size(self.directory / name)
            if name == self.cursor.file:
                size -= max(0, min(self.cursor.offset, size) - len(_HEADER))
            total += size
        self.bytes = total

    def _check_room(self, size: int) -> None:
        """Raise :class:`SpoolFullError` when ``size`` more bytes would pass the cap."""
        if self.max_bytes is None:
            return
        if self.bytes + size > self.max_bytes:
            raise SpoolFullError(
                f"the spool holds {_size_text(self.bytes)}, its cap (spool_max_bytes={self.max_bytes}): what it holds is "
                "kept and delivered when the sink is back, newer undeliverable events are not spooled; raise "
                "Sink.spool_max_bytes (or set it to None) to keep more"
            )
        if not self._half_warned and self.bytes + size > self.max_bytes // 2:
            self._half_warned = True
            logger.warning(
                "eventbus: the spool in %s holds %s, over half its cap of %s (Sink.spool_max_bytes): its sink has "
                "been unable to deliver for a while",
                self.directory, _size_text(self.bytes + size), _size_text(self.max_bytes),
            )

    def _check_disk(self) -> None:
        """Raise :class:`SpoolFullError` when less than ``min_free_fraction`` of the
        disk is free (checked when a new file starts: the room checkpoints need)."""
        if self.min_free_fraction <= 0:
            return
        try:
            usage = _disk_usage(self.directory)
        except OSError:
            return  # cannot tell: the write itself will say
        if usage.free - self.max_file_bytes < usage.total * self.min_free_fraction:
            raise SpoolFullError(
                f"the disk holding it has {_size_text(usage.free)} free of {_size_text(usage.total)}, less than "
                f"{self.min_free_fraction:.0%} (Sink.spool_min_free_fraction) once another spool file is written: "
                "the room is left to the run's checkpoints; free disk space or move the spool (Sink.spool_dir)"
            )

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        """Name, size and modification time of each file in the directory (what
        :meth:`_load` reads), to tell whether it changed since."""
        out = []
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return ()
        for name in names:
            if name == LOCK_FILE:
                continue
            try:
                st = os.stat(self.directory / name)
            except OSError:
                continue
            out.append((name, st.st_size, st.st_mtime_ns))
        return tuple(out)

    @classmethod
    def for_sink(cls, sink: Any, run: Any) -> Spool:
        """The spool of ``sink`` in ``run``: ``sink.spool_dir`` if set, else
        ``<run.output_dir>/spool/<sink.name>``, else ``./eventbus-spool/<run_id>/<sink.name>``
        (on a rank other than 0, ``<sink.name>-rank<N>``, or ``<spool_dir>/rank<N>``).
        ``sink.spool_max_file_bytes``, ``sink.spool_fsync_interval``,
        ``sink.spool_max_bytes`` and ``sink.spool_min_free_fraction`` override the
        defaults when the sink sets them."""
        rank = getattr(run, "rank", 0) or 0
        # Ranks share the output_dir: a sink that runs on every rank gets one spool each.
        leaf = sink.name if rank == 0 else f"{sink.name}-rank{rank}"
        if getattr(sink, "spool_dir", None):
            directory = Path(sink.spool_dir) if rank == 0 else Path(sink.spool_dir) / f"rank{rank}"
        elif getattr(run, "output_dir", None):
            directory = Path(run.output_dir) / "spool" / leaf
        else:
            directory = Path("eventbus-spool") / str(run.run_id) / leaf
        return cls(
            directory,
            max_file_bytes=getattr(sink, "spool_max_file_bytes", DEFAULT_MAX_FILE_BYTES),
            fsync_interval=getattr(sink, "spool_fsync_interval", DEFAULT_FSYNC_INTERVAL),
            max_bytes=getattr(sink, "spool_max_bytes", DEFAULT_MAX_BYTES),
            min_free_fraction=getattr(sink, "spool_min_free_fraction", DEFAULT_MIN_FREE_FRACTION),
        )

    # -- ownership -----------------------------------------------------------------------

    def lock(self) -> bool:
        """Take the directory for this process's bus: an exclusive ``flock`` on its
        ``LOCK_FILE``, held until :meth:`close`. False when another live spool (another
        bus, in this process or another) holds it; ``OSError`` when the directory or the
        lock file cannot be created. Once locked, the state and the pending count are
        read again: what they were before the lock may have been another bus's, live."""
        if self._lock_fd is not None:
            return True
        self._check_open()
        self._ensure_dir()
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return False
                raise
        self._lock_fd = fd
        key = _dir_key(self.directory)
        _LOCKED_HERE.add(key)
        # Released by close(); also when this object is collected or the process exits
        # (a bus that is never closed does not keep the directory from the next one).
        self._unlock = weakref.finalize(self, _release_lock, fd, os.getpid(), key)
        # Read again only if the directory changed since it was read (another bus
        # wrote to it meanwhile): counting a large spool's records twice costs seconds.
        if self._fingerprint() != self._loaded_as:
            self._load()
        return True

    def unlock(self) -> None:
        """Let go of the lock :meth:`lock` took (no-op without one)."""
        if self._unlock is not None:
            self._unlock()
            self._unlock = None
            self._lock_fd = None

    def remove_if_empty(self) -> bool:
        """Remove the directory of a closed spool that holds no pending record: the
        stand-in a bus used while its own spool directory was busy (a resume looks
        for its marks in the spool's own directory, not here). True when removed."""
        if not self._closed or self.pending > 0:
            return False
        for name in _spool_files(self.directory) + [STATE_FILE, LOCK_FILE]:
            _unlink(self.directory / name)
        try:
            os.rmdir(self.directory)
        except OSError:
            return False
        return True

    @property
    def locked(self) -> bool:
        """Whether this spool holds its directory's lock."""
        return self._lock_fd is not None

    def first_run_id(self) -> str | None:
        """The ``run_id`` of the first readable pending event (for a spool whose
        ``state.json`` does not say which run wrote it), else None."""
        for name in _spool_files(self.directory):
            if _seq(name) < _seq(self.cursor.file):
                continue
            path = self.directory / name
            try:
                for payload, end in _frames(path, self.cursor.offset if name == self.cursor.file else 0, warn=False):
                    ev = _decode(payload, path, end, False) if payload is not None else None
                    if ev is not None:
                        return getattr(ev, "run_id", None) or None
            except (SpoolError, OSError):
                continue
        return None

    def move_aside(self, tag: str) -> Path:
        """Move what the directory holds (its spool files and ``state.json``) to a new
        sibling directory ``<name>.<tag>`` (``.2``, ``.3``... when taken), for
        ``eventbus replay``; this spool is then empty. Only before anything is appended.
        Returns the new directory."""
        self._check_open()
        if self._fd is not None:
            raise SpoolError("move_aside() is for a spool that has not been written to")
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)[:64] or "run"
        base = f"{self.directory.name}.{safe}"
        k = 1
        while True:
            dest = self.directory.with_name(base if k == 1 else f"{base}.{k}")
            try:
                os.mkdir(dest, 0o700)
                break
            except FileExistsError:
                k += 1
        for name in _spool_files(self.directory) + [STATE_FILE]:
            try:
                os.rename(self.directory / name, dest / name)
            except FileNotFoundError:
                pass
        self._load()
        return dest

    # -- writing -------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        # Owner-only, also the parents we create (os.makedirs gives those the default
        # mode): metrics and config are private. Existing parents are left alone.
        missing = []
        d = self.directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
        os.chmod(self.directory, 0o700)

    def _open_file(self) -> None:
        self._ensure_dir()
        self._check_disk()
        name = _file_name(self._next_seq)
        self._next_seq += 1
        path = self.directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                self._write_fd(fd, _HEADER)
                size = len(_HEADER)
        except BaseException:
            os.close(fd)
            _unlink(path)  # no empty or headless files left behind by a full disk
            raise
        self.bytes += size
        self._fd, self._file, self._size = fd, name, size

    def _write_fd(self, fd: int, data: bytes) -> None:
        write_all(fd, data, self._write)

    def _write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        """One ``os.write``; the seam tests replace to simulate a full disk."""
        return os.write(fd, data)

    def append(self, events: Sequence[BaseEvent]) -> None:
        """Append ``events`` as records, in order. Raises ``OSError`` (e.g. ENOSPC)
        and then holds none of them: a partly written batch is cut off again."""
        self._check_open()
        if not events:
            return
        buf = _encode(events)
        self._check_room(len(buf) + len(_HEADER))
        if self._fd is None or self._size >= self.max_file_bytes:
            self._rotate()
        assert self._fd is not None
        try:
            self._write_fd(self._fd, bytes(buf))
        except OSError:
            # Leave no half record behind when we can (the reader would resync anyway).
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise
        self._size += len(buf)
        self.bytes += len(buf)
        self.pending += len(events)
        self._dirty = True
        # The events are written (a SIGKILL loses none of them): a failed fsync only
        # weakens what a machine crash could lose. Warned, not raised.
        if self.fsync_interval == 0:
            self._sync_or_warn()
        elif time.monotonic() - self._last_sync >= self.fsync_interval:
            self._sync_soon()

    def prepend(self, events: Sequence[BaseEvent]) -> None:
        """Put ``events`` in front of every pending record: they are read (drained,
        replayed) first. For events older than what the spool holds (a failed batch
        held in memory while newer ones were spooled): the disk keeps publish order.
        Rewrites the cursor's file (at most about ``max_file_bytes``); the other files
        are left as they are. Raises ``OSError`` and then holds none of them."""
        self._check_open()
        if not events:
            return
        if self.pending <= 0:
            self.append(events)
            return
        buf = _encode(events)
        self._check_room(len(buf))
        name = self.cursor.file
        path = self.directory / name
        try:
            with open(path, "rb") as f:
                good = _check_header(path, f.read(len(_HEADER)))
                f.seek(max(self.cursor.offset, len(_HEADER)))
                rest = f.read() if good else b""
        except FileNotFoundError:
            rest = b""
        except SpoolError as exc:  # not ours to rewrite: behind, then, but kept
            logger.warning("eventbus: %s; %d older events are appended after newer ones", exc, len(events))
            self.append(events)
            return
        # Written aside and fsynced, then put in place of the file: a crash leaves the
        # old file or the new one, never half of one. (Past the deadline the fsync
        # finishes in the background: see _fsync_wait.)
        self._ensure_dir()
        tmp = self.directory / f".{name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                self._write_fd(fd, _HEADER + buf + rest)
                self._fsync_wait(fd)
            finally:
                os.close(fd)
        except BaseException:
            _unlink(tmp)
            raise
        writing = self._file == name
        if writing:
            assert self._fd is not None
            self._retire(self._fd)
            self._fd = None
            self._file = None
        # The cursor first: a crash between the two re-reads the old file from its
        # start (events delivered twice, which the marks hold back) instead of reading
        # the new one from the old offset (events lost).
        old = self.cursor
        self.cursor = SpoolPosition(name, 0)
        try:
            try:
                self.save_state(fsync=True)
            except OSError as exc:
                logger.warning("eventbus: could not save the spool state in %s: %s", self.directory, exc)
            os.replace(tmp, path)
        except BaseException:
            self.cursor = old
            _unlink(tmp)
            try:
                self.save_state()
            except OSError:
                pass
            raise
        finally:
            if writing:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND, 0o600)
                self._fd, self._file, self._size = fd, name, os.fstat(fd).st_size
        self.pending += len(events)
        self._count_bytes()

    def _rotate(self) -> None:
        if self._fd is not None:
            self._retire(self._fd)
            self._fd = None
        self._open_file()

    def _sync_or_warn(self) -> None:
        """fsync the current file now (``fsync_interval=0``): the append waits for it,
        as 0 asks, until a :attr:`deadline` is set (the bus closing): from then on it
        is only started, and close() waits for it, within the deadline, once the other
        sinks had their last writes (a wait here would hold the loop they share). An
        error is a durability warning (once per failing streak): what was written
        stays written, and is delivered or replayed as usual."""
        if self.deadline is not None:
            self._sync_soon()
            return
        self._last_sync = time.monotonic()
        if self._fd is not None and self._dirty:
            self._dirty = False
            self._fsync_wait(self._fd, until_closing=True)

    def _sync_soon(self) -> None:
        """Start an fsync of the current file on the syncer and return at once (the
        interval fsync). While one is in flight none is started: the next append
        after it ends starts the next, so a slow disk gets one fsync at a time."""
        if self._fd is None or not self._dirty or self._sync_busy:
            return
        self._last_sync = time.monotonic()
        try:
            fd = os.dup(self._fd)  # the syncer's own: rotation may close ours meanwhile
        except OSError as exc:
            self._sync_failed(exc)
            return
        self._dirty = False
        self._sync_busy = True

        def job() -> None:
            try:
                self._fsync_fd(fd, close=True)
            finally:
                self._sync_busy = False

        self._syncer.submit(job)

    def _retire(self, fd: int) -> None:
        """``fd``, a spool file no longer written to (rotation, prepend, close), is
        fsynced (when written since the last fsync) and closed on the syncer."""
        dirty, self._dirty = self._dirty, False
        self._last_sync = time.monotonic()
        if dirty:
            self._syncer.submit(lambda: self._fsync_fd(fd, close=True))
        else:
            os.close(fd)

    def _fsync_wait(self, fd: int, *, until_closing: bool = False) -> None:
        """fsync ``fd`` before going on (a file about to replace another, the state at
        close), waiting no longer than :attr:`deadline`, also one set while it waits
        (``until_closing``: not at all once one is set). The fsync then goes on in
        the background, on a duplicate of ``fd``: what it syncs is written already."""
        try:
            dup = os.dup(fd)
        except OSError as exc:
            self._sync_failed(exc)
            return
        done = self._syncer.submit(lambda: self._fsync_fd(dup, close=True))
        while True:
            deadline = self.deadline  # set from another thread (EventBus.close)
            if deadline is None:
                wait = _DEADLINE_POLL
            elif until_closing:
                return
            else:
                wait = max(0.0, deadline - time.monotonic())
            if done.wait(wait) or deadline is not None:
                return

    def _fsync_fd(self, fd: int, *, close: bool) -> None:
        """``os.fsync(fd)`` (and close it when asked), on whichever thread: an error is
        a durability warning (see _sync_failed), a slow one is warned about once."""
        start = time.monotonic()
        try:
            os.fsync(fd)
        except OSError as exc:
            self._sync_failed(exc)
        else:
            self._sync_failing = False
        finally:
            if close:
                with contextlib.suppress(OSError):
                    os.close(fd)
        took = time.monotonic() - start
        if took >= _SLOW_FSYNC and not self._slow_warned:
            self._slow_warned = True
            logger.warning(
                "eventbus: an fsync of the spool in %s took %.1f s (a slow or network disk): a machine crash can "
                "lose what was spooled since the last one that finished (and with spool_fsync_interval=0 each append "
                "waits that long); put the spool on a local disk (the sink's spool_dir)",
                self.directory,
                took,
            )

    def _sync_failed(self, exc: OSError) -> None:
        self._last_sync = time.monotonic()  # tried again at the next interval, not at once
        if not self._sync_failing:
            self._sync_failing = True
            logger.warning(
                "eventbus: fsync of the spool in %s failed (%r): the spooled events are written but may not "
                "survive a machine crash; they are still delivered or replayed as usual",
                self.directory,
                exc,
            )

    # -- reading and consuming -----------------------------------------------------------

    def read(self, max_events: int) -> SpoolBatch:
        """Up to ``max_events`` events from the cursor on, without consuming them.
        A closed spool cannot be read (:class:`SpoolError`): what it holds is left for
        a replay or the next run, not for a thread that outlived the close."""
        self._check_open()
        events: list[Event] = []
        corrupt = 0
        pos = self.cursor
        for name in _spool_files(self.directory):
            if _seq(name) < _seq(pos.file):
                continue
            start = pos.offset if name == pos.file else 0
            path = self.directory / name
            pos = SpoolPosition(name, start)
            frames = _frames(path, start)
            try:
                for payload, end in frames:
                    if len(events) >= max_events:
                        return SpoolBatch(events, pos, corrupt)
                    pos = SpoolPosition(name, end)
                    if payload is None:
                        corrupt += 1
                        continue
                    ev = _decode(payload, path, end, True)
                    if ev is None:
                        corrupt += 1
                    else:
                        events.append(ev)
            except SpoolError as exc:  # another format version: leave the file, go on
                logger.warning("eventbus: %s; skipped", exc)
                pos = SpoolPosition(name, path.stat().st_size)
                corrupt += 1
            finally:
                frames.close()
        return SpoolBatch(events, pos, corrupt)

    def consume(self, batch: SpoolBatch) -> int:
        """Mark ``batch`` as delivered: move the cursor past it, delete files read to
        the end, persist the cursor. Returns how many pending records turned out to be
        unreadable (only known once the end of the spool is reached). A closed spool
        cannot be consumed (:class:`SpoolError`)."""
        self._check_open()
        # Never below 0: a count that went negative would read as "pending" (truthy).
        self.pending = max(0, self.pending - len(batch.events))
        self.cursor = batch.end
        lost = 0
        files = _spool_files(self.directory)
        at_end = self._at_end(files)
        if at_end and self.pending > 0:
            lost, self.pending = self.pending, 0
        for name in files:
            if _seq(name) < _seq(self.cursor.file) and name != self._file:
                _unlink(self.directory / name)
        if at_end and self._file is None:
            # Everything is delivered and nothing is open for writing: start afresh.
            for name in _spool_files(self.directory):
                _unlink(self.directory / name)
            self.cursor = SpoolPosition(_file_name(self._next_seq), 0)
        self._count_bytes()
        try:
            self.save_state()
        except OSError as exc:  # e.g. a full disk: the cursor lives on in memory
            logger.warning("eventbus: could not save the spool state in %s: %s", self.directory, exc)
        return lost

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError(f"the spool at {self.directory} is closed")

    def _at_end(self, files: list[str]) -> bool:
        # A file that holds no record (a header only: one rotated to just before the
        # disk filled up) is no reason to keep the spool.
        for name in files:
            if _seq(name) > _seq(self.cursor.file) and _size(self.directory / name) > len(_HEADER):
                return False
        return max(self.cursor.offset, len(_HEADER)) >= _size(self.directory / self.cursor.file)

    # -- state ----------------------------------------------------------------------------

    def save_state(self, *, fsync: bool = False) -> None:
        """Persist the cursor and the marks to ``state.json`` (atomically); ``fsync``:
        durably, waiting no longer than :attr:`deadline` for it (see _fsync_wait)."""
        self._ensure_dir()
        _write_json_atomic(
            self.directory / STATE_FILE,
            {
                "format": FORMAT_VERSION,
                "run_id": self.run_id,
                "cursor": {"file": self.cursor.file, "offset": self.cursor.offset},
                "marks": self.marks,
                "mark_names": self.mark_names,
                "replayed_ns": self.replayed_ns,
            },
            self._fsync_wait if fsync else None,
        )

    def close(self) -> None:
        """fsync and close the current file and persist the state. Idempotent.
        Returns by :attr:`deadline`: everything is written then, and an fsync still
        running (a slow disk) finishes in the background, with a warning."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._fd is not None:
                fd, self._fd, self._file = self._fd, None, None
                self._retire(fd)
            if self.directory.exists():
                if self.pending <= 0 and self._at_end(_spool_files(self.directory)):
                    for name in _spool_files(self.directory):
                        _unlink(self.directory / name)
                    self.cursor = SpoolPosition(_file_name(self._next_seq), 0)
                self.save_state(fsync=True)
            # "fsynced at close": also the interval and rotation fsyncs still in flight.
            left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            since = None if self._syncer.join(left) else self._syncer.waiting_since()
            if since is not None and time.monotonic() - since >= _LATE_FSYNC:
                # (One that just started, at or past the deadline: the close spooled
                # what the deadline cut off, is no slow disk; it ends in a moment.)
                logger.warning(
                    "eventbus: the spool in %s is written, but its fsync did not finish by the close deadline (a slow "
                    "disk); it goes on in the background. The spooled events survive this process exiting, a machine "
                    "crash only once it finished: put the spool on a local disk (the sink's spool_dir)",
                    self.directory,
                )
        finally:
            self.unlock()

    def __repr__(self) -> str:
        return f"<Spool {str(self.directory)!r} pending={self.pending}>"


_LOCKED_HERE: set[str] = set()
"""The spool directories this process's spools hold the lock of."""


def _dir_key(directory: Path) -> str:
    return os.path.realpath(directory)


def locked_here(directory: str | os.PathLike[str]) -> bool:
    """Whether a spool of this process holds ``directory``'s lock."""
    return _dir_key(Path(directory)) in _LOCKED_HERE


def _release_lock(fd: int, owner: int, key: str) -> None:
    _LOCKED_HERE.discard(key)
    # LOCK_UN first: a process forked meanwhile (DataLoader workers) holds the same
    # open file, and closing ours alone would leave the lock held until it exits. Only
    # by the process that took it: a forked child that exits (running this finalizer)
    # shares the lock and must not release the parent's.
    if fcntl is not None and os.getpid() == owner:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
    os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)

