"""Shared pieces of the training-loop tests: a tiny model, data, a recording callback,
a recording sink, and a runner for transformers' own Trainer (for side-by-side checks)."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch
from torch import nn

from eventbus import EVENT_TYPES, Log, Sink
from trainer import TrainerCallback, TrainingArguments

ALL_HOOKS = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_substep_end",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
)


class TinyClassifier(nn.Module):
    """4 features -> 3 classes, with a LayerNorm and optional dropout; transformers'
    output convention (``{"loss", "logits"}``)."""

    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            self.lin = nn.Linear(4, 16)
            self.norm = nn.LayerNorm(16)
            self.drop = nn.Dropout(dropout)
            self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.out(self.drop(torch.relu(self.norm(self.lin(x)))))
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def tiny_gpt2(n_layer: int = 1) -> nn.Module:
    """A real transformers causal language model (built from a config: nothing
    downloaded), without dropout so that runs compare exactly."""
    from tests.conftest import require_module

    transformers = require_module("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def make_dataset(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` examples ``{"x": float[4], "labels": int}`` whose label depends on x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return [{"x": x[i], "labels": int(y[i])} for i in range(n)]


def accuracy(p: Any) -> dict[str, float]:
    preds, labels = p
    return {"accuracy": float((preds.argmax(-1) == labels).mean())}


def recording_callback_class(base: type = TrainerCallback) -> type:
    """A callback class (subclass of ``base``) that records every hook it receives."""

    class Recorder(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.calls: list[str] = []
            self.steps: list[tuple[str, int]] = []

    for hook in ALL_HOOKS:

        def method(self: Any, args: Any, state: Any, control: Any, _hook: str = hook, **kwargs: Any) -> None:
            self.calls.append(_hook)
            self.steps.append((_hook, state.global_step))

        setattr(Recorder, hook, method)
    return Recorder


class RecordingSink(Sink):
    """Keeps every event it is written, in order."""

    name = "recording"
    events = EVENT_TYPES

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.opened_with: Any = None
        self.closed = False

    async def open(self, run: Any) -> None:
        self.opened_with = run

    async def write(self, batch: Sequence[Any]) -> None:
        self.received.extend(batch)

    async def close(self) -> None:
        self.closed = True

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.received if isinstance(e, cls)]


def run_transformers(model: nn.Module, args_kwargs: dict[str, Any], train, eval_ds, callbacks, compute_metrics=None):
    """Train with transformers' own Trainer on the CPU, without downloads or reporting."""
    import transformers

    targs = transformers.TrainingArguments(report_to="none", use_cpu=True, disable_tqdm=True, **args_kwargs)
    t = transformers.Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        eval_dataset=eval_ds,
        callbacks=callbacks,
        compute_metrics=compute_metrics,
    )
    t.train()
    return t


def steps_per_epoch(n_examples: int, batch_size: int, ga: int) -> int:
    batches = math.ceil(n_examples / batch_size)
    return max(batches // ga + int(batches % ga > 0), 1)


def checkpoints(output_dir: str) -> list[str]:
    return sorted(
        (d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and "." not in d),
        key=lambda d: int(d.split("-")[1]),
    )


def tiny_args(output_dir: Any, **overrides: Any) -> TrainingArguments:
    """TrainingArguments for the tiny model's tests: batches of 4, a log every step, no
    checkpoints, no sinks from report_to, no progress bar; ``overrides`` win."""
    base: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    base.update(overrides)
    return TrainingArguments(**base)


def log_as_built(run_id: str, rank: int, step: int, epoch: float | None, values: Any, settle: Any = None) -> Log:
    """The ``Log`` that ``EventBus.publish_log`` with these arguments stands for, as
    it is on the training thread (the bus thread builds it, its values read, and
    writes them into ``settle``)."""
    return Log(run_id=run_id, rank=rank, step=step, epoch=epoch, values=values)
