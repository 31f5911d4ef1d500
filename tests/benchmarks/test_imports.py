"""Import hygiene: the training loop and the event bus never pull in a backend SDK;
only asking for a sink does. Checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

from eventbus._bench import BACKEND_MODULES, trainer_backend_imports


def _leaked(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {BACKEND_MODULES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]


def test_import_trainer_imports_no_backend_sdk() -> None:
    assert trainer_backend_imports() == []


def test_import_eventbus_imports_no_backend_sdk() -> None:
    assert _leaked("import eventbus") == []


def test_building_the_cli_imports_no_backend_sdk() -> None:
    """Every subcommand (train, replay, bench) registers without loading an SDK."""
    assert _leaked("from eventbus.cli import _build_parser\n_build_parser()") == []


def test_the_probe_sees_an_sdk_when_one_is_imported() -> None:
    """The check can fail: asking for the tensorboard sink does import tensorboard."""
    assert "tensorboard" in _leaked("from sinks.tensorboard import TensorBoardSink\nTensorBoardSink()")
