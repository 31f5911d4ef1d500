"""``TrainingArguments``: transformers' names and defaults for what this trainer uses,
validated when constructed.

Every check raises :class:`TrainingArgumentsError` (a ``ValueError``) whose message
names the field, the value and how to fix it. Fields keep transformers' names and
meanings, so ``args.eval_strategy == "steps"`` and callbacks written against
transformers' ``TrainingArguments`` read the same attributes here.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from eventbus.errors import SinkConfigError
from eventbus.redact import redact
from eventbus.registry import normalize_report_to

__all__ = ["IntervalStrategy", "SaveStrategy", "SchedulerType", "TrainingArguments", "TrainingArgumentsError"]

logger = logging.getLogger("trainer")


class TrainingArgumentsError(ValueError):
    """A training argument is invalid; the message names the field and the fix."""


def _sink_names(field: str, value: Any) -> list[str] | None:
    """``None``, ``"all"``, ``"none"``, ``"a,b"`` or a list of sink names -> ``None``,
    ``["all"]``, ``[]`` or the names."""
    if value is None:
        return None
    if value == "none":
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in items):
        raise TrainingArgumentsError(
            f"{field} must be None, 'all', 'none', or a list of sink names such as ['comet_ml', 'neptune'], "
            f"got {value!r}"
        )
    names = list(dict.fromkeys(v.strip() for v in items))
    if ("all" in names or "none" in names) and len(names) > 1:
        raise TrainingArgumentsError(f"{field}: 'all' and 'none' cannot be combined with sink names, got {value!r}")
    return [] if names == ["none"] else names


class _StrEnum(str, enum.Enum):
    """A string enum that compares equal to its value (``IntervalStrategy.STEPS ==
    "steps"``), as transformers' ``ExplicitEnum``."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, value: Any, field_name: str) -> Any:
        """``value`` as a member, or a :class:`TrainingArgumentsError` listing the choices."""
        try:
            return cls(value.value if isinstance(value, enum.Enum) else value)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in cls)
            raise TrainingArgumentsError(f"{field_name}={value!r} is not valid; choose one of {choices}") from None


class IntervalStrategy(_StrEnum):
    """When to log or evaluate: never, every ``*_steps`` steps, or at each epoch end."""

    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"


class SaveStrategy(_StrEnum):
    """When to save a checkpoint: as :class:`IntervalStrategy`, or ``"best"``: whenever
    the evaluation finds a new best ``metric_for_best_model``."""

    NO = "no"
    STEPS = "steps"
    EPOCH = "epoch"
    BEST = "best"


class SchedulerType(_StrEnum):
    """The learning-rate schedules this trainer implements (transformers' names)."""

    LINEAR = "linear"
    COSINE = "cosine"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


