"""The real ``tensorboard`` server reads what TensorBoardSink wrote, over its HTTP API."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from eventbus import EventBus, RunInfo
from eventbus.events import Evaluate, Log, TrainBegin, TrainEnd
from tests.conftest import require, require_module

pytestmark = pytest.mark.integration

require_module("tensorboard")

from sinks.tensorboard import TensorBoardSink  # noqa: E402


def _tensorboard_exe() -> str | None:
    local = Path(sys.executable).with_name("tensorboard")
    return str(local) if local.exists() else shutil.which("tensorboard")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


@pytest.fixture
def logdir(tmp_path):
    run = RunInfo(run_id="srv", output_dir=str(tmp_path / "out"), logging_dir=str(tmp_path / "tb" / "run1"))
    sink = TensorBoardSink()
    bus = EventBus([sink], run=run)
    bus.start()
    bus.publish(TrainBegin(run_id="srv", step=0, hparams={"learning_rate": 0.01}, max_steps=3))
    for step, loss in ((1, 0.9), (2, 0.5), (3, 0.25)):
        bus.publish(Log(run_id="srv", step=step, values={"loss": loss}))
    bus.publish(Evaluate(run_id="srv", step=3, metrics={"eval_loss": 0.4}))
    bus.publish(TrainEnd(run_id="srv", step=3))
    stats = bus.close(timeout=30)
    assert stats.sinks["tensorboard"].delivered == 6
    return tmp_path / "tb"


@pytest.fixture
def tensorboard_server(logdir, tmp_path):
    exe = _tensorboard_exe()
    require(exe is not None, "the tensorboard executable is not installed")
    port = _free_port()
    log = open(tmp_path / "tensorboard.log", "wb")
    proc = subprocess.Popen(
        [exe, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1", "--reload_interval", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        with httpx.Client(base_url=base, timeout=5) as client:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"tensorboard exited with {proc.returncode}: {(tmp_path / 'tensorboard.log').read_text()[-2000:]}")
                try:
                    if "run1" in client.get("/data/runs").json():
                        break
                except (httpx.HTTPError, ValueError):
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"tensorboard did not list the run in time: {(tmp_path / 'tensorboard.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_server_serves_the_scalars_we_wrote(tensorboard_server):
    with httpx.Client(base_url=tensorboard_server, timeout=10) as client:
        # The server loads files in the background: wait until every point is in.
        deadline = time.monotonic() + 60
        while True:
            r = client.get("/data/plugin/scalars/scalars", params={"run": "run1", "tag": "train/loss"})
            points = r.json() if r.status_code == 200 else []
            if len(points) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        assert [(p[1], p[2]) for p in points] == [(1, f32(0.9)), (2, f32(0.5)), (3, f32(0.25))]

        r = client.get("/data/plugin/scalars/scalars", params={"run": "run1", "tag": "eval/loss"})
        assert [(p[1], p[2]) for p in r.json()] == [(3, f32(0.4))]

        tags = client.get("/data/plugin/scalars/tags").json()
        assert {"train/loss", "eval/loss"} <= set(tags["run1"])


def test_server_hparams_tab_lists_our_hyperparameters(tensorboard_server):
    with httpx.Client(base_url=tensorboard_server, timeout=10) as client:
        deadline = time.monotonic() + 60
        while True:
            r = client.get("/data/plugin/hparams/experiment", params={"request": '{"experimentName": ""}'})
            infos = r.json().get("hparamInfos", []) if r.status_code == 200 else []
            if infos or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        assert [i["name"] for i in infos] == ["learning_rate"]
        assert infos[0]["type"] == "DATA_TYPE_FLOAT64"
        metrics = {m["name"]["tag"] for m in r.json().get("metricInfos", [])}
        assert {"train/loss", "eval/loss"} <= metrics
