"""The training loop: transformers' ``Trainer`` semantics, with every hook published to
an event bus and nothing on the step path that waits for the device.

The loop mirrors transformers' ``_inner_training_loop``/``_run_epoch``/
``_maybe_log_save_evaluate`` hook for hook, so that callbacks written for transformers
see the same sequence of calls. What differs is what happens to values: the running
loss, the logged loss and the gradient norm stay tensors, and reach the ``Log`` event
as tensors; the bus turns them into numbers on its own thread. ``on_log`` callbacks
get plain numbers, as in transformers, unless every one of them takes tensors
(``accepts_tensor_logs``, as the progress bar and the printer do): only then is
nothing read on the training thread (see :meth:`Trainer.log`). The NaN/inf filter is
a ``torch.where`` on the device. Evaluation is the one place where values come to the
host.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from eventbus import EventBus, InitEnd, RunInfo, Sink, TrainEnd, sinks_from_report_to
from eventbus.values import Snapshot, is_tensor, snapshot
from trainer import _marks
from trainer import checkpoint as ckpt
from trainer import distributed
from trainer import neftune, precision, reports
from trainer.label_smoothing import (
    LabelSmoother,
    accepts_loss_kwargs,
    is_causal_lm,
    loss_shifts_labels,
    transformers_model,
)
from trainer.optimizers import optimizer_cls_and_kwargs
from trainer.schedules import get_scheduler
from trainer.arguments import TrainingArguments, TrainingArgumentsError
from trainer._callback_watch import CallbackTimeWatch
from trainer.callbacks import CallbackHandler, TrainerCallback, _read_values
from trainer.flow import DefaultFlowCallback
from trainer.progress import PrinterCallback, ProgressCallback
from trainer.state import TrainerControl, TrainerState

__all__ = [
    "Trainer",
    "EvalPrediction",
    "PredictionOutput",
    "TrainOutput",
    "TrainingInterrupted",
    "LoaderWorkerSignals",
    "default_data_collator",
    "set_seed",
    "get_scheduler",
    "get_decay_parameter_names",
]

logger = logging.getLogger("trainer")

_DECAY_EXCLUDED_NAMES = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


class EvalPrediction:
    """What ``compute_metrics`` receives, as transformers' class of that name: the
    model's predictions (logits, or what ``preprocess_logits_for_metrics`` made of
    them) and the labels, as numpy arrays concatenated over the evaluation set (lists
    of per-batch arrays with ``eval_do_concat_batches=False``; one batch's tensors
    with ``batch_eval_metrics``); ``inputs`` and ``losses`` when
    ``include_for_metrics`` asks for them, else ``None``.

    It unpacks like a tuple of the fields that are set: ``preds, labels = p``, or
    ``preds, labels, inputs = p`` with ``include_for_metrics=["inputs"]``."""

    def __init__(self, predictions: Any, label_ids: Any, inputs: Any = None, losses: Any = None) -> None:
        self.predictions = predictions
        self.label_ids = label_ids
        self.inputs = inputs
        self.losses = losses
        self.elements: tuple[Any, ...] = (predictions, label_ids)
        if inputs is not None:
            self.elements += (inputs,)
        if losses is not None:
            self.elements += (losses,)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.elements)

    def __getitem__(self, idx: int) -> Any:
        if idx < 0 or idx >= len(self.elements):
            raise IndexError("tuple index out of range")
        return self.elements[idx]

    def __len__(self) -> int:
        return len(self.elements)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={_shape_text(getattr(self, k))}" for k in ("predictions", "label_ids", "inputs", "losses"))
        return f"EvalPrediction({fields})"


def _shape_text(value: Any) -> str:
    """A short description of an array (or nested arrays) for a repr: shapes, not values."""
    if value is None:
        return "None"
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<{type(value).__name__} {tuple(shape)}>"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__}[{', '.join(_shape_text(v) for v in value[:3])}{', ...' if len(value) > 3 else ''}]"
    return type(value).__name__


class PredictionOutput(NamedTuple):
    """What :meth:`Trainer.predict` returns (transformers' namedtuple of that name)."""

    predictions: Any
    label_ids: Any
    metrics: dict[str, float] | None


class TrainOutput(NamedTuple):
    """What :meth:`Trainer.train` returns: the last global step, the mean training loss
    of this call and the final metrics."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after finishing the current step and
    saving a checkpoint. ``checkpoint`` is where to resume from (``None`` when no step
    had been taken), ``signum`` the signal received."""

    def __init__(self, message: str, *, signum: int, checkpoint: str | None, global_step: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
        self.global_step = global_step


class LoaderWorkerSignals:
    """The ``worker_init_fn`` of the trainer's DataLoaders with workers: leaves a
    SIGTERM or SIGINT sent to the whole job to the training process.

    A scheduler's SIGTERM (Slurm signals every process of the job, ``kill`` of a
    process group, ``timeout``) and a terminal's Ctrl-C reach the loader's workers as
    well. torch's handler in a worker ends it on any SIGTERM not sent by its parent,
    and the training process then fails mid-step with "DataLoader worker ... killed by
    signal", before the trainer can save its checkpoint. Here a worker ignores SIGINT
    and its first SIGTERM while the training process lives: the trainer, which got the
    same signal, finishes the step, saves and shuts its loaders' workers down. A second
    SIGTERM (torch ending a worker that did not stop when told, then
    ``multiprocessing`` at exit), or one after the training process is gone, ends the
    worker as torch's handler would. The handlers are Python's own, so a program the
    worker starts (a decoder, ``subprocess``) gets the default handling back when it
    runs, with nothing blocked or ignored; any start method works (fork, spawn,
    forkserver).

    A loader you build yourself can pass ``worker_init_fn=LoaderWorkerSignals()``
    (or call an instance from your own ``worker_init_fn``)."""

    def __init__(self) -> None:
        self.parent = os.getpid()
        self._terms = 0

    def __call__(self, worker_id: int) -> None:
        self._terms = 0
        signal.signal(signal.SIGINT, _ignore_signal)
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: Any) -> None:
        self._terms += 1
        if self._terms > 1 or not ckpt.process_alive(self.parent):
            os._exit(0)


def _new_run_id() -> str:
    """A new eventbus run id, rank 0's on every rank."""
    return distributed.broadcast_object(uuid.uuid4().hex[:12])


def _ignore_signal(signum: int, frame: Any) -> None:
    """A handler that does nothing (unlike ``SIG_IGN``, not inherited by a program the
    process starts)."""


class _Interrupt(Exception):
    """Internal: unwinds the loop after an interruption checkpoint was written."""


def set_seed(seed: int) -> None:
    """Seed python's ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def enable_full_determinism(seed: int, warn_only: bool = False) -> None:
    """transformers' function: :func:`set_seed`, then torch's deterministic
    algorithms for the whole process (``torch.use_deterministic_algorithms``, cuDNN
    deterministic and not benchmarking, and the environment CUDA needs for it:
    ``CUBLAS_WORKSPACE_CONFIG``, ``CUDA_LAUNCH_BLOCKING``). ``warn_only``: an
    operation without a deterministic implementation warns instead of raising."""
    set_seed(seed)
    os.environ["CUDA_LAUNCH_BLOCKING"] = "1"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    os.environ["FLASH_ATTENTION_DETERMINISTIC"] = "1"
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _apply_tf32(tf32: bool | None) -> None:
    """``args.tf32`` as transformers applies it: torch's TF32 switches for matrix
    products and cuDNN, on (needs an Ampere or newer GPU) or off; ``None``: as they are."""
    if tf32 is None:
        return
    if tf32:
        capable = torch.cuda.is_available() and torch.version.cuda is not None and torch.cuda.get_device_capability() >= (8, 0)
        if not capable:
            raise TrainingArgumentsError(
                "tf32=True needs an NVIDIA GPU of the Ampere generation or newer (compute capability 8.0), and "
                "none is visible here; leave tf32 unset (or False)"
            )
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def clear_device_cache() -> None:
    """Free the memory torch's allocator keeps cached on the accelerators there are
    (CUDA, XPU, MPS), as transformers' ``torch_empty_cache_steps`` does; nothing to
    do on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        torch.mps.empty_cache()


def default_data_collator(features: Sequence[Any]) -> dict[str, Any]:
    """Stack a list of dict-like examples into a batch of tensors.

    As transformers' ``default_data_collator``: tensors are stacked, numbers become a
    tensor, a ``label``/``label_ids`` key becomes ``labels``; other values (strings)
    are kept as lists.
    """
    if not features:
        raise ValueError("cannot collate an empty list of examples")
    first = features[0]
    if not isinstance(first, Mapping):
        raise TypeError(
            f"the default data collator needs examples that are mappings (e.g. {{'x': ..., 'labels': ...}}), "
            f"got {type(first).__name__}; return dicts from your dataset or pass data_collator=..."
        )
    batch: dict[str, Any] = {}
    for key in first:
        values = [f[key] for f in features]
        name = "labels" if key in ("label", "label_ids") else key
        v0 = values[0]
        if v0 is None:
            continue
        if isinstance(v0, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(v0, np.ndarray):
            batch[name] = torch.from_numpy(np.stack(values))
        elif isinstance(v0, bool) or isinstance(v0, (int, np.integer)):
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif isinstance(v0, (float, np.floating)):
            batch[name] = torch.tensor(values, dtype=torch.float)
        elif isinstance(v0, (list, tuple)) and v0 and isinstance(v0[0], (int, float)):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def get_decay_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters weight decay applies to: all but biases and the
    parameters of normalisation layers (transformers' rule)."""
    import re

    patterns = [re.compile(p) for p in _DECAY_EXCLUDED_NAMES]
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if hasattr(nn, "RMSNorm"):
        norm_types = norm_types + (nn.RMSNorm,)

    def walk(module: nn.Module) -> list[str]:
        result: list[str] = []
        for name, child in module.named_children():
            for n in walk(child):
                full = f"{name}.{n}"
                if not isinstance(child, norm_types) and not any(p.search(full.lower()) for p in patterns):
                    result.append(full)
        result += [k for k in module._parameters if not any(p.search(k.lower()) for p in patterns)]
        return result

    return walk(model)


def get_warmup_steps(args: Any, num_training_steps: int) -> int:
    """``warmup_steps`` when positive (a value below 1 is a fraction of the training
    steps, as in transformers 5), else ``ceil(warmup_ratio * num_training_steps)``."""
    warmup_steps = getattr(args, "warmup_steps", 0) or 0
    if warmup_steps > 0:
        if warmup_steps < 1:
            return math.ceil(num_training_steps * warmup_steps)
        return int(warmup_steps)
    ratio = getattr(args, "warmup_ratio", 0.0) or 0.0
    return math.ceil(num_training_steps * ratio)


def _speed_metrics(prefix: str, start: float, num_samples: int | None = None, num_steps: int | None = None) -> dict:
    runtime = time.time() - start
    out: dict[str, float] = {f"{prefix}_runtime": round(runtime, 4)}
    if runtime > 0:
        if num_samples is not None:
            out[f"{prefix}_samples_per_second"] = round(num_samples / runtime, 3)
        if num_steps is not None:
            out[f"{prefix}_steps_per_second"] = round(num_steps / runtime, 3)
    return out


class _EpochBatches:
    """The batch indices of one epoch: a permutation drawn from a generator seeded
    with ``seed + epoch`` (so every epoch's order is a function of the seed alone, and
    a resumed run sees the same order), cut into batches; the first ``skip`` batches
    (already consumed before the checkpoint) are dropped without loading them.

    Distributed (``world_size`` > 1): every rank draws the same permutation and takes
    its share as ``DistributedSampler`` does (padded to a multiple of the world size,
    then every ``world_size``-th index from ``rank``), so every rank runs the same
    number of steps, the ranks together see the single-process global batch, and the
    epoch (``set_epoch``) and skip logic stay exact per rank on resume."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        drop_last: bool,
        skip: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.shuffle, self.drop_last, self.skip = shuffle, drop_last, skip
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        """Draw the order of ``epoch`` next (``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def _all(self) -> list[list[int]]:
        order = list(range(self.n))
        if self.shuffle:
            # A private generator on the host: the global RNGs are left alone (they
            # drive dropout) and no tensor is involved.
            random.Random(self.seed + self.epoch).shuffle(order)
        if self.world_size > 1:
            order = distributed.shard_indices(order, self.rank, self.world_size, pad=True)
        bs = self.batch_size
        batches = [order[i : i + bs] for i in range(0, len(order), bs)]
        if self.drop_last and batches and len(batches[-1]) < bs:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._all()[self.skip :])

    def __len__(self) -> int:
        n = math.ceil(self.n / self.world_size) if self.world_size > 1 else self.n
        full = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return max(0, full - self.skip)


def _has_length(dataset: Any) -> bool:
    try:
        return len(dataset) is not None
    except (TypeError, NotImplementedError):
        return False


def _is_sized(loader: Any) -> bool:
    """Whether the training loop knows ``loader``'s length (as
    ``_set_initial_training_values`` decides): not an ``IterableDataset``'s."""
    ds = getattr(loader, "dataset", None)
    return _has_length(loader) and not isinstance(ds, torch.utils.data.IterableDataset)


def _fingerprint(batch: Any) -> str | None:
    """A digest of a batch's contents (tensors, arrays, other values by ``repr``), to
    tell whether ranks read the same data; ``None`` when it cannot be taken."""
    import hashlib

    h = hashlib.sha1()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, np.ndarray):
            h.update(f"A{value.dtype}{value.shape}".encode())
            h.update(np.ascontiguousarray(value).tobytes())
        elif isinstance(value, Mapping):
            for k in sorted(value, key=repr):
                h.update(repr(k).encode())
                feed(value[k])
        elif isinstance(value, (list, tuple)):
            h.update(f"L{len(value)}".encode())
            for v in value:
                feed(v)
        else:
            h.update(repr(value).encode())

    try:
        feed(batch)
    except Exception:  # an exotic batch (sparse tensors, ...): no verdict
        return None
    return h.hexdigest()


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True) if value.device != device else value
    if isinstance(value, Mapping):
        return type(value)({k: _to_device(v, device) for k, v in value.items()}) if not isinstance(value, dict) else {
            k: _to_device(v, device) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def _loss_of(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    else:
        loss = getattr(outputs, "loss", None)
    if not isinstance(loss, torch.Tensor):
        keys = list(outputs.keys()) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            f"the model did not return a loss (got {keys}); the model must return a mapping with a 'loss' entry "
            "(or a tuple whose first element is the loss) when the batch holds 'labels'"
        )
    return loss


def _pad_and_concat(arrays: list[torch.Tensor], padding_index: int = -100) -> torch.Tensor:
    if len(arrays) == 1:
        return arrays[0]
    if all(a.dim() <= 1 or a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        return torch.cat([a.reshape(-1) if a.dim() == 0 else a for a in arrays], dim=0)
    # Different sequence lengths: pad dimension 1 on the right, as transformers does.
    width = max(a.shape[1] for a in arrays)
    out = []
    for a in arrays:
        if a.shape[1] < width:
            pad_shape = (a.shape[0], width - a.shape[1]) + tuple(a.shape[2:])
            a = torch.cat([a, a.new_full(pad_shape, padding_index)], dim=1)
        out.append(a)
    return torch.cat(out, dim=0)


def _nested_concat(chunks: list[Any]) -> Any:
    if not chunks:
        return None
    first = chunks[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_nested_concat([c[i] for c in chunks]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _nested_concat([c[k] for c in chunks]) for k in first}
    return _pad_and_concat(chunks)


def _nested_numpy(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return type(value)(_nested_numpy(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _nested_numpy(v) for k, v in value.items()}
    t = value
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _nested_cpu(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_nested_cpu(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _nested_cpu(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def _denumpify(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray) and v.size == 1:
            v = v.item()
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()  # evaluation: values come to the host here, and only here
        out[k] = v
    return out


_SINK_OF_INTEGRATION = {
    "TensorBoardCallback": "tensorboard",
    "MLflowCallback": "mlflow",
    "AzureMLCallback": "azure_ml",
    "NeptuneCallback": "neptune",
    "CometCallback": "comet_ml",
}
"""transformers' integration callback -> the sink ``report_to`` builds here instead."""


class Trainer:
    """A training loop with transformers' ``Trainer`` API and an event bus.

    ``model(**batch)`` must return a mapping (or tuple) whose ``"loss"`` entry (or
    first element) is the loss when the batch holds labels. Control callbacks run
    inline on the training thread with transformers' semantics; every hook is also
    published to ``trainer.bus``, whose sinks (from ``args.report_to`` and ``sinks``)
    consume events on a thread of their own.

    The arguments are transformers' (by keyword) plus ``sinks``: ``model_init`` (a
    function returning a fresh model, called, seeded, when the Trainer is built and
    at the start of every train(), instead of ``model``);
    ``compute_loss_func(outputs, labels, num_items_in_batch=...)`` (the loss from the
    model's outputs, the model called without labels; see :meth:`compute_loss`);
    ``optimizers`` (an optimizer and a schedule to use instead of the ones ``args``
    describe) or ``optimizer_cls_and_kwargs`` (an optimizer class and its options,
    given the parameters in the trainer's weight-decay groups); and
    ``preprocess_logits_for_metrics(logits, labels)`` (each evaluation batch's
    logits, on the device, turned into what ``compute_metrics`` needs).

    Example::

        trainer = Trainer(model, TrainingArguments(output_dir="runs/x", report_to="jsonl"),
                          train_dataset=train, eval_dataset=val, compute_metrics=accuracy)
        trainer.train()
        print(trainer.bus.stats().format_table())
    """

    loss_is_scaled_for_ga: bool | None = None
    """transformers' switch for a ``compute_loss`` of one's own: ``True`` when its
    loss is normalised over the whole optimizer step already, ``False`` when it is a
    batch mean (divided by the accumulation steps); ``None``: decided as transformers
    does (see :meth:`training_step`). Set it on a subclass or an instance."""

    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        data_collator: Callable[[list[Any]], Any] | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        compute_metrics: Callable[[EvalPrediction], Mapping[str, Any]] | None = None,
        callbacks: Sequence[TrainerCallback | type[TrainerCallback]] | None = None,
        sinks: Sequence[Sink] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, Any] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[Any, Any], Any] | None = None,
        compute_loss_func: Callable[..., Any] | None = None,
        model_init: Callable[..., nn.Module] | None = None,
    ) -> None:
        if model is None and model_init is None:
            raise RuntimeError(
                "Trainer needs a model (an nn.Module whose forward returns a loss when given labels) or a model_init "
                "(a function returning a fresh one)"
            )
        if model is not None and model_init is not None:
            raise ValueError("`Trainer` requires either a `model` or `model_init` argument, but not both.")
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        if not isinstance(optimizers, (tuple, list)) or len(optimizers) != 2:
            raise TypeError("optimizers must be a pair (optimizer, lr_scheduler); use (None, None) for the defaults")
        if model_init is not None and (optimizers[0] is not None or optimizers[1] is not None):
            raise RuntimeError(
                "Passing a `model_init` is incompatible with providing the `optimizers` argument: each train() builds "
                "a fresh model. Subclass Trainer and override `create_optimizer_and_scheduler` instead."
            )
        self.args = args
        # Seed before anything random happens, as transformers does in its __init__.
        if getattr(args, "full_determinism", False):
            enable_full_determinism(args.seed)
        else:
            set_seed(args.seed)
        # transformers' model_init: a model built now (seeded, as above) and again,
        # freshly, at the start of every train().
        self.model_init = model_init
        if model is None:
            model = self.call_model_init()
        self.model = model
        self.data_collator = data_collator if data_collator is not None else default_data_collator
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.processing_class = processing_class
        self.compute_metrics = compute_metrics
        # transformers' hook: each evaluation batch's logits (and labels) in, what to
        # keep for compute_metrics out (e.g. the argmax, not the full vocabulary).
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.optimizer, self.lr_scheduler = optimizers
        self.optimizer_cls_and_kwargs = _checked_optimizer_cls_and_kwargs(optimizer_cls_and_kwargs, self.optimizer)
        self._created_lr_scheduler = False
        # The per-device training batch: args.per_device_train_batch_size, or smaller
        # once auto_find_batch_size has run out of memory with it.
        self._train_batch_size: int = args.per_device_train_batch_size
        self.label_names: list[str] = list(getattr(args, "label_names", None) or ["labels"])
        # Under torchrun (WORLD_SIZE > 1) the process group starts here, as in
        # transformers' TrainingArguments, so the rank is known from the start.
        use_cpu = bool(getattr(args, "use_cpu", False))
        distributed.init_process_group(
            timeout=args.ddp_timeout, backend=args.ddp_backend or ("gloo" if use_cpu else None)
        )
        self.dist = distributed.get_info()
        _apply_tf32(getattr(args, "tf32", None))
        # label_smoothing_factor: transformers' smoother on the model's logits, the
        # labels shifted for its causal language models.
        self.label_smoother = self._make_label_smoother()
        # transformers' loss normalisation over an accumulated batch: the number of
        # labelled positions in the optimizer step's micro-batches (num_items_in_batch)
        # is handed to a model that takes loss kwargs, or to compute_loss_func(outputs,
        # labels, num_items_in_batch=...), whose losses are then sums over that count,
        # not divided again by the accumulation steps.
        self.compute_loss_func = compute_loss_func
        self._compute_loss_takes_items = _accepts_keyword(self.compute_loss, "num_items_in_batch")
        self._adopt_model(model)
        self._check_evaluation_options()
        self._check_auto_find_batch_size()
        self._check_optimizer()
        self._check_schedule()
        # fp16's loss scaler (made when training starts; None without fp16).
        self.scaler: torch.amp.GradScaler | None = None
        self._user_sinks: list[Sink] = list(sinks or [])
        for s in self._user_sinks:
            if not isinstance(s, Sink):
                raise TypeError(f"sinks must be eventbus.Sink instances, got {type(s).__name__}: {s!r}")
        # Every rank publishes under rank 0's run id.
        self.run_id = _new_run_id()
        self._resumed = False
        self._resume_marks: dict[str, int] = {}
        self._bus_started = False
        self._trained = False  # train() was called: the next one that is not a resume is a new run
        self._last_checkpoint_dir: str | None = None
        self._initial_global_step = 0
        self.bus: EventBus = self._new_bus()

        default_callbacks: list[Any] = [DefaultFlowCallback]
        all_callbacks = default_callbacks if callbacks is None else default_callbacks + list(callbacks)
        # The bus is attached when it opens (train/evaluate/predict): only then is the
        # run id final (a resume continues the checkpoint's run).
        self.callback_handler = CallbackHandler(
            all_callbacks, self.model, self.processing_class, self.optimizer, self.lr_scheduler, bus=None
        )
        self._init_end_pending = True
        self.add_callback(PrinterCallback if getattr(args, "disable_tqdm", False) else ProgressCallback)
        # Samples the control callbacks' share of the step time now and then; warns once.
        self._callback_watch = CallbackTimeWatch(
            self.callback_handler, getattr(args, "callback_time_warning_share", 0.05)
        )

        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(), is_world_process_zero=self.is_world_process_zero()
        )
        self.control = TrainerControl()
        self.is_in_train = False
        self._signal_received: int | None = None
        self._interrupt_agreed = False
        self._last_saved_step: int | None = None
        self._last_save_whole = True  # the last checkpoint can be resumed from
        self._tr_loss: torch.Tensor | None = None
        self._logs_on_cpu = True  # the training loss lives on the CPU (set when training starts)
        self._total_loss: torch.Tensor | None = None
        self._globalstep_last_logged = 0
        self._history_settled = 0  # state.log_history[:n] holds no tensor...
        self._history_settled_list: list[Any] | None = None  # ...when it is this very list
        self.current_gradient_accumulation_steps = 1
        self._record_device()
        self.control = self.callback_handler.on_init_end(self.args, self.state, self.control)

    def _adopt_model(self, model: nn.Module) -> None:
        """Make ``model`` the trainer's (at build, and for each train() with
        model_init): placed on the run's device, checked against the arguments, and
        what the loss path needs to know of it read."""
        if getattr(self.args, "use_cpu", False):
            model = model.to("cpu")
        elif distributed.is_initialized() and distributed.device_for_rank().type == "cuda":
            # One GPU per rank: the user's script need not know its local rank.
            model = model.to(distributed.device_for_rank())
        self.model = model
        # The DDP wrapper used for training steps (set when training starts);
        # ``self.model`` stays the plain module (checkpoints, evaluation).
        self.model_wrapped: nn.Module = model
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            # As transformers: no key/value cache in the outputs (neither training nor
            # evaluation reads it, and a cache object is no prediction).
            config.use_cache = bool(getattr(self.args, "use_cache", False))
        self._causal_lm = is_causal_lm(model)
        self.model_accepts_loss_kwargs = accepts_loss_kwargs(model)
        self._loss_shifts_labels = loss_shifts_labels(model)
        # (the module compiled, its compiled form) with torch_compile, once built.
        self._compiled: tuple[nn.Module, nn.Module] | None = None
        self._check_precision()
        self._check_activation_checkpointing()
        self._check_neftune()

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """A fresh model from ``model_init`` (called with no argument, or with
        ``trial`` when it takes one), as transformers."""
        import inspect

        assert self.model_init is not None
        try:
            count = len(inspect.signature(self.model_init).parameters)
        except (TypeError, ValueError):
            count = 0
        if count == 0:
            model = self.model_init()
        elif count == 1:
            model = self.model_init(trial)
        else:
            raise RuntimeError("model_init should have 0 or 1 argument.")
        if model is None:
            raise RuntimeError("model_init should not return None.")
        return model

    def _make_label_smoother(self) -> LabelSmoother | None:
        factor = getattr(self.args, "label_smoothing_factor", 0.0) or 0.0
        if not factor:
            return None
        if getattr(getattr(self.model, "config", None), "problem_type", None) == "multi_label_classification":
            logger.warning(
                "label_smoothing_factor=%s does not apply to multi-label classification (config.problem_type); "
                "training without label smoothing, as transformers", factor,
            )
            return None
        return LabelSmoother(epsilon=float(factor))

    def _model_loss(self, model: nn.Module, inputs: Mapping[str, Any], num_items_in_batch: Any = None) -> tuple[torch.Tensor, Any]:
        """(loss, outputs) as transformers' compute_loss makes them: with
        ``compute_loss_func`` or label smoothing the model is called without
        ``labels`` and the loss is computed from its outputs; ``num_items_in_batch``
        goes to a model that takes loss kwargs, to ``compute_loss_func`` and to the
        label smoother."""
        labels = None
        if self._loss_from_outputs(inputs):
            labels = inputs["labels"]
            inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            inputs = {**inputs, "num_items_in_batch": num_items_in_batch}
        outputs = model(**inputs)
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch), outputs
        if labels is not None:
            assert self.label_smoother is not None
            smoother = self.label_smoother
            return smoother(outputs, labels, shift_labels=self._causal_lm, num_items_in_batch=num_items_in_batch), outputs
        loss = _loss_of(outputs)
        return (loss.mean() if loss.dim() > 0 else loss), outputs

    @property
    def _takes_count(self) -> bool:
        """Whether anything takes ``num_items_in_batch``: the model (loss kwargs) or
        ``compute_loss_func``."""
        return self.model_accepts_loss_kwargs or self.compute_loss_func is not None

    def _loss_from_outputs(self, inputs: Mapping[str, Any]) -> bool:
        """Whether the loss is computed from the model's outputs, the model called
        without ``labels`` (``compute_loss_func``, label smoothing)."""
        return (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs

    def _get_num_items_in_batch(
        self, batch_samples: Sequence[Any], device: torch.device, across_ranks: bool = True
    ) -> torch.Tensor | None:
        """The labelled positions (labels other than -100) in an optimizer step's
        micro-batches, summed over the ranks with ``average_tokens_across_devices``,
        as transformers counts them (``labels[..., 1:]`` for a causal language model's
        shifted loss, ``shift_labels`` when the batches carry them): a tensor on the
        labels' device (the batches are moved there first), so counting never waits
        for the device; ``None`` when nothing is counted (no labels, or neither the
        model nor ``compute_loss_func`` takes the count)."""
        if not self._takes_count:
            return None
        first = batch_samples[0] if batch_samples else None
        if not isinstance(first, Mapping) or "labels" not in first:
            return None
        try:
            counted = [
                b["shift_labels"] if "shift_labels" in b else b["labels"][..., 1:] if self._loss_shifts_labels else b["labels"]
                for b in batch_samples
            ]
            total = sum(labels.ne(-100).sum() for labels in counted)
        except (TypeError, AttributeError):  # labels that are not tensors: not counted, as transformers
            return None
        if across_ranks and self._count_across_ranks():
            # Summed over the ranks, on the device (NCCL: the stream waits, not the host).
            total = distributed.all_reduce_sum_(total.to(device)).wait()
        # A float, as transformers hands it (its count is divided by the parallel sizes).
        return total.float()

    def _warn_if_count_may_be_ignored(self) -> None:
        """transformers' pitfall, said once: a model of one's own whose forward takes
        ``**kwargs`` is handed ``num_items_in_batch`` and its loss is not divided by
        the accumulation steps; if it ignores the count, its gradients are that many
        times too large."""
        if (
            self.args.gradient_accumulation_steps > 1
            and self.model_accepts_loss_kwargs
            and self.compute_loss_func is None
            and self.loss_is_scaled_for_ga is None
            and not hasattr(self.model, "accepts_loss_kwargs")
            and transformers_model(self.model) is None
        ):
            logger.warning(
                "%s.forward takes **kwargs: as transformers' Trainer does, this trainer passes it num_items_in_batch (the "
                "labelled positions of the whole accumulated step) and does not divide its loss by "
                "gradient_accumulation_steps=%d. If the model ignores num_items_in_batch and returns a batch mean, set "
                "trainer.loss_is_scaled_for_ga = False (or model.accepts_loss_kwargs = False), or its gradients are "
                "%d times too large",
                type(self.model).__name__,
                self.args.gradient_accumulation_steps,
                self.args.gradient_accumulation_steps,
            )

    def _count_across_ranks(self) -> bool:
        """Whether the training step's count is summed over the ranks (and the loss
        normalised by it scaled by their number): ``average_tokens_across_devices``
        under a process group."""
        return (
            self.dist.is_distributed
            and distributed.is_initialized()
            and bool(getattr(self.args, "average_tokens_across_devices", True))
        )

    def _optimizer_spec(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        try:
            return optimizer_cls_and_kwargs(self.args)
        except ValueError as exc:
            raise TrainingArgumentsError(str(exc)) from None

    def _check_optimizer(self) -> None:
        # optim and optim_args checked now, as the schedule below.
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self._optimizer_spec()

    def _check_evaluation_options(self) -> None:
        args = self.args
        if getattr(args, "batch_eval_metrics", False):
            if self.compute_metrics is not None and not _accepts_keyword(self.compute_metrics, "compute_result"):
                raise ValueError(
                    "batch_eval_metrics=True: compute_metrics is called once per evaluation batch and must take a "
                    "compute_result keyword (True on the last batch, when it returns the metrics of the whole "
                    "evaluation), as in transformers; add it, or leave batch_eval_metrics False"
                )
            if self.dist.is_distributed:
                raise TrainingArgumentsError(
                    "batch_eval_metrics=True is not available in a distributed run here (each rank evaluates its own "
                    "share); leave it False: compute_metrics then sees the whole evaluation set, gathered from every rank"
                )

    def _check_auto_find_batch_size(self) -> None:
        if getattr(self.args, "auto_find_batch_size", False) and self.dist.is_distributed:
            raise TrainingArgumentsError(
                "auto_find_batch_size=True is not available in a distributed run here: a rank that runs out of memory "
                "alone would leave the others waiting in a collective; set per_device_train_batch_size to a size that "
                "fits (find it with one process) and leave auto_find_batch_size False"
            )

    def _check_neftune(self) -> None:
        if getattr(self.args, "neftune_noise_alpha", None) is None:
            return
        get = getattr(self.model, "get_input_embeddings", None)
        embeddings = get() if callable(get) else None
        if not isinstance(embeddings, nn.Module):
            raise TrainingArgumentsError(
                f"neftune_noise_alpha={self.args.neftune_noise_alpha!r}: NEFTune adds noise to the model's input "
                f"embeddings, found with model.get_input_embeddings(), which {type(self.model).__name__} does not "
                "provide (transformers' models do); add that method returning the embedding layer, or leave "
                "neftune_noise_alpha None"
            )

    def _check_schedule(self) -> None:
        # The schedule's options are checked now, on a stand-in optimizer with the
        # run's learning rate: a typo in lr_scheduler_kwargs fails here, not when
        # training starts (maybe after a long data preparation).
        if self.lr_scheduler is not None:
            return
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(getattr(self.args, "learning_rate", 1.0)) or 1.0)
        try:
            get_scheduler(self.args.lr_scheduler_type, probe, 0, 1, getattr(self.args, "lr_scheduler_kwargs", None))
        except ValueError as exc:
            raise TrainingArgumentsError(str(exc)) from None
        except TypeError as exc:  # e.g. a number given as text: {"lr_end": "0.0"}
            raise TrainingArgumentsError(
                f"lr_scheduler_kwargs={self.args.lr_scheduler_kwargs!r} for {self.args.lr_scheduler_type!s}: {exc}; "
                "give numbers as numbers"
            ) from None

    def _check_activation_checkpointing(self) -> None:
        if getattr(self.args, "activation_checkpointing", False) and self._checkpointing_enabler() is None:
            raise TrainingArgumentsError(
                f"activation_checkpointing=True (or gradient_checkpointing=True): {type(self.model).__name__} has no "
                "activation_checkpointing_enable() or gradient_checkpointing_enable() method (transformers' models "
                "have them); checkpoint inside its forward with torch.utils.checkpoint.checkpoint instead and leave "
                "the argument unset"
            )

    def _checkpointing_enabler(self) -> Callable[..., Any] | None:
        for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
            fn = getattr(self.model, name, None)
            if callable(fn):
                return fn
        return None

    def _enable_activation_checkpointing(self) -> None:
        """As transformers when training starts: the model's own switch, with
        ``activation_checkpointing_kwargs`` (``every_n_layers`` and ``offload`` as
        its arguments, the rest for ``torch.utils.checkpoint``)."""
        if not getattr(self.args, "activation_checkpointing", False):
            return
        self._check_activation_checkpointing()
        enable = self._checkpointing_enabler()
        assert enable is not None
        options = dict(getattr(self.args, "activation_checkpointing_kwargs", None) or {})
        every_n_layers = options.pop("every_n_layers", 1)
        offload = options.pop("offload", False)
        # An older gradient_checkpointing_enable(gradient_checkpointing_kwargs=None)
        # takes neither extra argument: they are passed only when set.
        extra = {} if every_n_layers == 1 and not offload else {"every_n_layers": every_n_layers, "offload": offload}
        if enable.__name__ == "activation_checkpointing_enable":
            enable(activation_checkpointing_kwargs=options or None, every_n_layers=every_n_layers, offload=offload)
        else:
            enable(gradient_checkpointing_kwargs=options or None, **extra)

    def _check_precision(self) -> None:
        # Refused when the trainer is built (and again when training starts, the model
        # may have moved): not hours later, nor silently in another precision.
        try:
            precision.check_precision(self.args, self.model, self._device)
        except ValueError as exc:
            raise TrainingArgumentsError(str(exc)) from None

    def autocast_smart_context_manager(self, cache_enabled: bool | None = True) -> Any:
        """transformers' method: ``torch.autocast`` in the dtype ``bf16``/``fp16``
        ask for, on the model's device; a null context in full precision."""
        # Every micro-step: the device is looked up only under mixed precision.
        return precision.autocast(self.args, self.model, cache_enabled=cache_enabled)

    def compute_loss_context_manager(self) -> Any:
        """transformers' method: the context the forward pass runs in, in training
        (around :meth:`compute_loss`) and in evaluation (:meth:`prediction_step`)."""
        return self.autocast_smart_context_manager()

    def _run_logging_dir(self) -> str | None:
        """Where this run's local logs (TensorBoard) go: under the default
        ``<output_dir>/logs``, a directory of the run's own
        (``<time>_<host>_<run id>``, the one it has when resumed), so that a script
        started again in the same output directory shows as a second run instead of
        drawing over the first; an explicit ``logging_dir`` as it is (transformers)."""
        logging_dir = getattr(self.args, "logging_dir", None)
        output_dir = getattr(self.args, "output_dir", None)
        if not logging_dir or not output_dir or os.path.normpath(logging_dir) != os.path.normpath(os.path.join(output_dir, "logs")):
            return logging_dir
        from eventbus.rundir import run_directory

        return run_directory(logging_dir, self.run_id)

    def _record_device(self) -> None:
        """Tell our arguments the device this trainer runs on (its model's), which
        ``args.device``/``args.n_gpu`` report to callbacks, as transformers' do."""
        if isinstance(self.args, TrainingArguments):
            self.args._trainer_device = self._device

    # -- process identity -------------------------------------------------------------

    def is_world_process_zero(self) -> bool:
        """True on the process that saves checkpoints and runs the sinks."""
        return self.dist.is_world_process_zero

    def is_local_process_zero(self) -> bool:
        """True on the first process of this machine."""
        return self.dist.is_local_process_zero

    # -- callbacks ------------------------------------------------------------------

    def add_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        """Add a callback (a class or an instance) to the list."""
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> TrainerCallback | None:
        """Remove a callback (by class or instance) and return it, or ``None``."""
        found = self.callback_handler.pop_callback(callback)
        if found is None:
            self._explain_integration(callback)
        return found

    def remove_callback(self, callback: TrainerCallback | type[TrainerCallback]) -> None:
        """Remove a callback (by class or instance)."""
        if isinstance(callback, type):
            self.pop_callback(callback)  # says what report_to made of an integration class
        else:
            self.callback_handler.remove_callback(callback)

    def _explain_integration(self, callback: Any) -> None:
        """transformers' Trainer turns ``report_to`` into integration callbacks, which
        code written for it may look for or remove (``remove_callback(TensorBoardCallback)``);
        here ``report_to`` names sinks of the event bus: say so, rather than nothing."""
        cls = callback if isinstance(callback, type) else type(callback)
        sink = _SINK_OF_INTEGRATION.get(cls.__name__)
        if sink is None or not (cls.__module__ or "").startswith("transformers"):
            return
        logger.warning(
            "%s is not among this trainer's callbacks: report_to=%r logs through sinks of the event bus, not "
            "integration callbacks, so there is none to remove; to leave %r out, leave it out of "
            "TrainingArguments.report_to when building the Trainer",
            cls.__name__,
            getattr(self.args, "report_to", None),
            sink,
        )

    # -- the bus --------------------------------------------------------------------

    def _new_bus(self) -> EventBus:
        args = self.args
        sinks = self._report_to_sinks(getattr(args, "report_to", None)) + self._user_sinks
        isolate = getattr(args, "isolate_sinks", None)
        if isolate is not None:
            # Exactly the named sinks run in a child process each (eventbus.isolation);
            # None leaves each sink's own default.
            names = [s.name for s in sinks]
            unknown = [n for n in isolate if n != "all" and n not in names]
            if unknown:
                raise TrainingArgumentsError(
                    f"isolate_sinks names {unknown}, which are not among this run's sinks {names}; "
                    f"use names from report_to or of the sinks passed to the Trainer"
                )
            for s in sinks:
                s.isolate = isolate == ["all"] or s.name in isolate
        run = RunInfo(
            run_id=self.run_id,
            run_name=getattr(args, "run_name", None),
            output_dir=getattr(args, "output_dir", None),
            logging_dir=self._run_logging_dir(),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            resumed=self._resumed,
        )
        marks = self._resume_marks if self._resumed else None
        return EventBus(
            sinks,
            run=run,
            close_timeout=self._close_timeout(),
            flush_interval=float(getattr(self.args, "bus_flush_interval", TrainingArguments.bus_flush_interval)),
            resume_marks=marks or None,
        )

    def _report_to_sinks(self, report_to: Any) -> list[Sink]:
        """The sinks ``report_to`` names, built once per run and reused by every bus of
        it (train(), then evaluate()/predict()), as sinks passed by the user are: a
        sink that is opened again for the same run continues what it started (the
        MLflow run, the Comet experiment, the Neptune run). Built again when
        ``args.report_to`` or the run changes (a second train() that is not a resume,
        a resume of another run)."""
        key = (repr(report_to), self.run_id)
        cached = getattr(self, "_report_to_cache", None)
        if cached is None or cached[0] != key:
            cached = self._report_to_cache = (key, list(sinks_from_report_to(report_to)))
        return list(cached[1])

    def _close_timeout(self) -> float:
        return float(getattr(self.args, "bus_close_timeout", TrainingArguments.bus_close_timeout))

    def _open_bus(self) -> bool:
        """Start the bus for a train/evaluate/predict call; returns whether this call
        owns it (and so must close it)."""
        if self.bus.running:
            return False
        # A bus is started once: the next call gets a fresh one. So does a resume: the
        # run id, ``resumed`` and the sinks' high-water marks are read as sinks attach.
        if self._bus_started or self._resumed:
            self.bus = self._new_bus()
        self.bus.run.resumed = self._resumed
        self.bus.run.run_id = self.run_id
        # Re-attach: the handler reads the run id and the subscriptions at set_bus.
        self.callback_handler.set_bus(self.bus)
        self._bus_started = True
        self.bus.start()
        if self._init_end_pending:
            # on_init_end ran in __init__; its event goes first into the first bus.
            self._init_end_pending = False
            if self.bus.wants(InitEnd):
                self.bus.publish(
                    InitEnd(run_id=self.run_id, step=self.state.global_step, epoch=self.state.epoch, rank=self.dist.rank)
                )
        return True

    def _close_bus(self) -> None:
        self.bus.close(timeout=self._close_timeout())
        self._save_latest_marks()

    def _save_latest_marks(self) -> None:
        # What each sink has now (past the last checkpoint): a resume reads it back.
        output_dir = getattr(self.args, "output_dir", None)
        marks = self.bus.high_water_marks()
        if output_dir and marks and self.is_world_process_zero():
            _marks.write_latest(output_dir, self.run_id, marks, self.bus.high_water_names())

    def _publish_train_end(self, status: str, error: str | None = None) -> None:
        if not self.bus.wants(TrainEnd):
            return
        self.bus.publish(
            TrainEnd(
                run_id=self.run_id,
                step=self.state.global_step,
                epoch=self.state.epoch,
                rank=self.dist.rank,
                status=status,
                error=error,
                best_metric=self.state.best_metric,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        )

    # -- signals --------------------------------------------------------------------

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal.signal only works in the main thread; leave others alone
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self._signal_received is not None and signum == signal.SIGINT:
                # A second Ctrl-C: the user does not want to wait for the step.
                raise KeyboardInterrupt
            self._signal_received = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.getsignal(sig)
                signal.signal(sig, handler)
            except (ValueError, OSError):  # pragma: no cover - platform without that signal
                previous.pop(sig, None)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, old in previous.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, OSError):  # pragma: no cover
                pass

    # -- data -----------------------------------------------------------------------

    @property
    def _device(self) -> torch.device:
        return precision.model_device(self.model)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The training ``DataLoader``, transformers' method: :meth:`train` calls it
        once, and its length sets the number of steps.

        The default loader draws every epoch's order from ``data_seed`` (``seed``)
        and the epoch, and shards it across ranks when distributed; the loop builds
        one such loader per epoch (on resume, one that skips the batches already
        trained on without loading them). Override it to inject your own: the loop
        then iterates the loader you return every epoch, calls ``set_epoch(epoch)`` on
        it, its sampler, its batch sampler or its dataset (the first that has one),
        and on resume reads past the batches already trained on."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset; pass Trainer(..., train_dataset=...)")
        return self._train_loader(0)

    def _custom_train_loader(self) -> bool:
        """Whether :meth:`get_train_dataloader` is overridden (in a subclass or on the instance)."""
        return type(self).get_train_dataloader is not Trainer.get_train_dataloader or "get_train_dataloader" in vars(self)

    def _epoch_train_loader(
        self, loader: torch.utils.data.DataLoader, custom: bool, epoch: int, skip: int
    ) -> torch.utils.data.DataLoader:
        """The loader of ``epoch``: the default's own (built without the first ``skip``
        batches), or ``loader`` from an overridden :meth:`get_train_dataloader`, set
        to ``epoch``."""
        if not custom:
            return self._train_loader(epoch, skip)
        batches = getattr(loader, "batch_sampler", None)
        if isinstance(batches, _EpochBatches):  # the default's, from an override calling super()
            batches.set_epoch(epoch)
            batches.skip = skip
            if isinstance(loader.generator, torch.Generator):
                loader.generator.manual_seed(batches.seed + epoch)
            return loader
        for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                    getattr(loader, "dataset", None)):
            set_epoch = getattr(obj, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
                break
        return loader

    def get_eval_dataloader(self, eval_dataset: Any = None) -> torch.utils.data.DataLoader:
        """The evaluation ``DataLoader`` for ``eval_dataset`` (default
        ``self.eval_dataset``; a string names one of a dict of them), in order,
        sharded across ranks when distributed. Override it to inject your own, as in
        transformers."""
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer.evaluate() needs an eval_dataset; pass Trainer(..., eval_dataset=...)")
        if isinstance(eval_dataset, str):
            dataset = self.eval_dataset[eval_dataset]
        else:
            dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        return self._eval_loader(dataset)

    def get_test_dataloader(self, test_dataset: Any) -> torch.utils.data.DataLoader:
        """The ``DataLoader`` :meth:`predict` runs ``test_dataset`` through (as
        :meth:`get_eval_dataloader`). Override it to inject your own."""
        return self._eval_loader(test_dataset)

    def _train_loader(self, epoch: int, skip_batches: int = 0) -> torch.utils.data.DataLoader:
        args = self.args
        ds = self.train_dataset
        bs = self._train_batch_size
        common: dict[str, Any] = {"collate_fn": self.data_collator, **self._loader_options()}
        if isinstance(ds, torch.utils.data.IterableDataset) or not _has_length(ds):
            # Not sharded here: the dataset shards the stream by rank, or every rank
            # reads all of it (the loop compares the ranks' first batches and warns).
            loader = torch.utils.data.DataLoader(ds, batch_size=bs, **common)
            return loader
        data_seed = getattr(args, "data_seed", None)
        batches = _EpochBatches(
            len(ds),
            bs,
            seed=args.seed if data_seed is None else data_seed,
            epoch=epoch,
            shuffle=True,
            drop_last=bool(getattr(args, "dataloader_drop_last", False)),
            skip=skip_batches,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        # A generator of its own: iterating must not draw from the global torch RNG,
        # or a resumed run's dropout masks would drift from the uninterrupted run's.
        gen = torch.Generator()
        gen.manual_seed(batches.seed + epoch)
        return torch.utils.data.DataLoader(ds, batch_sampler=batches, generator=gen, **common)

    def _loader_options(self) -> dict[str, Any]:
        """The DataLoader settings the arguments name, as transformers passes them:
        workers, pinned memory, and with workers, their persistence, prefetch and
        start method; and :class:`LoaderWorkerSignals` as the workers' init."""
        args = self.args
        workers = int(getattr(args, "dataloader_num_workers", 0) or 0)
        options: dict[str, Any] = {"num_workers": workers, "pin_memory": self._pin_memory()}
        if workers > 0:
            options["worker_init_fn"] = LoaderWorkerSignals()
            options["persistent_workers"] = bool(getattr(args, "dataloader_persistent_workers", False))
            prefetch = getattr(args, "dataloader_prefetch_factor", None)
            if prefetch is not None:
                options["prefetch_factor"] = prefetch
            context = getattr(args, "dataloader_multiprocessing_context", None)
            if context is not None:
                options["multiprocessing_context"] = context
        return options

    def _pin_memory(self) -> bool:
        # Pinned batches make the host-to-device copy (non_blocking) truly asynchronous.
        return bool(getattr(self.args, "dataloader_pin_memory", True)) and self._device.type == "cuda"

    def _eval_loader(self, dataset: Any) -> torch.utils.data.DataLoader:
        args = self.args
        sampler: Any = None
        sharded = self.dist.is_distributed and distributed.is_initialized()  # only when the shares can be gathered
        if sharded and _has_length(dataset) and not isinstance(dataset, torch.utils.data.IterableDataset):
            # Each rank evaluates every world_size-th example (no padding, so no example
            # counts twice); evaluation_loop gathers the shares back into dataset order.
            sampler = distributed.shard_indices(range(len(dataset)), self.dist.rank, self.dist.world_size, pad=False)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.per_device_eval_batch_size,
            shuffle=False,
            sampler=sampler,
            collate_fn=self.data_collator,
            **self._loader_options(),
        )
        loader._trainer_sharded = sampler is not None  # type: ignore[attr-defined]  # evaluation_loop gathers then
        return loader

    # -- optimizer and schedule -------------------------------------------------------

    def create_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer ``args.optim`` names (:mod:`trainer.optimizers`; AdamW with
        its fused kernel by default), weight decay on every parameter except biases
        and norms."""
        if self.optimizer is None:
            args = self.args
            decay = set(get_decay_parameter_names(self.model))
            params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in params if n in decay], "weight_decay": args.weight_decay},
                {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            if not groups:
                raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
            if self.optimizer_cls_and_kwargs is not None:
                cls, options = self.optimizer_cls_and_kwargs
                options = dict(options)
            else:
                cls, options = self._optimizer_spec()
            try:
                self.optimizer = cls(groups, **options)
            except RuntimeError as exc:  # no fused kernel for these parameters' device: torch's default
                if not options.pop("fused", False):
                    raise
                logger.info("fused %s is not available here (%s); using torch's default kernel", cls.__name__, exc)
                self.optimizer = cls(groups, **options)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int) -> Any:
        """The learning-rate schedule named by ``lr_scheduler_type``, with warmup."""
        if self.lr_scheduler is None:
            warmup = (
                self.args.get_warmup_steps(num_training_steps)
                if hasattr(self.args, "get_warmup_steps")
                else get_warmup_steps(self.args, num_training_steps)
            )
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                self.optimizer,
                warmup,
                num_training_steps,
                getattr(self.args, "lr_scheduler_kwargs", None),
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_learning_rate(self) -> float:
        lr = self.lr_scheduler.get_last_lr()[0] if self.lr_scheduler is not None else self.optimizer.param_groups[0]["lr"]
        if isinstance(lr, torch.Tensor):  # a tensor lr (capturable optimizers): keep it lazy
            return lr.detach().clone()  # type: ignore[return-value]
        return float(lr)

    # -- train ----------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | os.PathLike[str] | bool | None = None) -> TrainOutput:
        """Train, or resume from ``resume_from_checkpoint`` (a ``checkpoint-<step>``
        directory, or ``True`` for the latest one in ``output_dir``).

        On SIGTERM or SIGINT the current step finishes, a checkpoint is saved, the bus
        is closed within ``bus_close_timeout`` and :class:`TrainingInterrupted` is
        raised. An exception in the loop publishes ``TrainEnd(status="failed")``, closes
        the bus and propagates.
        """
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset; pass Trainer(..., train_dataset=...)")
        # The per-step hooks as they are now: one replaced on a callback after it was
        # added (mock.patch.object before train()) is the one called from step 1.
        self.callback_handler.refresh()
        args = self.args
        if str(getattr(args, "eval_strategy", "no")) != "no" and self.eval_dataset is None:
            raise ValueError(
                f'eval_strategy="{args.eval_strategy}" evaluates during training, but the Trainer has no eval_dataset; '
                'pass Trainer(..., eval_dataset=...) or set eval_strategy="no"'
            )
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = ckpt.get_last_checkpoint(args.output_dir)
            if resume_from_checkpoint is None:
                raise ckpt.CheckpointError(
                    f"resume_from_checkpoint=True but there is no checkpoint-<step> directory in "
                    f"output_dir={args.output_dir!r}; train without resuming or pass the checkpoint's path"
                )
        if resume_from_checkpoint is not None:
            resume_from_checkpoint = self._check_resume_checkpoint(resume_from_checkpoint)
            info = ckpt.read_run_info(resume_from_checkpoint)
            if isinstance(info.get("run_id"), str) and info["run_id"]:
                self.run_id = info["run_id"]  # sinks continue the same run
            self._resumed = True
            self._resume_marks = _marks.merge(
                _marks.read_run_info(info), _marks.read_latest(args.output_dir, self.run_id)
            )
        else:
            self._resumed = False
            if self._trained:
                # Another training run of this trainer, not a continuation: a run of its
                # own (a new MLflow run, Comet experiment, jsonl file), as transformers'
                # integrations start one per train(); the report_to sinks are built anew.
                self.run_id = _new_run_id()
        self._trained = True
        if self.model_init is not None:
            # A fresh model for this run, seeded as at build (transformers'
            # hyperparameter searches rely on it), with a fresh optimizer and schedule.
            if getattr(args, "full_determinism", False):
                enable_full_determinism(args.seed)
            else:
                set_seed(args.seed)
            self._adopt_model(self.call_model_init())
            self.optimizer, self.lr_scheduler = None, None
            self._created_lr_scheduler = False
            self.callback_handler.model = self.model

        self._signal_received = None
        previous_handlers = self._install_signal_handlers()
        owns_bus = self._open_bus()
        # The marks hold back what an earlier process already sent, which this call
        # publishes again: its bus has them. An evaluate() or predict() after it
        # publishes new metrics, whatever their step: its bus gets none.
        self._resume_marks = {}
        self.is_in_train = True
        interrupted = False
        alpha = getattr(args, "neftune_noise_alpha", None)
        neftune_hook = neftune.activate_neftune(self.model, alpha) if alpha is not None else None
        try:
            try:
                if getattr(args, "auto_find_batch_size", False):
                    return self._train_finding_batch_size(resume_from_checkpoint)
                return self._inner_training_loop(resume_from_checkpoint)
            except _Interrupt:
                interrupted = True
                signum = self._signal_received or signal.SIGTERM
                name = signal.Signals(signum).name
                where = self._last_checkpoint_dir
                # A graceful stop: callbacks see the end of training (bars close), and
                # sinks get TrainEnd(status="interrupted").
                self.control = self.callback_handler.on_train_end(
                    args, self.state, self.control, status="interrupted", error=f"{name} received"
                )
                if owns_bus:
                    self._close_bus()
                    owns_bus = False
                resume_hint = (
                    f"checkpoint saved to {where}; resume with train(resume_from_checkpoint={where!r})"
                    if where
                    else "no step had completed, so no checkpoint was saved"
                )
                raise TrainingInterrupted(
                    f"training interrupted by {name} at step {self.state.global_step}: {resume_hint}",
                    signum=signum,
                    checkpoint=where,
                    global_step=self.state.global_step,
                ) from None
            except BaseException as exc:
                self._publish_train_end("failed", f"{type(exc).__name__}: {exc}")
                raise
        finally:
            self.is_in_train = False
            if neftune_hook is not None:  # the embeddings' forward as it was, also after a failure
                neftune.deactivate_neftune(self.model, neftune_hook)
            self._callback_watch.stop()
            try:
                if owns_bus:
                    self._close_bus()
            finally:
                # Restored whatever the close did (a second Ctrl-C inside it): a
                # handler left behind would swallow every later SIGTERM.
                self._restore_signal_handlers(previous_handlers)
                pending, self._signal_received = self._signal_received, None
                if pending is not None and not interrupted:
                    # It came after the loop's last look (the final save, evaluation
                    # or close): handed on now, to whoever handled it before, rather
                    # than dropped (a scheduler's SIGTERM would otherwise be ignored).
                    signal.raise_signal(pending)

    def _train_finding_batch_size(self, resume_from_checkpoint: str | None) -> TrainOutput:
        """``auto_find_batch_size``, as transformers (accelerate's
        ``find_executable_batch_size``): train; when the device (or the host) runs out
        of memory, free what the attempt held and start the run again with a
        per-device batch 0.9 times as large, until one fits. A resume starts from the
        batch size its checkpoint was trained with."""
        if resume_from_checkpoint is not None:
            saved = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, ckpt.TRAINER_STATE_NAME))
            if saved.train_batch_size:
                self._train_batch_size = int(saved.train_batch_size)
        while True:
            try:
                return self._inner_training_loop(resume_from_checkpoint)
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                failed = self._train_batch_size
                self._train_batch_size = int(failed * 0.9)
                self.model_wrapped = self.model  # the attempt's wrapper (and what it held) released
                del exc
                gc.collect()
                clear_device_cache()
                if self._train_batch_size == 0:
                    raise RuntimeError(
                        "auto_find_batch_size: out of memory even with a per-device batch of 1 (no executable batch "
                        "size found, reached zero); the model alone does not fit, see its memory"
                    ) from None
                logger.warning(
                    "auto_find_batch_size: out of memory with a per-device batch of %d; training again from the start "
                    "with %d",
                    failed,
                    self._train_batch_size,
                )

    def _check_resume_checkpoint(self, path: str | os.PathLike[str]) -> str:
        """``path`` when it is a checkpoint every rank can resume from, else a
        :class:`~trainer.checkpoint.CheckpointError` on every rank (never one rank
        raising while the others train on).

        Distributed, a missing ``rng_state_<rank>.pth`` (a checkpoint written by a
        run with fewer ranks, or an older one cut short while the ranks added their
        RNG files) is a warning, as in transformers: that rank resumes with the
        generators it has."""
        distributed_run = self.dist.is_distributed
        required = (
            tuple(f for f in ckpt.REQUIRED_FILES if f != ckpt.RNG_STATE_NAME)
            if distributed_run
            else ckpt.required_files(self.dist.rank, self.dist.world_size)
        )
        error: BaseException | None = None
        checked = os.fspath(path)
        try:
            checked = ckpt.check_checkpoint(path, required)
        except BaseException as exc:  # agreed below, then raised
            error = exc
        self._raise_on_every_rank(error, lambda rank, message: f"rank {rank} cannot resume from {checked!r}: {message}")
        if distributed_run:
            rng = ckpt.rng_state_name(self.dist.rank, self.dist.world_size)
            if not os.path.isfile(os.path.join(checked, rng)):
                logger.warning(
                    "checkpoint %s has no %s for rank %d (written with fewer ranks, or cut short while the ranks "
                    "added their RNG files): rank %d resumes with its current random generators, so the resumed "
                    "run does not reproduce the uninterrupted one exactly",
                    checked,
                    rng,
                    self.dist.rank,
                    self.dist.rank,
                )
        return checked

    def _load_rng_state(self, checkpoint: str) -> None:
        """Restore this rank's generators from ``checkpoint`` (a missing distributed
        RNG file was warned about by :meth:`_check_resume_checkpoint`); a file that
        cannot be read on any rank is an error on every rank."""
        distributed_run = self.dist.is_distributed
        error: BaseException | None = None
        try:
            ckpt.load_rng_state(checkpoint, self.dist.rank, self.dist.world_size, missing_ok=distributed_run)
        except BaseException as exc:  # agreed below, then raised
            error = exc
        self._raise_on_every_rank(error, lambda rank, message: f"rank {rank} cannot restore its RNG state: {message}")

    def _raise_on_every_rank(self, error: BaseException | None, describe: Callable[[int, str], str]) -> None:
        """Raise ``error`` (this rank's, or None); distributed, the ranks first share
        theirs, and a rank without one raises a :class:`CheckpointError` that
        ``describe(rank, message)`` words for the first rank that had one: no rank goes
        on while another failed."""
        if self.dist.is_distributed and distributed.is_initialized():
            errors = distributed.gather_objects(None if error is None else str(error))
            if error is None:
                for rank, message in enumerate(errors):
                    if message is not None:
                        raise ckpt.CheckpointError(describe(rank, message))
        if error is not None:
            raise error

    def _set_initial_training_values(self, loader: torch.utils.data.DataLoader) -> tuple[int, int, int, int, int, float]:
        """(num_train_epochs, num_update_steps_per_epoch, steps_in_epoch, max_steps,
        num_examples, num_train_samples) for the training ``loader``, with
        transformers' arithmetic (``num_train_samples`` covers the whole schedule)."""
        args = self.args
        ga = args.gradient_accumulation_steps
        total_batch = self._train_batch_size * ga * self.dist.world_size
        ds = getattr(loader, "dataset", self.train_dataset)
        if _has_length(loader) and not isinstance(ds, torch.utils.data.IterableDataset):
            len_loader = len(loader)
            if len_loader == 0:
                raise ValueError(
                    "the training set yields no batch (empty dataset, or fewer examples than one batch with "
                    "dataloader_drop_last); add data or lower per_device_train_batch_size"
                )
            nuspe = max(len_loader // ga + int(len_loader % ga > 0), 1)
            num_examples = len(ds) if _has_length(ds) else len_loader * self._train_batch_size
            if args.max_steps > 0:
                max_steps = args.max_steps
                num_train_epochs = max_steps // nuspe + int(max_steps % nuspe > 0)
                num_train_samples: float = max_steps * total_batch
            else:
                max_steps = math.ceil(args.num_train_epochs * nuspe)
                num_train_epochs = math.ceil(args.num_train_epochs)
                num_train_samples = num_examples * args.num_train_epochs
            return num_train_epochs, nuspe, len_loader, max_steps, num_examples, num_train_samples
        if args.max_steps <= 0:
            raise ValueError(
                "max_steps must be set to a positive value when the training dataset has no length "
                f"(an IterableDataset), got max_steps={args.max_steps}"
            )
        import sys

        max_steps = args.max_steps
        return sys.maxsize, max_steps, max_steps * ga, max_steps, max_steps * total_batch, max_steps * total_batch

    def _inner_training_loop(self, resume_from_checkpoint: str | None) -> TrainOutput:
        args = self.args
        handler = self.callback_handler
        # By the public method a subclass may override (as transformers); the loop
        # then iterates each epoch's loader (_epoch_train_loader).
        train_loader = self.get_train_dataloader()
        custom_loader = self._custom_train_loader()
        (
            num_train_epochs,
            nuspe,
            steps_in_epoch,
            max_steps,
            num_examples,
            num_train_samples,
        ) = self._set_initial_training_values(train_loader)

        # -- state, fresh or resumed --
        self.state = TrainerState(stateful_callbacks=self._stateful_callbacks())
        self.state.train_batch_size = self._train_batch_size
        self.state.compute_steps(args, max_steps)
        self._warn_if_count_may_be_ignored()
        epochs_trained = 0
        steps_trained_in_current_epoch = 0
        if resume_from_checkpoint is not None:
            ckpt.load_model_weights(self.model, resume_from_checkpoint)
            self.state = TrainerState.load_from_json(os.path.join(resume_from_checkpoint, ckpt.TRAINER_STATE_NAME))
            if self.state.best_model_checkpoint is not None and not os.path.isdir(self.state.best_model_checkpoint):
                logger.warning(
                    "the best checkpoint %s recorded in the resumed state does not exist anymore; ignoring it",
                    self.state.best_model_checkpoint,
                )
                self.state.best_model_checkpoint = None
            if getattr(args, "restore_callback_states_from_checkpoint", True):
                handler.restore_callback_states(self.state.stateful_callbacks, control=self.control)
            epochs_trained = self.state.global_step // nuspe
            if not getattr(args, "ignore_data_skip", False):
                steps_trained_in_current_epoch = (self.state.global_step % nuspe) * args.gradient_accumulation_steps
        self.state.init_training_references(self, max_steps, num_train_epochs)
        self._enable_activation_checkpointing()
        self.model_wrapped = self._wrap_model()
        self._interrupt_agreed = False

        # -- optimizer, schedule, their state --
        if self._created_lr_scheduler:
            self.lr_scheduler = None
            self._created_lr_scheduler = False
        self._check_precision()
        self.create_optimizer()
        self.create_scheduler(max_steps)
        self.scaler = precision.make_scaler(args, self._device)
        if resume_from_checkpoint is not None:
            self._load_optimizer(ckpt.load_torch(os.path.join(resume_from_checkpoint, ckpt.OPTIMIZER_NAME)))
            self.lr_scheduler.load_state_dict(ckpt.load_torch(os.path.join(resume_from_checkpoint, ckpt.SCHEDULER_NAME)))
            self._load_scaler(resume_from_checkpoint)
        handler.model = self.model
        handler.optimizer = self.optimizer
        handler.lr_scheduler = self.lr_scheduler
        self._record_device()

        logger.info(
            "***** Running training ***** examples=%s epochs=%s steps/epoch=%s batch=%s accumulation=%s steps=%s",
            num_examples,
            num_train_epochs,
            nuspe,
            self._train_batch_size,
            args.gradient_accumulation_steps,
            max_steps,
        )
        start_time = time.time()
        device = self._device
        self._initial_global_step = self.state.global_step
        self._tr_loss = torch.tensor(0.0, device=device)
        self._total_loss = torch.tensor(0.0, device=device)
        self._logs_on_cpu = self._tr_loss.is_cpu
        self._globalstep_last_logged = self.state.global_step
        self._last_saved_step = self.state.global_step if resume_from_checkpoint is not None else None
        self._last_checkpoint_dir = resume_from_checkpoint
        self.model.zero_grad(set_to_none=True)

        # As transformers, callbacks get the training DataLoader as train_dataloader=
        # from on_train_begin on: the first epoch's here, each epoch's own from its
        # on_epoch_begin (the default draws a new one per epoch).
        loader = self._epoch_train_loader(
            train_loader,
            custom_loader,
            epochs_trained,
            steps_trained_in_current_epoch if resume_from_checkpoint is not None else 0,
        )
        handler.train_dataloader = loader
        self.control = handler.on_train_begin(args, self.state, self.control, resumed_from=resume_from_checkpoint)
        self._callback_watch.start(self.state.global_step)
        if getattr(args, "eval_on_start", False):
            self._evaluate(skip_scheduler=True)  # as transformers: no plateau step before training

        for epoch in range(epochs_trained, num_train_epochs):
            skip = steps_trained_in_current_epoch if epoch == epochs_trained else 0
            if epoch != epochs_trained:
                loader = self._epoch_train_loader(train_loader, custom_loader, epoch, 0)
                handler.train_dataloader = loader
            self.control = handler.on_epoch_begin(args, self.state, self.control)
            self._run_epoch(epoch, skip, steps_in_epoch, nuspe, resume_from_checkpoint, epochs_trained, loader=loader)
            if self.control.should_training_stop:
                break
            self._check_interrupt()

        return self._finalize_training(start_time, max_steps, num_train_samples)

    def _load_optimizer(self, state: Mapping[str, Any]) -> None:
        # load_state_dict takes every group setting from the checkpoint, the kernel
        # choice (fused/foreach) too: the optimizer keeps the one it was built with
        # (an fp16 run's fused AdamW resumed from a full-precision checkpoint would
        # otherwise get the GradScaler's flags on a kernel that refuses them).
        # Set in the checkpoint's groups before loading, not after: torch moves each
        # parameter's step count to the parameter's device only for a group that is
        # fused (or capturable) as it loads it; a fused kernel given a step left on the
        # CPU fails on a GPU ("Expected all tensors to be on the same device").
        kernels = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in self.optimizer.param_groups]
        state = dict(state)
        state["param_groups"] = [{**saved, **kernel} for saved, kernel in zip(state["param_groups"], kernels)]
        self.optimizer.load_state_dict(state)

    def _load_scaler(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, precision.SCALER_NAME)
        if self.scaler is None:
            return
        if os.path.isfile(path):
            self.scaler.load_state_dict(ckpt.load_torch(path))
        else:
            logger.warning(
                "fp16=True, but %s holds no %s (it was saved without fp16): the loss scale starts again from %s",
                checkpoint, precision.SCALER_NAME, self.scaler.get_scale(),
            )

    def _wrap_model(self) -> nn.Module:
        """The module training steps run through: ``DistributedDataParallel`` around
        ``self.model`` when distributed (its gradients are averaged across ranks in
        backward), else the model itself; compiled with ``torch.compile`` when
        ``args.torch_compile`` (once per trainer: a second train() reuses it). Wrapped
        after a resume loaded the weights: DDP broadcasts rank 0's parameters when it
        is built."""
        model = self._ddp_model()
        if not getattr(self.args, "torch_compile", False):
            return model
        if self._compiled is None or self._compiled[0] is not model:
            backend = getattr(self.args, "torch_compile_backend", None) or "inductor"
            self._compiled = (model, torch.compile(model, backend=backend, mode=getattr(self.args, "torch_compile_mode", None)))
        return self._compiled[1]

    def _ddp_model(self) -> nn.Module:
        if not self.dist.is_distributed or not distributed.is_initialized():
            return self.model
        if self._compiled is not None and isinstance(self._compiled[0], nn.parallel.DistributedDataParallel):
            return self._compiled[0]
        if isinstance(self.model_wrapped, nn.parallel.DistributedDataParallel):
            return self.model_wrapped
        device = self._device
        device_ids = [device.index] if device.type == "cuda" else None
        # The ddp_* arguments, as transformers passes them; unset: torch's defaults.
        options: dict[str, Any] = {}
        for field, option in (
            ("ddp_find_unused_parameters", "find_unused_parameters"),
            ("ddp_bucket_cap_mb", "bucket_cap_mb"),
            ("ddp_broadcast_buffers", "broadcast_buffers"),
            ("ddp_static_graph", "static_graph"),
        ):
            value = getattr(self.args, field, None)
            if value is not None:
                options[option] = value
        return nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids, **options)

    def _agree_control(self, exhausted: bool = False) -> bool:
        """Make the control flags (and a pending SIGTERM/SIGINT) agree across ranks: a
        flag set on any rank is set on every rank, at this same global step. One small
        collective; a no-op in a single process. ``exhausted`` (this rank's training
        stream ran out) travels in the same message; returns whether any rank's did."""
        if not self.dist.is_distributed:
            return exhausted
        c = self.control
        flags = distributed.broadcast_flags(
            [
                c.should_training_stop,
                c.should_epoch_stop,
                c.should_save,
                c.should_evaluate,
                c.should_log,
                self._signal_received is not None,
                exhausted,
            ]
        )
        c.should_training_stop, c.should_epoch_stop, c.should_save, c.should_evaluate, c.should_log = flags[:5]
        if flags[5]:
            # Another rank was signalled: stop here too, as if this one had been.
            if self._signal_received is None:
                self._signal_received = signal.SIGTERM
            self._interrupt_agreed = True
        return flags[6]

    def _prefetch_and_agree(
        self, iterator: Iterator[Any], update_step: int, nuspe: int, ga: int, remainder: int, epoch: int
    ) -> list[Any] | None:
        """At the end of a step, over an unsized stream with several ranks: read the
        next step's batches, then agree on the control flags and on whether any rank
        ran short (one message, the step's agreement). Returns the batches for the
        next step; ``[]`` when the ranks end the epoch here; ``None`` when this was
        the epoch's last step."""
        if update_step + 1 >= nuspe:
            self._agree_control()
            return None
        n = ga if update_step + 1 != nuspe - 1 else remainder
        batches: list[Any] = []
        stopping = self.control.should_training_stop or self.control.should_epoch_stop
        if not stopping:  # when stopping anyway, read nothing more
            for _ in range(n):
                try:
                    batches.append(next(iterator))
                except StopIteration:
                    break
        exhausted = self._agree_control(exhausted=not stopping and len(batches) < n)
        if not exhausted:
            return batches
        c = self.control  # agreed: the same on every rank, so is this collective
        if not (c.should_training_stop or c.should_epoch_stop) and not getattr(self, "_warned_uneven_stream", False):
            self._warn_uneven_stream([int(k) for k in distributed.gather_objects(len(batches))], n, epoch)
        return []

    def _agree_first_batches(self, batches: list[Any], n: int, epoch: int) -> bool:
        """The first step of an epoch over an unsized stream with several ranks
        (nothing before it to agree with): whether any rank has fewer than ``n``
        batches for it, agreed. The first time, the ranks also compare a fingerprint
        of their first batch: the same batch everywhere means the stream is not
        sharded (every rank reads all of it), which a warning says."""
        check = not getattr(self, "_stream_checked", False)
        fingerprint = _fingerprint(batches[0]) if check and batches else None
        got = distributed.gather_objects((len(batches), fingerprint))
        if check:
            self._stream_checked = True
            prints = [g[1] for g in got]
            if prints[0] is not None and all(p == prints[0] for p in prints) and self.is_world_process_zero():
                logger.warning(
                    "every one of the %d ranks got the same first training batch: the training set has no length "
                    "(an IterableDataset), so the Trainer does not shard it, and it looks like every rank reads all "
                    "of it (each example seen %d times per epoch); shard the stream by RANK/WORLD_SIZE in the "
                    "dataset, or pass a dataset with __len__ to have the Trainer shard it",
                    self.dist.world_size,
                    self.dist.world_size,
                )
        counts = [int(g[0]) for g in got]
        exhausted = any(k < n for k in counts)
        if exhausted and not getattr(self, "_warned_uneven_stream", False):
            self._warn_uneven_stream(counts, n, epoch)
        return exhausted

    def _warn_uneven_stream(self, counts: list[int], n: int, epoch: int) -> None:
        """Once: the ranks' streams ran out at different steps (``counts[r]`` batches
        of the ``n`` the next step needs, on rank ``r``)."""
        if len(set(counts)) <= 1:
            return  # every rank ran out together: the shards were even
        self._warned_uneven_stream = True
        if not self.is_world_process_zero():
            return
        short = [r for r, k in enumerate(counts) if k < n]
        unused = ", ".join(f"rank {r}: {k}" for r, k in enumerate(counts) if k)
        logger.warning(
            "the training stream of rank(s) %s ran out at step %d (epoch %d) while the others still had data: every "
            "rank ends the epoch there, so that their collectives stay matched. Batches read and left unused (the "
            "rest of each stream is not read): %s. Shard the stream into equal lengths to train on every example "
            "(this warning is shown once)",
            short,
            self.state.global_step,
            epoch,
            unused,
        )

    def _run_epoch(
        self,
        epoch: int,
        skip_batches: int,
        steps_in_epoch: int,
        nuspe: int,
        resume_from_checkpoint: str | None,
        epochs_trained: int,
        loader: torch.utils.data.DataLoader | None = None,
    ) -> None:
        args = self.args
        handler = self.callback_handler
        watch = self._callback_watch
        ga = args.gradient_accumulation_steps
        state = self.state
        model = self.model_wrapped
        ddp = getattr(model, "_orig_mod", model)  # under torch.compile: the module it compiled
        device = self._device
        distributed_run = self.dist.is_distributed
        step = -1
        grad_norm: torch.Tensor | None = None
        learning_rate: float | None = None
        num_update_steps_trained = 0
        resuming_this_epoch = epoch == epochs_trained and resume_from_checkpoint is not None
        if resuming_this_epoch and skip_batches > 0:
            step = skip_batches - 1
            num_update_steps_trained = skip_batches // ga
        if loader is None:
            loader = self._epoch_train_loader(
                self.get_train_dataloader(), self._custom_train_loader(), epoch, skip_batches if resuming_this_epoch else 0
            )
            handler.train_dataloader = loader
        if resuming_this_epoch:
            # The generators continue exactly where the checkpoint left them (dropout
            # masks and any other randomness in the step).
            self._load_rng_state(resume_from_checkpoint)
        epoch_iterator = iter(loader)
        if resuming_this_epoch and skip_batches > 0 and not isinstance(getattr(loader, "batch_sampler", None), _EpochBatches):
            # An iterable dataset cannot skip by index: consume what was already trained on.
            for _ in range(skip_batches):
                if next(epoch_iterator, None) is None:
                    break
        remainder = steps_in_epoch % ga or ga
        nan_filter = bool(getattr(args, "logging_nan_inf_filter", True))
        # reduce_lr_on_plateau steps on evaluations (_evaluate), not per step.
        step_schedule = not isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        # transformers calls training_step(model, inputs, num_items_in_batch): so do
        # we (with None) when the method takes a third argument, so that an override
        # written for transformers without a default works, as one written for the
        # two-argument form does.
        takes_items = _takes_third_argument(self.training_step)
        count_items = takes_items and self._takes_count
        # Distributed over a stream without a length (an IterableDataset the user
        # shards by rank), the shards may differ in length, and a rank that ran out
        # alone would leave the others in DDP's all-reduce. There the ranks read each
        # step's batches before it (the next step's at the end of this one) and agree,
        # in the step's control agreement, whether any rank ran short: all end the
        # epoch at the same step. Sized data is sharded evenly, and a single process
        # has nobody to agree with: neither pays anything for this.
        agree_exhaustion = distributed_run and distributed.is_initialized() and not _is_sized(loader)
        prefetched: list[Any] | None = None

        for update_step in range(num_update_steps_trained, nuspe):
            num_batches = ga if update_step != nuspe - 1 else remainder
            if prefetched is not None:
                batch_samples, prefetched = prefetched, None
            else:
                batch_samples = []
                for _ in range(num_batches):
                    try:
                        batch_samples.append(next(epoch_iterator))
                    except StopIteration:
                        break
                if agree_exhaustion and self._agree_first_batches(batch_samples, num_batches, epoch):
                    batch_samples = []
            if not batch_samples:
                break
            self.current_gradient_accumulation_steps = len(batch_samples)
            step_args: tuple[Any, ...] = ()
            if count_items:
                # The step's micro-batches go to the device together (as transformers
                # prefetches them) and their labels are counted there.
                batch_samples = [_to_device(b, device) for b in batch_samples]
                step_args = (self._get_num_items_in_batch(batch_samples, device),)
            elif takes_items:
                step_args = (None,)
            for inputs in batch_samples:
                step += 1
                do_sync_step = (step + 1) % ga == 0 or (step + 1) == steps_in_epoch
                if step % ga == 0:
                    self.control = handler.on_step_begin(args, state, self.control)

                if distributed_run and not do_sync_step and isinstance(ddp, nn.parallel.DistributedDataParallel):
                    # Accumulate locally; the gradients are averaged once, on the sync step.
                    with ddp.no_sync():
                        loss_step = self.training_step(model, _to_device(inputs, device), *step_args)
                else:
                    loss_step = self.training_step(model, _to_device(inputs, device), *step_args)
                if nan_filter:
                    # transformers' filter, on the device: a NaN/inf loss is replaced by
                    # the mean of the losses since the last log (no host `if`).
                    since = 1 + state.global_step - self._globalstep_last_logged
                    self._tr_loss += torch.where(torch.isfinite(loss_step), loss_step, self._tr_loss / since)
                else:
                    self._tr_loss += loss_step

                if do_sync_step:
                    max_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else float("inf")
                    scaler = self.scaler
                    if scaler is not None:
                        # fp16: the true gradients (on the device), so that the norm is
                        # clipped and logged unscaled.
                        scaler.unscale_(self.optimizer)
                    # Returns the total norm as a tensor; clipping scales on the device.
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
                    self.control = handler.on_pre_optimizer_step(args, state, self.control)
                    if scaler is not None:
                        # Skips the update when the gradients overflowed (on the device
                        # with the fused AdamW) and adjusts the scale; the schedule and
                        # global_step go on (no host check of the overflow flag).
                        scaler.step(self.optimizer)
                        scaler.update()
                    else:
                        self.optimizer.step()
                    self.control = handler.on_optimizer_step(args, state, self.control)
                    learning_rate = self._get_learning_rate()
                    if step_schedule:
                        self.lr_scheduler.step()
                    model.zero_grad(set_to_none=True)
                    state.global_step += 1
                    state.epoch = epoch + (step + 1) / steps_in_epoch
                    self.control = handler.on_step_end(args, state, self.control)
                    # Whatever any callback on any rank decided since the step began
                    # (stop, save, evaluate, log) now holds on every rank.
                    if agree_exhaustion:
                        prefetched = self._prefetch_and_agree(epoch_iterator, update_step, nuspe, ga, remainder, epoch)
                    else:
                        self._agree_control()
                    self._maybe_log_save_evaluate(grad_norm, learning_rate)
                    if state.global_step >= watch.due:  # one comparison per step between samples
                        watch.tick(state.global_step)
                    self._check_interrupt()
                else:
                    self.control = handler.on_substep_end(args, state, self.control)
                    if distributed_run:
                        # A stop asked for mid-accumulation waits for the step's end,
                        # where the ranks agree on it (no collective per micro-batch).
                        continue

                if self.control.should_epoch_stop or self.control.should_training_stop:
                    break
            if self.control.should_epoch_stop or self.control.should_training_stop:
                break

        if step < 0:
            logger.warning(
                "the training set yielded no batch in epoch %d; stopping training at step %d", epoch, state.global_step
            )
            self.control.should_training_stop = True

        self.control = handler.on_epoch_end(args, state, self.control)
        self._agree_control()
        self._maybe_log_save_evaluate(grad_norm, learning_rate)

    def training_step(
        self, model: nn.Module, inputs: Mapping[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Forward and backward on one micro-batch; returns the detached loss, scaled
        so that the accumulated gradient is that of the optimizer step's loss, as
        transformers: a loss normalised by ``num_items_in_batch`` (the step's labelled
        positions, which the loop counts when the model takes loss kwargs or a
        ``compute_loss_func`` was given) as it is, any other (a batch mean) divided by
        the number of micro-batches in the step. ``loss_is_scaled_for_ga`` (``True``
        or ``False``) overrides that decision, as in transformers, for a
        ``compute_loss`` override that normalises its own way."""
        model.train()
        with self.compute_loss_context_manager():
            if num_items_in_batch is not None and not self._compute_loss_takes_items:
                # A compute_loss override with the older signature (model, inputs,
                # return_outputs=False): its loss is a batch mean, divided below.
                num_items_in_batch = None
            if num_items_in_batch is None:
                loss = self.compute_loss(model, inputs)
            else:
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        every = getattr(self.args, "torch_empty_cache_steps", None)
        if every is not None and self.state.global_step % every == 0:
            clear_device_cache()
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            # Normalised over the whole optimizer step already (by the model or by
            # compute_loss_func, with the count), else a batch mean: as transformers.
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        if self.scaler is not None:  # fp16: the scaled loss, unscaled before the step
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return loss.detach()

    def compute_loss(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        """The loss of one micro-batch, and the outputs too when ``return_outputs``,
        as transformers: ``model(**inputs)``'s own loss (``outputs["loss"]`` or
        ``outputs[0]``); ``compute_loss_func(outputs, labels, num_items_in_batch=...)``
        when the Trainer was given one; transformers' label smoother with
        ``label_smoothing_factor``. ``num_items_in_batch`` (the labelled positions of
        the whole optimizer step, see :meth:`_get_num_items_in_batch`) is passed to a
        model whose forward takes loss kwargs, and to those two; a loss normalised by
        it is multiplied by the number of ranks with ``average_tokens_across_devices``
        (DDP averages the gradients over the ranks)."""
        loss, outputs = self._model_loss(model, inputs, num_items_in_batch)
        if (
            num_items_in_batch is not None
            and self._takes_count
            and model.training  # evaluation counts each batch on its own rank
            and self._count_across_ranks()
        ):
            loss = loss * self.dist.world_size
        return (loss, outputs) if return_outputs else loss

    def _check_interrupt(self) -> None:
        # Distributed: only a signal every rank knows of (see _agree_control) stops
        # training, so all ranks checkpoint and stop at the same step.
        pending = self._interrupt_agreed if self.dist.is_distributed else self._signal_received is not None
        if not pending:
            return
        # The step that was running when the signal came has finished: checkpoint it.
        # With save_only_model the checkpoint is whole nonetheless: it is the one to
        # resume from.
        if self.state.global_step > 0 and (self._last_saved_step != self.state.global_step or not self._last_save_whole):
            self._save_and_notify(whole=True)
        raise _Interrupt

    def _maybe_log_save_evaluate(self, grad_norm: torch.Tensor | None, learning_rate: float | None) -> None:
        args = self.args
        state = self.state
        if self.control.should_log and state.global_step > self._globalstep_last_logged:
            assert self._tr_loss is not None and self._total_loss is not None
            steps = state.global_step - self._globalstep_last_logged
            logs: dict[str, Any] = {}
            # A tensor, on the device: the bus resolves it off the training thread.
            # Distributed, it is the mean over ranks, reduced on the device (NCCL:
            # enqueued on the communication stream, the host does not wait).
            loss = self._tr_loss / steps
            pending = distributed.all_reduce_mean_(loss)
            self._total_loss += self._tr_loss
            self._tr_loss.zero_()
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            logs["learning_rate"] = learning_rate if learning_rate is not None else self._get_learning_rate()
            self._globalstep_last_logged = state.global_step
            # The loss, the grad norm (and a tensor learning rate, a clone) are new
            # tensors made without grad (training_step detaches, clip_grad_norm_ runs
            # without grad) that nobody modifies afterwards: handed to the Log event as
            # fresh. On the CPU, as a Snapshot, which on_log hands over to the bus
            # without looking at a value (the bus thread reads them); on an
            # accelerator each gets its asynchronous copy to the host.
            kind = Snapshot if self._logs_on_cpu else dict
            self.callback_handler.logs_are_fresh = True
            try:
                self.log(kind(loss=pending.wait(), **logs))
            finally:
                self.callback_handler.logs_are_fresh = False
            # on_log callbacks may have set flags (evaluate, save, stop) on one rank:
            # agreed before any rank acts on them, so that every rank runs the same
            # collectives (evaluation's gather, the checkpoint's). Logging steps only.
            self._agree_control()

        if self.control.should_evaluate:
            metrics = self._evaluate()
            is_new_best = self._determine_best_metric(metrics)
            if _save_strategy(args) == "best":
                self.control.should_save = is_new_best
            # Evaluation already waited for the host: agreeing again is cheap, and
            # on_evaluate callbacks (early stopping) may have set flags.
            self._agree_control()

        if self.control.should_save:
            self._save_and_notify()
            # on_save callbacks may have asked to stop; the same hooks ran on every
            # rank, so every rank takes part in this agreement.
            self._agree_control()

    def _save_and_notify(self, whole: bool = False) -> None:
        path = self._save_checkpoint(whole=whole)
        is_best = self.state.best_global_step == self.state.global_step and self.state.best_global_step is not None
        self.control = self.callback_handler.on_save(
            self.args, self.state, self.control, checkpoint_dir=path, is_best=is_best
        )

    def _evaluate(self, skip_scheduler: bool = False) -> dict[str, float]:
        metrics = self.evaluate()
        if not skip_scheduler and isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            # As transformers: the plateau schedule steps on each evaluation's metric.
            metric = self.args.metric_for_best_model or "loss"
            key = metric if metric.startswith("eval_") else f"eval_{metric}"
            value = metrics.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.lr_scheduler.step(value)
            elif not getattr(self, "_plateau_warned", False):
                self._plateau_warned = True
                logger.warning(
                    "lr_scheduler_type=reduce_lr_on_plateau watches %r (metric_for_best_model), which is not a number "
                    "in the evaluation metrics %s: the learning rate is not lowered. Fix metric_for_best_model (this "
                    "warning is shown once)", key, sorted(metrics),
                )
        return metrics

    def _determine_best_metric(self, metrics: Mapping[str, Any]) -> bool:
        args = self.args
        metric = getattr(args, "metric_for_best_model", None)
        if metric is None:
            return False
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            # Hours into a run is no time to crash over a typo: warn once, keep training
            # (every metric and checkpoint is still written), and track no best model.
            if not getattr(self, "_best_metric_warned", False):
                self._best_metric_warned = True
                found = "is not among" if key not in metrics else f"is {value!r}, not a number, in"
                logger.warning(
                    "metric_for_best_model=%r looks for %r, which %s the evaluation metrics %s; no best model is "
                    "tracked (this warning is shown once). Make compute_metrics return it or change "
                    "metric_for_best_model",
                    metric,
                    key,
                    found,
                    sorted(metrics),
                )
            return False
        value = float(value)
        greater = getattr(args, "greater_is_better", None)
        if greater is None:
            greater = not key.endswith("loss")
        if self.state.best_metric is None:
            self.state.best_metric = float("-inf") if greater else float("inf")
        better = value > self.state.best_metric if greater else value < self.state.best_metric
        if better:
            self.state.best_metric = value
            if _save_strategy(args) in ("steps", "epoch", "best"):
                self.state.best_global_step = self.state.global_step
        return better

    def log(self, logs: dict[str, Any], start_time: float | None = None) -> None:
        """Record ``logs`` in ``state.log_history`` (with the epoch and step) and call
        ``on_log`` (which publishes the ``Log`` event).

        The loop logs its loss and grad norm as tensors, read off the training thread
        by the bus. When some ``on_log`` callback wants plain numbers
        (:attr:`CallbackHandler.wants_plain_logs`, as transformers gives), they are read
        here first, for the callbacks and ``log_history`` alike; on the CPU, so are
        those of the ``log_history`` entry when a callback of the user's may read it
        (:attr:`CallbackHandler.wants_plain_history`). Otherwise the bus
        thread, which reads them for the ``Log`` event, writes the numbers into the
        ``log_history`` entry (within a flush interval or so: the entry holds no tensor,
        nor device memory, for long); with no sink taking ``Log``, CPU values are read
        here (no device involved) and accelerator values copied to the host
        asynchronously, read at the next evaluation, checkpoint or the end of training
        (which wait for the device anyway)."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        handler = self.callback_handler
        plain = handler.wants_plain_logs
        if plain:
            _read_values(logs)
        entry = {**logs, "step": self.state.global_step}
        self.state.log_history.append(entry)
        if plain:
            self.control = handler.on_log(self.args, self.state, self.control, logs)
        elif handler.publishes_log and not (self._logs_on_cpu and handler.wants_plain_history):
            handler.log_record = entry
            try:
                self.control = handler.on_log(self.args, self.state, self.control, logs)
            finally:
                handler.log_record = None
        else:
            if self._logs_on_cpu:
                # No sink reads them, or a callback of the user's may read the history
                # at any hook (numbers there, as transformers gives): read here, which
                # for a CPU tensor waits for no device. An event still gets the tensors.
                _read_values(entry)
            else:
                for k, v in entry.items():
                    if is_tensor(v):
                        entry[k] = snapshot(v)  # an asynchronous copy: no device memory kept
            self.control = handler.on_log(self.args, self.state, self.control, logs)

    def _finalize_training(self, start_time: float, max_steps: int, num_train_samples: float) -> TrainOutput:
        args = self.args
        assert self._tr_loss is not None and self._total_loss is not None
        # The one host sync of the whole run: the mean training loss of this call.
        total_t = self._total_loss + self._tr_loss
        distributed.all_reduce_mean_(total_t).wait()  # the mean over ranks
        total = total_t.item()
        steps_trained = self.state.global_step - self._initial_global_step
        train_loss = total / max(steps_trained, 0.001)
        metrics = _speed_metrics(
            "train",
            start_time,
            # As transformers: num_train_samples covers the whole schedule (the
            # examples times the epochs, or max_steps full batches); this call ran
            # its share of the steps.
            num_samples=num_train_samples * steps_trained / max(self.state.max_steps, 1),
            num_steps=steps_trained,
        )
        metrics["total_flos"] = float(self.state.total_flos)
        metrics["train_loss"] = train_loss
        self._settle_log_history()
        self.log(metrics)

        if getattr(args, "load_best_model_at_end", False) and self.state.best_model_checkpoint is not None:
            self._load_best_model()

        if (
            self.is_world_process_zero()
            and self.state.best_model_checkpoint is not None
            and getattr(args, "save_total_limit", None) == 1
        ):
            best = os.path.realpath(self.state.best_model_checkpoint)
            for path in ckpt.sorted_checkpoints(args.output_dir):
                if os.path.realpath(path) != best:
                    import shutil

                    shutil.rmtree(path, ignore_errors=True)

        status = "completed" if self.state.global_step >= self.state.max_steps else "stopped"
        self.control = self.callback_handler.on_train_end(args, self.state, self.control, status=status)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        assert best is not None
        logger.info("loading the best model from %s (score %s)", best, self.state.best_metric)
        ckpt.load_model_weights(self.model, best)

    # -- checkpoints ------------------------------------------------------------------

    def _stateful_callbacks(self) -> list[Any]:
        from trainer.state import is_exportable

        return [cb for cb in self.callback_handler.callbacks + [self.control] if is_exportable(cb)]

    def _settle_log_history(self) -> None:
        """Read the tensors left in ``state.log_history`` (see :meth:`log`)."""
        history = self.state.log_history
        # The count holds for the list it was taken on: a new state (a second train(),
        # a resume, a user's assignment) brings a new list, read from its start.
        same = history is self._history_settled_list and self._history_settled <= len(history)
        start = self._history_settled if same else 0
        for entry in history[start:]:
            _read_values(entry)
        self._history_settled = len(history)
        self._history_settled_list = history

    def _save_checkpoint(self, whole: bool = False) -> str:
        """Write ``checkpoint-<global_step>`` (atomically) and rotate old ones. With
        ``save_only_model`` it holds the model and the trainer state only, unless
        ``whole`` (the checkpoint of an interrupted run, to resume from)."""
        self._settle_log_history()
        args = self.args
        whole = whole or not getattr(args, "save_only_model", False)
        state = self.state
        final = ckpt.checkpoint_path(args.output_dir, state.global_step)
        if _save_strategy(args) in ("steps", "epoch", "best") and state.best_global_step:
            best_dir = ckpt.checkpoint_path(args.output_dir, state.best_global_step)
            if state.best_global_step == state.global_step or os.path.isdir(best_dir):
                state.best_model_checkpoint = best_dir
        marks: dict[str, int] = {}
        names: dict[str, Any] = {}
        rank0 = self.is_world_process_zero()
        # With a process group, every rank writes its RNG file into rank 0's staging
        # directory, and the directory is renamed into place only once every rank
        # has said its files are written: a crash mid-save (on any rank) never leaves
        # a checkpoint-<step> that lacks a rank's RNG state.
        collective = self.dist.is_distributed and distributed.is_initialized()
        tmp: str | None = None
        error: BaseException | None = None
        if rank0:
            try:
                os.makedirs(args.output_dir, exist_ok=True)
                tmp = ckpt.staging_dir(final)
            except BaseException as exc:  # agreed below, then raised
                error = exc
        if collective:
            tmp = distributed.broadcast_object(tmp)
        elif not rank0:
            # RANK/WORLD_SIZE without a process group: the ranks cannot wait for each
            # other, so this one adds its RNG file to the checkpoint directory itself.
            tmp = final
        if tmp is not None and error is None:
            try:
                # Not whole (save_only_model): the model and the trainer state, nothing a
                # resume needs.
                if rank0:
                    ckpt.save_model_weights(self.model, tmp)
                    if whole and self.optimizer is not None:
                        ckpt.save_torch(self.optimizer.state_dict(), os.path.join(tmp, ckpt.OPTIMIZER_NAME))
                    if whole and self.lr_scheduler is not None:
                        ckpt.save_torch(self.lr_scheduler.state_dict(), os.path.join(tmp, ckpt.SCHEDULER_NAME))
                    if whole and self.scaler is not None:
                        ckpt.save_torch(self.scaler.state_dict(), os.path.join(tmp, precision.SCALER_NAME))
                if whole:
                    ckpt.save_rng_state(tmp, self.dist.rank, self.dist.world_size)
                if rank0:
                    state.stateful_callbacks = self.callback_handler.export_callback_states(control=self.control)
                    state.save_to_json(os.path.join(tmp, ckpt.TRAINER_STATE_NAME))
                    marks = self.bus.high_water_marks()
                    names = self.bus.high_water_names()
                    ckpt.write_run_info(
                        tmp,
                        {
                            "run_id": self.run_id,
                            "global_step": state.global_step,
                            _marks.RUN_INFO_KEY: marks,
                            _marks.RUN_INFO_NAMES_KEY: names,
                        },
                    )
            except BaseException as exc:  # agreed below, then raised
                error = exc
        # Every rank's files are in the staging directory, or some rank failed: the
        # ranks agree on which before anything is committed (this is also the barrier).
        failed = distributed.broadcast_flags([error is not None])[0] if collective else error is not None
        if failed:
            if rank0 and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error
            raise RuntimeError(
                f"checkpoint {final!r} was not saved: another rank failed while writing its files (its own error "
                "says why); the staging directory was removed, the previous checkpoints are intact"
            )
        if rank0:
            assert tmp is not None
            ckpt.commit_staging_dir(tmp, final)
            ckpt.rotate_checkpoints(
                args.output_dir, getattr(args, "save_total_limit", None), state.best_model_checkpoint, current=final
            )
            if marks:
                _marks.write_latest(args.output_dir, self.run_id, marks, names)
        # checkpoint-<step> is in place (and rotation done) on every rank before on_save.
        distributed.barrier()
        self._last_saved_step = state.global_step
        self._last_save_whole = whole
        self._last_checkpoint_dir = final
        return final

    def save_model(self, output_dir: str | os.PathLike[str] | None = None) -> str | None:
        """Save the model's weights (``pytorch_model.bin``) to ``output_dir`` (default
        ``args.output_dir``) on the main process; returns the file written."""
        if not self.is_world_process_zero():
            return None
        directory = os.fspath(output_dir) if output_dir is not None else self.args.output_dir
        return ckpt.save_model_weights(self.model, directory)

    # -- transformers' helpers for scripts ---------------------------------------------

    def metrics_format(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """``metrics`` formatted for reading, as transformers (see :meth:`log_metrics`)."""
        return reports.metrics_format(metrics)

    def log_metrics(self, split: str, metrics: Mapping[str, Any]) -> None:
        """Print ``metrics`` as transformers' example scripts show them, under
        ``***** <split> metrics *****``, on the main process only."""
        if not self.is_world_process_zero():
            return
        print(f"***** {split} metrics *****")
        formatted = reports.metrics_format(metrics)
        if not formatted:
            return
        k_width = max(len(str(k)) for k in formatted)
        v_width = max(len(str(v)) for v in formatted.values())
        for key in sorted(formatted):
            print(f"  {key: <{k_width}} = {formatted[key]:>{v_width}}")

    def save_metrics(self, split: str, metrics: Mapping[str, Any], combined: bool = True) -> None:
        """Write ``metrics`` to ``<output_dir>/<split>_results.json`` and, with
        ``combined``, merge them into ``all_results.json``, as transformers (on the
        main process only; each file replaced atomically)."""
        if not self.is_world_process_zero():
            return
        values = _denumpify(metrics)
        reports.write_json(os.path.join(self.args.output_dir, f"{split}_results.json"), values)
        if combined:
            path = os.path.join(self.args.output_dir, "all_results.json")
            merged: dict[str, Any] = {}
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    merged = json.load(f)
            merged.update(values)
            reports.write_json(path, merged)

    def save_state(self) -> None:
        """Write the trainer state to ``<output_dir>/trainer_state.json`` (main
        process only), as transformers."""
        if not self.is_world_process_zero():
            return
        self._settle_log_history()
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.state.save_to_json(os.path.join(self.args.output_dir, ckpt.TRAINER_STATE_NAME))

    def create_model_card(self, **kwargs: Any) -> None:
        """transformers' draft model card (``<output_dir>/README.md``: the
        hyperparameters, the evaluation results, the training log), written by
        transformers' own ``Trainer.create_model_card`` from this trainer's arguments
        and state; it takes the same keywords (``model_name``, ``language``,
        ``license``, ``tags``, ``finetuned_from``, ``tasks``, ``dataset_tags``,
        ``dataset``, ``dataset_args``). Needs transformers (its example scripts, which
        call this, import it anyway)."""
        try:
            import transformers
        except ImportError:
            raise ImportError(
                "Trainer.create_model_card writes transformers' model card with transformers' own code; install "
                "transformers (pip install transformers), or leave the call out"
            ) from None
        self._settle_log_history()
        os.makedirs(self.args.output_dir, exist_ok=True)
        transformers.Trainer.create_model_card(self, **kwargs)

    def end(self) -> None:
        """Finish what the trainer holds for the process, as transformers' ``end()``:
        its bus, if still open (after :meth:`train` it is closed already), and the
        distributed process group, which every rank ends together. Call it once, at
        the very end of a script, after everything that needs the other processes."""
        if self.bus.running:
            self._close_bus()
        distributed.destroy_process_group()

    def num_examples(self, dataloader: Any) -> int:
        """The examples in ``dataloader``'s dataset; without a length, the batches
        times ``per_device_train_batch_size``, as transformers estimates it."""
        try:
            return len(dataloader.dataset)
        except (AttributeError, TypeError):
            return len(dataloader) * self.args.per_device_train_batch_size

    def get_num_trainable_parameters(self) -> int:
        """The number of parameters that require gradients."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def get_learning_rates(self) -> list[float]:
        """The learning rate of each of the optimizer's parameter groups."""
        if self.optimizer is None:
            raise ValueError("Trainer optimizer is None, please make sure you have setup the optimizer before.")
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_optimizer_group(self, param: str | torch.nn.Parameter | None = None) -> Any:
        """The optimizer's parameter group holding ``param`` (a parameter, or its
        name in the model); otherwise (``None``, or not found) every group's
        parameters, as transformers."""
        if self.optimizer is None:
            raise ValueError("Trainer optimizer is None, please make sure you have setup the optimizer before.")
        if isinstance(param, str):
            param = dict(self.model.named_parameters()).get(param)
        if param is not None:
            for group in self.optimizer.param_groups:
                if any(p is param for p in group["params"]):
                    return group
        return [group["params"] for group in self.optimizer.param_groups]

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The names of ``model``'s parameters that get weight decay (all but biases
        and norms), as transformers' method of that name."""
        return get_decay_parameter_names(model)

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        """:meth:`create_optimizer` then :meth:`create_scheduler`, as transformers."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps=num_training_steps)

    # -- evaluation and prediction ---------------------------------------------------

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Run the evaluation set through the model; returns the metrics (prefixed with
        ``metric_key_prefix``), logs them and calls ``on_evaluate``.

        A dict of named datasets (as ``eval_dataset`` here or to the Trainer) is
        evaluated one by one, each logged with the prefix ``f"{metric_key_prefix}_{name}"``
        and reported to ``on_evaluate`` on its own, as in transformers; the metrics of
        all are returned together (so ``metric_for_best_model`` names one of them, e.g.
        ``"eval_val_loss"``)."""
        override = eval_dataset is not None
        dataset = eval_dataset if override else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer.evaluate() needs an eval_dataset; pass Trainer(..., eval_dataset=...)")
        owns_bus = self._open_bus()
        try:
            if isinstance(dataset, dict):
                metrics: dict[str, float] = {}
                for name, named in dataset.items():
                    metrics.update(
                        self.evaluate(
                            eval_dataset=named if override else name,
                            ignore_keys=ignore_keys,
                            metric_key_prefix=f"{metric_key_prefix}_{name}",
                        )
                    )
                return metrics
            start = time.time()
            loader = self.get_eval_dataloader(eval_dataset)
            output = self.evaluation_loop(
                loader,
                description="Evaluation",
                prediction_loss_only=True if self.compute_metrics is None else None,
                ignore_keys=ignore_keys,
                metric_key_prefix=metric_key_prefix,
            )
            n = output.num_samples
            output.metrics.update(
                _speed_metrics(
                    metric_key_prefix, start, num_samples=n, num_steps=math.ceil(n / self.args.per_device_eval_batch_size)
                )
            )
            self._settle_log_history()
            self.log(output.metrics)
            self.control = self.callback_handler.on_evaluate(
                self.args, self.state, self.control, metrics=output.metrics, metric_key_prefix=metric_key_prefix
            )
            return output.metrics
        finally:
            if owns_bus:
                self._close_bus()

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Run ``test_dataset`` through the model; returns predictions, labels (when the
        data has them) and metrics, and calls ``on_predict``."""
        owns_bus = self._open_bus()
        try:
            start = time.time()
            loader = self.get_test_dataloader(test_dataset)
            output = self.evaluation_loop(
                loader, description="Prediction", ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
            n = output.num_samples
            output.metrics.update(
                _speed_metrics(
                    metric_key_prefix, start, num_samples=n, num_steps=math.ceil(n / self.args.per_device_eval_batch_size)
                )
            )
            self.control = self.callback_handler.on_predict(
                self.args, self.state, self.control, metrics=output.metrics, metric_key_prefix=metric_key_prefix
            )
            return PredictionOutput(output.predictions, output.label_ids, output.metrics)
        finally:
            if owns_bus:
                self._close_bus()

    class _LoopOutput(NamedTuple):
        predictions: Any
        label_ids: Any
        metrics: dict[str, Any]
        num_samples: int

    def evaluation_loop(
        self,
        dataloader: torch.utils.data.DataLoader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> Trainer._LoopOutput:
        """Shared by :meth:`evaluate` and :meth:`predict`: run every batch, gather
        losses, predictions and labels on the host, compute metrics (as transformers:
        ``preprocess_logits_for_metrics`` on each batch's logits, ``include_for_metrics``,
        ``eval_do_concat_batches``, ``batch_eval_metrics``, ``bf16/fp16_full_eval``)."""
        args = self.args
        if prediction_loss_only is None:
            prediction_loss_only = bool(getattr(args, "prediction_loss_only", False))
        model = self.model
        if not self.is_in_train:
            # A whole half-precision evaluation, as transformers: the model is cast in
            # place (it stays so), only when evaluate/predict run outside train().
            if getattr(args, "fp16_full_eval", False):
                model = model.to(dtype=torch.float16)
            elif getattr(args, "bf16_full_eval", False):
                model = model.to(dtype=torch.bfloat16)
        model.eval()
        self.callback_handler.eval_dataloader = dataloader
        self._record_device()
        device = self._device
        phase = "predict" if description == "Prediction" else "eval"
        include = set(getattr(args, "include_for_metrics", None) or ())
        concat = bool(getattr(args, "eval_do_concat_batches", True))
        per_batch = bool(getattr(args, "batch_eval_metrics", False))
        # With per-batch metrics nothing is kept for them; predict() still returns
        # every prediction.
        keep = not per_batch or phase == "predict"
        main_input = getattr(self.model, "main_input_name", "input_ids")
        losses: list[torch.Tensor] = []
        loss_weights: list[float] = []
        kept = _EvalBatches()
        metrics: Any = None
        observed = 0
        try:
            num_batches: int | None = len(dataloader)
        except TypeError:
            num_batches = None
        for batch_index, (inputs, last) in enumerate(_with_last(dataloader)):
            inputs = _to_device(inputs, device)
            bs = _find_batch_size(inputs)
            if bs is not None:
                observed += bs
            loss, logits, label = self.prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            example_losses = None
            if loss is not None:
                loss = loss.detach()
                losses.append(loss.reshape(1).cpu())
                loss_weights.append(float(bs) if bs is not None else 1.0)
                if "loss" in include:
                    # The batch's loss once per example, aligned with the predictions.
                    example_losses = loss.reshape(1).repeat(bs if bs is not None else 1)
            main = _main_input(inputs, main_input) if "inputs" in include else None
            if logits is not None and self.preprocess_logits_for_metrics is not None:
                logits = self.preprocess_logits_for_metrics(logits, label)
            if keep:
                kept.add(logits, label, main, example_losses)
            self.control = self.callback_handler.on_prediction_step(
                args, self.state, self.control, batch_index=batch_index, num_batches=num_batches, phase=phase
            )
            if per_batch and self.compute_metrics is not None and logits is not None and label is not None:
                # transformers' call: this batch's tensors (the whole batch as inputs);
                # the metrics are those of the call on the last batch.
                batch = EvalPrediction(logits, label, inputs=inputs if main is not None else None, losses=example_losses)
                metrics = self.compute_metrics(batch, compute_result=last)
        dataset = getattr(dataloader, "dataset", None)
        num_samples = len(dataset) if dataset is not None and _has_length(dataset) else observed

        all_preds, all_labels, all_inputs, all_losses = kept.arrays(concat)
        if getattr(dataloader, "_trainer_sharded", False):
            # Every rank ran its share: gather them so that compute_metrics (and so
            # every control callback, early stopping included) sees the whole set, and
            # decides the same on every rank.
            (all_preds, all_labels, all_inputs, all_losses), losses, loss_weights, observed = _gather_eval(
                (all_preds, all_labels, all_inputs, all_losses), concat, losses, loss_weights, observed
            )
            if dataset is None or not _has_length(dataset):
                num_samples = observed
        if self.compute_metrics is not None and not per_batch and all_preds is not None and all_labels is not None:
            # (inputs and losses are None unless include_for_metrics asked for them)
            metrics = self.compute_metrics(EvalPrediction(all_preds, all_labels, inputs=all_inputs, losses=all_losses))
        metrics = _denumpify(dict(metrics)) if metrics is not None else {}
        if losses:
            all_batch_losses = torch.cat(losses).double()
            finite = torch.isfinite(all_batch_losses)
            weights = torch.tensor(loss_weights, dtype=torch.float64)
            if getattr(args, "logging_nan_inf_filter", True) and bool(finite.any()):
                all_batch_losses = all_batch_losses[finite]
                weights = weights[finite]
            # The mean over examples, as transformers (which repeats each batch's loss
            # batch-size times): each batch mean weighs as many examples as it holds,
            # so a short last batch (or a rank's smaller share) counts for less.
            metrics[f"{metric_key_prefix}_loss"] = ((all_batch_losses * weights).sum() / weights.sum()).item()
        for key in list(metrics):
            if not key.startswith(f"{metric_key_prefix}_"):
                metrics[f"{metric_key_prefix}_{key}"] = metrics.pop(key)
        return Trainer._LoopOutput(all_preds, all_labels, metrics, num_samples)

    def prediction_step(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        """One evaluation batch: (loss, logits, labels), each ``None`` when absent."""
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        ignore = list(ignore_keys or [])
        label: Any = None
        if has_labels:
            found = tuple(inputs[k].detach() if isinstance(inputs[k], torch.Tensor) else inputs[k] for k in self.label_names)
            label = found[0] if len(found) == 1 else found
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = None
            if has_labels:
                # Through compute_loss, as transformers (so an override of it is the
                # evaluation loss too): compute_loss_func's or the smoothed loss, and
                # this batch's labelled positions for a model that takes them.
                count = self._get_num_items_in_batch([inputs], self._device, across_ranks=False)
                if count is not None and self._compute_loss_takes_items:
                    loss, outputs = self.compute_loss(model, inputs, return_outputs=True, num_items_in_batch=count)
                else:  # an override with the older signature
                    loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                loss = loss.detach().mean()
                # Called without labels (compute_loss_func, smoothing), the model's
                # outputs hold no loss: all of them are predictions.
                own_loss = not self._loss_from_outputs(inputs)
            else:
                outputs = model(**inputs)
                own_loss = False
            if own_loss:
                if isinstance(outputs, Mapping):
                    logits = tuple(v for k, v in outputs.items() if k not in ignore + ["loss"])
                else:
                    logits = tuple(outputs[1:])
            elif isinstance(outputs, Mapping):
                logits = tuple(v for k, v in outputs.items() if k not in ignore)
            else:
                logits = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
        loss = precision.outputs_to_fp32(loss)
        if prediction_loss_only:
            return loss, None, None
        # Half-precision outputs of an autocast forward as float32 (numpy, which
        # compute_metrics gets, has no bfloat16).
        logits = tuple(precision.outputs_to_fp32(v.detach() if isinstance(v, torch.Tensor) else v) for v in logits if v is not None)
        if not logits:
            return loss, None, label
        return loss, (logits[0] if len(logits) == 1 else logits), label


def _interleave(parts: list[Any]) -> Any:
    """Undo ``shard_indices(pad=False)``: rank ``r`` holds rows ``r, r + W, ...``."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    first = parts[0]
    if isinstance(first, (tuple, list)):
        return type(first)(_interleave([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _interleave([p[k] for p in parts]) for k in first}
    if len(parts) == 1:
        return first
    if all(isinstance(p, np.ndarray) and p.ndim >= 1 and p.shape[1:] == first.shape[1:] for p in parts):
        out = np.empty((sum(p.shape[0] for p in parts),) + first.shape[1:], dtype=np.result_type(*parts))
        for r, p in enumerate(parts):
            out[r :: len(parts)] = p
        return out
    # Rows of different widths (sequence lengths): concatenated in rank order instead.
    return np.concatenate([np.asarray(p) for p in parts], axis=0)


def _gather_eval(
    fields: tuple[Any, ...], concat: bool, losses: list[torch.Tensor], weights: list[float], observed: int
) -> tuple[tuple[Any, ...], list[torch.Tensor], list[float], int]:
    """Every rank's evaluation results (``fields``: predictions, labels, inputs,
    per-example losses; arrays, or lists of per-batch arrays when not ``concat``), on
    every rank, in dataset order."""
    loss_vec = torch.cat(losses) if losses else torch.zeros(0)
    gathered = distributed.gather_objects((fields, loss_vec, list(weights), observed))
    merged = []
    for i in range(len(fields)):
        # A rank whose share was empty (fewer examples than ranks) has None: skipped.
        parts = [g[0][i] for g in gathered if g[0][i] is not None]
        if not parts:
            merged.append(None)
        elif concat:
            merged.append(_interleave(parts))
        else:
            # Batch b of every rank holds the rows r + W * (b * size + k): together, one
            # contiguous block of the dataset, in order once interleaved.
            merged.append([_interleave([p[b] for p in parts if b < len(p)]) for b in range(max(len(p) for p in parts))])
    all_losses = [g[1] for g in gathered if g[1].numel()]
    all_weights = [w for g in gathered for w in g[2]]
    return tuple(merged), all_losses, all_weights, sum(int(g[3]) for g in gathered)


class _EvalBatches:
    """The evaluation batches' predictions, labels, main inputs and per-example
    losses, moved to the host as they come."""

    def __init__(self) -> None:
        self.fields: tuple[list[Any], ...] = ([], [], [], [])

    def add(self, *values: Any) -> None:
        for kept, value in zip(self.fields, values):
            if value is not None:
                kept.append(_nested_cpu(value))

    def arrays(self, concat: bool) -> tuple[Any, ...]:
        """Each field as numpy: concatenated over the batches (padded with -100
        where their widths differ), or as a list of per-batch arrays; ``None`` when
        no batch had it."""
        if concat:
            return tuple(_nested_numpy(_nested_concat(kept)) if kept else None for kept in self.fields)
        return tuple([_nested_numpy(b) for b in kept] if kept else None for kept in self.fields)


def _with_last(loader: Any) -> Iterator[tuple[Any, bool]]:
    """``(batch, is_last)`` for each batch of ``loader``: one batch read ahead, so
    that an unsized loader says which batch is its last too."""
    it = iter(loader)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


def _main_input(inputs: Any, name: str) -> Any:
    """The batch's main input (``include_for_metrics=["inputs"]``)."""
    if isinstance(inputs, Mapping) and name in inputs:
        return inputs[name]
    keys = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
    raise ValueError(
        f"include_for_metrics=['inputs'] passes the batches' {name!r} (the model's main_input_name) to "
        f"compute_metrics, but the evaluation batches hold {keys}; set model.main_input_name to the input to pass"
    )


# What accelerate's should_reduce_batch_size looks for in an error's message.
_OOM_MESSAGES = (
    " out of memory.",  # CUDA, HIP, XPU
    "MPS backend out of memory",
    "cuDNN error: CUDNN_STATUS_NOT_SUPPORTED.",
    "DefaultCPUAllocator: can't allocate memory",
    "FATAL ERROR :: MODULE:PT_DEVMEM Allocation failed",  # HPU
)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator running out of memory, as accelerate decides
    it for ``auto_find_batch_size``."""
    return isinstance(exc, RuntimeError) and len(exc.args) == 1 and any(m in str(exc.args[0]) for m in _OOM_MESSAGES)


def _checked_optimizer_cls_and_kwargs(spec: Any, optimizer: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]] | None:
    """Trainer's ``optimizer_cls_and_kwargs``: ``None`` or an (optimizer class,
    options) pair, not given with an optimizer instance (as transformers)."""
    if spec is None:
        return None
    if optimizer is not None:
        raise RuntimeError("Passing both `optimizers` and `optimizer_cls_and_kwargs` arguments is incompatible.")
    if (
        not isinstance(spec, (tuple, list))
        or len(spec) != 2
        or not (isinstance(spec[0], type) and issubclass(spec[0], torch.optim.Optimizer))
        or not isinstance(spec[1], Mapping)
    ):
        raise TypeError(
            "optimizer_cls_and_kwargs must be a pair (a torch.optim.Optimizer subclass, a dict of its options), e.g. "
            f"(torch.optim.AdamW, {{'lr': 1e-4}}); got {spec!r}"
        )
    return spec[0], dict(spec[1])


def _accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes ``name`` as a keyword (or any keyword: ``**kwargs``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _takes_third_argument(method: Callable[..., Any]) -> bool:
    """Whether ``method(model, inputs, x)`` binds (a bound method's signature)."""
    import inspect

    try:
        inspect.signature(method).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): call it as transformers does
        return True
    return True


def _find_batch_size(inputs: Any) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() > 0 else None
    if isinstance(inputs, Mapping):
        for v in inputs.values():
            n = _find_batch_size(v)
            if n is not None:
                return n
    if isinstance(inputs, (list, tuple)):
        for v in inputs:
            n = _find_batch_size(v)
            if n is not None:
                return n
    return None


def _save_strategy(args: Any) -> str:
    s = getattr(args, "save_strategy", "no")
    return str(getattr(s, "value", s))
