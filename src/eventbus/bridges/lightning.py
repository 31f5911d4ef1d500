"""Use the bus from Lightning's ``Trainer``.

Two pieces that share one bus:

- :class:`EventBusLogger`, a Lightning ``Logger``: what ``self.log(...)`` sends to
  loggers becomes :class:`~eventbus.events.Log` events, hyperparameters go into
  :class:`~eventbus.events.TrainBegin`, ``finalize`` publishes
  :class:`~eventbus.events.TrainEnd` and closes the bus within its deadline.
- :class:`EventBusLightningCallback`, a Lightning ``Callback`` for the lifecycle:
  train/epoch/step begin and end, optimizer steps, validation (``Evaluate``), test
  (``Predict``) and checkpoints (``Save``).

::

    import lightning as L
    from eventbus.bridges.lightning import EventBusLogger

    logger = EventBusLogger(report_to=["tensorboard", "jsonl"], save_dir="runs")
    trainer = L.Trainer(logger=logger, callbacks=[logger.callback()])
    trainer.fit(model, data)

Importing this module imports lightning; a missing lightning is a
:class:`~eventbus.errors.MissingDependencyError` naming the ``[lightning]`` extra.

Tensor values are never synchronised here: the callback passes tensors (from
``trainer.callback_metrics``) to the events, which snapshot them asynchronously, and
the bus thread turns them into numbers.
"""

from __future__ import annotations

import os
import uuid
from argparse import Namespace
from typing import Any, Iterable, Mapping, Sequence

from eventbus.bridges._common import BusHolder, import_framework, safe_config, scalar_params
from eventbus.bus import EventBus
from eventbus.events import (
    BaseEvent,
    EpochBegin,
    EpochEnd,
    Evaluate,
    Log,
    OptimizerStep,
    Predict,
    PreOptimizerStep,
    Save,
    StepBegin,
    StepEnd,
    SubstepEnd,
    TrainBegin,
    TrainEnd,
)
from eventbus.sink import RunInfo, Sink
from eventbus.stats import BusStats

import_framework("lightning", "lightning")
from lightning.fabric.utilities.rank_zero import rank_zero_only  # noqa: E402  (after the friendly import check)
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402

__all__ = ["EventBusLogger", "EventBusLightningCallback"]

# Lightning's finalize() statuses -> TrainEnd.status.
_STATUS = {"success": "completed", "finished": "interrupted", "failed": "failed", "aborted": "interrupted"}


def _rank() -> int:
    # Lightning sets this per process before any hook runs.
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def _epoch(value: Any) -> float | None:
    # Only plain numbers: float(tensor) would synchronise the device.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class _Shared:
    """The state a logger and its callback share: one bus, one run, one lifecycle."""

    def __init__(self, holder: BusHolder, *, name: str | None, save_dir: str | None, run_id: str | None) -> None:
        self.holder = holder
        self.name = name
        self.save_dir = save_dir
        self.run_id = run_id or (holder.run.run_id if holder.run is not None else uuid.uuid4().hex[:12])
        self.has_logger = False
        self.has_callback = False
        self.hparams: dict[str, Any] = {}
        self.config: dict[str, Any] = {}
        self.training = False
        self.error: BaseException | None = None
        self.output_dir: str | None = None
        self.log_dir: str | None = None
        """The logger's ``<save_dir>/<name>/<version>``: where the file sinks' logs go."""
        self.world_size = 1
        self.last_step = 0
        """The trainer's global step at the last hook (for events a logger publishes)."""
        self.trainer: Any = None
        """The trainer the callback was set up with (``None`` for a logger alone)."""
        self.eval_step: int | None = None
        """The step the logger received the running validation/test loop's end metrics at."""

    def run_info(self) -> RunInfo:
        out = self.save_dir or self.output_dir or os.getcwd()
        return RunInfo(
            run_id=self.run_id,
            run_name=self.name,
            output_dir=out,
            logging_dir=self.log_dir or self.save_dir,
            rank=_rank(),
            world_size=self.world_size,
        )

    def bus(self) -> EventBus:
        bus = self.holder.bus
        if bus is not None and bus.running:
            return bus
        return self.holder.ensure(self.run_info())

    def wants(self, event_type: type[BaseEvent]) -> bool:
        return event_type in self.holder.wanted

    def header(self, step: int, epoch: float | None) -> dict[str, Any]:
        run = self.holder.run
        return {"run_id": run.run_id if run is not None else self.run_id, "step": int(step), "epoch": epoch, "rank": _rank()}

    def publish(self, event_type: type[BaseEvent], step: int, epoch: float | None, **fields: Any) -> None:
        bus = self.bus()
        if event_type in self.holder.wanted:
            bus.publish(event_type(**self.header(step, epoch), **fields))

    def train_begin(self, step: int, epoch: float | None, **fields: Any) -> None:
        self.training = True
        self.publish(
            TrainBegin, step, epoch, config=dict(self.config), hparams=dict(self.hparams), **fields
        )

    def train_end(self, step: int, epoch: float | None, status: str, error: BaseException | None = None) -> None:
        if not self.training:
            return
        self.training = False
        err = None if error is None else f"{type(error).__name__}: {error}"[:2000]
        self.publish(TrainEnd, step, epoch, status=status, error=err)


