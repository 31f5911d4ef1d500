"""Per-sink high-water marks across a resume: what each sink already has, so that a
resumed run never logs a step twice to it.

The bus reports, per sink, the highest step of a metric event it delivered
(``EventBus.high_water_marks()``); a resumed run passes them back as
``EventBus(resume_marks=...)``. They are kept in two places:

- each checkpoint's ``run_info.json`` (``eventbus_marks``): what the sinks had when it
  was saved;
- ``<output_dir>/eventbus_marks.json``: the latest known, rewritten at every checkpoint
  and after every close of the bus (the end of training, an exception, a signal).
  Training goes on past the last checkpoint, so this is the one that knows about the
  steps a resume will publish again.

A resume takes, per sink, the higher of the two (the file only when it belongs to the
same run). Sinks with a disk spool also keep their mark in the spool's ``state.json``,
which the bus reads itself; that one survives a SIGKILL.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from eventbus.spool import write_json_atomic

__all__ = ["MARKS_FILE", "RUN_INFO_KEY", "clean_marks", "write_latest", "read_latest", "merge"]

logger = logging.getLogger("trainer")

MARKS_FILE = "eventbus_marks.json"
RUN_INFO_KEY = "eventbus_marks"


def clean_marks(marks: Any) -> dict[str, int]:
    """Keep the well-formed entries (sink name -> int step) of what a file held."""
    if not isinstance(marks, Mapping):
        return {}
    return {str(k): int(v) for k, v in marks.items() if isinstance(v, int) and not isinstance(v, bool)}


def write_latest(output_dir: str, run_id: str, marks: Mapping[str, int]) -> None:
    """Atomically rewrite ``<output_dir>/eventbus_marks.json``; a failure is a warning
    (losing it risks a duplicate step after a resume, never the training)."""
    path = os.path.join(output_dir, MARKS_FILE)
    try:
        os.makedirs(output_dir, exist_ok=True)
        write_json_atomic(Path(path), {"run_id": run_id, "marks": dict(marks)})
    except OSError as exc:
        logger.warning("could not save the sinks' high-water marks to %s: %r", path, exc)


def read_latest(output_dir: str | None, run_id: str) -> dict[str, int]:
    """The marks of ``<output_dir>/eventbus_marks.json`` when it belongs to ``run_id``."""
    if not output_dir:
        return {}
    try:
        with open(os.path.join(output_dir, MARKS_FILE), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("run_id") != run_id:
        return {}
    return clean_marks(data.get("marks"))


def merge(*many: Mapping[str, int]) -> dict[str, int]:
    """Per sink, the highest of the marks given."""
    out: dict[str, int] = {}
    for marks in many:
        for name, step in marks.items():
            out[name] = max(step, out.get(name, step))
    return out
