"""What a user's loop hands the bus is what the sinks write: a values dict reused after
publish(), numpy scalars, integers beyond 64 bits, in this process and across an
isolated sink's pipe, read back with the backends' own readers."""

from __future__ import annotations

import os

import msgspec
import numpy as np
import pytest

from eventbus import EventBus, Evaluate, Log, RunInfo
from eventbus.events import Event, decode_msgpack, encode_lenient, encode_msgpack
from eventbus.values import Snapshot
from sinks.jsonl import JSONLSink, read_jsonl
from tests.conftest import require_module

WIDE = 2**64  # one past msgpack's largest integer


def test_a_values_dict_reused_after_publish_keeps_what_it_held(tmp_path) -> None:
    # A loop that fills one dict per step and clears it afterwards, as transformers'
    # callbacks (which read logs at once) allow.
    path = tmp_path / "events.jsonl"
    values: dict[str, float] = {}
    metrics: dict[str, float] = {}
    with EventBus([JSONLSink(path=path)]) as bus:
        for step in range(1, 6):
            values["loss"] = 1.0 / step
            bus.publish(Log(step=step, values=values))
            metrics["eval_loss"] = 2.0 / step
            bus.publish(Evaluate(step=step, metrics=metrics))
        values.clear()
        metrics.clear()
    got = read_jsonl(path)
    assert [(e.step, e.values) for e in got if isinstance(e, Log)] == [(s, {"loss": 1.0 / s}) for s in range(1, 6)]
    assert [(e.step, e.metrics) for e in got if isinstance(e, Evaluate)] == [(s, {"eval_loss": 2.0 / s}) for s in range(1, 6)]


def test_an_event_keeps_a_copy_and_a_snapshot_as_handed_over() -> None:
    mine = {"loss": 1.0}
    ev = Log(step=1, values=mine)
    mine["loss"] = 2.0
    assert ev.values == {"loss": 1.0} and ev.values is not mine
    handed = Snapshot(loss=0.5)  # the trainer's own, never changed afterwards: no copy
    assert Log(step=1, values=handed).values is handed


def test_wide_ints_and_numpy_scalars_encode_as_numbers() -> None:
    values = {"tokens": WIDE, "huge": 10**400, "f32": np.float32(0.5), "f64": np.float64(0.25), "i64": np.int64(3), "b": np.bool_(True)}
    (ev,) = msgspec.msgpack.Decoder(list[Event]).decode(encode_lenient([Log(step=7, values=values)]))  # type: ignore[valid-type]
    assert ev.values == {"tokens": float(WIDE), "huge": str(10**400), "f32": 0.5, "f64": 0.25, "i64": 3, "b": True}
    assert type(ev.values["i64"]) is int and type(ev.values["b"]) is bool
    # the common case goes through msgpack unchanged
    plain = Log(step=1, values={"loss": 0.5, "n": 2**63})
    assert encode_lenient(plain) == encode_msgpack(plain) and decode_msgpack(encode_lenient(plain)) == plain


def test_an_int_too_long_for_its_text_does_not_cost_the_batch() -> None:
    # Python will not write an int of over 4300 digits as text (sys.get_int_max_str_digits).
    (ev,) = msgspec.msgpack.Decoder(list[Event]).decode(encode_lenient([Log(step=1, values={"x": 10**5000, "loss": 0.5})]))  # type: ignore[valid-type]
    assert ev.values == {"x": f"<int of {(10**5000).bit_length()} bits>", "loss": 0.5}


def test_numpy_arrays_are_written_as_tensors_of_the_same_values_would_be(tmp_path) -> None:
    """A one-element array is its number, a longer one its list (as a tensor), in the
    JSONL file and across an isolated sink's pipe, not the array's repr."""
    path = tmp_path / "events.jsonl"
    values = {"one": np.array([0.7]), "three": np.zeros(3), "zero_d": np.array(1.5), "grid": np.ones((1, 1), dtype=np.int64)}
    with EventBus([JSONLSink(path=path)]) as bus:
        bus.publish(Log(step=1, values=values))
    (ev,) = read_jsonl(path)
    assert ev.values == {"one": 0.7, "three": [0.0, 0.0, 0.0], "zero_d": 1.5, "grid": 1}
    (piped,) = msgspec.msgpack.Decoder(list[Event]).decode(encode_lenient([Log(step=1, values=values)]))  # type: ignore[valid-type]
    assert piped.values == {"one": 0.7, "three": [0.0, 0.0, 0.0], "zero_d": 1.5, "grid": 1}


@pytest.mark.parametrize("isolate", [True, False], ids=["in-a-child-process", "in-process"])
def test_numpy_scalars_and_a_wide_int_reach_the_jsonl_file_as_numbers(tmp_path, isolate: bool) -> None:
    if isolate and os.name != "posix":
        pytest.skip("process isolation is POSIX only")
    path = tmp_path / "events.jsonl"
    sink = JSONLSink(path=path)
    sink.isolate = isolate
    with EventBus([sink]) as bus:
        for step in range(1, 6):
            extra = {"tokens_seen": WIDE} if step == 3 else {}
            bus.publish(Log(step=step, values={"loss": np.float64(1.0 / step), "n": np.int64(step), **extra}))
    st = bus.stats().sinks["jsonl"]
    assert (st.delivered, st.failed, st.dropped) == (5, 0, 0), st.last_error
    got = {e.step: e.values for e in read_jsonl(path) if isinstance(e, Log)}
    assert got == {s: {"loss": 1.0 / s, "n": s, **({"tokens_seen": WIDE} if s == 3 else {})} for s in range(1, 6)}
    assert all(type(v["loss"]) is float and type(v["n"]) is int for v in got.values())


def test_the_default_isolated_tensorboard_sink_logs_numpy_scalars_and_a_wide_int_as_scalars(tmp_path) -> None:
    require_module("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    from sinks.tensorboard import TensorBoardSink

    sink = TensorBoardSink(log_dir=str(tmp_path / "tb"))
    with EventBus([sink], run=RunInfo(output_dir=str(tmp_path))) as bus:
        for step in range(1, 6):
            extra = {"tokens_seen": WIDE} if step == 3 else {}
            bus.publish(Log(step=step, values={"loss": np.float64(1.0 / step), "acc": np.float32(0.5), **extra}))
    st = bus.stats().sinks["tensorboard"]
    assert (st.delivered, st.failed, st.dropped) == (5, 0, 0), st.last_error
    acc = ea.EventAccumulator(str(tmp_path / "tb"), size_guidance={k: 0 for k in ea.DEFAULT_SIZE_GUIDANCE})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/acc", "train/loss", "train/tokens_seen"]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("train/loss")] == [(s, round(1.0 / s, 6)) for s in range(1, 6)]
    assert [(e.step, e.value) for e in acc.Scalars("train/tokens_seen")] == [(3, float(WIDE))]
    assert not acc.Tags()["tensors"]  # nothing went as text
