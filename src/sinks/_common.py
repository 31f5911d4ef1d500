"""Helpers the backend sinks share: metric naming, scalar filtering, flattening."""

from __future__ import annotations

import collections.abc
import errno
import hashlib
import importlib
import logging
import os
import re
import time
import types
import typing
from typing import Any, Callable, Iterator, Mapping

from eventbus.errors import MissingDependencyError, SinkConfigError
from eventbus.redact import is_secret_key
from eventbus.spool import write_all

__all__ = [
    "BATCH_SIZE", "import_sdk", "rewrite_name", "rewrite_logs", "prefixed_name", "evaluation_names", "ScalarFilter",
    "flatten", "is_number", "check_option_types", "distinct_name", "AppendFile",
]

logger = logging.getLogger("sinks")

BATCH_SIZE = 4096
"""``max_batch_size`` of the sinks that write every ``Log`` (tensorboard, jsonl,
neptune, comet_ml): a batch costs a hand-off to the sink's thread or child process
(thread wakes, ~0.5 ms of CPU on a busy VM) whatever its size, and at a thousand
logged steps a second the default 512 meant two a second; with this, batches go out
every ``max_delay``."""


def import_sdk(module: str, extra: str, sink: str) -> Any:
    """Import a backend SDK, or raise a clear error naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {sink} sink needs the {module!r} package, which is not installed: "
            f"pip install 'eventbus-telemetry[{extra}]' ({exc})"
        ) from exc


def rewrite_name(name: str) -> str:
    """transformers' naming for scalar backends, one name: ``eval_loss`` ->
    ``eval/loss``, ``test_acc`` -> ``test/acc``, anything else ``loss`` -> ``train/loss``."""
    if name.startswith("eval_"):
        return "eval/" + name[5:]
    if name.startswith("test_"):
        return "test/" + name[5:]
    return "train/" + name


def rewrite_logs(values: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`rewrite_name` applied to every key of ``values``."""
    return {rewrite_name(k): v for k, v in values.items()}


def prefixed_name(name: str, prefix: str) -> str:
    """An evaluation's metric under its prefix: ``eval_loss`` -> ``eval/loss`` (a name
    without the prefix -> ``eval/<name>``)."""
    head = prefix + "_"
    return f"{prefix}/{name[len(head):]}" if name.startswith(head) else f"{prefix}/{name}"


