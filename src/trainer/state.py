"""The trainer's inner state and the control flags callbacks steer it with.

:class:`TrainerState` and :class:`TrainerControl` mirror transformers' classes of the
same names field for field, and ``trainer_state.json`` is read and written in
transformers' format both ways. A whole checkpoint directory moves between this
trainer and transformers' (either resumes from the other's) when the model, the
optimizer and the schedule are the same on both sides: the RNG files are in a format
both read, and transformers' ``model.safetensors`` is read in place of
``pytorch_model.bin`` (with the ``safetensors`` package). The optimizer's state
loads only into the same parameter groups: transformers always has two (decayed, not
decayed) where this trainer leaves out an empty one, so a model whose parameters are
all decayed (or none is) does not move. transformers' ``training_args.bin`` is not
read; this trainer's ``run_info.json`` is ignored by transformers. See
:mod:`trainer.checkpoint`.
:class:`ExportableState` is the protocol for objects (callbacks, the control) whose
state goes into a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

__all__ = ["ExportableState", "TrainerControl", "TrainerState", "TrainerStateError", "CallbackStateError"]

logger = logging.getLogger("trainer")


class TrainerStateError(ValueError):
    """``trainer_state.json`` could not be read: the message names the file and what was wrong."""


class CallbackStateError(ValueError):
    """A stateful callback's checkpointed state could not be loaded into it."""


