"""``TrainingArguments``: transformers' names and defaults for what this trainer uses,
validated when constructed.

Every check raises :class:`TrainingArgumentsError` (a ``ValueError``) whose message
names the field, the value and how to fix it. Fields keep transformers' names and
meanings, so ``args.eval_strategy == "steps"`` and callbacks written against
transformers' ``TrainingArguments`` read the same attributes here: every field of
transformers' (5.x) exists, with its default, so that a callback reading ``args.bf16``
or ``args.hub_strategy`` in the middle of a run of days does not die of an
``AttributeError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from eventbus.errors import SinkConfigError
from eventbus.redact import redact
from eventbus.registry import normalize_report_to

__all__ = [
    "HubStrategy",
    "IntervalStrategy",
    "OptimizerNames",
    "ParallelMode",
    "SaveStrategy",
    "SchedulerType",
    "TrainingArguments",
    "TrainingArgumentsError",
]

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
    """The learning-rate schedules this trainer implements (transformers' names;
    :mod:`trainer.schedules`)."""

    LINEAR = "linear"
    COSINE = "cosine"
    COSINE_WITH_RESTARTS = "cosine_with_restarts"
    POLYNOMIAL = "polynomial"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    INVERSE_SQRT = "inverse_sqrt"
    REDUCE_ON_PLATEAU = "reduce_lr_on_plateau"
    COSINE_WITH_MIN_LR = "cosine_with_min_lr"
    COSINE_WARMUP_WITH_MIN_LR = "cosine_warmup_with_min_lr"
    WARMUP_STABLE_DECAY = "warmup_stable_decay"


class HubStrategy(_StrEnum):
    """transformers' ``hub_strategy`` values (kept for callbacks that read them:
    nothing is pushed here, see ``push_to_hub``)."""

    END = "end"
    EVERY_SAVE = "every_save"
    CHECKPOINT = "checkpoint"
    ALL_CHECKPOINTS = "all_checkpoints"


class OptimizerNames(_StrEnum):
    """The ``optim`` values this trainer accepts (transformers' names; see
    :mod:`trainer.optimizers`)."""

    ADAMW_TORCH = "adamw_torch"
    ADAMW_TORCH_FUSED = "adamw_torch_fused"
    SGD = "sgd"
    ADAGRAD = "adagrad"
    RMSPROP = "rmsprop"


class ParallelMode(_StrEnum):
    """:attr:`TrainingArguments.parallel_mode`, with transformers' values. It also
    compares equal to transformers' own ``ParallelMode`` members, a plain ``Enum``
    that would otherwise only equal itself, so that the checks transformers'
    callbacks write (``args.parallel_mode == ParallelMode.DISTRIBUTED``, ``!=``,
    ``in [...]``) work on these arguments without importing transformers here."""

    NOT_PARALLEL = "not_parallel"
    NOT_DISTRIBUTED = "not_distributed"
    DISTRIBUTED = "distributed"
    SAGEMAKER_MODEL_PARALLEL = "sagemaker_model_parallel"
    SAGEMAKER_DATA_PARALLEL = "sagemaker_data_parallel"
    TPU = "tpu"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, enum.Enum) and not isinstance(other, str):
            return bool(self.value == other.value)
        return str.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        # str defines __ne__ itself: without this, ``!=`` against transformers'
        # member would fall back to identity and always be True.
        return not self.__eq__(other)

    def __hash__(self) -> int:
        return hash(self.value)


# transformers' ``trainer_log_levels``: ``passive`` (-1) keeps the logger's level.
_LOG_LEVELS: dict[str, int] = {
    "detail": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
    "passive": -1,
}

# What include_for_metrics may name (transformers' names).
_INCLUDABLE = ("inputs", "loss")

_OWN_OPTIMIZER = "pass your own optimizer with Trainer(optimizers=(optimizer, None))"
_OWN_LOADER = "override Trainer.get_train_dataloader()/get_eval_dataloader() to build your own DataLoader"

# transformers' fields whose other values change training there, and which this
# trainer does not implement: (the values accepted, what to do instead). The
# accepted values are transformers' default and its equivalents (``None``/``False``
# for an unset switch). Anything else is refused: a run of days that silently
# trains without the mixed precision or the checkpointing it asked for is worse
# than one that does not start.
_NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "optim_target_modules": ((None,), _OWN_OPTIMIZER),
    "use_liger_kernel": ((False,), "apply Liger's kernels to the model yourself before creating the Trainer"),
    "accelerator_config": ((None,), "this trainer does not use accelerate"),
    "parallelism_config": ((None,), "this trainer does not use accelerate; it trains with DistributedDataParallel "
                           "under torchrun"),
    "dataloader_in_order": ((True,), _OWN_LOADER),
    "train_sampling_strategy": (("random",), "training batches here are drawn in a random order (seeded by "
                                "data_seed); " + _OWN_LOADER),
    "fsdp": ((None, "", [], False), "this trainer trains with DistributedDataParallel (torchrun) only"),
    "deepspeed": ((None,), "this trainer trains with DistributedDataParallel (torchrun) only"),
    "debug": (([],), "this trainer has no debug modes (underflow/overflow detection...); register forward hooks "
              "on the model yourself"),
    "skip_memory_metrics": ((True,), "this trainer adds no memory metrics; log torch.cuda.max_memory_allocated() "
                            "from a callback"),
}


def _accepted(value: Any, accepted: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``accepted``, by type as well as by value (``0``
    is not ``False``, ``1`` is not ``True``)."""
    return any(value is a or (type(value) is type(a) and value == a) for a in accepted)


