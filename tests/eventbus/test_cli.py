"""The ``eventbus`` console script and ``python -m eventbus``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eventbus import cli


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "120"})


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "eventbus"
    assert script.exists(), f"the console script is not installed next to {sys.executable}"
    out = _run(str(script), "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: eventbus")


def test_python_dash_m_help() -> None:
    out = _run(sys.executable, "-m", "eventbus", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: eventbus")


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: eventbus" in capsys.readouterr().out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_importing_the_cli_imports_no_backend_sdk() -> None:
    code = (
        "import sys, eventbus.cli as c; c._build_parser(); "
        "bad = [m for m in ('tensorboard', 'neptune', 'comet_ml', 'mlflow') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = _run(sys.executable, "-c", code)
    assert out.returncode == 0, out.stdout + out.stderr
