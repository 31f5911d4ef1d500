"""EventBusCallback with the Comet and Neptune sinks, offline, on the real
``transformers.Trainer``: an ``evaluate()``/``predict()`` after ``train()`` lands in
the training's Comet experiment and Neptune run (as with transformers' own
callbacks), under the names transformers' ``CometCallback``/``NeptuneCallback`` give
it, with the sinks isolated in a child process (the default) or in-process. What
the sinks wrote is read back with the SDKs' offline formats (Comet's ``.zip``,
Neptune's offline operation queue)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_module
from tests.integration.test_comet import _COMET_ENV, Archive
from tests.integration.test_neptune import read_offline

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]

_NEPTUNE_ENV = ("NEPTUNE_API_TOKEN", "NEPTUNE_MODE", "NEPTUNE_PROJECT", "NEPTUNE_CUSTOM_RUN_ID", "NEPTUNE_DATA_DIRECTORY")


@pytest.fixture
def sdk_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[Any]) -> Path:
    """No COMET_*/NEPTUNE_* variables, no Comet config file, the working directory
    (Neptune's ``.neptune/``) in ``tmp_path``, no network."""
    for module in ("transformers", "accelerate", "comet_ml", "neptune"):
        require_module(module)
    for var in _COMET_ENV + _NEPTUNE_ENV:
        # setenv first so that teardown restores the variable's absence, even after
        # the Comet sink set a default for it.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("COMET_CONFIG", str(tmp_path / "no-such.comet.config"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert no_network == [], f"a sink tried the network offline: {no_network}"


def _sinks(root: Path, isolated: bool) -> list[Any]:
    from sinks.comet import CometSink
    from sinks.neptune import NeptuneSink

    comet = CometSink(online=False, offline_directory=str(root / "comet"))
    neptune = NeptuneSink(mode="offline", capture_hardware_metrics=False)
    for sink in (comet, neptune):
        sink.isolate = isolated
    return [comet, neptune]


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "in-process"])
def test_evaluate_and_predict_after_train_land_in_the_training_experiment_and_run(
    sdk_env: Path, isolated: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from eventbus.bridges.transformers import EventBusCallback
    from tests.eventbus.bridges.test_transformers_bridge import _Data, _train

    caplog.set_level(logging.WARNING, logger="sinks")
    cb = EventBusCallback(_sinks(sdk_env, isolated))
    trainer = _train(sdk_env, cb)  # 8 steps, evaluations at steps 4 and 8
    during = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(during) == [4, 8]
    other = trainer.evaluate(eval_dataset=_Data(8, 3))  # other data, at step 8 again
    val = trainer.evaluate(metric_key_prefix="val")
    test = trainer.predict(_Data(8, 4)).metrics
    assert other["eval_loss"] != during[8]
    stats = cb.close()
    assert stats is not None
    for name in ("comet_ml", "neptune"):
        assert stats.sinks[name].errors == 0 and stats.sinks[name].failed == 0, stats.sinks[name]

    # Comet: one experiment (one archive), with the training's parameters and metrics
    # and the evaluations after it.
    archives = sorted((sdk_env / "comet").glob("*.zip"))
    assert len(archives) == 1, archives
    archive = Archive(archives[0])
    assert archive.params["args|learning_rate"] == 0.05
    assert archive.others["train_status"] == "completed"
    assert [(v, s) for v, s, _ in archive.metrics["eval/loss"]] == [
        (during[4], 4),
        (during[8], 8),
        (other["eval_loss"], 8),  # not taken for the training's evaluation at step 8
    ]
    # A custom metric_key_prefix: transformers' callbacks log "val_loss" (on_log,
    # rewrite_logs) as train/val_loss; nothing else (no eval/val_loss, no val/loss).
    assert [(v, s) for v, s, _ in archive.metrics["train/val_loss"]] == [(val["val_loss"], 8)]
    assert [(v, s) for v, s, _ in archive.metrics["test/loss"]] == [(test["test_loss"], 8)]
    assert not {"eval/val_loss", "val/loss", "eval/epoch"} & set(archive.metrics)
    assert not [n for n in archive.metrics if n.startswith(("val/", "eval/val_", "eval/train_"))]

    # Neptune: one run (read_offline insists), with the training's parameters and
    # metrics and the evaluations after it.
    data = read_offline(sdk_env)
    assert data.values["finetuning/trainer_parameters/learning_rate"] == 0.05
    assert data.values["finetuning/train_status"] == "completed"
    # Neptune keeps one value per step: the second evaluation at step 8 is skipped,
    # with a warning that says why (transformers' callback loses it too).
    assert data.series["finetuning/eval/loss"] == [(during[8] if s == 8 else during[4], s) for s in (4, 8)]
    assert any("one value per step" in r.getMessage() and "eval/loss" in r.getMessage() for r in caplog.records)
    assert data.series["finetuning/train/val_loss"] == [(val["val_loss"], 8)]
    assert data.series["finetuning/test/loss"] == [(test["test_loss"], 8)]
    assert "finetuning/train/epoch" in data.values and "finetuning/train/epoch" not in data.series
    series = set(data.series)
    assert not {"finetuning/eval/val_loss", "finetuning/val/loss", "finetuning/eval/epoch"} & series


_AT_EXIT = """
import sys
from pathlib import Path
from transformers import Trainer
from eventbus.bridges.transformers import EventBusCallback
from tests.eventbus.bridges.test_transformers_bridge import TinyRegressor, _Data, _args
from tests.eventbus.bridges.test_transformers_comet_neptune import _sinks

root = Path.cwd()
cb = EventBusCallback(_sinks(root, sys.argv[1] == "isolated"))
trainer = Trainer(model=TinyRegressor(), args=_args(root), train_dataset=_Data(64, 0),
                  eval_dataset=_Data(16, 1), callbacks=[cb])
trainer.train()
print("AFTER", trainer.evaluate(metric_key_prefix="after")["after_loss"])
# No cb.close(): interpreter exit closes the bus.
"""


@pytest.mark.parametrize("isolated", [True, False], ids=["isolated", "in-process"])
def test_bus_left_open_after_train_is_closed_at_interpreter_exit(sdk_env: Path, isolated: bool) -> None:
    """Nothing stays open at exit: Comet's archive is written and Neptune's run
    stopped, with what was logged after train()."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMET_", "NEPTUNE_"))}
    env["COMET_CONFIG"] = str(sdk_env / "no-such.comet.config")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, "-c", _AT_EXIT, "isolated" if isolated else "in-process"],
        cwd=sdk_env,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    after = float(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("AFTER")))

    archives = sorted((sdk_env / "comet").glob("*.zip"))
    assert len(archives) == 1, (archives, r.stderr[-3000:])
    archive = Archive(archives[0])
    assert archive.params["args|learning_rate"] == 0.05
    assert [s for _, s, _ in archive.metrics["eval/loss"]] == [4, 8]
    assert archive.metrics["train/after_loss"] == [(after, 8, 0.5)]

    data = read_offline(sdk_env)
    assert data.values["finetuning/trainer_parameters/learning_rate"] == 0.05
    assert data.series["finetuning/train/after_loss"] == [(after, 8)]
