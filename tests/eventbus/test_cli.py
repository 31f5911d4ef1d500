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


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--bogus"],
        ["replay", "some.jsonl", "--to", "jsonl", "--bogus"],
        ["bench", "--quick", "--bogus", "1"],
    ],
)
def test_unknown_option_of_a_subcommand_is_reported_by_that_subcommand(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: eventbus {argv[0]} "), err  # its own usage line, not `eventbus COMMAND ...`
    assert f"eventbus {argv[0]}: error: unrecognized arguments: " in err and "--bogus" in err


def test_unknown_option_before_the_command_is_the_top_level_parsers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--bogus", "train"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: eventbus [-h] COMMAND") and "eventbus: error: unrecognized arguments: --bogus" in err
