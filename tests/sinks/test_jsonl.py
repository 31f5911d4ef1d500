"""JSONLSink: one JSON line per event, read back with eventbus.events.decode_json and
sinks.jsonl.read_jsonl."""

from __future__ import annotations

import json
import math
import os

import msgspec
import pytest
import torch

from eventbus import EventBus, RunInfo
from eventbus.errors import SinkConfigError
from eventbus.events import (
    EVENT_TYPES,
    Evaluate,
    Log,
    Save,
    StepBegin,
    StepEnd,
    TrainBegin,
    TrainEnd,
    decode_json,
    encode_json,
)
from eventbus.registry import create_sink
from tests.conftest import kill_isolated_child_once_delivered
from sinks.jsonl import DEFAULT_EVENTS, NONFINITE_KEY, PER_BATCH_EVENTS, JSONLSink, decode_line, encode_line, iter_jsonl, read_jsonl

RUN_ID = "jrun"


def run_bus(sink: JSONLSink, events: list, run: RunInfo) -> None:
    bus = EventBus([sink], run=run)
    bus.start()
    for ev in events:
        bus.publish(ev)
    st = bus.close(timeout=30).sinks[sink.name]
    assert (st.errors, st.failed, st.dropped) == (0, 0, 0), st.last_error
    assert st.delivered == sum(type(e) in sink.events for e in events)


def realistic_events() -> list:
    return [
        TrainBegin(run_id=RUN_ID, step=0, config={"learning_rate": 5e-5, "report_to": ["jsonl"]}, hparams={"learning_rate": 5e-5}, max_steps=4),
        StepBegin(run_id=RUN_ID, step=0),
        StepEnd(run_id=RUN_ID, step=1, epoch=0.25),
        Log(run_id=RUN_ID, step=1, epoch=0.25, values={"loss": torch.tensor(0.5), "learning_rate": 4e-5, "Weird Name/with.dots": 1}),
        StepEnd(run_id=RUN_ID, step=2, epoch=0.5),
        Log(run_id=RUN_ID, step=2, epoch=0.5, values={"loss": torch.tensor(float("nan")), "grad_norm": float("inf"), "neg": -math.inf, "vec": torch.tensor([1.0, 2.0]), "note": "NaN"}),
        Evaluate(run_id=RUN_ID, step=2, epoch=0.5, metrics={"eval_loss": torch.tensor(0.25), "eval_accuracy": 0.75}),
        Save(run_id=RUN_ID, step=2, checkpoint_dir="out/checkpoint-2"),
        TrainEnd(run_id=RUN_ID, step=4, status="completed", best_metric=0.25, best_model_checkpoint="out/checkpoint-2"),
    ]


