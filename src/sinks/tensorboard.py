"""TensorBoard sink: real event files, written with tensorboard's own protos and
record writer, without TensorFlow and without a hidden writer thread.

What lands in the event file, under the names transformers' ``TensorBoardCallback``
uses:

- ``Log`` values as scalars ``train/<name>`` (``eval_*`` -> ``eval/*``, ``test_*`` ->
  ``test/*``, as ``rewrite_logs``), ``Evaluate``/``Predict`` metrics under their
  prefix (``eval/loss``, ``test/accuracy``); NaN and inf are written as such. Tags
  are cleaned by TensorFlow's rule (``a:b`` -> ``a_b``); of two names that clean alike
  (``a:b`` and ``a_b``) the one that needs no cleaning keeps the tag and the other gets
  one of its own (``train/a_b_<hash>``, with one warning), from the first log where
  both are known.
- An int too large for a float (``10**400``) as its text, as a string would be.
- String values as text (``<tag>/text_summary``, as ``SummaryWriter.add_text``);
  other non-scalar values (lists, dicts, ``None``) are skipped with one warning per
  key.
- At ``TrainBegin``: the training arguments as text (``args``), the model config as
  text (``model_config``), and the hyperparameters as an HParams session (read by
  TensorBoard's HParams tab); at ``TrainEnd`` the session's end status and the
  HParams experiment summary, listing every scalar written as a metric.

The file is flushed on an interval (``flush_secs``), on ``Save``, ``Evaluate`` and
``TrainEnd``, and at close, never per event; in a child process of its own (the
default, ``Sink.isolate``) after every batch as well, before the bus counts it
delivered. A resumed run (``TrainBegin.resumed_from``
set) writes a ``SessionLog.START`` just before its first point, after the sink's
high-water mark (``RunInfo.resume_marks``): TensorBoard's readers then drop what the
interrupted run wrote at or after that step, which the resumed run writes again, so no
step appears twice, and keep what the sink had up to its mark.

The event file only ever ends in a whole record (``sinks._common.AppendFile``): a write
that fails (a full disk) cuts it back to its last whole record, and the batch the bus
counts failed is not in it, not even once the disk has room again; what the bus counts
delivered is. An event file deleted while the run writes it (the log directory
removed) is noticed at the next flush: a warning names it, and the rest of the run
goes to a new event file in the log directory (created again), which begins with the
``file_version`` header and the run's ``TrainBegin`` (its ``args`` text and HParams
session).
"""

from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import math
import os
import re
import socket
import struct
import time
from types import SimpleNamespace
from typing import Any, BinaryIO, Mapping, Sequence

from eventbus.errors import SinkConfigError
from eventbus.events import BaseEvent, Evaluate, Log, Predict, Save, TrainBegin, TrainEnd
from eventbus.redact import redact
from eventbus.rundir import run_directory
from eventbus.sink import RunInfo, ThreadedSink
from eventbus.values import wide_int_text
from sinks._common import (
    BATCH_SIZE, AppendFile, ScalarFilter, check_option_types, distinct_name, import_sdk, is_number, prefixed_name, rewrite_name,
)

__all__ = ["TensorBoardSink", "clean_tag"]

logger = logging.getLogger("sinks.tensorboard")

# Event files of one process get distinct names even when opened within one second.
_file_counter = itertools.count()

_INVALID_TAG_CHARACTERS = re.compile(r"[^-/\w.]")
_TAG_CACHE_SIZE = 10_000  # names cleaned once each, up to this many
_BUFFER_BYTES = 1 << 18  # written out at this size even before flush_secs (as the file buffer was)


def clean_tag(name: str) -> str:
    """A tag TensorBoard accepts, by TensorFlow's own rule (``summary_op_util.clean_tag``):
    characters other than letters, digits, ``_-/.`` become ``_`` and leading slashes go.
    The JSONL sink keeps the original name."""
    return _INVALID_TAG_CHARACTERS.sub("_", str(name)).lstrip("/") or "_"