@dataclass
class TrainingArguments:
    """What the training loop and its callbacks are configured with.

    Names, defaults and meanings follow transformers' ``TrainingArguments``; only the
    fields this trainer uses exist. Differences, each on purpose:

    - ``restore_callback_states_from_checkpoint`` defaults to ``True``: stateful
      callbacks (early stopping's patience counter...) continue where they were.
    - ``report_to`` defaults to ``"none"`` and is kept as a list of sink names, or
      ``["all"]`` (resolved by the event bus's registry when the trainer starts).
    - ``logging_dir`` defaults to ``<output_dir>/logs``.
    - ``warmup_ratio`` is kept (transformers 5 folded it into a fractional
      ``warmup_steps``, which works here too); setting both is an error.
    - ``bus_close_timeout`` and ``bus_flush_interval`` configure the event bus.
    - ``callback_time_warning_share``: the trainer warns once when control callbacks
      take more than this share of the step time.
    - Features this trainer does not have are refused rather than ignored:
      ``push_to_hub=True``, ``save_on_each_node=True`` (checkpoints are written by
      world rank 0) and counting input tokens (``include_num_input_tokens_seen``).

    Like transformers', the arguments also say where this process sits (properties,
    read when asked, not serialised): ``process_index``, ``local_process_index``,
    ``world_size`` (from the torchrun environment or the process group, as the
    trainer reads them), ``should_log``, ``should_save``, ``device`` and ``n_gpu``.

    Steps (``logging_steps``, ``eval_steps``, ``save_steps``) may be a fraction in
    (0, 1) of the total number of training steps.
    """

    output_dir: str | None = None
    """Where checkpoints and the final model are written. Default ``"trainer_output"``."""

    # -- duration and batches --
    num_train_epochs: float = 3.0
    """Epochs to train for (may be fractional); ignored when ``max_steps > 0``."""
    max_steps: int = -1
    """When positive, the total number of optimizer steps (overrides ``num_train_epochs``)."""
    per_device_train_batch_size: int = 8
    """Training batch size per device."""
    per_device_eval_batch_size: int = 8
    """Evaluation batch size per device."""
    gradient_accumulation_steps: int = 1
    """Batches whose gradients are accumulated before each optimizer step."""

    # -- optimizer and schedule --
    learning_rate: float = 5e-5
    """Initial (peak) learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; 0 or ``None`` disables clipping."""
    lr_scheduler_type: SchedulerType | str = "linear"
    """``linear``, ``cosine``, ``constant`` or ``constant_with_warmup``."""
    warmup_steps: float = 0
    """Linear warmup steps; a value in (0, 1) is a fraction of the total steps."""
    warmup_ratio: float | None = None
    """Warmup as a fraction of the total steps (alternative to ``warmup_steps``)."""

    # -- logging --
    logging_dir: str | None = None
    """Directory for local logs (TensorBoard...). Default ``<output_dir>/logs``."""
    logging_strategy: IntervalStrategy | str = "steps"
    """When to log: ``no``, ``steps`` (every ``logging_steps``) or ``epoch``."""
    logging_steps: float = 500
    """Log every this many steps (or this fraction of the total, if in (0, 1))."""
    logging_first_step: bool = False
    """Also log after the first step."""
    logging_nan_inf_filter: bool = True
    """Leave NaN/inf losses out of the logged running loss (on the device, no sync)."""
    log_on_each_node: bool = True
    """In a multi-node run, whether the first process of every node logs
    (:attr:`should_log`), or only world rank 0."""
    include_num_input_tokens_seen: str | bool = "no"
    """transformers' input-token counting: this trainer does not count input tokens,
    so only ``"no"`` (or ``False``) is accepted; ``state.num_input_tokens_seen`` stays 0."""
    disable_tqdm: bool | None = None
    """Use :class:`~trainer.PrinterCallback` instead of progress bars. Default: bars
    unless the ``trainer`` logger is quieter than WARNING."""
    report_to: str | list[str] | None = "none"
    """Sinks to send events to: ``"none"``, ``"all"`` (every installed and configured
    sink) or sink names (a list or a comma-separated string)."""
    run_name: str | None = None
    """A name for the run, shown by tracking backends."""

    # -- evaluation --
    eval_strategy: IntervalStrategy | str = "no"
    """When to evaluate: ``no``, ``steps`` (every ``eval_steps``) or ``epoch``."""
    eval_steps: float | None = None
    """Evaluate every this many steps; defaults to ``logging_steps``."""
    eval_delay: float = 0
    """Steps (or epochs, with ``eval_strategy="epoch"``) before the first evaluation."""
    eval_on_start: bool = False
    """Run one evaluation before the first training step (a sanity check)."""
    prediction_loss_only: bool = False
    """In evaluation and prediction, return only the loss: no predictions or labels are
    gathered (so ``compute_metrics`` is not called). :meth:`Trainer.evaluate` without
    ``compute_metrics`` gathers none anyway."""

    # -- checkpoints --
    save_strategy: SaveStrategy | str = "steps"
    """When to checkpoint: ``no``, ``steps``, ``epoch`` or ``best``."""
    save_steps: float = 500
    """Checkpoint every this many steps (or this fraction of the total, if in (0, 1))."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (the best one is never deleted); ``None``
    or 0 keeps all."""
    load_best_model_at_end: bool = False
    """Load the best checkpoint when training ends (needs matching eval/save strategies)."""
    metric_for_best_model: str | None = None
    """Evaluation metric that defines "best" (``eval_`` prefix optional); defaults to
    ``"loss"`` with ``load_best_model_at_end``."""
    greater_is_better: bool | None = None
    """Whether a larger metric is better; defaults to ``False`` for metrics ending in
    ``loss``, ``True`` otherwise."""
    save_on_each_node: bool = False
    """transformers' per-node checkpoints: here checkpoints are written by world rank
    0 only (share ``output_dir`` between nodes), so only ``False`` is accepted."""
    restore_callback_states_from_checkpoint: bool = True
    """On resume, load stateful callbacks' states from the checkpoint."""
    ignore_data_skip: bool = False
    """On resume, start from the beginning of the data instead of skipping the batches
    already seen."""

    # -- reproducibility and data --
    seed: int = 42
    """Seed set at the start of training."""
    data_seed: int | None = None
    """Seed of the data sampler; defaults to ``seed``."""
    dataloader_num_workers: int = 0
    """Worker processes for data loading (0: in the main process)."""
    dataloader_drop_last: bool = False
    """Drop the last incomplete training batch."""
    dataloader_pin_memory: bool = True
    """Pin host memory of batches (faster copies to the accelerator)."""
    label_names: list[str] | None = None
    """The keys of a batch that hold the labels; ``None``: ``["labels"]``."""

    # -- hub (transformers' names; pushing is not implemented here) --
    push_to_hub: bool = False
    """transformers' push to the Hugging Face Hub: not implemented by this trainer,
    so only ``False`` is accepted."""
    hub_model_id: str | None = None
    """The Hub repository name (kept for callbacks that read it; nothing is pushed)."""

    # -- distributed (torchrun) --
    ddp_backend: str | None = None
    """torch.distributed backend under torchrun: ``nccl`` or ``gloo``; ``None`` picks
    NCCL when CUDA is available, gloo otherwise."""
    ddp_timeout: float = 1800
    """Seconds a rank waits for the others in a collective before failing (never forever)."""
    local_rank: int = -1
    """transformers' deprecated ``--local_rank`` of ``torch.distributed.launch``, kept for
    argument parsers; as in transformers it is not updated from the environment: read
    :attr:`local_process_index` for this process's rank on its machine."""

    # -- event bus --
    bus_close_timeout: float = 30.0
    """Seconds the event bus gets to deliver what is queued when train/evaluate/predict
    end; what a sink has not received by then is spooled or counted as dropped."""
    bus_flush_interval: float = 0.2
    """Seconds between deliveries from the bus to the sinks' queues (urgent events such
    as ``Evaluate``, ``Save`` and ``TrainEnd`` go at once)."""

    # -- diagnostics --
    callback_time_warning_share: float | None = 0.05
    """Warn (once per trainer) when control callbacks take more than this share of
    the step time, sampled over 10 steps every 1000; ``None`` or ``0`` turns it off."""

    isolate_sinks: list[str] | None = None
    """Which sinks run in a child process each (``eventbus.Sink.isolate``): names
    from ``report_to`` or of sinks passed to the trainer (exactly those), ``"all"``,
    or ``"none"``. A blocking SDK then no longer competes with the training loop for
    the GIL or a core (the child runs at a lower CPU priority); each such sink must
    be picklable. ``None`` (default): each sink's own default, which isolates the
    SDK and HTTP sinks (``tensorboard``, ``mlflow``, ``azure_ml``, ``neptune``,
    ``comet_ml``) on POSIX systems where they can be pickled, and runs the others
    (``jsonl``, ``console``, the progress bar) here."""

    def __post_init__(self) -> None:
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise TrainingArgumentsError(f"output_dir must be a non-empty path, got {self.output_dir!r}")
        self.output_dir = os.path.expanduser(self.output_dir)
        if self.logging_dir is None:
            self.logging_dir = os.path.join(self.output_dir, "logs")
        elif isinstance(self.logging_dir, os.PathLike):
            self.logging_dir = os.fspath(self.logging_dir)
        self.logging_dir = os.path.expanduser(self.logging_dir)
        if self.disable_tqdm is None:
            self.disable_tqdm = logger.getEffectiveLevel() > logging.WARN

        self.logging_strategy = IntervalStrategy.parse(self.logging_strategy, "logging_strategy")
        self.eval_strategy = IntervalStrategy.parse(self.eval_strategy, "eval_strategy")
        self.save_strategy = SaveStrategy.parse(self.save_strategy, "save_strategy")
        self.lr_scheduler_type = SchedulerType.parse(self.lr_scheduler_type, "lr_scheduler_type")

        try:
            self.report_to = normalize_report_to(self.report_to)
        except (SinkConfigError, TypeError) as exc:
            raise TrainingArgumentsError(
                f"report_to={self.report_to!r}: {exc}. Use 'none', 'all', or sink names such as ['jsonl', 'tensorboard']"
            ) from None

        self.isolate_sinks = _sink_names("isolate_sinks", self.isolate_sinks)

        if isinstance(self.include_num_input_tokens_seen, bool):  # as transformers
            self.include_num_input_tokens_seen = "all" if self.include_num_input_tokens_seen else "no"
        if isinstance(self.label_names, tuple):
            self.label_names = list(self.label_names)

        self._check_types()
        self._check_ranges()
        share = self.callback_time_warning_share
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1
        ):
            raise TrainingArgumentsError(
                f"callback_time_warning_share must be a fraction of the step time in [0, 1] (e.g. 0.05), or None "
                f"to turn the warning off; got {share!r}"
            )

        # eval_steps falls back to logging_steps, as transformers.
        if self.eval_strategy == IntervalStrategy.STEPS and not self.eval_steps:
            if self.logging_steps > 0:
                self.eval_steps = self.logging_steps
            else:
                raise TrainingArgumentsError(
                    'eval_strategy="steps" needs eval_steps > 0 (or logging_steps > 0 to default to); '
                    "set eval_steps"
                )
        self._check_steps()

        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        self._check_best_model()

    # -- validation -----------------------------------------------------------------

    def _check_types(self) -> None:
        ints = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "seed", "dataloader_num_workers")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TrainingArgumentsError(f"{name} must be an integer, got {v!r} ({type(v).__name__})")
        for name in ("save_total_limit", "data_seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise TrainingArgumentsError(f"{name} must be an integer or None, got {v!r} ({type(v).__name__})")
        numbers = ("num_train_epochs", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                   "warmup_steps", "logging_steps", "save_steps", "eval_delay", "bus_close_timeout",
                   "bus_flush_interval", "ddp_timeout")
        for name in numbers:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise TrainingArgumentsError(f"{name} must be a number, got {v!r} ({type(v).__name__})")
        for name in ("eval_steps", "warmup_ratio", "max_grad_norm"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
                raise TrainingArgumentsError(f"{name} must be a number or None, got {v!r} ({type(v).__name__})")
        bools = ("logging_first_step", "logging_nan_inf_filter", "disable_tqdm", "eval_on_start",
                 "load_best_model_at_end", "restore_callback_states_from_checkpoint", "ignore_data_skip",
                 "dataloader_drop_last", "dataloader_pin_memory", "log_on_each_node", "save_on_each_node",
                 "push_to_hub", "prediction_loss_only")
        for name in bools:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TrainingArgumentsError(f"{name} must be True or False, got {v!r}")
        for name in ("greater_is_better",):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise TrainingArgumentsError(f"{name} must be True, False or None, got {v!r}")
        for name in ("metric_for_best_model", "run_name", "hub_model_id"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TrainingArgumentsError(f"{name} must be a string or None, got {v!r}")
        v = self.local_rank
        if isinstance(v, bool) or not isinstance(v, int):
            raise TrainingArgumentsError(f"local_rank must be an integer, got {v!r} ({type(v).__name__})")
        v = self.label_names
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and x for x in v)):
            raise TrainingArgumentsError(f"label_names must be a list of batch keys such as ['labels'], or None; got {v!r}")
        self._check_unsupported()

    def _check_unsupported(self) -> None:
        tokens = self.include_num_input_tokens_seen
        if tokens not in ("all", "non_padding", "no"):
            raise TrainingArgumentsError(
                f"include_num_input_tokens_seen must be 'all', 'non_padding', 'no' or a bool, got {tokens!r}"
            )
        if tokens != "no":
            raise TrainingArgumentsError(
                f"include_num_input_tokens_seen={tokens!r}: this trainer does not count input tokens; leave it at "
                "'no' (count them in a callback from the batches if you need them)"
            )
        if self.push_to_hub:
            raise TrainingArgumentsError(
                "push_to_hub=True: this trainer does not push to the Hugging Face Hub; leave it False and upload "
                "output_dir with huggingface_hub (e.g. upload_folder) after training"
            )
        if self.save_on_each_node:
            raise TrainingArgumentsError(
                "save_on_each_node=True: this trainer writes checkpoints on world rank 0 only; leave it False and "
                "use an output_dir that every node can read (a shared filesystem) to resume"
            )

    def _check_ranges(self) -> None:
        def at_least(name: str, low: float, hint: str = "") -> None:
            v = getattr(self, name)
            if v is not None and v < low:
                raise TrainingArgumentsError(f"{name} must be >= {low}, got {v!r}{hint}")

        if self.max_steps < -1:
            raise TrainingArgumentsError(
                f"max_steps must be a positive number of steps, or -1 to train for num_train_epochs; got {self.max_steps}"
            )
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            at_least(name, 1)
        for name in ("num_train_epochs", "learning_rate", "weight_decay", "adam_epsilon", "eval_delay",
                     "dataloader_num_workers", "seed", "save_total_limit"):
            at_least(name, 0)
        at_least("max_grad_norm", 0, " (use 0 or None to disable clipping)")
        at_least("warmup_steps", 0)
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise TrainingArgumentsError(f"{name} must be in [0, 1), got {v!r}")
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio <= 1.0:
                raise TrainingArgumentsError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
            if self.warmup_ratio > 0 and self.warmup_steps > 0:
                raise TrainingArgumentsError(
                    f"warmup_steps={self.warmup_steps!r} and warmup_ratio={self.warmup_ratio!r} are both set; set only "
                    "one (warmup_steps also accepts a fraction in (0, 1))"
                )
        if self.warmup_steps > 1 and self.warmup_steps != int(self.warmup_steps):
            raise TrainingArgumentsError(
                f"warmup_steps must be a whole number of steps or a fraction in (0, 1), got {self.warmup_steps!r}"
            )
        if self.ddp_backend is not None and self.ddp_backend not in ("nccl", "gloo"):
            raise TrainingArgumentsError(
                f"ddp_backend must be 'nccl', 'gloo' or None (pick automatically), got {self.ddp_backend!r}"
            )
        for name in ("bus_close_timeout", "bus_flush_interval", "ddp_timeout"):
            v = getattr(self, name)
            if v <= 0:
                raise TrainingArgumentsError(f"{name} must be > 0 seconds, got {v!r}")

    def _check_steps(self) -> None:
        checks = (
            ("logging_steps", self.logging_strategy == IntervalStrategy.STEPS, 'logging_strategy="steps"',
             'use logging_strategy="no" to turn logging off'),
            ("eval_steps", self.eval_strategy == IntervalStrategy.STEPS, 'eval_strategy="steps"',
             'use eval_strategy="no" to turn evaluation off'),
            ("save_steps", self.save_strategy == SaveStrategy.STEPS, 'save_strategy="steps"',
             'use save_strategy="no" to turn checkpoints off'),
        )
        for name, active, strategy, off in checks:
            v = getattr(self, name)
            if v is None:
                continue
            if v < 0:
                raise TrainingArgumentsError(
                    f"{name} must be a positive number of steps or a fraction in (0, 1), got {v!r}"
                )
            if not active:
                continue
            if v == 0:
                raise TrainingArgumentsError(f"{strategy} needs {name} > 0, got 0; {off}")
            if v > 1:
                if v != int(v):
                    raise TrainingArgumentsError(
                        f"{name} must be a whole number of steps when larger than 1, or a fraction in (0, 1); got {v!r}"
                    )
                setattr(self, name, int(v))

    def _check_best_model(self) -> None:
        if self.save_strategy == SaveStrategy.BEST:
            if self.eval_strategy == IntervalStrategy.NO:
                raise TrainingArgumentsError(
                    'save_strategy="best" saves when an evaluation finds a new best metric, but eval_strategy="no"; '
                    'set eval_strategy to "steps" or "epoch"'
                )
            if self.metric_for_best_model is None:
                raise TrainingArgumentsError(
                    'save_strategy="best" needs metric_for_best_model (e.g. "loss" or "accuracy") to know what is best'
                )
        if not self.load_best_model_at_end:
            return
        if self.eval_strategy == IntervalStrategy.NO:
            raise TrainingArgumentsError(
                'load_best_model_at_end=True needs evaluations, but eval_strategy="no"; set eval_strategy '
                'to "steps" or "epoch" (and save_strategy to match)'
            )
        if self.save_strategy == SaveStrategy.BEST:
            return
        if self.eval_strategy != self.save_strategy:
            raise TrainingArgumentsError(
                "load_best_model_at_end=True needs save_strategy to match eval_strategy (or be \"best\"), but "
                f'eval_strategy="{self.eval_strategy}" and save_strategy="{self.save_strategy}"; set '
                f'save_strategy="{self.eval_strategy}"'
            )
        if self.eval_strategy == IntervalStrategy.STEPS:
            assert self.eval_steps is not None
            save, ev = self.save_steps, self.eval_steps
            if (save < 1) != (ev < 1):
                raise TrainingArgumentsError(
                    "load_best_model_at_end=True needs save_steps to be a multiple of eval_steps, which cannot be "
                    f"guaranteed when one is a fraction and the other a step count (save_steps={save!r}, "
                    f"eval_steps={ev!r}); give both as step counts or both as fractions"
                )
            # Integer arithmetic: 0.2 % 0.1 is not 0 in floating point.
            scale = 1_000_000 if save < 1 else 1
            if round(save * scale) % round(ev * scale) != 0:
                raise TrainingArgumentsError(
                    f"load_best_model_at_end=True needs save_steps to be a multiple of eval_steps, but save_steps="
                    f"{save!r} and eval_steps={ev!r}; set save_steps to a multiple of {ev!r}"
                )

    # -- where this process sits (transformers' properties; read when asked) --------

    @property
    def world_size(self) -> int:
        """The number of processes of the run (``WORLD_SIZE`` under torchrun; 1 alone)."""
        from trainer import distributed

        return distributed.get_info().world_size

    @property
    def process_index(self) -> int:
        """This process's world rank (0 in a single process)."""
        from trainer import distributed

        return distributed.get_info().rank

    @property
    def local_process_index(self) -> int:
        """This process's rank on its machine (``LOCAL_RANK``; 0 in a single process)."""
        from trainer import distributed

        return distributed.get_info().local_rank

    @property
    def should_log(self) -> bool:
        """Whether this process should log: the first process of each node with
        ``log_on_each_node`` (the default), else world rank 0 only."""
        if self.log_on_each_node:
            return self.local_process_index == 0
        return self.process_index == 0

    @property
    def should_save(self) -> bool:
        """Whether this process writes to disk (models, checkpoints): world rank 0,
        the one process this trainer saves on."""
        if self.save_on_each_node:
            return self.local_process_index == 0
        return self.process_index == 0

    @property
    def device(self) -> Any:
        """The ``torch.device`` this process trains on. Once a :class:`~trainer.Trainer`
        uses these arguments, the device of its model (the trainer trains where the
        model is; under torchrun with NCCL it moves it to ``cuda:<LOCAL_RANK>``).
        Before that: ``cuda:<LOCAL_RANK>`` in a torchrun run on NCCL, else
        ``cuda:0`` when CUDA is available, else the CPU (transformers' choice)."""
        known = self.__dict__.get("_trainer_device")
        if known is not None:
            return known
        import torch

        from trainer import distributed

        if distributed.launched_by_torchrun() or distributed.is_initialized():
            return distributed.device_for_rank(self.ddp_backend)
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    @property
    def n_gpu(self) -> int:
        """GPUs used by this process: 1 when :attr:`device` is a CUDA device, else 0
        (this trainer never spreads one process over several GPUs)."""
        return 1 if getattr(self.device, "type", None) == "cuda" else 0

    # -- derived values -------------------------------------------------------------

    @property
    def train_batch_size(self) -> int:
        """The training batch size of one process."""
        return self.per_device_train_batch_size

    @property
    def eval_batch_size(self) -> int:
        """The evaluation batch size of one process."""
        return self.per_device_eval_batch_size

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """The number of warmup steps for a run of ``num_training_steps`` steps."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        if self.warmup_steps > 0:
            return math.ceil(num_training_steps * self.warmup_steps)
        if self.warmup_ratio:
            return math.ceil(num_training_steps * self.warmup_ratio)
        return 0

    # -- serialisation --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON values (enums as their strings), secrets redacted."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            v = getattr(self, f.name)
            if isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, list):
                v = [x.value if isinstance(x, enum.Enum) else x for x in v]
            d[f.name] = v
        return redact(d)

    def to_json_string(self) -> str:
        """:meth:`to_dict` as indented JSON."""
        import json

        return json.dumps(self.to_dict(), indent=2)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` plus the effective batch sizes, every value a bool, int,
        float or str (others as their ``str``): what TensorBoard's hparams accept."""
        d = {**self.to_dict(), "train_batch_size": self.train_batch_size, "eval_batch_size": self.eval_batch_size}
        valid = (bool, int, float, str)
        return {k: v if type(v) in valid else str(v) for k, v in d.items()}

    def __repr__(self) -> str:
        body = "".join(f"{k}={v!r},\n" for k, v in sorted(self.to_dict().items()))
        return f"{type(self).__name__}(\n{body})"

    __str__ = __repr__

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # A @dataclass subclass would get a generated __repr__ showing every field,
        # secrets included; @dataclass keeps a __repr__ the class itself defines.
        super().__init_subclass__(**kwargs)
        if "__repr__" not in cls.__dict__:
            cls.__repr__ = TrainingArguments.__repr__  # type: ignore[method-assign]
            cls.__str__ = TrainingArguments.__repr__  # type: ignore[method-assign]