def _make_holder(
    sinks: Iterable[Sink] | Sink | None,
    report_to: str | Sequence[str] | None,
    bus: EventBus | None,
    sink_options: Mapping[str, Mapping[str, Any]] | None,
    close_timeout: float,
) -> BusHolder:
    return BusHolder(sinks, report_to=report_to, bus=bus, sink_options=sink_options, close_timeout=close_timeout)


class EventBusLogger(Logger):  # type: ignore[misc]
    """A Lightning ``Logger`` that publishes to an :class:`~eventbus.EventBus`.

    Give it sinks, ``report_to`` names (the ``eventbus.sinks`` registry), or a bus
    you own (``bus=``; then you close it). ``save_dir`` becomes the run's
    ``output_dir`` (where spools and file sinks write; default: the working
    directory) and is what Lightning puts checkpoints under, as with its own loggers;
    the file sinks' logs (TensorBoard) go to :attr:`log_dir`,
    ``<save_dir>/<name>/<version>`` (the version: as given, else the run id).

    - ``log_metrics(metrics, step)`` -> :class:`Log` at ``step`` (Lightning's own
      logging step, the same one its CSV/TensorBoard loggers use); with the callback,
      the end-of-loop validation/test metrics are its :class:`Evaluate`/:class:`Predict`
      instead (not also a training ``Log``).
    - ``log_hyperparams(params)`` -> the ``hparams``/``config`` of
      :class:`TrainBegin` (published at once when no callback shares this bus,
      else by the callback at ``on_train_start``).
    - ``after_save_checkpoint`` -> :class:`Save` with the checkpoint file.
    - ``finalize(status)`` -> :class:`TrainEnd` (if training began), then closes
      the bus within ``close_timeout`` (``last_stats`` holds its final counters). The
      next ``fit``/``test`` opens a fresh bus over the same sinks and run id.

    Add :meth:`callback` to the trainer's callbacks for the lifecycle events.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] | Sink | None = None,
        *,
        report_to: str | Sequence[str] | None = None,
        bus: EventBus | None = None,
        sink_options: Mapping[str, Mapping[str, Any]] | None = None,
        save_dir: str | os.PathLike[str] | None = None,
        name: str = "eventbus",
        version: str | int | None = None,
        close_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        holder = _make_holder(sinks, report_to, bus, sink_options, close_timeout)
        self._shared = _Shared(
            holder,
            name=name,
            save_dir=os.fspath(save_dir) if save_dir is not None else None,
            run_id=None,
        )
        self._shared.has_logger = True
        self._name = name
        self._version = version
        self._callback: EventBusLightningCallback | None = None
        # As Lightning's own loggers: each logger (each version) logs to a directory
        # of its own, so two fits under one save_dir are two TensorBoard runs.
        self._shared.log_dir = self.log_dir

    # -- Lightning's Logger surface -----------------------------------------------------

    @property
    def name(self) -> str:
        """The experiment name (``run_name`` of the run the sinks see)."""
        return self._name

    @property
    def version(self) -> str | int:
        """The version: as given, else the run id."""
        return self._version if self._version is not None else self._shared.run_id

    @property
    def save_dir(self) -> str | None:
        """Where this logger's run writes (``None``: Lightning's default_root_dir)."""
        return self._shared.save_dir

    @property
    def root_dir(self) -> str | None:
        """``<save_dir>/<name>`` (``None`` without a save_dir)."""
        return os.path.join(self._shared.save_dir, self._name) if self._shared.save_dir else None

    @property
    def log_dir(self) -> str | None:
        """``<save_dir>/<name>/<version>`` (``None`` without a save_dir)."""
        root = self.root_dir
        return os.path.join(root, str(self.version)) if root else None

    @property
    def experiment(self) -> EventBus:
        """The :class:`~eventbus.EventBus` events go to.

        Lightning reads this before the callbacks' ``setup``: the bus is created then
        but started at the first event, so that the callback can still give the run
        the trainer's ``default_root_dir``."""
        sh = self._shared
        bus = sh.holder.bus
        if bus is not None and (bus.running or sh.holder.pending):
            return bus
        return sh.holder.prepare(sh.run_info())

    @property
    def bus(self) -> EventBus | None:
        """The bus, or ``None`` before anything was logged."""
        return self._shared.holder.bus

    @property
    def last_stats(self) -> BusStats | None:
        """The final stats of the last bus this logger closed."""
        return self._shared.holder.last_stats

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Publish ``metrics`` as one :class:`Log` event at ``step``.

        With the callback, the metrics Lightning logs at the end of a validation or
        test loop are not a ``Log``: the callback publishes them as
        :class:`Evaluate`/:class:`Predict` at this ``step``."""
        sh = self._shared
        kind = _eval_loop_end(sh.trainer) if sh.has_callback else None
        if kind is not None:
            sh.eval_step = step
            if kind in sh.holder.wanted:
                return
        if step is not None:
            sh.last_step = step
        bus = sh.holder.bus
        if bus is None or not bus.running:
            bus = sh.bus()
        if Log in sh.holder.wanted:
            bus.publish(
                Log(**sh.header(step or 0, _epoch(metrics.get("epoch"))), values=dict(metrics))
            )

    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None, *args: Any, **kwargs: Any) -> None:
        """Keep ``params`` for :class:`TrainBegin` (secrets redacted)."""
        if params is None:
            return
        raw = vars(params) if isinstance(params, Namespace) else dict(params)
        sh = self._shared
        sh.config.update(safe_config(raw))
        sh.hparams.update(scalar_params(raw))
        if not sh.has_callback:
            # No callback will publish TrainBegin at on_train_start: this is the start.
            sh.train_begin(0, None)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Publish :class:`Save` for the file Lightning's ModelCheckpoint just wrote."""
        sh = self._shared
        if not sh.wants(Save) and sh.holder.bus is not None:
            return
        path = getattr(checkpoint_callback, "_last_checkpoint_saved", None) or getattr(
            checkpoint_callback, "last_model_path", ""
        )
        best = getattr(checkpoint_callback, "best_model_path", None)
        step = getattr(checkpoint_callback, "_last_global_step_saved", 0) or 0
        sh.publish(Save, step, None, checkpoint_dir=str(path or ""), is_best=bool(best) and best == path)

    def save(self) -> None:
        """Nothing to do: Lightning calls this after every ``log_metrics``, and
        flushing is the bus's job, off the training thread."""

    def finalize(self, status: str) -> None:
        """Publish :class:`TrainEnd` (when training began) and close the bus."""
        sh = self._shared
        if sh.training:
            trainer_status = _STATUS.get(status, status)
            if sh.error is not None and isinstance(sh.error, KeyboardInterrupt):
                trainer_status = "interrupted"
            sh.train_end(sh.last_step, None, trainer_status, sh.error)
        sh.error = None
        sh.holder.close()

    def callback(self) -> EventBusLightningCallback:
        """The lifecycle :class:`EventBusLightningCallback` publishing to this
        logger's bus (the same one each call)."""
        if self._callback is None:
            self._callback = EventBusLightningCallback(_shared=self._shared)
        return self._callback

    def close(self, timeout: float | None = None) -> BusStats | None:
        """Close the bus now, within ``timeout`` (default ``close_timeout``)."""
        return self._shared.holder.close(timeout)