_END_STATUS = {
    "completed": "STATUS_SUCCESS",
    "stopped": "STATUS_SUCCESS",
    "interrupted": "STATUS_FAILURE",
    "failed": "STATUS_FAILURE",
}


def _record_writer_class(fallback: Any) -> Any:
    """tensorboard's ``RecordWriter`` computes its CRC-32C in pure Python (~25 µs
    per 100-byte record, holding the GIL the training thread needs). With
    ``google-crc32c`` installed (the ``tensorboard`` extra brings it), records are
    framed the same way by :class:`_FastRecordWriter` with the C implementation."""
    try:
        import google_crc32c
    except ImportError:
        return fallback
    if google_crc32c.implementation != "c":
        return fallback
    return _FastRecordWriter


class _FastRecordWriter:
    """TFRecord framing, byte for byte as tensorboard's ``RecordWriter``: uint64
    length, masked CRC of the length, data, masked CRC of the data."""

    def __init__(self, writer: BinaryIO) -> None:
        import google_crc32c

        self._crc = google_crc32c.value
        self._writer = writer

    def _masked(self, data: bytes) -> bytes:
        x = self._crc(data)
        return struct.pack("<I", (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    def write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._writer.write(header + self._masked(header) + data + self._masked(data))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _tb() -> SimpleNamespace:
    """Import what the sink needs from tensorboard, or fail naming the extra."""
    import_sdk("tensorboard", "tensorboard", "tensorboard")
    from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    from tensorboard.plugins.hparams import metadata as hp_metadata
    from tensorboard.plugins.text import plugin_data_pb2 as text_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    return SimpleNamespace(
        event_pb2=event_pb2,
        summary_pb2=summary_pb2,
        tensor_pb2=tensor_pb2,
        tensor_shape_pb2=tensor_shape_pb2,
        api_pb2=api_pb2,
        plugin_data_pb2=plugin_data_pb2,
        hp_metadata=hp_metadata,
        text_pb2=text_pb2,
        RecordWriter=_record_writer_class(RecordWriter),
    )


class TensorBoardSink(ThreadedSink):
    """Writes TensorBoard event files (report_to name ``"tensorboard"``).

    Options:

    - ``log_dir``: where the event file goes. Default: ``$TENSORBOARD_LOGGING_DIR``
      (as transformers), else the run's ``logging_dir``, else a directory of the
      run's own under ``<output_dir>/logs``, named as transformers names its runs
      plus the run id (``Nov29_14-02-11_host_3f2a9c1b7d4e``, see
      :func:`run_directory`): a run started again in the same output directory is
      a run of its own in TensorBoard (its points are not drawn into the earlier
      run's lines), and a resumed run (same run id) continues in its directory.
    - ``flush_secs``: the longest time written events may sit in the file buffer
      while events keep arriving (default 5 s).
    - ``filename_suffix``: appended to the event file name.

    The blocking file writes run on the sink's own thread (a :class:`ThreadedSink`);
    tensorboard's ``EventFileWriter`` is not used because it brings its own queue and
    thread, which would hide drops from the bus's counters.
    """

    name = "tensorboard"
    requires = ("tensorboard", "tensorboard")
    """The SDK (module, extra): ``create_sink``/``report_to`` check it is installed."""
    events = (TrainBegin, Log, Evaluate, Predict, Save, TrainEnd)
    # Building and writing each point's protobuf (~7 µs of Python per logged value
    # set) runs in a child process, off the training process's GIL
    # (eventbus.isolation); POSIX only. Set isolate = False to keep it here.
    isolate = os.name == "posix"
    isolate_optional = True  # an instance that cannot be pickled runs here instead
    max_batch_size = BATCH_SIZE
    _log_dir_option: str | None = None
    _log_dir_run: str | None = None

    def __init__(self, *, log_dir: str | os.PathLike[str] | None = None, flush_secs: float = 5.0, filename_suffix: str = "") -> None:
        check_option_types(self.name, TensorBoardSink.__init__, locals())
        if isinstance(flush_secs, bool) or not isinstance(flush_secs, (int, float)) or flush_secs < 0:
            raise SinkConfigError(f"tensorboard sink: flush_secs must be a number of seconds >= 0, got {flush_secs!r}")
        if not isinstance(filename_suffix, str) or os.sep in filename_suffix:
            raise SinkConfigError(f"tensorboard sink: filename_suffix must be a plain string without {os.sep!r}, got {filename_suffix!r}")
        self._tb = _tb()  # a missing tensorboard is an error when the sink is asked for
        self.log_dir: str | None = os.fspath(log_dir) if log_dir is not None else None
        """The ``log_dir`` option; once open, the directory written to."""
        self._log_dir_option = self.log_dir
        self._log_dir_run: str | None = None  # the run id log_dir was resolved for
        self.flush_secs = float(flush_secs)
        self.filename_suffix = filename_suffix
        self.path: str | None = None
        """The event file being written (set when the sink is opened)."""
        self._file: AppendFile | None = None
        self._writer: Any = None
        self._filter = ScalarFilter(self.name)
        self._last_written: dict[str, tuple[int, float]] = {}
        self._scalar_tags: set[str] = set()
        # A logged name -> its tag (rewritten, then cleaned), once per name: for Log
        # values, and per Evaluate/Predict prefix.
        self._tags: dict[str, str] = {}
        self._metric_tags: dict[str, dict[str, str]] = {}
        # A tag -> the (rewritten) name it stands for, and the names moved to a tag of
        # their own because their cleaned tag was another's ("a:b" beside "a_b"): two
        # metrics are never one series.
        self._tag_owners: dict[str, str] = {}
        self._moved: dict[str, str] = {}
        self._hparams: dict[str, Any] = {}
        # A resumed run's SessionLog START, written just before its first point (see
        # _train_begin); (checkpoint path, wall time ns).
        self._pending_start: tuple[str, int] | None = None
        self._resume_mark: int | None = None
        # The TrainBegin record, for a new event file that replaces a deleted one.
        self._begin_record = b""
        self._begin_flushed = False  # the record is in the file, not (only) in the buffer
        # What write_sync changed, as it was before the batch: a batch whose flush fails
        # is not in the file, and a retry writes its points again (not skipped as
        # already written) and its START.
        self._undo: tuple[dict[str, tuple[int, float]], tuple[str, int] | None, bytes, bool] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # For process isolation (sink.isolate): modules and open files do not travel;
        # the child imports tensorboard again and opens its own event file.
        if self._writer is not None:
            raise TypeError("an open TensorBoardSink cannot be pickled; isolate it before the bus starts")
        state = self.__dict__.copy()
        del state["_tb"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tb = _tb()

    @classmethod
    def available(cls) -> bool:
        """True when tensorboard is installed."""
        import importlib.util

        return importlib.util.find_spec("tensorboard") is not None

    # -- lifecycle ---------------------------------------------------------------------

    def resolve_log_dir(self, run: RunInfo) -> str:
        """The directory this sink writes to for ``run`` (see the class docstring); on a
        rank other than 0 (a sink with ``all_ranks``), its ``rank<N>`` subdirectory:
        TensorBoard shows each rank as a run of its own instead of every point twice."""
        if self._log_dir_option:
            log_dir = os.path.expanduser(self._log_dir_option)
        elif self.log_dir and self._log_dir_run == run.run_id:
            return self.log_dir  # opened again in the same run (a retry, a new file)
        elif os.environ.get("TENSORBOARD_LOGGING_DIR"):
            log_dir = os.path.expanduser(os.environ["TENSORBOARD_LOGGING_DIR"])
        elif run.logging_dir:
            log_dir = os.path.expanduser(run.logging_dir)
        elif run.output_dir:
            log_dir = run_directory(os.path.join(os.path.expanduser(run.output_dir), "logs"), run.run_id)
        else:
            raise SinkConfigError(
                "tensorboard sink: no directory to write to; pass TensorBoardSink(log_dir=...) "
                "or give the run an output_dir or logging_dir"
            )
        # (An open again in the same run returned the directory above, rank included.)
        if run.rank and os.path.basename(os.path.normpath(log_dir)) != f"rank{run.rank}":
            log_dir = os.path.join(log_dir, f"rank{run.rank}")
        return log_dir

    def open_sync(self, run: RunInfo) -> None:
        """Create the log directory and a new event file in it."""
        log_dir = self.resolve_log_dir(run)
        os.makedirs(log_dir, exist_ok=True)
        self.log_dir, self._log_dir_run = log_dir, run.run_id
        # The high-water mark this run starts from: a resumed run's START goes after it.
        self._resume_mark = run.resume_marks.get(self.name)
        self.path = os.path.join(log_dir, self._file_name(log_dir))
        f = self._file = AppendFile(
            self.path, owner=f"{self.name} sink", unit="record", reopen=self._reopened, head=self._header(), log=logger
        )
        self._writer = self._tb.RecordWriter(f)
        try:
            self._flush()
        except OSError:
            # Not open: the bus tries again (a new file) with its next batch.
            self._file = self._writer = None
            try:
                f.close()
            except OSError:
                pass
            if os.path.exists(f.path) and os.path.getsize(f.path) == 0:
                os.remove(f.path)
            raise

    def _frame(self, event: Any) -> bytes:
        """``event`` as one record of an event file."""
        out = io.BytesIO()
        self._tb.RecordWriter(out).write(event.SerializeToString())
        return out.getvalue()

    def _header(self) -> bytes:
        """The record an event file begins with: file_version 2 tells readers to
        honour SessionLog.START (orphan purging)."""
        return self._frame(self._tb.event_pb2.Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))

    def _reopened(self) -> tuple[str, bytes]:
        """The event file was deleted: the rest of the run goes to a new one in the
        log directory, beginning with the header and the run's TrainBegin."""
        assert self.log_dir is not None
        self.path = os.path.join(self.log_dir, self._file_name(self.log_dir))
        # The TrainBegin record again, unless it is still in the buffer (which goes to
        # the new file anyway): once in each file.
        return self.path, self._header() + (self._begin_record if self._begin_flushed else b"")

    def _file_name(self, log_dir: str) -> str:
        # Readers load a directory's event files in name order, so a resumed run's
        # file must sort after the earlier ones even within the same second.
        stamp = int(time.time())
        for existing in glob.glob(os.path.join(glob.escape(log_dir), "events.out.tfevents.*")):
            parts = os.path.basename(existing).split(".")
            if len(parts) > 3 and parts[3].isdigit() and int(parts[3]) >= stamp:
                stamp = int(parts[3]) + 1
        host = socket.gethostname().replace(os.sep, "_")
        return f"events.out.tfevents.{stamp:010d}.{host}.{os.getpid()}.{next(_file_counter)}{self.filename_suffix}"

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        """Write a batch of events; flush if one asks for it or the interval passed,
        and after every batch while flushes fail. A batch that fails (its flush, or
        anything else) is not in the file, and leaves the sink as it found it."""
        f = self._file
        if f is None:
            raise SinkConfigError("tensorboard sink: write before open (the bus opens sinks before writing)")
        f.begin(len(batch))
        self._undo = (self._last_written.copy(), self._pending_start, self._begin_record, self._begin_flushed)
        try:
            urgent = False
            for ev in batch:
                if isinstance(ev, Log):
                    self._write_values(ev.values, ev, self._tags, None)
                elif isinstance(ev, (Evaluate, Predict)):
                    self._write_values(ev.metrics, ev, self._metric_tags.setdefault(ev.prefix, {}), ev.prefix)
                    urgent = urgent or isinstance(ev, Evaluate)
                elif isinstance(ev, TrainBegin):
                    self._train_begin(ev)
                elif isinstance(ev, Save):
                    urgent = True
                elif isinstance(ev, TrainEnd):
                    self._train_end(ev)
                    urgent = True
            if urgent or f.due(self.flush_secs, _BUFFER_BYTES):
                self._flush()
        except Exception:
            f.discard_batch()
            self._restore()
            raise

    def flush_sync(self) -> None:
        """Write the buffered events out to the file (the isolated child calls it
        after every batch). On failure the last batch written is not in the file."""
        try:
            self._flush()
        except OSError:
            self._restore()
            raise

    def _restore(self) -> None:
        """Undo what the last write_sync changed (its batch is not in the file)."""
        if self._undo is not None:
            self._last_written, self._pending_start, self._begin_record, self._begin_flushed = self._undo
            self._undo = None

    def close_sync(self) -> None:
        """Flush and close the event file."""
        f, self._file, self._writer = self._file, None, None
        if f is not None:
            f.close()

    # -- writing -----------------------------------------------------------------------

    def _write_event(self, event: Any) -> None:
        if self._writer is None:
            raise SinkConfigError("tensorboard sink: write before open (the bus opens sinks before writing)")
        self._writer.write(event.SerializeToString())

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            self._begin_flushed = bool(self._begin_record)

    def _summary_event(self, ev: BaseEvent, values: list[Any], step: int | None = None) -> Any:
        tb = self._tb
        wall = ev.time_ns / 1e9 if ev.time_ns else time.time()
        if not values:
            # Values are to be added into event.summary (created on first access): an
            # empty Summary built here would cost a third of a scalar event's time.
            return tb.event_pb2.Event(wall_time=wall, step=ev.step if step is None else step)
        return tb.event_pb2.Event(wall_time=wall, step=ev.step if step is None else step, summary=tb.summary_pb2.Summary(value=values))

    def _write_values(self, values: Mapping[str, Any], ev: BaseEvent, tags: dict[str, str], prefix: str | None) -> None:
        # Once per logged event, on the sink's thread, whose Python time the training
        # thread shares the GIL with: each name rewritten (``train/loss``, or under an
        # evaluation's ``prefix``) and cleaned into a tag once (``tags`` caches it), and
        # the values added into the Event's own summary (building Summary.Value
        # objects and handing them to Summary(value=...) copies each one: twice the time).
        cleaned: dict[str, Any] = {}
        texts: dict[str, str] = {}
        if not values.keys() <= tags.keys():
            # New names: those that need no cleaning claim their tag first, so that a
            # cleaned twin in this very log (or cached from an earlier one: "a:b" before
            # "a_b") moves to a tag of its own before any of its points is written there.
            for k in values:
                if k not in tags:
                    name = _metric_name(k, prefix)
                    if clean_tag(name) == name:
                        tag = self._tag(name, name)
                        if len(tags) < _TAG_CACHE_SIZE:
                            tags[k] = tag
        for k, v in values.items():
            tag = tags.get(k)
            if tag is None:
                name = _metric_name(k, prefix)
                tag = self._tag(name, clean_tag(name))
                if len(tags) < _TAG_CACHE_SIZE:
                    tags[k] = tag
            # Names that stand for one series (a ``val`` evaluation's ``val_acc`` and
            # ``acc``, both ``val/acc``): the last one wins, as text or as a number.
            if isinstance(v, str):
                texts[tag] = v
                cleaned.pop(tag, None)
            elif type(v) is int and v.bit_length() > 1000 and (text := wide_int_text(v)) is not None:
                # Beyond a float (10**400): its text, as an isolated sink (the default)
                # gets it from its child process's pipe (eventbus.events.encode_lenient).
                texts[tag] = text
                cleaned.pop(tag, None)
            else:
                cleaned[tag] = v
                if texts:
                    texts.pop(tag, None)
        out = None
        last_written = self._last_written
        step = ev.step
        for tag, value in self._filter.scalars(cleaned):
            # The trainer may report eval metrics both as Evaluate and as Log (as
            # transformers' Trainer.log does); one point per tag and step is enough.
            last = last_written.get(tag)
            if last is not None and last[0] == step and _same(last[1], value):
                continue
            if last is None:
                self._scalar_tags.add(tag)
            last_written[tag] = (step, value)
            if out is None:
                out = self._summary_event(ev, [])
                add = out.summary.value.add
            add(tag=tag, simple_value=value)
        for tag, text in texts.items():
            if out is None:
                out = self._summary_event(ev, [])
            out.summary.value.append(self._text_value(tag, text))
        if out is not None:
            if self._pending_start is not None:
                self._write_start(step)
            self._write_event(out)

    def _tag(self, name: str, tag: str) -> str:
        """The tag of ``name`` (a rewritten metric name; ``tag`` is its cleaned form):
        that, unless another name has it already; then a tag of its own, with one
        warning naming both. A name that needs no cleaning always keeps its tag; a
        cleaned one logged before its twin appears had the plain tag until then."""
        moved = self._moved.get(name)
        if moved is not None:
            return moved
        owner = self._tag_owners.setdefault(tag, name)
        if owner == name:
            return tag
        if name == tag:
            # A name that needs no cleaning owns its tag, whichever came first: the
            # cleaned one that had it moves to a tag of its own from now on (so a new
            # process, which may see them in another order, tags them alike).
            self._tag_owners[tag] = name
            for cache in (self._tags, *self._metric_tags.values()):
                for k in [k for k, t in cache.items() if t == tag]:
                    del cache[k]
            self._move(owner, tag, name)
            return tag
        return self._move(name, tag, owner)

    def _move(self, name: str, tag: str, owner: str) -> str:
        """Give ``name`` (whose cleaned tag ``tag`` is ``owner``'s) a tag of its own."""
        new = distinct_name(tag, name, self._tag_owners.__contains__)
        self._tag_owners[new] = name
        self._moved[name] = new
        logger.warning(
            "%s sink: %r and %r would both be written as tag %r; %r is written as %r instead (TensorBoard takes "
            "only letters, digits and _-/. in a tag)",
            self.name,
            name,
            owner,
            tag,
            name,
            new,
        )
        return new

    def _text_value(self, tag: str, text: str) -> Any:
        tb = self._tb
        pb = tb.summary_pb2
        tensor_pb2, tensor_shape_pb2 = tb.tensor_pb2, tb.tensor_shape_pb2
        meta = pb.SummaryMetadata(
            plugin_data=pb.SummaryMetadata.PluginData(plugin_name="text", content=tb.text_pb2.TextPluginData(version=0).SerializeToString())
        )
        tensor = tensor_pb2.TensorProto(
            dtype="DT_STRING",
            string_val=[text.encode("utf-8")],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]),
        )
        return pb.Summary.Value(tag=f"{tag}/text_summary", metadata=meta, tensor=tensor)

    def _write_start(self, step: int) -> None:
        assert self._pending_start is not None
        tb = self._tb
        checkpoint, time_ns = self._pending_start
        self._pending_start = None
        if self._resume_mark is not None and step <= self._resume_mark:
            # This first point is at the mark's step, of a name the sink did not get
            # there (an evaluation the interrupted run died in): what it got at that
            # step stays.
            step = self._resume_mark + 1
        start = tb.event_pb2.SessionLog(status=tb.event_pb2.SessionLog.START, checkpoint_path=checkpoint)
        self._write_event(tb.event_pb2.Event(wall_time=time_ns / 1e9, step=step, session_log=start))

    def _hparams_value(self, tag: str, plugin_data: Any) -> Any:
        hp = self._tb.hp_metadata
        return self._tb.summary_pb2.Summary.Value(tag=tag, metadata=hp.create_summary_metadata(plugin_data), tensor=hp.NULL_TENSOR)

    def _train_begin(self, ev: TrainBegin) -> None:
        tb = self._tb
        if ev.resumed_from:
            # Readers purge every earlier point with a step >= the START's: what the
            # interrupted run logged after its checkpoint. Written just before this
            # run's first point, at its step (after the sink's high-water mark, when
            # that point is at the mark's step): a Trainer resume skips the steps this
            # sink already has (its mark), so those points are not redone and must stay.
            self._pending_start = (ev.resumed_from, ev.time_ns)
        values = []
        if ev.config:
            values.append(self._text_value("args", json.dumps(redact(ev.config), indent=2, sort_keys=True, default=str)))
        if ev.model_config:
            values.append(self._text_value("model_config", json.dumps(redact(ev.model_config), indent=2, sort_keys=True, default=str)))
        hparams = _hparam_values(redact(ev.hparams or ev.config))
        self._hparams = hparams
        if hparams:
            ssi = tb.plugin_data_pb2.SessionStartInfo(start_time_secs=ev.time_ns / 1e9)
            for k, v in hparams.items():
                if isinstance(v, bool):
                    ssi.hparams[k].bool_value = v
                elif isinstance(v, (int, float)):
                    ssi.hparams[k].number_value = v
                else:
                    ssi.hparams[k].string_value = v
            values.append(self._hparams_value(tb.hp_metadata.SESSION_START_INFO_TAG, tb.plugin_data_pb2.HParamsPluginData(session_start_info=ssi)))
        if values:
            assert self._file is not None  # write_sync checked
            self._begin_record = self._frame(self._summary_event(ev, values))
            self._begin_flushed = False
            self._file.write(self._begin_record)

    def _train_end(self, ev: TrainEnd) -> None:
        tb = self._tb
        if not self._hparams:
            return
        api = tb.api_pb2
        status = api.Status.Value(_END_STATUS.get(ev.status, "STATUS_UNKNOWN"))
        sei = tb.plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=ev.time_ns / 1e9)
        infos = []
        for k, v in self._hparams.items():
            kind = "DATA_TYPE_BOOL" if isinstance(v, bool) else "DATA_TYPE_FLOAT64" if isinstance(v, (int, float)) else "DATA_TYPE_STRING"
            infos.append(api.HParamInfo(name=k, type=api.DataType.Value(kind)))
        metrics = [api.MetricInfo(name=api.MetricName(tag=t)) for t in sorted(self._scalar_tags)]
        experiment = api.Experiment(time_created_secs=ev.time_ns / 1e9, hparam_infos=infos, metric_infos=metrics)
        values = [
            self._hparams_value(tb.hp_metadata.SESSION_END_INFO_TAG, tb.plugin_data_pb2.HParamsPluginData(session_end_info=sei)),
            self._hparams_value(tb.hp_metadata.EXPERIMENT_TAG, tb.plugin_data_pb2.HParamsPluginData(experiment=experiment)),
        ]
        self._write_event(self._summary_event(ev, values))


def _metric_name(key: str, prefix: str | None) -> str:
    """A ``Log`` value's name (``prefix`` None) or an evaluation metric's, as written."""
    return rewrite_name(key) if prefix is None else _prefixed_name(key, prefix)


def _prefixed_name(name: str, prefix: str) -> str:
    """An evaluation's tag name: transformers' naming (:func:`rewrite_name`) under
    ``eval``/``test``, the evaluation's own prefix otherwise (``val_acc`` -> ``val/acc``)."""
    return rewrite_name(name) if prefix in ("eval", "test", "") else prefixed_name(name, prefix)


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _hparam_values(params: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """What the HParams tab can show: bools, numbers and strings; lists and tuples as
    their text (as transformers' ``to_sanitized_dict``); ``None`` and nested mappings
    are left out (they are in the ``args`` text)."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in params.items():
        if isinstance(v, bool) or is_number(v) or isinstance(v, str):
            out[str(k)] = v
        elif isinstance(v, (list, tuple)):
            out[str(k)] = str(v)
    return out