def evaluation_names(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """An ``Evaluate``/``Predict``'s metrics under the names transformers' Comet and
    Neptune callbacks give them (they log them through ``on_log``, named by
    :func:`rewrite_logs`), so the same evaluation arriving as ``Log`` and as
    ``Evaluate`` is one series: ``eval_loss`` -> ``eval/loss``, ``test_acc`` ->
    ``test/acc``, ``epoch`` -> ``train/epoch`` (no ``eval/epoch``), a custom
    ``metric_key_prefix``'s ``val_loss`` -> ``train/val_loss``; a name without the
    prefix gets it (``loss`` -> ``eval/loss``)."""
    head = prefix + "_"
    return {
        rewrite_name(k) if k == "epoch" or k.startswith(head) else prefixed_name(k, prefix): v
        for k, v in metrics.items()
    }


def is_number(value: Any) -> bool:
    """Ints and floats (NaN and inf included), not bools."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ScalarFilter:
    """Keeps the values a scalar-only backend can take, warning once per key (not per
    step) about the ones it skips."""

    def __init__(self, sink_name: str) -> None:
        self.sink_name = sink_name
        self._warned: set[str] = set()

    def scalars(self, values: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
        for k, v in values.items():
            kind = type(v)
            if kind is float:  # nearly every value: one type() and no call
                yield k, v
            elif kind is bool or kind is int or is_number(v):
                try:
                    f = float(v)
                except OverflowError:
                    # An int beyond a double (10**400): not a number a backend can store.
                    # Skipped like text, which is what it arrives as in an isolated
                    # sink's child process (eventbus.events.encode_lenient); raising
                    # here would fail every other event of the batch.
                    if k not in self._warned:
                        self._warned.add(k)
                        logger.warning(
                            "%s sink: %r is an int too large for a float; it is not logged as a metric "
                            "(this warning is shown once per key)",
                            self.sink_name,
                            k,
                        )
                    continue
                yield k, f
            elif k not in self._warned:
                self._warned.add(k)
                logger.warning(
                    "%s sink: %r is a %s, not a scalar; it is not logged as a metric (this warning is shown once per key)",
                    self.sink_name,
                    k,
                    type(v).__name__,
                )


def flatten(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings to one level: ``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out



def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp``, for the shapes sink options use;
    what cannot be checked at run time (protocols, type variables) passes."""
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a fine float (``flush_secs=5``)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is os.PathLike or tp is os.PathLike:
        return isinstance(value, os.PathLike)
    if origin in (collections.abc.Sequence, list, tuple, collections.abc.Iterable):
        if isinstance(value, (str, bytes)) or not isinstance(value, origin):
            return False
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if origin in (collections.abc.Mapping, dict):
        return isinstance(value, collections.abc.Mapping)
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return callable(value)
    if isinstance(tp, type) and tp.__module__ != "typing":
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is None or tp is type(None):
        return "None"
    if origin is os.PathLike:
        return "a path"
    if tp is float:
        return "a number"
    if origin is collections.abc.Callable:
        return "a callable"
    if origin is not None:
        return f"a {getattr(origin, '__name__', str(origin))}"
    return f"a {getattr(tp, '__name__', str(tp))}"


_URL_USERINFO = re.compile(r"(://)[^/@\s'\"]+@")


def check_option_types(sink: str, func: Callable[..., Any], values: Mapping[str, Any]) -> None:
    """Check each of ``values`` (a constructor's ``locals()``) against the annotation
    of that parameter of ``func``; a mismatch is a :class:`SinkConfigError` naming the
    sink, the option, what it must be and what it got (never the value of a secret)."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an annotation that does not resolve here: nothing to check
        return
    for name, value in values.items():
        tp = hints.get(name)
        if tp is None or name == "self":
            continue
        if not _matches(value, tp):
            # Credentials in a URL (a tracking URI's user:password@) never show.
            shown = "***" if is_secret_key(name) else _URL_USERINFO.sub(r"\1***@", repr(value))
            if len(shown) > 80:
                shown = shown[:77] + "..."
            raise SinkConfigError(
                f"{sink} sink: option {name!r} must be {_describe(tp)}, got {type(value).__name__} {shown}"
            )


def distinct_name(base: str, original: str, taken: Callable[[str], bool], limit: int | None = None,
                  fix: Callable[[str], str] = lambda n: n) -> str:
    """A name for ``original`` when ``base`` (what a backend's renaming made of it) is
    another metric's: ``base`` plus ``_`` and 6 hex characters of a hash of
    ``original`` (the same in every process), within ``limit`` characters and passed
    through ``fix`` (the backend's own rule), the first that is not ``taken``."""
    digest = hashlib.sha1(original.encode("utf-8", "surrogatepass")).hexdigest()
    head = base if limit is None else base[: limit - 7]
    for i in range(0, len(digest) - 6, 6):
        name = fix(f"{head}_{digest[i : i + 6]}")
        if not taken(name):
            return name
    n = 2
    head = base if limit is None else base[: limit - 12]
    while taken(name := fix(f"{head}_{n}")):
        n += 1
    return name


class AppendFile:
    """A file that only ever ends in a whole line (or record): what a sink writes waits
    in :attr:`buf`, and :meth:`flush` hands it to the file with ``os.write``.

    Why not a buffered file object: a flush of ``open(path, "ab")`` that fails (a full
    disk) keeps its buffer and writes it again with the next flush, having maybe written
    part of it already. The file then held batches the bus had counted as failed, and
    a close while the disk was still full left a torn last line (which
    ``pandas.read_json(lines=True)`` refuses, file and all). Here a flush that fails
    cuts the file back to its size after the last flush that succeeded (``ftruncate``)
    and takes the bytes of the batch being written out of the buffer: the bus counts
    that batch failed, and it is not in the file (nor twice in it when retried). The
    bytes of earlier batches, which the bus counted delivered when their write
    returned, stay in the buffer for the next flush. While flushes fail
    (:attr:`failing`) the sinks flush every batch, so those are no more than what the
    flush interval held when the disk filled up; a close that cannot write them says
    how many events it lost.

    A file deleted while the run writes it (``rm -rf`` of the output directory, a
    cleanup job) is noticed at the next flush (``st_nlink == 0``: one ``fstat`` per
    flush, never per event): a warning names it, and ``reopen`` gives the path of a new
    file (its directory is created again) and the bytes it must begin with, so that the
    rest of the run is on disk. What the deleted file held is gone with it.
    """

    def __init__(
        self,
        path: str,
        *,
        owner: str,
        unit: str,
        reopen: Callable[[], tuple[str, bytes]],
        log: logging.Logger,
        head: bytes = b"",
    ) -> None:
        self.owner = owner
        """Who writes the file, for the warnings: ``"jsonl sink"``."""
        self.unit = unit
        """What the file is a sequence of, for the warnings: ``"line"``."""
        self.log = log
        """Where the warnings go: the owner's logger."""
        self.buf = bytearray()
        """Bytes not handed to the file yet."""
        self.failing = False
        """The last flush failed: the sinks flush every batch until one succeeds."""
        self.last_flush = time.monotonic()
        """When the last flush was tried (``time.monotonic()``): see :meth:`due`."""
        self._reopen = reopen
        self._head = head  # written before the buffer until a flush succeeds (a file header)
        self._batch_start = 0  # where the bytes of the batch begun last start in buf
        self._batch_events = 0  # how many events that batch holds
        self._kept_events = 0  # the events of the bytes before it: reported delivered
        self._torn = False  # a cut back failed: the file may end in a part of a record
        self._warned_write = False
        self._warned_deleted = False  # for the deletion being dealt with
        self.path, self._fd, self._good = path, *self._open(path)

    @staticmethod
    def _open(path: str) -> tuple[int, int]:
        """Open ``path`` to append to (its directory created): (fd, size)."""
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            return fd, os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise

    def write(self, data: bytes) -> None:
        """Add ``data`` to the buffer (what tensorboard's record writer calls)."""
        self.buf += data

    def begin(self, events: int) -> None:
        """The bytes written from now on are a batch of ``events`` events; the batch
        before it was reported delivered (its write returned)."""
        self._kept_events += self._batch_events
        self._batch_start = len(self.buf)
        self._batch_events = events

    def discard_batch(self) -> None:
        """Take the bytes of the batch begun last out of the buffer (its write failed)."""
        del self.buf[self._batch_start :]
        self._batch_events = 0

    def due(self, flush_secs: float, limit: int) -> bool:
        """Whether the sink should flush after the batch just written: while flushes
        fail (so that what the bus counts delivered waits no longer than one batch),
        when the buffer holds ``limit`` bytes, or ``flush_secs`` after the last flush."""
        return self.failing or len(self.buf) >= limit or time.monotonic() - self.last_flush >= flush_secs

    def flush(self) -> None:
        """Write the buffer to the file. On failure, cut the file back to its last
        whole record, take the batch begun last out of the buffer (the bus counts it
        failed: an isolated child calls this after each write, before it reports the
        batch) and raise ``OSError`` naming the file."""
        fd = self._fd
        if fd is None:
            raise OSError(errno.EBADF, f"{self.owner}: {self.path} is closed")
        self.last_flush = time.monotonic()
        if not self.buf and not self._head and not self._torn:
            return
        try:
            if os.fstat(fd).st_nlink == 0:
                fd = self._replace()
            if self._torn:
                os.ftruncate(fd, self._good)
                self._torn = False
            write_all(fd, self._head)
            write_all(fd, self.buf)
        except OSError as exc:
            self._cut_back()
            self.discard_batch()
            self.failing = True
            reason = exc.strerror or repr(exc)
            if not self._warned_write:
                self._warned_write = True
                self.log.warning(
                    "%s: could not write to %s (%s). The file is cut back to its last whole %s, and what cannot be "
                    "written is counted as failed in the bus stats, not written later. Free space on that disk (or "
                    "fix it): the next batches are written again. (Warned once.)",
                    self.owner,
                    self.path,
                    reason,
                    self.unit,
                )
            raise OSError(exc.errno, f"{reason}: {self.path}") from exc
        self._good = os.lseek(fd, 0, os.SEEK_END)  # the file's size (also after a cut back alone)
        self._head = b""
        self.buf.clear()
        self._batch_start = self._batch_events = self._kept_events = 0
        self.failing = False

    def _cut_back(self) -> None:
        """Cut the file back to what the last flush that succeeded left."""
        try:
            os.ftruncate(self._fd, self._good)  # type: ignore[arg-type]
        except OSError:
            self._torn = True  # tried again before the next write

    def _replace(self) -> int:
        """The file was deleted: open the one ``reopen`` names (warned once per deletion)."""
        if not self._warned_deleted:
            self._warned_deleted = True
            self.log.warning(
                "%s: %s was deleted while the run was writing it (what it held is gone with it); the rest of the run "
                "goes to a new file there. Keep the run's directory until the run ends (a cleanup job, an rm -rf?).",
                self.owner,
                self.path,
            )
        path, head = self._reopen()
        fd, size = self._open(path)
        old, self._fd = self._fd, fd
        self.path, self._good, self._head, self._torn = path, size, head, False
        self._warned_deleted = False
        try:
            os.close(old)  # type: ignore[arg-type]
        except OSError:
            pass
        self.log.info("%s: writing to %s again", self.owner, path)
        return fd

    def close(self) -> None:
        """Write out what is left and close the file. What cannot be written was
        counted delivered (its write returned): a warning says how many events are
        lost, and the error is raised."""
        if self._fd is None:
            return
        self.begin(0)  # the last batch's write returned: it was reported delivered
        try:
            self.flush()
        except OSError:
            lost, self._kept_events = self._kept_events, 0
            self.buf.clear()
            if lost:
                self.log.warning(
                    "%s: the last %d events, counted delivered, could not be written to %s at close; the file ends "
                    "at its last whole %s before them.",
                    self.owner,
                    lost,
                    self.path,
                    self.unit,
                )
            raise
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)  # type: ignore[arg-type]

