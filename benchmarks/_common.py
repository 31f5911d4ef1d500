"""Shared pieces of the training benchmarks: a small model, its data, a step timer and
the sinks of the overhead benchmark's configuration (c).

Imported by ``benchmarks/training.py`` and ``benchmarks/gpu_sync.py`` (run as
scripts, so this directory is on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import statistics
import sys
import time
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["TinyModel", "make_dataset", "log_every_step_args", "train_transformers", "StepTimer", "as_transformers_callback", "transformers_trainer_status", "median_min_max", "quiet_stdout", "say"]


class TinyModel(nn.Module):
    """A two-layer MLP regressor; ``forward(x, labels)`` returns ``{"loss", "logits"}``
    as both trainers expect. At ``dim=64, hidden=256`` and a batch of 32 a CPU step
    (forward, backward, AdamW) takes a few hundred microseconds."""

    def __init__(self, dim: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Predict one value per row; the mean squared error when ``labels`` are given."""
        out = self.net(x).squeeze(-1)
        result = {"logits": out}
        if labels is not None:
            result["loss"] = nn.functional.mse_loss(out, labels)
        return result


def make_dataset(n: int, dim: int = 64, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` examples ``{"x", "labels"}`` of a noisy linear target."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, generator=g)
    y = x @ w + 0.1 * torch.randn(n, generator=g)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


class StepTimer:
    """Records the time of every ``on_step_end``; :meth:`steps_per_second` over the
    steps after a warm-up, so start-up (sinks opening, first allocations) and shutdown
    are not counted. Works as a callback of both trainers (duck-typed hooks).

    Training starts from a full garbage collection: with torch and the backends' SDKs
    imported the process holds about a million objects that the collector tracks, and
    a full collection of them (150-330 ms of CPU on the development VM, on whichever
    thread happens to allocate) is due when enough new objects have survived since
    the last one, which import and set-up bring close. Without a collection first, one
    falls into one run's timed window or another's by chance: 3-7% of a 3000-step
    run. :meth:`full_collections` counts those that still fall into the window."""

    def __init__(self) -> None:
        self.times: list[tuple[float, float, float]] = []
        self._full_gc_at: list[float] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Collect garbage fully, then note the time of each later full collection."""
        gc.collect()
        if self._note_full_gc not in gc.callbacks:
            gc.callbacks.append(self._note_full_gc)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Stop noting collections."""
        if self._note_full_gc in gc.callbacks:
            gc.callbacks.remove(self._note_full_gc)

    def _note_full_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and info["generation"] == 2:
            self._full_gc_at.append(time.perf_counter())

    def full_collections(self, warmup: float = 0.1) -> int:
        """Full garbage collections during the timed window (see the class's note)."""
        _, first, last = self._window(warmup)
        return sum(first[0] <= t <= last[0] for t in self._full_gc_at)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Note the wall time, the process's CPU time and the training thread's."""
        self.times.append((time.perf_counter(), time.process_time(), time.thread_time()))

    def _window(self, warmup: float) -> tuple[int, tuple[float, float, float], tuple[float, float, float]]:
        skip = max(1, int(len(self.times) * warmup))
        t = self.times[skip - 1 :]
        if len(t) < 2:
            raise RuntimeError("too few steps to time; raise --steps")
        return len(t) - 1, t[0], t[-1]

    def steps_per_second(self, warmup: float = 0.1) -> float:
        """Steps per second from the first step after ``warmup`` (a fraction) to the last."""
        n, first, last = self._window(warmup)
        return n / (last[0] - first[0])

    def other_threads_cpu_us(self, warmup: float = 0.1) -> float:
        """CPU µs per step used by the process's other threads (the bus, the sinks,
        the SDKs' own threads) over the same steps."""
        n, first, last = self._window(warmup)
        return ((last[1] - first[1]) - (last[2] - first[2])) * 1e6 / n


def as_transformers_callback(timer: StepTimer) -> Any:
    """``timer`` wrapped in a transformers ``TrainerCallback`` subclass."""
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timer.on_train_begin(args, state, control)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timer.on_train_end(args, state, control)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            timer.on_step_end(args, state, control)

    return _Timer()


def transformers_trainer_status() -> str | None:
    """None when transformers' Trainer can run here, else why not."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install 'eventbus-telemetry[bench]')"
    if importlib.util.find_spec("accelerate") is None:
        return "transformers' Trainer needs accelerate, which is not installed (pip install accelerate)"
    return None


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence what SDKs print (Comet's offline notes, progress bars)."""
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def median_min_max(values: list[float], fmt: str = ",.0f") -> str:
    """``median [min-max]``, each formatted with ``fmt``."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def say(msg: str) -> None:
    """Progress on stderr, so stdout holds only the results."""
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _log_every_step_kwargs(workdir: str, steps: int, batch: int) -> dict[str, Any]:
    """The training arguments both trainers get in the benchmarks: ``steps`` optimizer
    steps, a log every step, no checkpoints, no progress bar."""
    return {
        "output_dir": workdir,
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
    }


def log_every_step_args(workdir: str, steps: int, batch: int, **extra: Any) -> Any:
    """Our ``TrainingArguments`` for the benchmarks (:func:`_log_every_step_kwargs`),
    with no sinks from ``report_to`` (the caller passes its own); ``extra`` fields
    added (``bf16=True``...)."""
    from trainer import TrainingArguments

    return TrainingArguments(**_log_every_step_kwargs(workdir, steps, batch), report_to="none", **extra)


def train_transformers(model: Any, data: Any, workdir: str, steps: int, batch: int, report_to: str, use_cpu: bool) -> float:
    """Train ``model`` on ``data`` through transformers' ``Trainer`` with the same
    arguments as ours (printing and progress callbacks removed); steps/s."""
    import transformers
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    args = transformers.TrainingArguments(
        **_log_every_step_kwargs(workdir, steps, batch), report_to=report_to, use_cpu=use_cpu,
        dataloader_pin_memory=not use_cpu,  # as ours: pinned batches only where there is a GPU
    )
    timer = StepTimer()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[as_transformers_callback(timer)])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    with quiet_stdout():
        trainer.train()
    return timer.steps_per_second()