class EventBusLightningCallback(Callback):  # type: ignore[misc]
    """A Lightning ``Callback`` that publishes the lifecycle to the bus.

    Usually obtained from :meth:`EventBusLogger.callback` (one bus for both). On its
    own it takes the same ``sinks``/``report_to``/``bus`` arguments and closes its bus
    at ``teardown`` (or on an exception).

    - ``on_train_start``/``on_train_end`` -> :class:`TrainBegin`/:class:`TrainEnd`
    - ``on_train_epoch_start``/``_end`` -> :class:`EpochBegin`/:class:`EpochEnd`
    - a train batch starting an optimizer step -> :class:`StepBegin`; a batch that
      stepped -> :class:`OptimizerStep` and :class:`StepEnd` (gradient-accumulation
      batches that did not step -> :class:`SubstepEnd`)
    - ``on_before_optimizer_step`` -> :class:`PreOptimizerStep`
    - ``on_validation_end`` (not the sanity check) -> :class:`Evaluate` with the
      metrics logged during validation, named ``eval_<name>``
    - ``on_test_end`` -> :class:`Predict` with the test metrics, named ``test_<name>``
    - ``on_save_checkpoint`` -> :class:`Save` (only without a logger, which knows the
      file name)

    Events carry ``step=trainer.global_step`` and ``epoch=trainer.current_epoch``,
    but :class:`Evaluate`/:class:`Predict`: the step Lightning logs those metrics at
    (the one its loggers got; ``_batches_that_stepped``), so that TensorBoard's purge
    on a resume from a checkpoint at step S keeps the evaluations at or before S.
    """

    def __init__(
        self,
        sinks: Iterable[Sink] | Sink | None = None,
        *,
        report_to: str | Sequence[str] | None = None,
        bus: EventBus | None = None,
        sink_options: Mapping[str, Mapping[str, Any]] | None = None,
        save_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        close_timeout: float = 30.0,
        eval_prefix: str = "eval",
        test_prefix: str = "test",
        _shared: _Shared | None = None,
    ) -> None:
        super().__init__()
        if _shared is None:
            holder = _make_holder(sinks, report_to, bus, sink_options, close_timeout)
            _shared = _Shared(
                holder, name=name, save_dir=os.fspath(save_dir) if save_dir is not None else None, run_id=None
            )
        elif sinks or report_to or bus is not None:
            raise ValueError("a callback obtained from EventBusLogger.callback() uses the logger's bus and sinks")
        self._shared = _shared
        self._shared.has_callback = True
        self.eval_prefix = eval_prefix
        self.test_prefix = test_prefix
        self._last_step = -1
        self._step_open = False

    @property
    def bus(self) -> EventBus | None:
        """The bus, or ``None`` before the first hook."""
        return self._shared.holder.bus

    @property
    def last_stats(self) -> BusStats | None:
        """The final stats of the last bus closed for this run."""
        return self._shared.holder.last_stats

    # -- helpers -----------------------------------------------------------------------

    def _emit(self, event_type: type[BaseEvent], trainer: Any, step: int | None = None, **fields: Any) -> None:
        sh = self._shared
        sh.last_step = trainer.global_step
        if event_type in sh.holder.wanted or sh.holder.bus is None:
            sh.publish(
                event_type, trainer.global_step if step is None else step, float(trainer.current_epoch), **fields
            )

    def _eval_step(self, trainer: Any) -> int:
        """The step Lightning logged the ending loop's metrics at: the one the logger
        received, else Lightning's logging step (``_batches_that_stepped``)."""
        sh = self._shared
        step, sh.eval_step = sh.eval_step, None
        if step is not None:
            return int(step)
        try:
            return int(trainer.fit_loop.epoch_loop._batches_that_stepped)  # noqa: SLF001
        except Exception:  # Lightning's internals changed
            return int(trainer.global_step)

    def _metrics(self, trainer: Any, prefix: str) -> dict[str, Any]:
        metrics = trainer.callback_metrics
        names = _logged_names(trainer)
        out: dict[str, Any] = {}
        for key, value in metrics.items():
            base = key.split("/dataloader_idx_")[0]
            if base.endswith("_epoch"):
                base = base[: -len("_epoch")]
            if names is not None and key not in names and base not in names:
                continue
            out[key if key.startswith(prefix + "_") else f"{prefix}_{key}"] = value
        return out

    # -- hooks -------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Learn the run's folder and world size before the bus starts."""
        sh = self._shared
        sh.output_dir = str(trainer.default_root_dir)
        sh.world_size = int(getattr(trainer, "world_size", 1) or 1)
        sh.trainer = trainer
        sh.eval_step = None
        run = sh.holder.run
        if sh.holder.pending and run is not None:
            # The logger's bus was created (Lightning asked for its experiment) but
            # its sinks are not open yet: complete what they will be told.
            if not sh.save_dir:
                run.output_dir = sh.output_dir
            run.world_size = sh.world_size
        self._last_step = trainer.global_step
        self._step_open = False

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Publish :class:`TrainBegin` with the hyperparameters and trainer settings."""
        sh = self._shared
        if not sh.hparams:
            hp = getattr(pl_module, "hparams_initial", None)
            if hp:
                sh.hparams.update(scalar_params(dict(hp)))
                sh.config.update(safe_config(dict(hp)))
        sh.config.setdefault("trainer", safe_config(_trainer_settings(trainer)))
        max_steps = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 0
        if not max_steps:
            try:
                est = trainer.estimated_stepping_batches
                max_steps = int(est) if est != float("inf") else 0
            except Exception:  # an iterable dataset without length: unknown
                max_steps = 0
        self._last_step = trainer.global_step
        self._step_open = False
        sh.last_step = trainer.global_step
        sh.train_begin(
            trainer.global_step,
            float(trainer.current_epoch),
            max_steps=max_steps,
            num_train_epochs=int(trainer.max_epochs or 0) if (trainer.max_epochs or 0) > 0 else 0,
            resumed_from=str(trainer.ckpt_path) if trainer.ckpt_path else None,
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Publish :class:`TrainEnd` (``stopped`` when something set ``should_stop``)."""
        self._shared.train_end(
            trainer.global_step, float(trainer.current_epoch), "stopped" if trainer.should_stop else "completed"
        )

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Publish a failed :class:`TrainEnd`; close the bus unless a logger will."""
        sh = self._shared
        sh.error = exception
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        sh.train_end(trainer.global_step, float(trainer.current_epoch), status, exception)
        if not sh.has_logger:
            sh.error = None
            sh.holder.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Close the bus (a logger sharing it closes it in ``finalize`` instead)."""
        if not self._shared.has_logger:
            self._shared.holder.close()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Publish :class:`EpochBegin`."""
        if EpochBegin in self._shared.holder.wanted:
            self._emit(EpochBegin, trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Publish :class:`EpochEnd`."""
        if EpochEnd in self._shared.holder.wanted:
            self._emit(EpochEnd, trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Publish :class:`StepBegin` when this batch opens an optimizer step."""
        if self._step_open:
            return
        self._step_open = True
        if StepBegin in self._shared.holder.wanted:
            self._emit(StepBegin, trainer)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Publish :class:`PreOptimizerStep`."""
        if PreOptimizerStep in self._shared.holder.wanted:
            self._emit(PreOptimizerStep, trainer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Publish :class:`OptimizerStep` + :class:`StepEnd` after a step, else
        :class:`SubstepEnd`."""
        step = trainer.global_step
        wanted = self._shared.holder.wanted
        if step != self._last_step:
            self._last_step = step
            self._step_open = False
            if OptimizerStep in wanted:
                self._emit(OptimizerStep, trainer)
            if StepEnd in wanted:
                self._emit(StepEnd, trainer)
        elif SubstepEnd in wanted:
            self._emit(SubstepEnd, trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Publish :class:`Evaluate` with the validation metrics (tensors, unsynced)."""
        if not trainer.sanity_checking:
            self._emit_loop_end(Evaluate, trainer, self.eval_prefix)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Publish :class:`Predict` with the test metrics (tensors, unsynced)."""
        self._emit_loop_end(Predict, trainer, self.test_prefix)

    def _emit_loop_end(self, event_type: type[BaseEvent], trainer: Any, prefix: str) -> None:
        """The ending validation/test loop's metrics as ``event_type``, at the step
        Lightning logged them at (when some sink wants that event)."""
        if event_type not in self._shared.holder.wanted and self._shared.holder.bus is not None:
            return
        self._emit(event_type, trainer, step=self._eval_step(trainer), metrics=self._metrics(trainer, prefix), prefix=prefix)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Publish :class:`Save` when no logger will (it knows the file's name)."""
        sh = self._shared
        if sh.has_logger or (Save not in sh.holder.wanted and sh.holder.bus is not None):
            return
        ckpt = getattr(trainer, "checkpoint_callback", None)
        where = getattr(ckpt, "dirpath", None) or str(trainer.default_root_dir)
        self._emit(Save, trainer, checkpoint_dir=str(where))


def _eval_loop_end(trainer: Any) -> type[BaseEvent] | None:
    """:class:`Evaluate`/:class:`Predict` when Lightning is logging the end-of-loop
    metrics of a validation/test loop (what the callback publishes as that event), as
    Lightning tells them: the trainer's stage, and no loop iteration running
    (per-batch metrics, logged at the batch index, stay ``Log``); else ``None``."""
    if trainer is None:
        return None
    try:
        kind = Evaluate if trainer.validating else Predict if trainer.testing else None
        if kind is None or getattr(trainer._logger_connector, "_first_loop_iter", None) is not None:  # noqa: SLF001
            return None
        return kind
    except Exception:
        return None


def _logged_names(trainer: Any) -> set[str] | None:
    """The names logged in the loop that is ending (validation or test), or ``None``
    when Lightning's internals changed and we cannot tell (then: every metric)."""
    # Private Lightning API: trainer._results is the running loop's _ResultCollection.
    # callback_metrics mixes in training metrics, which are not evaluation results.
    try:
        results = trainer._results  # noqa: SLF001
        if results is None:
            return None
        return {m.meta.name for m in results.values()}
    except Exception:
        return None


def _trainer_settings(trainer: Any) -> dict[str, Any]:
    """The Trainer settings worth comparing across runs."""
    out: dict[str, Any] = {}
    for attr in (
        "max_epochs",
        "max_steps",
        "accumulate_grad_batches",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "log_every_n_steps",
        "val_check_interval",
        "check_val_every_n_epoch",
        "num_devices",
        "num_nodes",
        "precision",
        "world_size",
    ):
        try:
            out[attr] = getattr(trainer, attr)
        except Exception:  # some are only valid once the trainer is set up
            continue
    return out
