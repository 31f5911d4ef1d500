"""Bad input: a clear error, or one warning, and nothing already accepted is lost.

Invalid TrainingArguments; metric_for_best_model missing from the metrics; None,
strings, lists, multi-element tensors, NaN and inf in the logs, and metric names a
backend rejects, through a real Trainer to every sink that runs offline (each backend
read back with its own reader); a corrupt or future-version trainer_state.json; a
checkpoint directory with missing files; an unknown sink name; a sink option of the
wrong type (every sink's constructor)."""

from __future__ import annotations

import inspect
import io
import json
import logging
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from eventbus import Log
from eventbus.errors import SinkConfigError, UnknownSinkError
from eventbus.registry import create_sink, load_sink_factory, sinks_from_report_to
from sinks.jsonl import read_jsonl
from tests._faultserver import server  # noqa: F401 - the fixture
from tests.conftest import clean_backend_env
from tests.trainer._loop_helpers import TinyClassifier, accuracy, make_dataset, tiny_args
from trainer import Trainer, TrainerCallback, TrainingArguments
from trainer.arguments import TrainingArgumentsError
from trainer.checkpoint import CheckpointError
from trainer.state import TrainerStateError

TRAIN = make_dataset(24)
EVAL = make_dataset(8, seed=1)


def _args(tmp_path: Path, **kw: Any) -> TrainingArguments:
    return tiny_args(tmp_path / "out", **{"max_steps": 4, "bus_close_timeout": 20.0, **kw})


# -- TrainingArguments ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"per_device_train_batch_size": 2.5}, "per_device_train_batch_size"),
        ({"logging_steps": -1}, "logging_steps"),
        ({"eval_strategy": "sometimes"}, "eval_strategy"),
        ({"save_strategy": "weekly"}, "save_strategy"),
        ({"disable_tqdm": "yes"}, "disable_tqdm"),
        ({"warmup_ratio": 2.0}, "warmup_ratio"),
        ({"lr_scheduler_type": "zigzag"}, "lr_scheduler_type"),
        ({"output_dir": ""}, "output_dir"),
    ],
)
def test_invalid_training_arguments_name_the_field(tmp_path, kwargs, field):
    with pytest.raises((TrainingArgumentsError, ValueError, TypeError)) as info:
        _args(tmp_path, **kwargs)
    assert field in str(info.value)


# -- metric_for_best_model missing ------------------------------------------------------


