"""What transformers' example scripts call on the trainer once training is done:
``log_metrics`` (a table on stdout), ``save_metrics`` (``<split>_results.json`` and
``all_results.json``) and ``save_state`` (``trainer_state.json``), with
transformers' formatting. Written on the main process only."""

from __future__ import annotations

import datetime
import json
import os
import tempfile
from typing import Any, Mapping

__all__ = ["metrics_format", "write_json"]


def _secs2timedelta(secs: float) -> str:
    """``12.5`` -> ``"0:00:12.50"``, as transformers formats runtimes."""
    msec = int(abs(secs - int(secs)) * 100)
    return f"{datetime.timedelta(seconds=int(secs))}.{msec:02d}"


def metrics_format(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` for reading, as transformers: runtimes as ``h:mm:ss.cc``, memory
    in MB, ``total_flos`` in GF, other floats rounded to 4 decimals."""
    out = dict(metrics)
    for k, v in out.items():
        if "_mem_" in k:
            out[k] = f"{int(v) >> 20}MB"
        elif "_runtime" in k:
            out[k] = _secs2timedelta(v)
        elif k == "total_flos":
            out[k] = f"{int(v) >> 30}GF"
        elif isinstance(v, float):
            out[k] = round(v, 4)
    return out


def write_json(path: str, data: Mapping[str, Any]) -> None:
    """``data`` as transformers writes its results files (indent 4, sorted keys),
    replaced atomically: a crash never leaves half a file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(data), f, indent=4, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
