"""TensorBoardSink: event files read back with tensorboard's own EventAccumulator and
the HParams plugin's parsers."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import sys

import pytest
import torch

from eventbus import EventBus, RunInfo
from eventbus.errors import MissingDependencyError, SinkConfigError
from eventbus.events import Evaluate, Log, Predict, Save, StepEnd, TrainBegin, TrainEnd
from eventbus.registry import create_sink
from tests.conftest import tb_run_dir, kill_isolated_child_once_delivered, require_module

require_module("tensorboard")

from tensorboard.backend.event_processing import event_accumulator as ea  # noqa: E402
from tensorboard.plugins.hparams import api_pb2  # noqa: E402
from tensorboard.plugins.hparams import metadata as hp_metadata  # noqa: E402

from sinks.tensorboard import TensorBoardSink  # noqa: E402

RUN_ID = "tbrun"


def f32(x: float) -> float:
    """What a TensorBoard simple_value (a float32) holds for ``x``."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def accumulate(log_dir: str) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(log_dir, size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    return acc


def scalars(acc: ea.EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text(acc: ea.EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def run_bus(sink: TensorBoardSink, events: list, run: RunInfo) -> None:
    bus = EventBus([sink], run=run)
    bus.start()
    for ev in events:
        bus.publish(ev)
    stats = bus.close(timeout=30)
    st = stats.sinks[sink.name]
    assert (st.errors, st.failed, st.dropped) == (0, 0, 0), st.last_error
    assert st.delivered == sum(type(e) in sink.events for e in events)


CONFIG = {
    "output_dir": "out",
    "learning_rate": 5e-5,
    "num_train_epochs": 3,
    "fp16": False,
    "optim": "adamw_torch",
    "hub_token": "hf_supersecret_token",
    "report_to": ["tensorboard"],
    "warmup_ratio": None,
}
HPARAMS = {"learning_rate": 5e-5, "num_train_epochs": 3, "fp16": False, "optim": "adamw_torch", "report_to": ["tensorboard"], "warmup_ratio": None}


def realistic_events() -> list:
    return [
        TrainBegin(run_id=RUN_ID, step=0, config=CONFIG, hparams=HPARAMS, model_config={"hidden_size": 8, "model_type": "tiny"}, max_steps=20),
        StepEnd(run_id=RUN_ID, step=1),
        Log(run_id=RUN_ID, step=5, epoch=0.25, values={"loss": torch.tensor(0.6931), "learning_rate": 4e-5, "grad_norm": torch.tensor(1.5), "epoch": 0.25}),
        Log(run_id=RUN_ID, step=10, epoch=0.5, values={"loss": torch.tensor(float("nan")), "learning_rate": 3e-5, "grad_norm": float("inf"), "epoch": 0.5}),
        Evaluate(run_id=RUN_ID, step=10, epoch=0.5, metrics={"eval_loss": torch.tensor(0.55), "eval_accuracy": 0.75, "eval_runtime": 0.1}),
        # The trainer may also report the evaluation through on_log: one point only.
        Log(run_id=RUN_ID, step=10, epoch=0.5, values={"eval_loss": f32(0.55), "eval_accuracy": 0.75, "eval_runtime": 0.1, "epoch": 0.5}),
        Save(run_id=RUN_ID, step=10, checkpoint_dir="out/checkpoint-10"),
        Log(run_id=RUN_ID, step=15, values={"loss": torch.tensor(0.25), "note": "warmup done", "hist": torch.tensor([1.0, 2.0])}),
        Log(run_id=RUN_ID, step=20, values={"loss": 0.125, "hist": [3.0, 4.0], "flag": True}),
        Predict(run_id=RUN_ID, step=20, metrics={"test_loss": 0.3}),
        TrainEnd(run_id=RUN_ID, step=20, status="completed", best_metric=0.55),
    ]


def test_end_to_end_scalars_text_and_nan(tmp_path, caplog):
    sink = TensorBoardSink()
    run = RunInfo(run_id=RUN_ID, output_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sinks"):
        run_bus(sink, realistic_events(), run)
    log_dir = tb_run_dir(tmp_path / "logs", RUN_ID)
    assert sink.path is not None and os.path.dirname(sink.path) == log_dir
    acc = accumulate(log_dir)

    loss = scalars(acc, "train/loss")
    assert [s for s, _ in loss] == [5, 10, 15, 20]
    assert loss[0][1] == f32(0.6931) and math.isnan(loss[1][1]) and loss[2][1] == 0.25 and loss[3][1] == 0.125
    assert scalars(acc, "train/grad_norm") == [(5, 1.5), (10, math.inf)]
    assert scalars(acc, "train/learning_rate") == [(5, f32(4e-5)), (10, f32(3e-5))]
    assert scalars(acc, "train/epoch") == [(5, 0.25), (10, 0.5)]
    assert scalars(acc, "train/flag") == [(20, 1.0)]
    # Evaluate and the echoing Log give one point per tag and step.
    assert scalars(acc, "eval/loss") == [(10, f32(0.55))]
    assert scalars(acc, "eval/accuracy") == [(10, 0.75)]
    assert scalars(acc, "test/loss") == [(20, f32(0.3))]

    tags = acc.Tags()
    assert "train/hist" not in tags["scalars"]
    hist_warnings = [r for r in caplog.records if "'train/hist'" in r.getMessage()]
    assert len(hist_warnings) == 1, "one warning per key, not per step"

    assert text(acc, "train/note/text_summary") == [(15, "warmup done")]
    [(step, args)] = text(acc, "args/text_summary")
    assert step == 0
    args_dict = json.loads(args)
    assert args_dict["learning_rate"] == 5e-5 and args_dict["hub_token"] == "***"
    assert "hf_supersecret_token" not in open(sink.path, "rb").read().decode("utf-8", "replace")
    assert json.loads(text(acc, "model_config/text_summary")[0][1]) == {"hidden_size": 8, "model_type": "tiny"}


def test_hparams_readable_by_the_hparams_plugin(tmp_path):
    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"))
    run_bus(sink, realistic_events(), RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    acc = accumulate(str(tmp_path / "tb"))
    content = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)

    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    hp = start.hparams
    assert hp["learning_rate"].number_value == 5e-5
    assert hp["num_train_epochs"].number_value == 3
    assert hp["fp16"].bool_value is False and hp["fp16"].WhichOneof("kind") == "bool_value"
    assert hp["optim"].string_value == "adamw_torch"
    assert hp["report_to"].string_value == "['tensorboard']"
    assert "warmup_ratio" not in hp  # None has no HParams type

    end = hp_metadata.parse_session_end_info_plugin_data(content[hp_metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS

    exp = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    types = {i.name: api_pb2.DataType.Name(i.type) for i in exp.hparam_infos}
    assert types == {
        "learning_rate": "DATA_TYPE_FLOAT64",
        "num_train_epochs": "DATA_TYPE_FLOAT64",
        "fp16": "DATA_TYPE_BOOL",
        "optim": "DATA_TYPE_STRING",
        "report_to": "DATA_TYPE_STRING",
    }
    metric_tags = {m.name.tag for m in exp.metric_infos}
    assert {"train/loss", "eval/loss", "eval/accuracy", "test/loss"} <= metric_tags


def test_resumed_run_has_no_duplicate_steps(tmp_path):
    run = RunInfo(run_id=RUN_ID, output_dir=str(tmp_path))
    first = [TrainBegin(run_id=RUN_ID, step=0, hparams={"lr": 0.1}, max_steps=40)]
    first += [Log(run_id=RUN_ID, step=s, values={"loss": 1.0 / s}) for s in (10, 20, 30)]
    first += [Save(run_id=RUN_ID, step=20, checkpoint_dir="out/checkpoint-20")]
    run_bus(TensorBoardSink(), first, run)  # "crashes" after step 30: no TrainEnd

    second = [TrainBegin(run_id=RUN_ID, step=20, hparams={"lr": 0.1}, max_steps=40, resumed_from="out/checkpoint-20")]
    second += [Log(run_id=RUN_ID, step=s, values={"loss": 2.0 / s}) for s in (30, 40)]
    second += [TrainEnd(run_id=RUN_ID, step=40)]
    run_bus(TensorBoardSink(), second, run)

    # The same run (its id): continued in its directory, not a run of its own.
    log_dir = tb_run_dir(tmp_path / "logs", RUN_ID)
    assert len([f for f in os.listdir(log_dir) if f.startswith("events.out.tfevents.")]) == 2
    got = scalars(accumulate(log_dir), "train/loss")
    assert got == [(10, f32(0.1)), (20, f32(0.05)), (30, f32(2.0 / 30)), (40, f32(0.05))]


def test_flushes_on_save_evaluate_and_trainend_not_per_event(tmp_path):
    sink = TensorBoardSink(flush_secs=3600)
    sink.open_sync(RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    try:
        header_size = os.path.getsize(sink.path)
        sink.write_sync([Log(step=1, values={"loss": 1.0})])
        sink.write_sync([Log(step=2, values={"loss": 0.5})])
        assert os.path.getsize(sink.path) == header_size, "a Log alone must not flush"
        sink.write_sync([Save(step=2, checkpoint_dir="c")])
        size = os.path.getsize(sink.path)
        assert size > header_size
        assert scalars(accumulate(sink.log_dir), "train/loss") == [(1, 1.0), (2, 0.5)]
        sink.write_sync([Log(step=3, values={"loss": 0.25})])
        assert os.path.getsize(sink.path) == size
        sink.write_sync([Evaluate(step=3, metrics={"eval_loss": 0.3})])
        assert os.path.getsize(sink.path) > size
        size = os.path.getsize(sink.path)
        sink.write_sync([Log(step=4, values={"loss": 0.2})])
        sink.write_sync([TrainEnd(step=4)])
        assert os.path.getsize(sink.path) > size
    finally:
        sink.close_sync()


def test_flushes_when_the_interval_has_passed(tmp_path):
    sink = TensorBoardSink(flush_secs=0)
    sink.open_sync(RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    try:
        header_size = os.path.getsize(sink.path)
        sink.write_sync([Log(step=1, values={"loss": 1.0})])
        assert os.path.getsize(sink.path) > header_size
    finally:
        sink.close_sync()


def test_an_isolated_child_killed_loses_nothing_counted_delivered(tmp_path):
    # The OOM killer takes the sink's child: every step the bus counted as delivered
    # must be in the file (the child flushes each batch before it answers), not in
    # the dead process's buffer with flush_secs far away.
    sink = TensorBoardSink(flush_secs=3600)
    sink.isolate = True
    with EventBus([sink], run=RunInfo(run_id=RUN_ID, output_dir=str(tmp_path))) as bus:
        kill_isolated_child_once_delivered(bus, "tensorboard", [Log(step=s, values={"loss": 1.0 / s}) for s in range(1, 21)])
        log_dir = bus.sinks[0].log_dir
        assert scalars(accumulate(log_dir), "train/loss") == [(s, f32(1.0 / s)) for s in range(1, 21)]


def test_log_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    sink = TensorBoardSink()
    monkeypatch.chdir(tmp_path)
    assert sink.resolve_log_dir(RunInfo(run_id="aaa", output_dir="o", logging_dir="l")) == "l"  # as given
    first = sink.resolve_log_dir(RunInfo(run_id="bbb", output_dir="o"))
    assert re.fullmatch(r"o/logs/[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_[^/]+_bbb", first), first
    # A directory of the run that exists (a resume, a later bus of the run) is the one
    # written to, whenever it was made; another run gets one of its own.
    os.makedirs("o/logs/Jan01_00-00-00_elsewhere_bbb")
    assert sink.resolve_log_dir(RunInfo(run_id="bbb", output_dir="o")) == "o/logs/Jan01_00-00-00_elsewhere_bbb"
    assert sink.resolve_log_dir(RunInfo(run_id="ccc", output_dir="o")).endswith("_ccc")
    assert TensorBoardSink(log_dir="x").resolve_log_dir(RunInfo(output_dir="o", logging_dir="l")) == "x"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "env"))
    assert sink.resolve_log_dir(RunInfo(output_dir="o", logging_dir="l")) == str(tmp_path / "env")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR")
    with pytest.raises(SinkConfigError, match="log_dir"):
        sink.resolve_log_dir(RunInfo())


def test_bad_options_are_clear_errors():
    with pytest.raises(SinkConfigError, match="flush_secs"):
        create_sink("tensorboard", flush_secs=-1)
    with pytest.raises(SinkConfigError, match="tensorboard"):
        create_sink("tensorboard", no_such_option=1)


def test_missing_tensorboard_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'eventbus-telemetry\[tensorboard\]'"):
        TensorBoardSink()


def test_subscribes_only_to_what_it_writes():
    assert set(TensorBoardSink.events) == {TrainBegin, Log, Evaluate, Predict, Save, TrainEnd}


def test_fast_record_framing_is_byte_for_byte_tensorboards(tmp_path):
    """The C CRC-32C writer frames records exactly as tensorboard's own RecordWriter."""
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    from sinks.tensorboard import _FastRecordWriter, _record_writer_class

    assert _record_writer_class(RecordWriter) is _FastRecordWriter  # google-crc32c is in the extra
    payloads = [b"", b"x", bytes(range(256)) * 3]
    ours, theirs = io.BytesIO(), io.BytesIO()
    for p in payloads:
        _FastRecordWriter(ours).write(p)
        RecordWriter(theirs).write(p)
    assert ours.getvalue() == theirs.getvalue()


def test_names_are_cleaned_into_tags_on_every_step(tmp_path):
    """TensorFlow's tag rule applies to every point (the sink caches each name's clean
    tag): two names that clean to one tag stay two series (the second gets a tag of
    its own); text stays text."""
    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"))
    events = [
        Log(run_id=RUN_ID, step=s, values={"acc@top 1": 0.5 * s, "eval_f1 (macro)": 0.25 * s, "a b": 1.0, "a!b": 2.0, "msg": f"step {s}", "x y": "text", "x+y": 3.0})
        for s in (1, 2, 3)
    ]
    run_bus(sink, events, RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    acc = accumulate(str(tmp_path / "tb"))
    assert scalars(acc, "train/acc_top_1") == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert scalars(acc, "eval/f1__macro_") == [(1, 0.25), (2, 0.5), (3, 0.75)]
    assert scalars(acc, "train/a_b") == [(1, 1.0), (2, 1.0), (3, 1.0)]
    (other,) = [t for t in acc.Tags()["scalars"] if t.startswith("train/a_b_")]
    assert scalars(acc, other) == [(1, 2.0), (2, 2.0), (3, 2.0)]
    assert text(acc, "train/msg/text_summary") == [(1, "step 1"), (2, "step 2"), (3, "step 3")]
    assert text(acc, "train/x_y/text_summary") == [(1, "text"), (2, "text"), (3, "text")]
    (number,) = [t for t in acc.Tags()["scalars"] if t.startswith("train/x_y_")]
    assert scalars(acc, number) == [(1, 3.0), (2, 3.0), (3, 3.0)]


def test_a_sink_on_every_rank_writes_each_rank_to_a_run_of_its_own(tmp_path, monkeypatch):
    # all_ranks: rank 0 and rank 1 of one run, one log dir; TensorBoard shows two
    # runs ("." and "rank1"), each step once in each, not every point twice.
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    for rank in (0, 1):
        sink = TensorBoardSink()
        sink.all_ranks = True
        events = [Log(run_id=RUN_ID, rank=rank, step=s, values={"loss": float(10 * rank + s)}) for s in (1, 2)]
        run_bus(sink, events, RunInfo(run_id=RUN_ID, output_dir=str(tmp_path), rank=rank, world_size=2))
        # Opened again (evaluate() after train(), a restarted child): the same directory.
        again = sink.resolve_log_dir(RunInfo(run_id=RUN_ID, output_dir=str(tmp_path), rank=rank, world_size=2))
        assert again == sink.log_dir
    logs = tb_run_dir(tmp_path / "logs", RUN_ID)
    assert sink.log_dir == os.path.join(logs, "rank1")
    assert scalars(accumulate(logs), "train/loss") == [(1, 1.0), (2, 2.0)]
    assert scalars(accumulate(os.path.join(logs, "rank1")), "train/loss") == [(1, 11.0), (2, 12.0)]