def test_metric_for_best_model_missing_is_one_warning_and_training_goes_on(tmp_path, caplog):
    from tests.trainer._loop_helpers import RecordingSink

    sink = RecordingSink()
    args = _args(
        tmp_path,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=2,
        metric_for_best_model="f1",  # compute_metrics returns accuracy only
    )
    t = Trainer(TinyClassifier(), args, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=accuracy, sinks=[sink])
    with caplog.at_level(logging.WARNING, logger="trainer"):
        out = t.train()
    assert out.global_step == 4
    warnings = [r for r in caplog.records if "metric_for_best_model" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "eval_f1" in warnings[0].getMessage() and "eval_accuracy" in warnings[0].getMessage()
    # Nothing lost: every evaluation was logged and every checkpoint saved.
    assert [e.step for e in sink.received if type(e).__name__ == "Evaluate"] == [1, 2, 3, 4]
    assert sorted(os.listdir(args.output_dir)) >= ["checkpoint-2", "checkpoint-4"]
    assert t.state.best_metric is None


# -- odd values and odd names in the logs, through every offline sink -----------------------

ODD_VALUES = {
    "none": None,
    "text": "hello",
    "list": [1.0, 2.0],
    "nan": math.nan,
    "inf": math.inf,
    "ninf": -math.inf,
    "fine": 0.5,
}
ODD_NAMES = {"loss (smoothed) é": 1.25, "a//b/../c": 2.5, "/lead": 3.5}


class OddLogs(TrainerCallback):
    """Logs odd values and names at steps 2 and 3, the way a user's callback might."""

    def __init__(self) -> None:
        self.trainer: Any = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in (2, 3):
            logs = dict(ODD_VALUES, **ODD_NAMES)
            logs["vec"] = torch.tensor([1.0, 2.0, 3.0])
            logs["tnan"] = torch.tensor(float("nan"))
            self.trainer.log(logs)


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    clean_backend_env(tmp_path, monkeypatch)
    yield tmp_path


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def test_odd_values_and_names_reach_every_sink_as_each_can_take_them(offline_env, server, caplog):
    from sinks.console import ConsoleSink
    from sinks.mlflow import MLflowSink, sanitize_name
    from sinks.tensorboard import TensorBoardSink
    from tests.integration.test_comet import Archive
    from tests.integration.test_neptune import read_offline
    from tests.sinks.test_tensorboard import accumulate

    tmp = offline_env
    console = io.StringIO()
    sinks = [
        TensorBoardSink(log_dir=str(tmp / "tb")),
        ConsoleSink(file=console),
        MLflowSink(server.url, experiment_name="odd"),
        create_sink("neptune", mode="offline", capture_hardware_metrics=False),
        create_sink("comet_ml", offline_directory=str(tmp / "comet")),
    ]
    cb = OddLogs()
    t = Trainer(TinyClassifier(), _args(tmp, report_to=["jsonl"]), train_dataset=TRAIN, callbacks=[cb], sinks=sinks)
    cb.trainer = t
    with caplog.at_level(logging.WARNING):
        t.train()

    stats = t.bus.stats()
    for name, s in stats.sinks.items():
        assert (s.received, s.failed, s.dropped, s.errors) == (s.delivered, 0, 0, 0), (name, s.last_error)

    # JSONL keeps everything, under the original names.
    (path,) = [p for p in (tmp / "out").iterdir() if p.name.startswith("events-")]
    odd = [e for e in read_jsonl(path) if isinstance(e, Log) and "text" in e.values]
    assert [e.step for e in odd] == [2, 3]
    for e in odd:
        expected = dict(ODD_VALUES, **ODD_NAMES, vec=[1.0, 2.0, 3.0], tnan=math.nan)
        for k, v in expected.items():
            assert _same(e.values[k], v), (k, e.values[k], v)

    # TensorBoard: scalars (NaN and inf included) under tags TensorBoard accepts.
    acc = accumulate(str(tmp / "tb"))
    tags = set(acc.Tags()["scalars"])
    assert {"train/fine", "train/nan", "train/inf", "train/ninf", "train/tnan"} <= tags
    assert math.isnan(acc.Scalars("train/nan")[0].value) and acc.Scalars("train/inf")[0].value == math.inf
    assert not {"train/text", "train/none", "train/list", "train/vec"} & tags
    # TensorFlow's rule for tags (summary_op_util.clean_tag).
    bad_tags = [tag for tag in tags if re.search(r"[^-/\w.]", tag) or tag.startswith("/")]
    assert bad_tags == []
    assert len([tag for tag in tags if tag.startswith("train/loss")]) >= 2  # the odd name kept apart from loss

    # MLflow: names sanitised its way, NaN and inf sent as MLflow spells them.
    (run,) = server.runs.values()
    keys = {m["key"] for m in run["metrics"]}
    assert {sanitize_name(k) for k in ODD_NAMES} <= keys
    assert not {"text", "none", "list", "vec"} & keys
    assert {m["value"] for m in run["metrics"] if m["key"] == "nan"} == {"NaN"}
    assert {m["value"] for m in run["metrics"] if m["key"] == "inf"} == {"Infinity"}

    # Neptune: no empty or relative path segments.
    data = read_offline(tmp)
    for path_ in list(data.series) + list(data.values):
        assert "" not in path_.split("/") and ".." not in path_.split("/"), path_
    assert "finetuning/train/fine" in data.series

    # Comet: the archive holds the numbers.
    (archive,) = list((tmp / "comet").glob("*.zip"))
    metrics = Archive(archive).metrics
    assert "train/fine" in metrics or "fine" in metrics

    # One warning per skipped key and sink, not one per step.
    # One warning per skipped key and sink, not one per step (TensorBoard keeps strings
    # as text summaries, so it skips no "text").
    assert "train/text/text_summary" in acc.Tags()["tensors"]
    for key in ("none", "text", "list", "vec"):
        for sink_name in ("tensorboard", "mlflow", "neptune", "comet_ml"):
            if (key, sink_name) == ("text", "tensorboard"):
                continue
            hits = [r for r in caplog.records if r.getMessage().startswith(f"{sink_name} sink") and f"{key}' is a" in r.getMessage()]
            assert len(hits) == 1, (key, sink_name, [r.getMessage() for r in hits])


# -- trainer_state.json and checkpoints ------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    t = Trainer(TinyClassifier(), _args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=TRAIN)
    t.train()
    return tmp_path / "out" / "checkpoint-2"


def test_a_corrupt_trainer_state_is_a_clear_error(tmp_path, checkpoint):
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_hist')
    t = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN)
    with pytest.raises(TrainerStateError) as info:
        t.train(resume_from_checkpoint=str(checkpoint))
    assert "trainer_state.json" in str(info.value) and "not valid JSON" in str(info.value)


