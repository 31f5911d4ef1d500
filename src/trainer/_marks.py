"""Per-sink high-water marks across a resume: what each sink already has, so that a
resumed run never logs a step twice to it.

The bus reports, per sink, the highest step of a metric event it delivered
(``EventBus.high_water_marks()``) and the names of the metric events it delivered at
that step (``EventBus.high_water_names()``: ``{"step": 15, "names": ["Log/loss", ...]}``,
see :mod:`eventbus._marks`); a resumed run passes them back as
``EventBus(resume_marks=...)``, and metric events at the mark's step are skipped only
when the sink got all of their names (a crash during the evaluation at step 15 still
gets that evaluation to the sinks, which have the training loss of step 15). They are
kept in two places, the steps where they always were and the names alongside:

- each checkpoint's ``run_info.json`` (``eventbus_marks``: sink -> step,
  ``eventbus_mark_names``: sink -> ``{"step", "names"}``): what the sinks had when it
  was saved;
- ``<output_dir>/eventbus_marks.json`` (``{"run_id", "marks", "mark_names"}``): the
  latest known, updated at every checkpoint and after every close of the bus (the end
  of training, an exception, a signal). Training goes on past the last checkpoint, so
  this is the one that knows about the steps a resume will publish again. An update
  keeps what the file held for the same run, merged: the marks of sinks not attached
  this time (left out of one resume, back in the next), and what an earlier bus of
  this process (train(), then evaluate()) delivered at the same step.

A resume takes, per sink, the higher of the two (the file only when it belongs to the
same run); at equal steps the names are united. A mark saved without names (an older
version) counts every metric event at its step as delivered. Sinks with a disk spool
also keep their mark in the spool's ``state.json``, which the bus reads itself; that
one survives a SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from eventbus import _marks as _hwm
from eventbus.spool import write_json_atomic

__all__ = [
    "MARKS_FILE",
    "RUN_INFO_KEY",
    "RUN_INFO_NAMES_KEY",
    "clean_marks",
    "read_run_info",
    "write_latest",
    "read_latest",
    "merge",
]

logger = logging.getLogger("trainer")

MARKS_FILE = "eventbus_marks.json"
RUN_INFO_KEY = "eventbus_marks"
RUN_INFO_NAMES_KEY = "eventbus_mark_names"

MarkValue = Any
"""What ``EventBus(resume_marks=...)`` takes per sink: a step (int), or a
``{"step": int, "names": [str, ...]}`` entry."""


def clean_marks(marks: Any) -> dict[str, int]:
    """Keep the well-formed entries (sink name -> int step) of what a file held."""
    if not isinstance(marks, Mapping):
        return {}
    return {str(k): int(v) for k, v in marks.items() if isinstance(v, int) and not isinstance(v, bool)}


def _values(marks: Mapping[str, _hwm.Mark]) -> dict[str, MarkValue]:
    return {name: _hwm.to_value(m) for name, m in marks.items()}


def _parsed(marks: Mapping[str, MarkValue]) -> dict[str, _hwm.Mark]:
    out: dict[str, _hwm.Mark] = {}
    for name, value in marks.items():
        m = _hwm.parse(value)
        if m is not None:
            out[str(name)] = m
    return out


def read_run_info(info: Mapping[str, Any]) -> dict[str, MarkValue]:
    """The marks a checkpoint's ``run_info.json`` holds (with their names when it has
    them: one saved by an older version has steps only)."""
    return _values(_hwm.from_saved(info.get(RUN_INFO_KEY), info.get(RUN_INFO_NAMES_KEY)))


def _read_file(output_dir: str, run_id: str) -> dict[str, _hwm.Mark]:
    try:
        with open(os.path.join(output_dir, MARKS_FILE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("run_id") != run_id:
        return {}
    return _hwm.from_saved(data.get("marks"), data.get("mark_names"))


def write_latest(
    output_dir: str, run_id: str, marks: Mapping[str, int], names: Mapping[str, Any] | None = None
) -> None:
    """Atomically update ``<output_dir>/eventbus_marks.json`` with ``marks``
    (``EventBus.high_water_marks()``) and ``names`` (``EventBus.high_water_names()``),
    merged (:func:`merge`) with what it held for the same run: a sink not attached
    now keeps its mark. A failure is a warning (losing it risks a duplicate step after
    a resume, never the training)."""
    path = os.path.join(output_dir, MARKS_FILE)
    now = _hwm.from_saved(marks, names)
    kept = _read_file(output_dir, run_id)
    merged = {name: _hwm.merge(kept.get(name), now.get(name)) for name in {**kept, **now}}
    steps = {name: m[0] for name, m in sorted(merged.items()) if m is not None}
    entries = {name: e for name, m in sorted(merged.items()) if (e := _hwm.names_entry(m)) is not None}
    try:
        os.makedirs(output_dir, exist_ok=True)
        write_json_atomic(Path(path), {"run_id": run_id, "marks": steps, "mark_names": entries})
    except OSError as exc:
        logger.warning("could not save the sinks' high-water marks to %s: %r", path, exc)


def read_latest(output_dir: str | None, run_id: str) -> dict[str, MarkValue]:
    """The marks of ``<output_dir>/eventbus_marks.json`` when it belongs to ``run_id``
    (with their names when it has them)."""
    if not output_dir:
        return {}
    return _values(_read_file(output_dir, run_id))


def merge(*many: Mapping[str, MarkValue]) -> dict[str, MarkValue]:
    """Per sink, the highest of the marks given (steps, or ``{"step", "names"}``
    entries), as ``EventBus(resume_marks=...)`` takes them: the higher step wins, with
    its names; at equal steps the names are united, and a bare step (names not known:
    all of them) wins over names."""
    out: dict[str, _hwm.Mark] = {}
    for marks in many:
        for name, m in _parsed(marks).items():
            merged = _hwm.merge(out.get(name), m)
            if merged is not None:
                out[name] = merged
    return _values(out)