def test_default_leaves_out_the_per_batch_hook_events(tmp_path):
    sink = JSONLSink()
    run_bus(sink, realistic_events(), RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    got = read_jsonl(tmp_path / f"events-{RUN_ID}.jsonl")
    assert [type(e) for e in got] == [TrainBegin, Log, Log, Evaluate, Save, TrainEnd]
    assert StepBegin not in sink.events and StepEnd not in sink.events
    assert set(sink.events) | set(PER_BATCH_EVENTS) == set(EVENT_TYPES)


def test_end_to_end_every_event_one_line(tmp_path):
    sink = JSONLSink(events="all")
    events = realistic_events()
    run_bus(sink, events, RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    path = tmp_path / f"events-{RUN_ID}.jsonl"
    assert sink.path == str(path)
    lines = path.read_bytes().splitlines()
    assert len(lines) == len(events)

    got = read_jsonl(path)
    assert [type(e) for e in got] == [type(e) for e in events]
    assert [e.step for e in got] == [e.step for e in events]
    assert [e.time_ns for e in got] == [e.time_ns for e in events]
    log1, log2 = got[3], got[5]
    assert log1.values == {"loss": 0.5, "learning_rate": 4e-5, "Weird Name/with.dots": 1}
    assert math.isnan(log2.values["loss"]) and log2.values["grad_norm"] == math.inf and log2.values["neg"] == -math.inf
    assert log2.values["vec"] == [1.0, 2.0]
    assert log2.values["note"] == "NaN", "a string that reads NaN stays a string"
    assert got[6].metrics == {"eval_loss": 0.25, "eval_accuracy": 0.75}
    assert got[7].checkpoint_dir == "out/checkpoint-2"
    assert got[8].status == "completed" and got[8].best_metric == 0.25
    assert got[0].config == {"learning_rate": 5e-5, "report_to": ["jsonl"]}

    # Lines without NaN/inf are exactly encode_json(event); every line decodes with
    # decode_json, and is valid JSON for any other reader.
    assert lines[3] == encode_json(got[3])
    for line in lines:
        decode_json(line)
        json.loads(line)
    assert json.loads(lines[5])["values"]["grad_norm"] == "Infinity"
    assert json.loads(lines[5])[NONFINITE_KEY] == [["values", "loss"], ["values", "grad_norm"], ["values", "neg"]]


def test_nonfinite_in_typed_float_fields_round_trip():
    ev = TrainEnd(step=3, best_metric=float("nan"), epoch=float("inf"))
    back = decode_line(encode_line(ev))
    assert isinstance(back, TrainEnd) and math.isnan(back.best_metric) and back.epoch == math.inf
    nested = TrainBegin(config={"a": [1.0, float("-inf")], "b": {"c": float("nan")}})
    back = decode_line(encode_line(nested))
    assert back.config["a"] == [1.0, -math.inf] and math.isnan(back.config["b"]["c"])


def test_unencodable_config_value_is_written_as_text():
    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    back = decode_line(encode_line(TrainBegin(config={"obj": Opaque(), "n": 1})))
    assert back.config == {"obj": "<Opaque>", "n": 1}


def test_flushes_on_urgent_events_not_per_event(tmp_path):
    sink = JSONLSink(flush_secs=3600, events="all")
    sink.open_sync(RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    try:
        sink.write_sync([StepEnd(step=1), Log(step=1, values={"loss": 1.0})])
        assert os.path.getsize(sink.path) == 0, "ordinary events stay buffered"
        sink.write_sync([Save(step=1, checkpoint_dir="c")])
        assert [type(e) for e in read_jsonl(sink.path)] == [StepEnd, Log, Save]
        sink.write_sync([Log(step=2, values={"loss": 0.5})])
        assert len(read_jsonl(sink.path)) == 3
    finally:
        sink.close_sync()
    assert len(read_jsonl(sink.path)) == 4, "close flushes"


def test_flushes_when_the_interval_has_passed(tmp_path):
    sink = JSONLSink(flush_secs=0)
    sink.open_sync(RunInfo(run_id=RUN_ID, output_dir=str(tmp_path)))
    try:
        sink.write_sync([Log(step=1, values={"loss": 1.0})])
        assert len(read_jsonl(sink.path)) == 1
    finally:
        sink.close_sync()


def test_an_isolated_child_killed_loses_nothing_counted_delivered(tmp_path):
    # As for TensorBoard: isolated, the child flushes each batch before the
    # bus counts it delivered, so a child the OOM killer takes leaves every line.
    sink = JSONLSink(path=str(tmp_path / "run.jsonl"), flush_secs=3600)
    sink.isolate = True
    with EventBus([sink], run=RunInfo(run_id="r")) as bus:
        kill_isolated_child_once_delivered(bus, "jsonl", [Log(step=s, values={"loss": 1.0 / s}) for s in range(1, 21)])
        assert [(ev.step, ev.values["loss"]) for ev in read_jsonl(str(tmp_path / "run.jsonl"))] == [
            (s, 1.0 / s) for s in range(1, 21)
        ]


def test_resumed_run_appends_and_reader_keeps_each_step_once(tmp_path):
    run = RunInfo(run_id=RUN_ID, output_dir=str(tmp_path))
    first = [TrainBegin(run_id=RUN_ID, step=0)] + [Log(run_id=RUN_ID, step=s, values={"loss": 1.0 / s}) for s in (1, 2, 3)]
    run_bus(JSONLSink(), first, run)
    second = [TrainBegin(run_id=RUN_ID, step=2, resumed_from="out/checkpoint-2")]
    second += [Log(run_id=RUN_ID, step=s, values={"loss": 2.0 / s}) for s in (3, 4)]
    run_bus(JSONLSink(), second, run)

    path = tmp_path / f"events-{RUN_ID}.jsonl"
    logs = [(e.step, e.values["loss"]) for e in read_jsonl(path) if isinstance(e, Log)]
    assert logs == [(1, 1.0), (2, 0.5), (3, 2.0 / 3), (4, 0.5)]
    raw = [(e.step, e.values["loss"]) for e in iter_jsonl(path) if isinstance(e, Log)]
    assert raw == [(1, 1.0), (2, 0.5), (3, 1.0 / 3), (3, 2.0 / 3), (4, 0.5)]


def test_torn_line_is_skipped_and_a_resumed_run_starts_a_fresh_line(tmp_path, caplog):
    run = RunInfo(run_id=RUN_ID, output_dir=str(tmp_path))
    path = tmp_path / f"events-{RUN_ID}.jsonl"
    path.write_bytes(encode_line(Log(step=1, values={"loss": 1.0})) + b'{"type":"Log","st')
    run_bus(JSONLSink(), [Log(run_id=RUN_ID, step=2, values={"loss": 0.5})], run)
    assert [e.step for e in read_jsonl(path)] == [1, 2]
    assert any("line 2" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match=r":2: "):
        read_jsonl(path, strict=True)


def test_options(tmp_path):
    p = tmp_path / "sub" / "mine.jsonl"
    sink = create_sink("jsonl", path=str(p), events=["Log", "Evaluate"])
    assert sink.events == (Log, Evaluate)
    run_bus(sink, realistic_events(), RunInfo(run_id=RUN_ID))
    assert [type(e) for e in read_jsonl(p)] == [Log, Log, Evaluate]

    d = create_sink("jsonl", dir=str(tmp_path / "d"))
    assert d.resolve_path(RunInfo(run_id="abc", output_dir="ignored")) == str(tmp_path / "d" / "events-abc.jsonl")
    assert JSONLSink.events == DEFAULT_EVENTS
    assert create_sink("jsonl", events="all").events == EVENT_TYPES


def test_bad_options_are_clear_errors(tmp_path):
    with pytest.raises(SinkConfigError, match="not both"):
        JSONLSink(path="a", dir="b")
    with pytest.raises(SinkConfigError, match="unknown event types.*Lgo"):
        JSONLSink(events=["Lgo"])
    with pytest.raises(SinkConfigError, match="flush_secs"):
        JSONLSink(flush_secs="soon")
    with pytest.raises(SinkConfigError, match="output_dir"):
        JSONLSink().resolve_path(RunInfo())


def test_not_an_event_line_is_a_clear_error():
    with pytest.raises(ValueError, match="not an eventbus event line"):
        decode_line(b'{"type": "Nope"}')
    with pytest.raises(msgspec.DecodeError):
        decode_line(b"{oops")


def test_a_batch_is_encoded_in_one_call_unless_it_holds_null(monkeypatch):
    """encode_lines gives encode_line's bytes for every batch: a batch of plain values
    in one call (encode_line is not called), and one holding NaN, inf, None or a value
    msgspec cannot encode through encode_line, per event."""
    import sinks.jsonl as jsonl

    logs = [Log(step=i, epoch=i / 10, values={"loss": 0.5 / i, "lr": 1e-3, "name": "x"}) for i in range(1, 6)]
    expected = b"".join(encode_line(ev) for ev in logs)

    def refuse(ev):
        raise AssertionError("encode_line called for a batch without null")

    with monkeypatch.context() as m:
        m.setattr(jsonl, "encode_line", refuse)
        assert jsonl.encode_lines(logs) == expected

    mixed = [
        *logs[:2],
        Log(step=3, values={"loss": math.nan, "gn": math.inf}),
        Log(step=4, values={"note": None}),
        TrainBegin(config={"obj": object()}),
    ]
    data = jsonl.encode_lines(mixed)
    assert data == b"".join(encode_line(ev) for ev in mixed)
    back = [decode_line(line) for line in data.splitlines()]
    assert [type(e) for e in back] == [Log, Log, Log, Log, TrainBegin]
    assert math.isnan(back[2].values["loss"]) and back[2].values["gn"] == math.inf
    assert back[3].values == {"note": None} and back[4].config["obj"].startswith("<object object")


def test_a_sink_on_every_rank_writes_a_file_per_rank(tmp_path):
    for rank in (0, 1):
        for path in (None, str(tmp_path / "given.jsonl")):
            sink = JSONLSink(path=path)
            sink.all_ranks = True
            run = RunInfo(run_id=RUN_ID, output_dir=str(tmp_path), rank=rank, world_size=2)
            run_bus(sink, [Log(run_id=RUN_ID, rank=rank, step=1, values={"loss": float(rank)})], run)
            assert sink.resolve_path(run) == sink.path  # opened again: the same file
    for name in (f"events-{RUN_ID}", "given"):
        assert [e.rank for e in read_jsonl(tmp_path / f"{name}.jsonl")] == [0]
        assert [e.rank for e in read_jsonl(tmp_path / f"{name}-rank1.jsonl")] == [1]
