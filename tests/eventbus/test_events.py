"""Every event type: frozen, hook-named, and round-trippable through JSON and msgpack."""

from __future__ import annotations

import msgspec
import pytest

from eventbus import events as E


def _samples() -> list[E.BaseEvent]:
    h = dict(run_id="run-42", step=17, epoch=1.25, time_ns=1_700_000_000_123_456_789, rank=3)
    return [
        E.InitEnd(**h),
        E.TrainBegin(
            **h,
            config={"learning_rate": 3e-4, "output_dir": "out", "fp16": True, "nested": {"a": [1, 2, None]}},
            hparams={"batch_size": 32, "optimizer": "adamw"},
            model_config={"hidden_size": 64, "layers": [1, 2]},
            max_steps=1000,
            num_train_epochs=3,
            resumed_from="out/checkpoint-500",
        ),
        E.TrainEnd(**h, status="failed", error="RuntimeError('x')", best_metric=0.125, best_model_checkpoint="out/c-10"),
        E.EpochBegin(**h),
        E.EpochEnd(**h),
        E.StepBegin(**h),
        E.SubstepEnd(**h),
        E.PreOptimizerStep(**h),
        E.OptimizerStep(**h),
        E.StepEnd(**h),
        E.Evaluate(**h, metrics={"eval_loss": 0.5, "eval_acc": 0.75, "eval_runtime": 1.5, "eval_n": 100}, prefix="val"),
        E.Predict(**h, metrics={"test_loss": 0.25, "test_labels": [1, 0, 1]}, prefix="pred"),
        E.PredictionStep(**h, batch_index=4, num_batches=10, phase="predict"),
        E.Save(**h, checkpoint_dir="out/checkpoint-17", is_best=True),
        E.Log(**h, values={"loss": 1.5, "learning_rate": 1e-5, "note": "warmup", "grad_norm": 3, "flag": False}),
        E.PushBegin(**h, destination="hub/user/model"),
    ]


SAMPLES = _samples()


def test_samples_cover_every_event_type() -> None:
    assert sorted(type(e).__name__ for e in SAMPLES) == sorted(t.__name__ for t in E.EVENT_TYPES)
    assert len(E.EVENT_TYPES) == 16
    assert set(E.EVENT_BY_NAME) == {t.__name__ for t in E.EVENT_TYPES}


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_json_round_trip(event: E.BaseEvent) -> None:
    data = E.encode_json(event)
    back = E.decode_json(data)
    assert type(back) is type(event) and back == event
    assert msgspec.json.decode(data)["type"] == type(event).__name__  # the union's tag
    assert E.decode_json(data.decode()) == event  # str input too


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_msgpack_round_trip(event: E.BaseEvent) -> None:
    back = E.decode_msgpack(E.encode_msgpack(event))
    assert type(back) is type(event) and back == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_events_are_frozen_and_name_their_hook(event: E.BaseEvent) -> None:
    with pytest.raises(AttributeError):
        event.step = 99  # type: ignore[misc]
    assert E.HOOK_EVENTS[event.hook] is type(event)
    assert event.hook.startswith("on_")


def test_hooks_cover_every_event_type_once() -> None:
    assert sorted(t.__name__ for t in E.HOOK_EVENTS.values()) == sorted(t.__name__ for t in E.EVENT_TYPES)
    assert E.HOOK_EVENTS["on_step_end"] is E.StepEnd and E.HOOK_EVENTS["on_log"] is E.Log


def test_header_defaults() -> None:
    ev = E.StepEnd()
    assert ev.run_id == "" and ev.step == 0 and ev.epoch is None and ev.rank == 0
    assert ev.time_ns > 1_600_000_000 * 10**9  # wall clock, set at construction
    assert E.Log().values == {} and E.Log().values is not E.Log().values


def test_decoding_rejects_unknown_types_and_bad_fields() -> None:
    with pytest.raises(msgspec.ValidationError):
        E.decode_json(b'{"type": "NoSuchEvent", "step": 1}')
    with pytest.raises(msgspec.ValidationError):
        E.decode_json(b'{"type": "StepEnd", "step": "one"}')


def test_keyword_only() -> None:
    with pytest.raises(TypeError):
        E.StepEnd("run", 1)  # type: ignore[misc]
