"""Use the bus from transformers' own ``Trainer``.

:class:`EventBusCallback` is a ``transformers.TrainerCallback`` that publishes every
hook as the matching :mod:`eventbus.events` event, so logging through our sinks is
bounded, non-blocking and spooled while the training loop stays transformers'::

    from transformers import Trainer, TrainingArguments
    from eventbus.bridges.transformers import EventBusCallback

    args = TrainingArguments("out", report_to="none")      # transformers' loggers off
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[EventBusCallback(report_to=["tensorboard", "jsonl"])])
    trainer.train()

Importing this module imports transformers; a missing transformers is a
:class:`~eventbus.errors.MissingDependencyError` naming the ``[transformers]`` extra.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Iterable, Mapping, Sequence

from eventbus.bridges._common import BusHolder, import_framework, safe_config, scalar_params
from eventbus.bus import EventBus
from eventbus.events import (
    BaseEvent,
    EpochBegin,
    EpochEnd,
    Evaluate,
    InitEnd,
    Log,
    OptimizerStep,
    Predict,
    PredictionStep,
    PreOptimizerStep,
    PushBegin,
    Save,
    StepBegin,
    StepEnd,
    SubstepEnd,
    TrainBegin,
    TrainEnd,
)
from eventbus.sink import RunInfo, Sink
from eventbus.stats import BusStats

import_framework("transformers", "transformers")
from transformers import TrainerCallback  # noqa: E402  (after the friendly import check)

try:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError:  # pragma: no cover - moved in some future version
    PREFIX_CHECKPOINT_DIR = "checkpoint"

__all__ = ["EventBusCallback"]


class EventBusCallback(TrainerCallback):  # type: ignore[misc]
    """A ``TrainerCallback`` that publishes every hook to an :class:`~eventbus.EventBus`.

    Give it sinks, ``report_to`` names (resolved through the ``eventbus.sinks``
    registry, as our own trainer does), or a bus you own::

        EventBusCallback([JSONLSink("out/events.jsonl")])
        EventBusCallback(report_to=["tensorboard"], sink_options={"tensorboard": {...}})
        EventBusCallback(bus=my_bus)          # you start/close it yourself

    Set ``report_to="none"`` in ``TrainingArguments`` so transformers' own
    integrations do not log a second time, inline.

    The bus is created and started at ``on_init_end`` (or at the first hook, when the
    callback was added after the ``Trainer`` was built), with a :class:`RunInfo` built
    from ``args`` (``output_dir``, ``logging_dir``, ``run_name``) and ``state``:
    sinks run on world process zero only, unless a sink sets ``all_ranks``.

    At ``on_train_end`` the bus is flushed, not closed: before ``train()`` returns,
    the sinks were handed everything (within ``close_timeout`` seconds; ``last_stats``
    then holds the counters), and they stay open, so that a later
    ``trainer.evaluate()``/``predict()`` lands in the same experiment or run as the
    training (a Comet experiment, a Neptune run), as with transformers' own
    callbacks. The bus is closed (sinks finish: Comet writes its offline archive,
    Neptune stops its run) by :meth:`close`; when the callback is garbage-collected
    (dropped with its ``Trainer``, as a sweep or a notebook building a fresh callback
    per run does); when the callback sees another training run begin (the
    ``on_init_end``/``on_train_begin`` of another ``Trainer``, told apart by its
    ``args`` object and ``args.output_dir``: the next bus is a new run, with its own
    ``run_id``, its ``report_to`` sinks built anew for that trainer's folders); or at
    interpreter exit. In a hyperparameter search each trial's bus is closed at its
    ``on_train_end``, so each trial is an experiment of its own, as transformers does.

    Only events some sink subscribes to are built. ``Log``, ``Evaluate`` and
    ``Predict`` values are copied, so transformers changing its dicts later does not
    change what was published.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] | Sink | None = None,
        *,
        report_to: str | Sequence[str] | None = None,
        bus: EventBus | None = None,
        sink_options: Mapping[str, Mapping[str, Any]] | None = None,
        close_timeout: float = 30.0,
        run_name: str | None = None,
    ) -> None:
        self._holder = BusHolder(
            sinks, report_to=report_to, bus=bus, sink_options=sink_options, close_timeout=close_timeout
        )
        self._run_name = run_name
        self._rank = 0
        self._pred_batches = 0
        # Which trainer the current run is for: its args (a weak reference, or the id
        # of args that cannot be weakly referenced) and output_dir, when the run began.
        self._run_key: tuple[Any, int, Any] | None = None
        self._run_model: Any = None  # the model of that run (a weak reference), when known
        self._trained = False  # that run had a train(): the next one from step 0 is a new run

    # -- public surface --------------------------------------------------------------

    @property
    def bus(self) -> EventBus | None:
        """The bus events go to (``None`` until the first hook ran)."""
        return self._holder.bus

    @property
    def sinks(self) -> list[Sink]:
        """The sinks this callback created the bus with (empty when given a bus)."""
        return list(self._holder.sinks)

    @property
    def last_stats(self) -> BusStats | None:
        """The final stats of the last bus this callback closed."""
        return self._holder.last_stats

    def close(self, timeout: float | None = None) -> BusStats | None:
        """Close the bus now (deliver, close the sinks, within ``timeout`` or
        ``close_timeout``): call it when done with the trainer (after the last
        ``evaluate()``/``predict()``); otherwise dropping the callback (with its
        trainer), the next trainer's run, or interpreter exit does it. A later
        hook opens a fresh bus over the same sinks, for the same run (the Comet sink
        continues its experiment; offline, Neptune starts a new run)."""
        return self._holder.close(timeout)

    def __repr__(self) -> str:
        names = ", ".join(s.name for s in self._holder.sinks)
        return f"<EventBusCallback sinks=[{names}] bus={self._holder.bus!r}>"

    # -- plumbing ----------------------------------------------------------------------

    def _run_info(self, args: Any, state: Any) -> RunInfo:
        self._run_key = _run_key(args)
        process_index = int(getattr(args, "process_index", 0) or 0)
        # transformers decides who logs through is_world_process_zero (SageMaker model
        # parallel differs from process_index == 0): honour it.
        rank = 0 if getattr(state, "is_world_process_zero", True) else max(1, process_index)
        self._rank = rank
        return RunInfo(
            run_name=self._run_name or getattr(args, "run_name", None),
            output_dir=getattr(args, "output_dir", None),
            logging_dir=getattr(args, "logging_dir", None),
            rank=rank,
            world_size=int(getattr(args, "world_size", 1) or 1),
            resumed=False,
        )

    def _check_trainer(self, args: Any, model: Any) -> None:
        """At the start of a training run: if the bus is for another trainer (another
        ``args`` object or ``output_dir``, or another model: notebooks share one
        ``TrainingArguments`` between trainers), close it and forget its run, so that
        this run gets a bus (and a run) of its own. The same trainer (``evaluate()`` or
        a second ``train()``) keeps its bus."""
        key = self._run_key
        if key is not None and not (_same_run(key, args) and _same_model(self._run_model, model)):
            self._end_run()
        if model is not None:
            self._run_model = _weak(model)

    def _end_run(self) -> None:
        """Close the bus and forget the run: the next event starts a new one."""
        self._run_key = None
        self._trained = False
        self._holder.close_run()

    def _bus(self, args: Any, state: Any) -> EventBus:
        holder = self._holder
        bus = holder.bus
        if bus is not None and bus.running:
            return bus
        return holder.ensure(self._run_info(args, state))

    def _header(self, state: Any) -> dict[str, Any]:
        run = self._holder.run
        return {
            "run_id": run.run_id if run is not None else "",
            "step": int(state.global_step),
            "epoch": state.epoch,
            "rank": self._rank,
        }

    def _emit(self, event_type: type[BaseEvent], args: Any, state: Any, **fields: Any) -> None:
        bus = self._bus(args, state)
        if event_type in self._holder.wanted:
            bus.publish(event_type(**self._header(state), **fields))

    def _simple(self, event_type: type[BaseEvent], args: Any, state: Any) -> None:
        # The per-step path: a set lookup, then (only when subscribed) one event.
        holder = self._holder
        if event_type not in holder.wanted:
            # Still make sure the bus exists: a callback added after the Trainer was
            # built gets no on_init_end.
            if holder.bus is None:
                self._bus(args, state)
            return
        self._emit(event_type, args, state)

    # -- hooks ---------------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Start the bus (closing the one of a previous trainer); publish
        :class:`InitEnd`."""
        self._check_trainer(args, kwargs.get("model"))
        self._simple(InitEnd, args, state)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """(Re)start the bus; publish :class:`TrainBegin` with the redacted arguments,
        hyperparameters and the model's config."""
        self._check_trainer(args, model)
        if self._trained and not int(getattr(state, "global_step", 0) or 0):
            # The same trainer's train() again, from step 0 (a resume has loaded its
            # checkpoint's step by now): a run of its own, as transformers'
            # integrations start one per train() (a new MLflow run, jsonl file).
            self._end_run()
        self._trained = True
        bus = self._bus(args, state)
        if TrainBegin not in self._holder.wanted:
            return
        config = safe_config(args.to_dict()) if hasattr(args, "to_dict") else {}
        hparams = scalar_params(args.to_sanitized_dict()) if hasattr(args, "to_sanitized_dict") else {}
        model_config: dict[str, Any] = {}
        cfg = getattr(model, "config", None)
        if cfg is not None:
            raw = cfg.to_dict() if hasattr(cfg, "to_dict") else (cfg if isinstance(cfg, Mapping) else None)
            if raw is not None:
                model_config = safe_config(raw)
        bus.publish(
            TrainBegin(
                **self._header(state),
                config=config,
                hparams=hparams,
                model_config=model_config,
                max_steps=int(getattr(state, "max_steps", 0) or 0),
                num_train_epochs=int(getattr(state, "num_train_epochs", 0) or 0),
                resumed_from=_resumed_from(args, state),
            )
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`TrainEnd`, then flush the bus within ``close_timeout``
        (closed instead in a hyperparameter search: one experiment per trial)."""
        if TrainEnd in self._holder.wanted or self._holder.bus is None:
            max_steps = int(getattr(state, "max_steps", 0) or 0)
            stopped = max_steps > 0 and state.global_step < max_steps
            best = state.best_metric
            self._emit(
                TrainEnd,
                args,
                state,
                status="stopped" if stopped else "completed",
                best_metric=float(best) if isinstance(best, (int, float)) else None,
                best_model_checkpoint=state.best_model_checkpoint,
            )
        if getattr(state, "is_hyper_param_search", False):
            # The next trial is a run of its own (its own run id: a Comet sink makes a
            # new experiment for it rather than continuing this one).
            self._end_run()
        else:
            # Not closed: an evaluate()/predict() after train() must reach the same
            # Comet experiment / Neptune run. A sink closed and reopened starts a new
            # one (its experiment object lived in its isolated child, which a close
            # stops), and Neptune cannot continue an offline run once stopped.
            self._holder.flush()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`EpochBegin`."""
        self._simple(EpochBegin, args, state)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`EpochEnd`."""
        self._simple(EpochEnd, args, state)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`StepBegin`."""
        self._simple(StepBegin, args, state)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`SubstepEnd`."""
        self._simple(SubstepEnd, args, state)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`PreOptimizerStep`."""
        self._simple(PreOptimizerStep, args, state)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`OptimizerStep`."""
        self._simple(OptimizerStep, args, state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`StepEnd`."""
        self._simple(StepEnd, args, state)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        """Publish :class:`Evaluate` with a copy of ``metrics``, its ``prefix`` the
        ``metric_key_prefix`` the evaluation used (``"eval"`` unless told otherwise)."""
        self._pred_batches = 0
        if Evaluate in self._holder.wanted or self._holder.bus is None:
            metrics = dict(metrics or {})
            prefix = _metric_key_prefix(metrics) or "eval"
            self._emit(Evaluate, args, state, metrics=metrics, prefix=prefix)

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> None:
        """Publish :class:`Predict` with a copy of ``metrics``, its ``prefix`` the
        ``metric_key_prefix`` the prediction used (``"test"`` unless told otherwise)."""
        self._pred_batches = 0
        if Predict in self._holder.wanted or self._holder.bus is None:
            metrics = dict(metrics or {})
            prefix = _metric_key_prefix(metrics) or "test"
            self._emit(Predict, args, state, metrics=metrics, prefix=prefix)

    def on_prediction_step(self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any) -> None:
        """Publish :class:`PredictionStep` (transformers passes no index: counted here)."""
        index = self._pred_batches
        self._pred_batches = index + 1
        if PredictionStep not in self._holder.wanted:
            return
        try:
            num = len(eval_dataloader) if eval_dataloader is not None else None
        except TypeError:  # an iterable dataset has no length
            num = None
        self._emit(PredictionStep, args, state, batch_index=index, num_batches=num, phase="eval")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`Save` with the checkpoint folder transformers just wrote."""
        if Save not in self._holder.wanted and self._holder.bus is not None:
            return
        ckpt = _checkpoint_dir(args, int(state.global_step))
        best = state.best_model_checkpoint
        is_best = best is not None and os.path.abspath(str(best)) == os.path.abspath(ckpt)
        self._emit(Save, args, state, checkpoint_dir=ckpt, is_best=is_best)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Publish :class:`Log` with a copy of ``logs`` (other callbacks may edit it)."""
        if Log in self._holder.wanted or self._holder.bus is None:
            self._emit(Log, args, state, values=dict(logs or {}))

    def on_push_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Publish :class:`PushBegin` with the hub repository as destination."""
        if PushBegin in self._holder.wanted or self._holder.bus is None:
            self._emit(PushBegin, args, state, destination=getattr(args, "hub_model_id", None))


def _resumed_from(args: Any, state: Any) -> str | None:
    """The checkpoint a ``train()`` resumes from, as far as a callback can tell:
    transformers has loaded its state before ``on_train_begin``, so a run that starts
    past step 0 is a resume, of ``<output_dir>/checkpoint-<step>`` by its naming (the
    path is what a callback cannot see; the step is what sinks use: TensorBoard and the
    jsonl reader drop what the interrupted run logged from there on)."""
    step = int(getattr(state, "global_step", 0) or 0)
    return _checkpoint_dir(args, step) if step > 0 else None


def _checkpoint_dir(args: Any, step: int) -> str:
    """Where transformers saves (and names) the checkpoint of ``step``."""
    return os.path.join(str(getattr(args, "output_dir", None) or "."), f"{PREFIX_CHECKPOINT_DIR}-{step}")


def _run_key(args: Any) -> tuple[Any, int, Any]:
    try:
        ref: Any = weakref.ref(args)
    except TypeError:
        ref = None
    return ref, id(args), getattr(args, "output_dir", None)


def _weak(obj: Any) -> Any:
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def _same_model(ref: Any, model: Any) -> bool:
    """Whether ``model`` is the run's (unknown on either side counts as the same)."""
    if ref is None or model is None:
        return True
    return ref() is model


def _same_run(key: tuple[Any, int, Any], args: Any) -> bool:
    ref, ident, output_dir = key
    same_args = ref() is args if ref is not None else ident == id(args)
    return same_args and output_dir == getattr(args, "output_dir", None)


_SPEED = ("_runtime", "_samples_per_second", "_steps_per_second")


def _metric_key_prefix(metrics: Mapping[str, Any]) -> str | None:
    """The ``metric_key_prefix`` of an ``evaluate()``/``predict()`` (transformers
    passes it to no callback). Its ``speed_metrics`` always add ``<prefix>_runtime``,
    ``<prefix>_samples_per_second`` and ``<prefix>_steps_per_second``: the prefix
    those three share (``val``, ``eval_squad``...); else the ``<prefix>_`` every
    other key but ``epoch`` shares; else ``None``."""
    found = {
        k[: -len(_SPEED[0])]
        for k in metrics
        if k.endswith(_SPEED[0]) and all(k[: -len(_SPEED[0])] + s in metrics for s in _SPEED[1:])
    }
    found.discard("")
    if len(found) == 1:
        return found.pop()
    return _common_prefix({k: v for k, v in metrics.items() if k != "epoch"})


def _common_prefix(metrics: Mapping[str, Any]) -> str | None:
    """The ``<prefix>_`` every key shares (``test`` for ``test_loss``...), if any."""
    prefixes = {k.split("_", 1)[0] for k in metrics if "_" in k}
    if len(prefixes) == 1 and all("_" in k for k in metrics):
        return prefixes.pop()
    return None