def test_a_future_version_trainer_state_is_one_warning_and_resumes(tmp_path, checkpoint, caplog):
    path = checkpoint / "trainer_state.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    data["shiny_new_field"] = {"x": 1}
    path.write_text(json.dumps(data))
    t = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN)
    with caplog.at_level(logging.WARNING):
        t.train(resume_from_checkpoint=str(checkpoint))
    assert t.state.global_step == 4
    hits = [r for r in caplog.records if "shiny_new_field" in r.getMessage()]
    assert len(hits) == 1 and "newer version" in hits[0].getMessage()


@pytest.mark.parametrize("missing", ["pytorch_model.bin", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"])
def test_a_checkpoint_with_a_missing_file_is_a_clear_error(tmp_path, checkpoint, missing):
    os.remove(checkpoint / missing)
    t = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN)
    with pytest.raises(CheckpointError) as info:
        t.train(resume_from_checkpoint=str(checkpoint))
    assert missing in str(info.value) and str(checkpoint) in str(info.value)


def test_a_checkpoint_directory_that_does_not_exist_is_a_clear_error(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN)
    with pytest.raises(CheckpointError) as info:
        t.train(resume_from_checkpoint=str(tmp_path / "nope" / "checkpoint-9"))
    assert "checkpoint-9" in str(info.value)


# -- sinks: unknown names and options of the wrong type -------------------------------------


def test_an_unknown_sink_name_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownSinkError) as info:
        sinks_from_report_to(["jsonl", "tensorbord"])
    assert "tensorbord" in str(info.value) and "tensorboard" in str(info.value)
    with pytest.raises(UnknownSinkError):
        Trainer(TinyClassifier(), _args(tmp_path, report_to=["wandb-ish"]), train_dataset=TRAIN)


# The smallest valid options of each sink, so that one wrong option is the only error.
BASE_OPTIONS: dict[str, dict[str, Any]] = {
    "tensorboard": {},
    "jsonl": {},
    "console": {},
    "progress": {},
    "mlflow": {"tracking_uri": "http://127.0.0.1:5000"},
    "azure_ml": {
        "tracking_uri": "azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/s/resourceGroups/r/providers/"
        "Microsoft.MachineLearningServices/workspaces/w",
        "token": "t0k3n-for-the-test",
    },
    "neptune": {"mode": "offline"},
    "comet_ml": {"mode": "offline"},
}
WRONG = [123, 1.5, ["x"], {"a": 1}, "text", True, object()]


def _params(name: str) -> list[tuple[str, Any]]:
    factory = load_sink_factory(name)
    init = factory.__init__
    hints = typing.get_type_hints(init)
    out = []
    for p in inspect.signature(init).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out.append((p.name, hints.get(p.name, Any)))
    return out


def _fits(value: Any, tp: Any) -> bool:
    from sinks._common import _matches

    return _matches(value, tp)


@pytest.mark.parametrize("name", sorted(BASE_OPTIONS))
def test_every_sink_option_of_the_wrong_type_is_a_clear_error(name, offline_env):
    checked = 0
    for option, tp in _params(name):
        if tp is Any:
            continue
        for value in WRONG:
            if _fits(value, tp):
                continue
            opts = dict(BASE_OPTIONS[name], **{option: value})
            with pytest.raises(SinkConfigError) as info:
                create_sink(name, **opts)
            msg = str(info.value)
            assert msg.startswith(f"{name} sink") and f"option {option!r}" in msg, msg
            assert type(value).__name__ in msg, msg
            checked += 1
    assert checked > 0


def test_a_secret_option_of_the_wrong_type_is_not_echoed():
    with pytest.raises(SinkConfigError) as info:
        create_sink("mlflow", tracking_uri="http://127.0.0.1:5000", token=["tok-not-a-string-4242"])
    assert "token" in str(info.value) and "tok-not-a-string-4242" not in str(info.value)


def test_credentials_in_a_url_option_of_the_wrong_type_are_not_echoed():
    class Url:  # a URL object where a string is expected, with user:password in it
        def __repr__(self) -> str:
            return "Url('https://bob:pw-not-shown-4242@mlflow.example/')"

    with pytest.raises(SinkConfigError) as info:
        create_sink("mlflow", tracking_uri=Url())
    message = str(info.value)
    assert "tracking_uri" in message and "mlflow.example" in message
    assert "pw-not-shown-4242" not in message and "bob" not in message


def test_the_option_check_does_not_reject_good_values(tmp_path):
    sink = create_sink("jsonl", dir=tmp_path, flush_secs=2)  # a PathLike and an int for a float
    assert sink.flush_secs == 2.0
    mlflow = create_sink("mlflow", tracking_uri="http://127.0.0.1:5000", tags={"team": "x"}, max_log_params="10", verify=False)
    assert mlflow.name == "mlflow"
    assert create_sink("neptune", mode="offline", tags=("a", "b")).name == "neptune"
