"""Real servers for the integration tests, started once per session."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mlflow() -> str | None:
    """The ``mlflow`` executable: $EVENTBUS_MLFLOW_BIN, else <repo>/.mlflow-venv/bin/mlflow
    (where ``.ci/run`` installs it, apart from the project's own environment), else PATH."""
    env = os.environ.get("EVENTBUS_MLFLOW_BIN")
    if env:
        return env if os.access(env, os.X_OK) else None
    local = REPO / ".mlflow-venv" / "bin" / "mlflow"
    if os.access(local, os.X_OK):
        return str(local)
    return shutil.which("mlflow")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``mlflow server`` (sqlite backend) on 127.0.0.1; yields its base URL."""
    binary = find_mlflow()
    require(
        binary is not None,
        "mlflow is not installed: set EVENTBUS_MLFLOW_BIN, or create .mlflow-venv (python -m venv .mlflow-venv && "
        ".mlflow-venv/bin/pip install mlflow)",
    )
    assert binary is not None
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "wb")
    env = dict(os.environ)
    # The server must not pick up the test process's tracking settings or credentials.
    for k in list(env):
        if k.startswith("MLFLOW_"):
            del env[k]
    proc = subprocess.Popen(
        [
            binary,
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120.0  # a first start migrates the database: slow on a busy machine
        while True:
            if proc.poll() is not None:
                log.flush()
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server did not answer /health within 120 s:\n{tail}")
            time.sleep(0.5)
        yield url
    finally:
        # The server runs its workers as children in its own session: stop the group.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        except ProcessLookupError:
            pass
        log.close()