@dataclass
class TrainingArguments:
    """What the training loop and its callbacks are configured with.

    Names, defaults and meanings follow transformers' ``TrainingArguments``, and every
    field of transformers' exists here with its default, so that a callback written
    for transformers reads what it expects (``args.bf16``, ``args.hub_strategy``...).
    transformers' fields fall in three kinds:

    - those this trainer honours (most of the fields above the event-bus ones);
    - those that carry no behaviour for a trainer (script flags such as ``do_train``,
      ``resume_from_checkpoint``; run metadata such as ``project``, ``hub_*``;
      settings of a feature that is off): accepted, stored and serialised by
      :meth:`to_dict` (so tracking backends log them, as transformers' do), and not
      used by this trainer;
    - those that change training in transformers and that this trainer does not
      implement (optimizers outside torch such as ``adafactor``,
      ``fsdp``, ``deepspeed``...): they hold
      transformers' default, and any other value is refused when the arguments are
      built, with what to do instead, rather than silently ignored.

    Differences, each on purpose:

    - ``restore_callback_states_from_checkpoint`` defaults to ``True``: stateful
      callbacks (early stopping's patience counter...) continue where they were.
    - ``report_to`` defaults to ``"none"`` and is kept as a list of sink names, or
      ``["all"]`` (resolved by the event bus's registry when the trainer starts).
    - ``logging_dir`` defaults to ``<output_dir>/logs``, with a directory per run in
      it (``<time>_<host>_<run id>``; transformers: ``runs/<time>_<host>``).
    - ``warmup_ratio`` is kept (transformers 5 folded it into a fractional
      ``warmup_steps``, which works here too); setting both is an error.
    - ``bus_close_timeout`` and ``bus_flush_interval`` configure the event bus.
    - ``callback_time_warning_share``: the trainer warns once when control callbacks
      take more than this share of the step time.
    - Features this trainer does not have are refused rather than ignored:
      ``push_to_hub=True``, ``save_on_each_node=True`` (checkpoints are written by
      world rank 0), counting input tokens (``include_num_input_tokens_seen``) and
      the third kind above.
    - ``remove_unused_columns``: batches reach the model as the collator makes them,
      whatever its value (transformers' ``False``); drop unused keys in the collator.
    - ``enable_jit_checkpoint``: a checkpoint is saved on SIGTERM/SIGINT whatever its
      value.

    Like transformers', the arguments also say where this process sits (properties,
    read when asked, not serialised): ``process_index``, ``local_process_index``,
    ``world_size`` (from the torchrun environment or the process group, as the
    trainer reads them), ``should_log``, ``should_save``, ``device``, ``n_gpu`` and
    ``parallel_mode``; and they have transformers' ``get_process_log_level()`` and
    ``main_process_first()``.

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
    """Directory for local logs (TensorBoard...). Default ``<output_dir>/logs``, where
    each run writes into a directory of its own, ``<time>_<host>_<run id>`` (as
    transformers' ``runs/<time>_<host>``; a resumed run continues in its own): a
    script run again with the same ``output_dir`` shows as another run. An explicit
    ``logging_dir`` is written to as it is."""
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
    log_level: str = "passive"
    """Accepted for compatibility, not used by this trainer (``debug``, ``info``,
    ``warning``, ``error``, ``critical``, ``detail`` or ``passive``): what
    :meth:`get_process_log_level` returns on the processes that log."""
    log_level_replica: str = "warning"
    """Accepted for compatibility, not used by this trainer: what
    :meth:`get_process_log_level` returns on the other processes."""
    include_num_input_tokens_seen: str | bool = "no"
    """transformers' input-token counting: this trainer does not count input tokens,
    so only ``"no"`` (or ``False``) is accepted; ``state.num_input_tokens_seen`` stays 0."""
    disable_tqdm: bool | None = None
    """Use :class:`~trainer.PrinterCallback` instead of progress bars. Default: bars
    unless the ``trainer`` logger is quieter than WARNING."""
    report_to: None | str | list[str] = "none"
    """Sinks to send events to: ``"none"``, ``"all"`` (every installed and configured
    sink) or sink names (a list or a comma-separated string)."""
    run_name: str | None = None
    """A name for the run, shown by tracking backends."""
    project: str = "huggingface"
    """Accepted for compatibility, not used by this trainer (transformers' Trackio project)."""
    trackio_space_id: str | None = None
    """Accepted for compatibility, not used by this trainer."""
    trackio_bucket_id: str | None = None
    """Accepted for compatibility, not used by this trainer."""
    trackio_static_space_id: str | None | Literal[False] = None
    """Accepted for compatibility, not used by this trainer."""

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
    eval_accumulation_steps: int | None = None
    """Any value works as ``1`` does in transformers: predictions move to the host
    after every evaluation batch here."""
    eval_use_gather_object: bool = False
    """Either value works: in a distributed evaluation each rank's results are
    gathered as Python objects (``all_gather_object``) here."""

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
    enable_jit_checkpoint: bool = False
    """Either value works: on SIGTERM or SIGINT this trainer always finishes the step,
    saves a checkpoint and stops."""

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
    remove_unused_columns: bool = True
    """Either value works as transformers' ``False``: batches reach the model as the
    data collator makes them (drop keys the model does not take in the collator)."""
    length_column_name: str = "length"
    """Accepted for compatibility, not used by this trainer (transformers'
    ``group_by_length`` sampling is not implemented: see ``train_sampling_strategy``)."""

    # -- hub (transformers' names; pushing is not implemented here) --
    push_to_hub: bool = False
    """transformers' push to the Hugging Face Hub: not implemented by this trainer,
    so only ``False`` is accepted."""
    hub_model_id: str | None = None
    """The Hub repository name (kept for callbacks that read it; nothing is pushed)."""
    hub_token: str | None = None
    """Accepted for compatibility, not used by this trainer (redacted in :meth:`to_dict`
    and the repr)."""
    hub_private_repo: bool | None = None
    """Accepted for compatibility, not used by this trainer."""
    hub_strategy: HubStrategy | str = "every_save"
    """Accepted for compatibility, not used by this trainer (a :class:`HubStrategy`)."""
    hub_always_push: bool = False
    """Accepted for compatibility, not used by this trainer."""
    hub_revision: str | None = None
    """Accepted for compatibility, not used by this trainer."""

    # -- script-level flags (transformers' scripts read them; Trainer does not) --
    do_train: bool = False
    """Accepted for compatibility, not used by this trainer."""
    do_eval: bool = False
    """Accepted for compatibility, not used by this trainer."""
    do_predict: bool = False
    """Accepted for compatibility, not used by this trainer."""
    resume_from_checkpoint: str | None = None
    """Accepted for compatibility, not used by this trainer (pass it to
    ``Trainer.train(resume_from_checkpoint=...)``, as with transformers)."""

    # -- transformers' features this trainer does not implement ----------------------
    # They exist so that callbacks can read them; a value other than transformers'
    # default is refused when the arguments are built (see _NOT_IMPLEMENTED for
    # what to do instead). Settings of a feature that is off are accepted.
    lr_scheduler_kwargs: dict[str, Any] | str | None = None
    """Options of the ``lr_scheduler_type`` schedule, as transformers': ``num_cycles``
    (cosine ones), ``lr_end``/``power`` (polynomial), ``timescale`` (inverse_sqrt),
    ``min_lr``/``min_lr_rate`` (the min_lr ones, which need one), ``num_decay_steps``
    (warmup_stable_decay, needed)..., torch's ``ReduceLROnPlateau`` arguments for
    ``reduce_lr_on_plateau``. A JSON object in text is parsed; an option the schedule
    does not take is refused when the trainer is built."""
    optim: OptimizerNames | str = "adamw_torch_fused"
    """The optimizer the trainer creates (an :class:`OptimizerNames`), as
    transformers: ``adamw_torch_fused`` (torch's AdamW with its fused kernel),
    ``adamw_torch`` (its default kernel), ``sgd``, ``adagrad`` or ``rmsprop``; others
    are refused (pass your own with ``Trainer(optimizers=...)``)."""
    optim_args: str | None = None
    """Options of ``sgd``/``adagrad``/``rmsprop`` as ``"key=value,..."``
    (``momentum``, ``nesterov``, ``dampening``, ``lr_decay``, ``alpha``, ``eps``,
    ``centered``); an option the optimizer does not take is refused when the
    trainer is built."""
    optim_target_modules: None | str | list[str] = None
    """Only ``None``."""
    average_tokens_across_devices: bool = True
    """As transformers: when the loss is normalised by the labelled positions of the
    optimizer step (``num_items_in_batch``: a model whose forward takes loss kwargs,
    as transformers' models do, or ``Trainer(compute_loss_func=...)``), count them
    over every rank (one small all-reduce per step, on the device) and scale the loss
    by the number of ranks, so that each position weighs the same wherever it was;
    ``False``: each rank normalises by its own count."""
    label_smoothing_factor: float = 0.0
    """Label smoothing in [0, 1), as transformers: the model is called without
    ``labels`` and the loss (training and evaluation) is computed from its logits
    (``output["logits"]`` or ``output[0]``) with labels -100 ignored, shifted by one
    for transformers' causal language models. Not for multi-label classification."""
    bf16: bool = False
    """Mixed precision in bfloat16: the forward pass (training and evaluation) runs
    under ``torch.autocast``, the weights and optimizer stay float32. Needs a device
    with bfloat16 (the CPU; an Ampere or newer GPU)."""
    fp16: bool = False
    """Mixed precision in float16: ``torch.autocast`` as with ``bf16``, plus a
    ``GradScaler`` (its state saved in checkpoints as ``scaler.pt``). A step whose
    gradients overflow is skipped by the optimizer (on the device with the default
    fused AdamW); the schedule still advances. The model must be float32."""
    bf16_full_eval: bool = False
    """Evaluate in bfloat16, as transformers: an :meth:`~trainer.Trainer.evaluate` or
    ``predict`` called outside :meth:`~trainer.Trainer.train` first casts the model
    to bfloat16 (in place: ``self.model`` stays bfloat16 afterwards). Evaluations
    during training run as training does. Saves memory; metrics may move a little."""
    fp16_full_eval: bool = False
    """As ``bf16_full_eval``, in float16 (which wins when both are set, as in
    transformers)."""
    tf32: bool | None = None
    """TF32 matrix products and convolutions on the GPU (torch's
    ``backends.cuda.matmul.allow_tf32`` and ``backends.cudnn.allow_tf32``, process
    wide), set when the trainer is built, as transformers: ``True`` needs an Ampere or
    newer NVIDIA GPU (refused otherwise), ``False`` turns both off, ``None`` leaves
    torch's settings alone."""
    activation_checkpointing: bool | None = None
    """Recompute activations in backward instead of keeping them (less memory): the
    trainer calls the model's ``activation_checkpointing_enable()`` (transformers'
    models; or its older ``gradient_checkpointing_enable()``) when training starts. A
    model with neither is refused when the trainer is built: checkpoint in its
    forward with ``torch.utils.checkpoint`` instead. ``False`` after construction
    when unset, as transformers."""
    activation_checkpointing_kwargs: dict[str, Any] | str | None = None
    """Passed to the model's ``activation_checkpointing_enable()``: ``every_n_layers``
    and ``offload`` as its own arguments, the rest (``use_reentrant``...) for
    ``torch.utils.checkpoint``. A JSON object in text is parsed."""
    gradient_checkpointing: bool | None = None
    """transformers' deprecated alias of ``activation_checkpointing`` (used when that
    one is unset); mirrors it after construction."""
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = None
    """The deprecated alias of ``activation_checkpointing_kwargs``, as above."""
    torch_compile: bool = False
    """Compile the model the training steps run through with ``torch.compile``
    (checkpoints and evaluation use the model itself). Set by a backend or mode."""
    torch_compile_backend: str | None = None
    """``torch.compile``'s backend; ``"inductor"`` when compiling without one."""
    torch_compile_mode: str | None = None
    """``torch.compile``'s mode (``"reduce-overhead"``, ``"max-autotune"``...)."""
    use_liger_kernel: bool = False
    """Only ``False``."""
    liger_kernel_config: dict[str, bool] | None = None
    """Accepted for compatibility, not used by this trainer (Liger kernels are off)."""
    use_cache: bool = False
    """As transformers: the trainer sets the model's ``config.use_cache`` to this when
    it takes the model (``False``: the outputs hold no key/value cache, which neither
    training nor evaluation reads)."""
    neftune_noise_alpha: float | None = None
    """NEFTune, as transformers: during :meth:`~trainer.Trainer.train` a forward hook
    on the model's input embeddings (``model.get_input_embeddings()``) adds uniform
    noise of magnitude ``alpha / sqrt(sequence length * embedding size)`` to them
    while the model is in training mode; removed when training ends (also when it
    fails). ``None``: off."""
    torch_empty_cache_steps: int | None = None
    """Every this many steps, free the accelerator's cached memory
    (``torch.cuda.empty_cache()``, or the device's own) in the training step, as
    transformers: less fragmentation, slower steps. Nothing to free on the CPU."""
    auto_find_batch_size: bool = False
    """As transformers: when training runs out of memory, start again from the
    beginning with a per-device batch 0.9 times as large, until one fits (the size
    found is saved in the trainer state, and a resume starts from it). Single-process
    runs only."""
    eval_do_concat_batches: bool = True
    """``False``: evaluation keeps the batches' predictions, labels (and inputs and
    losses for ``include_for_metrics``) as lists of per-batch arrays, as
    transformers; ``compute_metrics`` and ``predict()`` get those lists (for
    predictions of varying sequence length that should not be padded together)."""
    include_for_metrics: list[str] = field(default_factory=list)
    """What else ``compute_metrics`` receives, as transformers: ``"inputs"`` (the
    batches' main input, ``model.main_input_name`` or ``input_ids``, as
    ``EvalPrediction.inputs``) and/or ``"loss"`` (``EvalPrediction.losses``: each
    batch's loss once per example of that batch, in the order of the predictions)."""
    batch_eval_metrics: bool = False
    """Call ``compute_metrics`` once per evaluation batch (with that batch's tensors,
    on the device) instead of once on the whole set, as transformers: it must take a
    ``compute_result`` keyword, ``True`` on the last batch, when it returns the
    metrics of the whole evaluation (the other calls' results are dropped). Nothing is
    accumulated for it. Not available in distributed evaluation."""
    save_only_model: bool = False
    """Checkpoints hold the model, the trainer state and the bus's run info only:
    no optimizer, scheduler, loss-scaler or RNG states (smaller, faster to write).
    Such a checkpoint cannot be resumed from (``train(resume_from_checkpoint=...)``
    says so); ``load_best_model_at_end`` works with it."""
    full_determinism: bool = False
    """Seed and switch torch to deterministic algorithms (process-wide, as
    transformers' ``enable_full_determinism``: ``torch.use_deterministic_algorithms``,
    cuDNN deterministic without benchmarking, ``CUBLAS_WORKSPACE_CONFIG``): a run
    repeats exactly on the same hardware, slower; an operation without a
    deterministic implementation then raises."""
    use_cpu: bool = False
    """Train on the CPU even where there is a GPU: the trainer moves the model to the
    CPU (it otherwise trains where the model is), and a distributed run uses gloo."""
    accelerator_config: dict[str, Any] | str | None = None
    """Only ``None``: this trainer does not use accelerate."""
    parallelism_config: Any = None
    """Only ``None``."""
    dataloader_persistent_workers: bool = False
    """With ``dataloader_num_workers > 0``: keep the workers between iterations."""
    dataloader_prefetch_factor: int | None = None
    """With ``dataloader_num_workers > 0``: batches each worker loads ahead."""
    dataloader_multiprocessing_context: str | None = None
    """With ``dataloader_num_workers > 0``: the workers' start method (``"spawn"``...)."""
    dataloader_in_order: bool = True
    """Only ``True``."""
    train_sampling_strategy: str = "random"
    """Only ``random``: training batches are drawn in a seeded random order."""
    ddp_find_unused_parameters: bool | None = None
    """Passed to ``DistributedDataParallel`` (``find_unused_parameters``) when set;
    ``None``: torch's default (``False``)."""
    ddp_bucket_cap_mb: int | None = None
    """``DistributedDataParallel``'s ``bucket_cap_mb`` when set."""
    ddp_broadcast_buffers: bool | None = None
    """``DistributedDataParallel``'s ``broadcast_buffers`` when set."""
    ddp_static_graph: bool | None = None
    """``DistributedDataParallel``'s ``static_graph`` when set."""
    fsdp: str | None = None
    """Only ``None``: this trainer trains with DistributedDataParallel."""
    fsdp_config: dict[str, Any] | str | None = None
    """Accepted for compatibility, not used by this trainer (FSDP is off)."""
    deepspeed: dict[str, Any] | str | None = None
    """Only ``None``."""
    debug: str | list[str] = ""
    """Only ``""`` (``[]`` after construction, as transformers)."""
    skip_memory_metrics: bool = True
    """Only ``True``: no memory metrics are added."""

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
        self._normalise_compat_fields()

        self._check_types()
        self._check_ranges()
        self._check_evaluation_options()
        if self.bf16 and self.fp16:
            raise TrainingArgumentsError("bf16=True and fp16=True: choose one mixed precision (bf16 where the device has it)")
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

        plateau = self.lr_scheduler_type == SchedulerType.REDUCE_ON_PLATEAU
        if plateau and self.eval_strategy == IntervalStrategy.NO:
            raise TrainingArgumentsError(
                'lr_scheduler_type="reduce_lr_on_plateau" lowers the rate when an evaluation metric stops improving, '
                'but eval_strategy="no"; set eval_strategy to "steps" or "epoch"'
            )
        if (self.load_best_model_at_end or plateau) and self.metric_for_best_model is None:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")
        self._check_best_model()

    # -- validation -----------------------------------------------------------------

    def _normalise_compat_fields(self) -> None:
        """transformers' own conversions of the fields this trainer only keeps for
        compatibility, so that they read back as they do there."""
        self.hub_strategy = HubStrategy.parse(self.hub_strategy, "hub_strategy")
        try:
            self.optim = OptimizerNames(self.optim.value if isinstance(self.optim, enum.Enum) else self.optim)
        except ValueError:
            raise TrainingArgumentsError(
                f"optim={redact(self.optim)!r} is not implemented by this trainer; choose one of "
                f"{', '.join(repr(m.value) for m in OptimizerNames)} (default 'adamw_torch_fused'), or {_OWN_OPTIMIZER}"
            ) from None
        if self.debug is None or self.debug == "":
            self.debug = []
        elif isinstance(self.debug, str):
            self.debug = self.debug.split()
        if isinstance(self.resume_from_checkpoint, os.PathLike):
            self.resume_from_checkpoint = os.fspath(self.resume_from_checkpoint)
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs", "lr_scheduler_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip().startswith("{"):  # from a command line, as transformers
                try:
                    setattr(self, name, json.loads(value))
                except ValueError as exc:
                    raise TrainingArgumentsError(f"{name}: not a JSON object ({exc}): {value!r}") from None
        # transformers' deprecated aliases: used when the new name is unset, then mirror it.
        for old, new in (
            ("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
        ):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
            setattr(self, old, getattr(self, new))
        if self.activation_checkpointing is None:
            self.activation_checkpointing = self.gradient_checkpointing = False
        # As transformers: a backend or a mode asks for compiling; inductor by default.
        if (self.torch_compile_backend is not None or self.torch_compile_mode is not None) and not self.torch_compile:
            self.torch_compile = True
        if self.torch_compile is True and self.torch_compile_backend is None:
            self.torch_compile_backend = "inductor"

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
                   "label_smoothing_factor", "warmup_steps", "logging_steps", "save_steps", "eval_delay", "bus_close_timeout",
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
                 "push_to_hub", "prediction_loss_only",
                 # kept for transformers' scripts and callbacks (a callback testing
                 # ``if args.do_eval`` gets a bool)
                 "do_train", "do_eval", "do_predict", "hub_always_push", "remove_unused_columns",
                 "eval_use_gather_object", "enable_jit_checkpoint", "bf16", "fp16", "activation_checkpointing",
                 "torch_compile", "full_determinism", "use_cpu", "bf16_full_eval", "fp16_full_eval",
                 "eval_do_concat_batches", "batch_eval_metrics", "save_only_model", "auto_find_batch_size",
                 "use_cache")
        for name in bools:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise TrainingArgumentsError(f"{name} must be True or False, got {v!r}")
        for name in ("greater_is_better", "hub_private_repo", "tf32"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise TrainingArgumentsError(f"{name} must be True, False or None, got {v!r}")
        for name in ("metric_for_best_model", "run_name", "hub_model_id", "trackio_space_id", "trackio_bucket_id",
                     "hub_revision", "resume_from_checkpoint"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TrainingArgumentsError(f"{name} must be a string or None, got {v!r}")
        v = self.local_rank
        if isinstance(v, bool) or not isinstance(v, int):
            raise TrainingArgumentsError(f"local_rank must be an integer, got {v!r} ({type(v).__name__})")
        v = self.label_names
        if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) and x for x in v)):
            raise TrainingArgumentsError(f"label_names must be a list of batch keys such as ['labels'], or None; got {v!r}")
        self._check_compat_types()
        self._check_unsupported()

    def _check_compat_types(self) -> None:
        """The other fields kept for transformers' scripts and callbacks hold what those
        expect to read."""
        for name in ("project", "length_column_name"):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TrainingArgumentsError(f"{name} must be a string, got {v!r}")
        v = self.hub_token
        if v is not None and not isinstance(v, str):
            # The value itself stays out of the message: it may be a token.
            raise TrainingArgumentsError(f"hub_token must be a string or None, got a value of type {type(v).__name__}")
        for name in ("log_level", "log_level_replica"):
            v = getattr(self, name)
            if v not in _LOG_LEVELS:
                choices = ", ".join(repr(k) for k in _LOG_LEVELS)
                raise TrainingArgumentsError(f"{name}={v!r} is not valid; choose one of {choices}")
        for name in ("eval_accumulation_steps", "torch_empty_cache_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TrainingArgumentsError(f"{name} must be a positive integer or None, got {v!r}")
        for name in ("activation_checkpointing_kwargs", "lr_scheduler_kwargs"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, dict):
                raise TrainingArgumentsError(f"{name} must be a dict (or a JSON object) or None, got {type(v).__name__}")
        for name in ("torch_compile_backend", "torch_compile_mode"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TrainingArgumentsError(f"{name} must be a string or None, got {v!r}")

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
        for name, (accepted, instead) in _NOT_IMPLEMENTED.items():
            v = getattr(self, name)
            if not _accepted(v, accepted):
                raise TrainingArgumentsError(
                    f"{name}={redact(v)!r} is not implemented by this trainer; leave it at its default "
                    f"({accepted[0]!r}): {instead}"
                )

    def _check_evaluation_options(self) -> None:
        include = self.include_for_metrics
        if isinstance(include, str):
            include = [include]
        if not isinstance(include, (list, tuple)) or not all(isinstance(v, str) for v in include):
            raise TrainingArgumentsError(
                f"include_for_metrics must be a list of names among {list(_INCLUDABLE)}, got {include!r}"
            )
        unknown = [v for v in include if v not in _INCLUDABLE]
        if unknown:
            raise TrainingArgumentsError(
                f"include_for_metrics={list(include)!r}: {unknown} not known; it may hold {list(_INCLUDABLE)}"
            )
        self.include_for_metrics = list(include)
        alpha = self.neftune_noise_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf):
            raise TrainingArgumentsError(
                f"neftune_noise_alpha must be a number > 0 (transformers' examples use 5), or None for no noise; got {alpha!r}"
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
        for name in ("adam_beta1", "adam_beta2", "label_smoothing_factor"):
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

    @property
    def parallel_mode(self) -> ParallelMode:
        """``ParallelMode.DISTRIBUTED`` when more than one process trains (torchrun,
        one device each), else ``ParallelMode.NOT_PARALLEL``: this trainer never
        spreads one process over several GPUs (``NOT_DISTRIBUTED``). Compares equal
        to transformers' ``ParallelMode`` members."""
        return ParallelMode.DISTRIBUTED if self.world_size > 1 else ParallelMode.NOT_PARALLEL

    @property
    def ddp_timeout_delta(self) -> datetime.timedelta:
        """``ddp_timeout`` as a ``timedelta``, as transformers'."""
        return datetime.timedelta(seconds=self.ddp_timeout)

    def get_process_log_level(self) -> int:
        """The logging level for this process, as transformers': ``log_level`` on the
        processes that log (:attr:`should_log`), ``log_level_replica`` on the others,
        as ``logging`` ints; ``passive`` is the ``trainer`` logger's current level.
        This trainer does not apply it: a script may, with ``logger.setLevel``."""
        level = _LOG_LEVELS[self.log_level] if self.should_log else _LOG_LEVELS[self.log_level_replica]
        return logger.getEffectiveLevel() if level == -1 else level

    @contextlib.contextmanager
    def main_process_first(self, local: bool = True, desc: str = "work") -> Iterator[None]:
        """Run the block on the main process first, then on the others (a dataset's
        ``map`` that caches its result for the replicas), as transformers': the
        replicas wait in a barrier until the main process has finished the block.
        The main process is the first of each machine with ``local=True``, world
        rank 0 with ``local=False``. In a single process (or without a process
        group to wait on) the block simply runs."""
        from trainer import distributed

        if self.world_size <= 1 or not distributed.is_initialized():
            yield
            return
        is_main = (self.local_process_index if local else self.process_index) == 0
        main = "main local process" if local else "main process"
        try:
            if not is_main:
                logger.debug("%d: waiting for the %s to perform %s", self.process_index, main, desc)
                distributed.barrier()
            yield
        finally:
            if is_main:
                logger.debug("%d: %s completed %s, releasing all replicas", self.process_index, main, desc)
                distributed.barrier()

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