class ExportableState:
    """An object whose state is saved in every checkpoint and restored on resume.

    Implement :meth:`state` returning ``{"args": {...}, "attributes": {...}}``: ``args``
    are the constructor's keyword arguments, ``attributes`` what changes while training
    (plain JSON values only: the state is written to ``trainer_state.json``).
    :meth:`from_state` rebuilds an instance from that, as in transformers.

    Example::

        class CountEvals(TrainerCallback, ExportableState):
            def __init__(self, every: int = 1):
                self.every = every
                self.seen = 0

            def on_evaluate(self, args, state, control, **kwargs):
                self.seen += 1

            def state(self) -> dict:
                return {"args": {"every": self.every}, "attributes": {"seen": self.seen}}
    """

    def state(self) -> dict:
        """This object's state: ``{"args": {...}, "attributes": {...}}``."""
        raise NotImplementedError(f"{type(self).__name__} must implement state() to be saved in checkpoints")

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Any:
        """A new instance built from ``state`` (the output of :meth:`state`)."""
        instance = cls(**state.get("args", {}))
        for k, v in state.get("attributes", {}).items():
            setattr(instance, k, v)
        return instance

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Load ``state`` into this very instance (so it keeps its place in the callback
        list and keeps receiving events). The default rebuilds through
        :meth:`from_state` and adopts the result's attributes; override it for objects
        that hold resources (files, bars) that must survive."""
        load_state_into(self, state)


def load_state_into(obj: Any, state: Mapping[str, Any]) -> None:
    """Load ``state`` into ``obj`` in place, for any ExportableState-like object
    (ours, transformers' or a duck-typed one with ``from_state``)."""
    if not isinstance(state, Mapping):
        raise CallbackStateError(
            f"the checkpointed state of {type(obj).__name__} must be a mapping with 'args' and 'attributes', "
            f"got {type(state).__name__}"
        )
    cls = type(obj)
    try:
        from_state = getattr(cls, "from_state", None)
        if from_state is not None:
            fresh = from_state(state)
        else:
            fresh = cls(**state.get("args", {}))
            for k, v in state.get("attributes", {}).items():
                setattr(fresh, k, v)
    except Exception as exc:
        raise CallbackStateError(
            f"could not restore {cls.__name__} from its checkpointed state {dict(state)!r}: {exc!r}. "
            "Its constructor or from_state() no longer accepts what state() saved; set "
            "TrainingArguments(restore_callback_states_from_checkpoint=False) to start it fresh instead"
        ) from exc
    if hasattr(fresh, "__dict__") and hasattr(obj, "__dict__"):
        obj.__dict__.update(fresh.__dict__)
    else:  # __slots__ classes: copy what the state named
        for k, v in {**state.get("args", {}), **state.get("attributes", {})}.items():
            setattr(obj, k, getattr(fresh, k, v))


def is_exportable(obj: Any) -> bool:
    """True for objects whose state goes into checkpoints: instances of our
    :class:`ExportableState` or of any class named ``ExportableState`` in their MRO
    (transformers' own), so callbacks written for transformers are saved too."""
    if isinstance(obj, ExportableState):
        return True
    return any(k.__name__ == "ExportableState" for k in type(obj).__mro__[1:]) and callable(getattr(obj, "state", None))


@dataclass
class TrainerControl(ExportableState):
    """The switches callbacks flip to steer the training loop (transformers' semantics).

    ``should_training_stop`` stays set once set (reset only when a new training
    starts); ``should_epoch_stop`` is reset at the start of every epoch;
    ``should_save``, ``should_evaluate`` and ``should_log`` at the start of every step,
    and each also after the action it asks for has happened.
    """

    should_training_stop: bool = False
    should_epoch_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def _new_training(self) -> None:
        """Reset for a new training."""
        self.should_training_stop = False

    def _new_epoch(self) -> None:
        """Reset for a new epoch."""
        self.should_epoch_stop = False

    def _new_step(self) -> None:
        """Reset for a new step."""
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False

    def state(self) -> dict:
        """The five flags, in transformers' checkpoint format."""
        return {
            "args": {
                "should_training_stop": self.should_training_stop,
                "should_epoch_stop": self.should_epoch_stop,
                "should_save": self.should_save,
                "should_evaluate": self.should_evaluate,
                "should_log": self.should_log,
            },
            "attributes": {},
        }


@dataclass
class TrainerState:
    """The trainer's inner state, saved with every checkpoint as ``trainer_state.json``
    and handed to every callback.

    One step is one optimizer update: with ``gradient_accumulation_steps=n`` a step
    goes through ``n`` batches. ``epoch`` is fractional (the decimal part is how much
    of the current epoch is done). ``log_history`` holds every log and evaluation;
    ``best_metric``/``best_global_step``/``best_model_checkpoint`` track the best
    model when ``metric_for_best_model`` is set. ``stateful_callbacks`` maps a callback
    class name to its :meth:`ExportableState.state` (a list of states, in callback
    order, when several callbacks share a class), exactly as transformers writes it.
    """

    epoch: float = 0
    global_step: int = 0
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: int = 0
    num_input_tokens_seen: int = 0
    total_flos: float = 0
    log_history: list[dict[str, Any]] = None  # type: ignore[assignment]
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict[str, str | float | int | bool] | None = None
    stateful_callbacks: dict[str, Any] | list[Any] | None = None

    FILE_NAME: ClassVar[str] = "trainer_state.json"
    """The file name transformers and this package use inside a checkpoint."""

    def __post_init__(self) -> None:
        # Keys read from a trainer_state.json written by a newer version: kept (not a
        # dataclass field) so that writing the state back does not lose them.
        self._extra: dict[str, Any] = {}
        if self.log_history is None:
            self.log_history = []
        if self.stateful_callbacks is None:
            self.stateful_callbacks = {}
        elif isinstance(self.stateful_callbacks, dict):
            pass  # already in checkpoint form (loaded from a file)
        else:
            # A list of callbacks, as transformers accepts: store their states.
            states: dict[str, Any] = {}
            for cb in self.stateful_callbacks:
                if not is_exportable(cb):
                    raise TypeError(
                        f"stateful_callbacks must hold ExportableState instances, got {type(cb).__name__}; "
                        "make the callback inherit trainer.ExportableState and implement state()"
                    )
                _add_state(states, type(cb).__name__, cb.state())
            self.stateful_callbacks = states

    # -- JSON -----------------------------------------------------------------------

    def to_json_dict(self) -> dict[str, Any]:
        """The state as the mapping ``trainer_state.json`` holds."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d = json.loads(json.dumps(d, default=_json_default))  # deep copy, tensors resolved
        for k, v in self._extra.items():
            d.setdefault(k, v)
        return d

    def save_to_json(self, json_path: str | os.PathLike[str]) -> None:
        """Write the state to ``json_path`` in transformers' format (sorted keys,
        indent 2, a final newline). The file is replaced atomically, so a crash while
        writing never leaves a truncated checkpoint state behind.

        Tensors found in ``log_history`` are turned into numbers here (a host sync,
        but a checkpoint is not the step path).
        """
        text = json.dumps(self.to_json_dict(), indent=2, sort_keys=True) + "\n"
        path = os.fspath(json_path)
        directory = os.path.dirname(path) or "."
        fd, tmp = tempfile.mkstemp(prefix=".trainer_state.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    @classmethod
    def load_from_json(cls, json_path: str | os.PathLike[str]) -> TrainerState:
        """Read a ``trainer_state.json`` written by this package or by transformers.

        Keys this version does not know (a file from a newer version) are kept for the
        next save and named in one warning. A file that is not valid JSON, or not a
        JSON object, is a :class:`TrainerStateError` naming the file.
        """
        path = os.fspath(json_path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise TrainerStateError(f"no trainer state at {path!r}: the checkpoint is incomplete or the path is wrong") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainerStateError(
                f"{path!r} is not valid JSON ({exc}); the checkpoint is corrupt (was the write interrupted?). "
                "Resume from an earlier checkpoint"
            ) from exc
        if not isinstance(data, dict):
            raise TrainerStateError(f"{path!r} must hold a JSON object, got {type(data).__name__}")
        return cls.from_json_dict(data, source=path)

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any], *, source: str = "trainer state") -> TrainerState:
        """Build a state from the mapping a ``trainer_state.json`` holds (see
        :meth:`load_from_json`)."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        if extra:
            logger.warning(
                "%s has keys this version does not know (written by a newer version?): %s; they are kept "
                "when the state is saved again but otherwise ignored",
                source,
                ", ".join(sorted(extra)),
            )
        sc = kwargs.get("stateful_callbacks")
        if sc is not None and not isinstance(sc, dict):
            raise TrainerStateError(
                f"{source}: 'stateful_callbacks' must be an object mapping callback class names to states, "
                f"got {type(sc).__name__}"
            )
        if kwargs.get("log_history") is not None and not isinstance(kwargs["log_history"], list):
            raise TrainerStateError(f"{source}: 'log_history' must be a list, got {type(kwargs['log_history']).__name__}")
        try:
            state = cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise TrainerStateError(f"{source}: invalid trainer state: {exc}") from exc
        state._extra = extra
        return state

    # -- helpers for the loop -------------------------------------------------------

    def compute_steps(self, args: Any, max_steps: int) -> None:
        """Store the absolute logging/eval/save intervals: a value in (0, 1) in
        ``args`` is a fraction of ``max_steps``, rounded up (as transformers)."""
        for kind in ("logging", "eval", "save"):
            num_steps = getattr(args, f"{kind}_steps")
            if num_steps is not None:
                if num_steps < 1:
                    num_steps = math.ceil(max_steps * num_steps)
                setattr(self, f"{kind}_steps", num_steps)

    def init_training_references(
        self,
        trainer: Any,
        max_steps: int,
        num_train_epochs: int,
        trial: Any = None,
    ) -> None:
        """Store what training starts with (transformers' helper of the same name)."""
        hp_name = getattr(trainer, "hp_name", None)
        trainer_trial = getattr(trainer, "_trial", None)
        if hp_name is not None and trainer_trial is not None:
            self.trial_name = hp_name(trainer_trial)
        self.trial_params = None
        if isinstance(trial, dict):
            self.trial_params = dict(trial)
        self.max_steps = max_steps
        self.num_train_epochs = num_train_epochs
        for name in ("is_local_process_zero", "is_world_process_zero"):
            value = getattr(trainer, name, None)
            if callable(value):
                setattr(self, name, bool(value()))


def _add_state(states: dict[str, Any], name: str, state: Any) -> None:
    """Add one callback's state in transformers' format: a second callback of the same
    class turns the entry into a list of states, in callback order."""
    if name in states:
        if not isinstance(states[name], list):
            states[name] = [states[name]]
        states[name].append(state)
    else:
        states[name] = state


def _json_default(value: Any) -> Any:
    # Tensors and numpy scalars in log_history (the loop keeps losses as tensors on the
    # step path): resolve them now, at checkpoint time.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()  # a 0-d tensor or numpy scalar gives a plain number
    raise TypeError(
        f"TrainerState holds a value of type {type(value).__name__} that cannot be written to JSON: {value!r}; "
        "store numbers, strings, lists or dicts in log_history and callback states"
    )
