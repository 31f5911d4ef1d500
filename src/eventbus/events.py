"""Typed lifecycle events: one frozen ``msgspec.Struct`` per training hook.

Every event carries the same small header (``run_id``, ``step``, ``epoch``,
``time_ns``, ``rank``) and a snapshot of what its consumers need, never a live
model, optimizer or ``TrainerState``. Because they are msgspec Structs, the same
objects encode to JSON lines, to msgpack for the disk spool and across processes,
and decode back to the same type through the tagged union :data:`Event`.

Values in ``Log.values``, ``Evaluate.metrics`` and ``Predict.metrics`` may be Python
numbers, strings or torch tensors. Tensors are snapshotted when the event is built
(an asynchronous copy, never a device sync) and turned into Python numbers by the bus
thread, so a tensor the training loop later modifies in place does not change what
was published.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Iterable, Union

import msgspec

from eventbus import values as _values
from eventbus.redact import redact, redact_str

__all__ = [
    "BaseEvent",
    "Event",
    "EVENT_TYPES",
    "EVENT_BY_NAME",
    "HOOK_EVENTS",
    "InitEnd",
    "TrainBegin",
    "TrainEnd",
    "EpochBegin",
    "EpochEnd",
    "StepBegin",
    "SubstepEnd",
    "PreOptimizerStep",
    "OptimizerStep",
    "StepEnd",
    "Evaluate",
    "Predict",
    "PredictionStep",
    "Save",
    "Log",
    "PushBegin",
    "encode_json",
    "encode_json_lines",
    "decode_json",
    "encode_msgpack",
    "decode_msgpack",
]


class BaseEvent(msgspec.Struct, frozen=True, kw_only=True, tag=True, omit_defaults=False):
    """The header every event carries.

    ``step`` is the global optimizer step, ``epoch`` the fractional epoch (as
    transformers' ``TrainerState.epoch``), ``time_ns`` wall-clock nanoseconds when the
    event was built, ``rank`` the world rank of the process that published it.
    """

    run_id: str = ""
    step: int = 0
    epoch: float | None = None
    time_ns: int = msgspec.field(default_factory=time.time_ns)
    rank: int = 0

    @property
    def hook(self) -> str:
        """The name of the callback hook this event mirrors, e.g. ``"on_step_end"``."""
        return _HOOK_BY_TYPE[type(self)]


class _ValuesEvent(BaseEvent, frozen=True, kw_only=True):
    """Events whose payload mapping may hold tensors: snapshot them at construction."""

    _value_field: ClassVar[str]

    def __post_init__(self) -> None:
        mapping = getattr(self, self._value_field)
        if type(mapping) is not _values.Snapshot:
            # A copy, as it was when published: a loop may reuse one dict for every
            # step, and what it writes into it afterwards must not reach this event.
            # Tensors are replaced by asynchronous snapshots; the caller's dict and
            # tensors are left as they were.
            snap = _values.snapshot_if_tensors(mapping) if mapping else None
            msgspec.structs.force_setattr(self, self._value_field, snap if snap is not None else _values.Snapshot(mapping))


class InitEnd(BaseEvent, frozen=True, kw_only=True):
    """The trainer finished its ``__init__`` (``on_init_end``)."""


class TrainBegin(BaseEvent, frozen=True, kw_only=True):
    """Training starts (``on_train_begin``).

    ``config`` holds the training arguments, ``hparams`` the hyperparameters worth
    comparing across runs, ``model_config`` the model's own configuration when it has
    one: each a copy with the values of secret-named keys (:func:`eventbus.redact.is_secret_key`)
    replaced by ``"***"`` when the event is built, however it is published, so that no
    sink, spool or file ever gets them.
    """

    config: dict[str, Any] = msgspec.field(default_factory=dict)
    hparams: dict[str, Any] = msgspec.field(default_factory=dict)
    model_config: dict[str, Any] = msgspec.field(default_factory=dict)
    max_steps: int = 0
    num_train_epochs: int = 0
    resumed_from: str | None = None

    def __post_init__(self) -> None:
        for name in ("config", "hparams", "model_config"):
            mapping = getattr(self, name)
            if mapping:
                msgspec.structs.force_setattr(self, name, redact(mapping))


class TrainEnd(BaseEvent, frozen=True, kw_only=True):
    """Training ended (``on_train_end``). ``status`` is ``"completed"``,
    ``"stopped"`` (a callback asked to stop), ``"interrupted"`` or ``"failed"``.
    ``error``: what failed, with the credentials the text shows masked
    (:func:`eventbus.redact.redact_str`: an exception about a presigned or SAS URL
    holds its signature) when the event is built."""

    status: str = "completed"
    error: str | None = None
    best_metric: float | None = None
    best_model_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.error:
            msgspec.structs.force_setattr(self, "error", redact_str(self.error))


class EpochBegin(BaseEvent, frozen=True, kw_only=True):
    """An epoch starts (``on_epoch_begin``)."""


class EpochEnd(BaseEvent, frozen=True, kw_only=True):
    """An epoch ended (``on_epoch_end``)."""


class StepBegin(BaseEvent, frozen=True, kw_only=True):
    """An optimizer step starts (``on_step_begin``)."""


class SubstepEnd(BaseEvent, frozen=True, kw_only=True):
    """A gradient-accumulation micro-step ended (``on_substep_end``)."""


class PreOptimizerStep(BaseEvent, frozen=True, kw_only=True):
    """Gradients are ready, before ``optimizer.step()`` (``on_pre_optimizer_step``)."""


class OptimizerStep(BaseEvent, frozen=True, kw_only=True):
    """Right after ``optimizer.step()`` (``on_optimizer_step``)."""


class StepEnd(BaseEvent, frozen=True, kw_only=True):
    """An optimizer step ended (``on_step_end``)."""


class Evaluate(_ValuesEvent, frozen=True, kw_only=True):
    """An evaluation finished (``on_evaluate``); ``metrics`` keys carry their prefix
    (``eval_loss``)."""

    _value_field: ClassVar[str] = "metrics"

    metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    prefix: str = "eval"


class Predict(_ValuesEvent, frozen=True, kw_only=True):
    """A prediction run finished (``on_predict``); ``metrics`` keys carry their prefix
    (``test_loss``)."""

    _value_field: ClassVar[str] = "metrics"

    metrics: dict[str, Any] = msgspec.field(default_factory=dict)
    prefix: str = "test"


class PredictionStep(BaseEvent, frozen=True, kw_only=True):
    """One evaluation or prediction batch ended (``on_prediction_step``)."""

    batch_index: int = 0
    num_batches: int | None = None
    phase: str = "eval"


class Save(BaseEvent, frozen=True, kw_only=True):
    """A checkpoint was written (``on_save``)."""

    checkpoint_dir: str = ""
    is_best: bool = False


class Log(_ValuesEvent, frozen=True, kw_only=True):
    """Values were logged (``on_log``), e.g. ``{"loss": ..., "learning_rate": ...}``."""

    _value_field: ClassVar[str] = "values"

    values: dict[str, Any] = msgspec.field(default_factory=dict)


class PushBegin(BaseEvent, frozen=True, kw_only=True):
    """A push of the model to a hub starts (``on_push_begin``)."""

    destination: str | None = None


Event = Union[
    InitEnd,
    TrainBegin,
    TrainEnd,
    EpochBegin,
    EpochEnd,
    StepBegin,
    SubstepEnd,
    PreOptimizerStep,
    OptimizerStep,
    StepEnd,
    Evaluate,
    Predict,
    PredictionStep,
    Save,
    Log,
    PushBegin,
]
"""The tagged union of every event type; the tag is the class name."""

EVENT_TYPES: tuple[type[BaseEvent], ...] = Event.__args__  # type: ignore[attr-defined]
EVENT_BY_NAME: dict[str, type[BaseEvent]] = {t.__name__: t for t in EVENT_TYPES}

HOOK_EVENTS: dict[str, type[BaseEvent]] = {
    "on_init_end": InitEnd,
    "on_train_begin": TrainBegin,
    "on_train_end": TrainEnd,
    "on_epoch_begin": EpochBegin,
    "on_epoch_end": EpochEnd,
    "on_step_begin": StepBegin,
    "on_substep_end": SubstepEnd,
    "on_pre_optimizer_step": PreOptimizerStep,
    "on_optimizer_step": OptimizerStep,
    "on_step_end": StepEnd,
    "on_evaluate": Evaluate,
    "on_predict": Predict,
    "on_prediction_step": PredictionStep,
    "on_save": Save,
    "on_log": Log,
    "on_push_begin": PushBegin,
}
"""Callback hook name -> the event type it publishes."""

_HOOK_BY_TYPE = {t: hook for hook, t in HOOK_EVENTS.items()}

_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(Event)
_msgpack_encoder = msgspec.msgpack.Encoder()
def lenient(obj: Any) -> Any:
    """``enc_hook`` for what we write ourselves (the spool, isolated sinks' pipes, JSON
    lines): a numpy scalar or a subclass of ``float``/``int`` goes as the number it
    stands for (a numpy array its list), any other value msgspec cannot encode (an
    object left in a config dict) as its repr, rather than losing the whole batch."""
    n = _values.plain_array(obj)
    return n if n is not obj else repr(obj)


lenient_msgpack_encoder = msgspec.msgpack.Encoder(enc_hook=lenient)
"""See :func:`lenient`; :func:`encode_lenient` also copes with integers msgpack cannot hold."""

_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


def encode_lenient(obj: Any) -> bytes:
    """``obj`` (an event, or a list of them) as msgpack with :data:`lenient_msgpack_encoder`.
    An integer beyond msgpack's 64 bits (``tokens_seen=2**64``), which msgspec refuses
    whatever its ``enc_hook``, is sent as a float (as a sink in this process would log
    it), or as its text when it is too large even for a float, instead of failing the
    whole batch."""
    try:
        return lenient_msgpack_encoder.encode(obj)
    except OverflowError:
        return lenient_msgpack_encoder.encode(_wide_ints(msgspec.to_builtins(obj, enc_hook=lenient)))


def _wide_ints(data: Any) -> Any:
    kind = type(data)
    if kind is dict:
        return {k: _wide_ints(v) for k, v in data.items()}
    if kind is list:
        return [_wide_ints(v) for v in data]
    if kind is int and not _INT_MIN <= data <= _UINT_MAX:
        text = _values.wide_int_text(data)
        return float(data) if text is None else text
    return data
_msgpack_decoder = msgspec.msgpack.Decoder(Event)


def encode_json(event: BaseEvent) -> bytes:
    """Encode a resolved event as one JSON document (no trailing newline)."""
    return _json_encoder.encode(event)


def encode_json_lines(events: Iterable[BaseEvent]) -> bytes:
    """:func:`encode_json` of each event, each followed by a newline, in one call."""
    return _json_encoder.encode_lines(events)


def decode_json(data: bytes | str) -> Event:
    """Decode a JSON document written by :func:`encode_json` back to its event type."""
    return _json_decoder.decode(data)


def encode_msgpack(event: BaseEvent) -> bytes:
    """Encode a resolved event as msgpack (the spool's record format)."""
    return _msgpack_encoder.encode(event)


def decode_msgpack(data: bytes) -> Event:
    """Decode msgpack written by :func:`encode_msgpack` back to its event type."""
    return _msgpack_decoder.decode(data)
