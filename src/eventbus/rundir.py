"""A run's own directory under a shared log directory, as transformers names its
TensorBoard runs (``runs/<time>_<host>``) plus the run id, found again by that id: a
run started again in the same output directory gets a directory of its own, and a
resumed run (the same run id) continues in its earlier one."""

from __future__ import annotations

import glob
import os
import socket
import time

__all__ = ["run_directory"]


def run_directory(base: str, run_id: str) -> str:
    """The directory of run ``run_id`` under ``base``: the one already there (a
    resumed run, or a later bus of the same run), else a new name,
    ``<Mon><DD>_<HH>-<MM>-<SS>_<host>_<run id>``. Nothing is created."""
    existing = sorted(glob.glob(os.path.join(glob.escape(base), f"*_{glob.escape(run_id)}")))
    existing = [d for d in existing if os.path.isdir(d)]
    if existing:
        return existing[0]
    host = socket.gethostname().replace(os.sep, "_")
    return os.path.join(base, f"{time.strftime('%b%d_%H-%M-%S')}_{host}_{run_id}")
