"""``eventbus train``: the main job. Trains a small real model on data generated in
code (nothing is downloaded), with evaluation, accuracy, early stopping, a progress bar
and logging through the event bus, then prints a summary: where the logs are, how to
open them, the best metric and what every sink received.

The task: three interleaved spiral arms in the plane, one class per arm, generated
deterministically from the seed. A small MLP learns it to high accuracy in a few
hundred steps on a laptop CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from typing import Any, Callable

__all__ = ["add_train_parser", "run_train", "SpiralDataset", "SpiralMLP", "make_spirals", "accuracy"]

DEFAULT_REPORT_TO = "tensorboard,jsonl"

EXIT_STATUS = """\
exit status:
  0    training completed, or early stopping ended it (also --resume from a
       checkpoint already at or past --max-steps: nothing is trained)
  1    training failed (the summary says so)
  2    a bad option, or a checkpoint --resume cannot use
  130  interrupted by SIGINT (Ctrl-C): the current step finishes, a checkpoint is
       saved and --resume continues (a second Ctrl-C stops at once, unsaved)
  143  interrupted by SIGTERM: a checkpoint is saved first, as for SIGINT
"""


def make_spirals(n_per_class: int, n_classes: int = 3, noise: float = 0.25, seed: int = 0) -> tuple[Any, Any]:
    """``n_classes`` spiral arms of ``n_per_class`` points each: (points[N, 2], labels[N])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(n_classes):
        r = torch.linspace(0.1, 1.0, n_per_class)
        theta = r * 2.5 * math.pi + 2 * math.pi * c / n_classes
        theta = theta + noise * torch.randn(n_per_class, generator=g) * r
        xs.append(torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1))
        ys.append(torch.full((n_per_class,), c, dtype=torch.long))
    x = torch.cat(xs)
    y = torch.cat(ys)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


class SpiralDataset:
    """A map-style dataset of ``{"x": point, "labels": class}`` examples."""

    def __init__(self, x: Any, y: Any) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "labels": self.y[i]}


def _mlp_class() -> type:
    import torch
    from torch import nn

    class SpiralMLP(nn.Module):
        """A small MLP with transformers' output convention: ``{"loss", "logits"}``."""

        def __init__(self, hidden: int = 64, n_classes: int = 3) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(2, hidden),
                nn.GELU(),
                nn.LayerNorm(hidden),
                nn.Linear(hidden, hidden),
                nn.GELU(),
                nn.Linear(hidden, n_classes),
            )

        def forward(self, x: Any, labels: Any = None) -> dict[str, Any]:
            logits = self.net(x)
            out = {"logits": logits}
            if labels is not None:
                out = {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}
            return out

    return SpiralMLP


def __getattr__(name: str) -> Any:  # SpiralMLP without importing torch at CLI import time
    if name == "SpiralMLP":
        return _mlp_class()
    raise AttributeError(name)


def accuracy(eval_pred: Any) -> dict[str, float]:
    """``compute_metrics``: the share of examples whose arg-max logit is the label."""
    import numpy as np

    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def add_train_parser(subparsers: Any) -> Callable[[argparse.Namespace], int]:
    """Add the ``train`` subcommand to ``subparsers``; returns its handler."""
    p = subparsers.add_parser(
        "train",
        help="train a small model on generated data, logging through the event bus",
        description=__doc__,
        epilog=EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--output-dir", default="runs/demo", help="where checkpoints and logs go (default: runs/demo)")
    p.add_argument("--max-steps", type=int, default=300, help="optimizer steps to train for (default: 300)")
    p.add_argument(
        "--report-to",
        default=DEFAULT_REPORT_TO,
        help=f"sinks: 'none', 'all' or comma-separated names (default: {DEFAULT_REPORT_TO})",
    )
    p.add_argument("--eval-steps", type=int, default=25, help="evaluate every N steps (default: 25)")
    p.add_argument("--logging-steps", type=int, default=10, help="log the training loss every N steps (default: 10)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data, the model and the order (default: 42)")
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience in evaluations (default: 3)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (default: 32)")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="peak learning rate (default: 1e-2)")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --output-dir")
    p.add_argument("--no-progress", action="store_true", help="print logs instead of drawing a progress bar")
    return run_train


def _check(ns: argparse.Namespace) -> str | None:
    for name in ("max_steps", "eval_steps", "logging_steps", "batch_size"):
        v = getattr(ns, name)
        if v < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {v}"
    if ns.patience < 1:
        return f"--patience must be >= 1, got {ns.patience}"
    if not ns.learning_rate > 0:
        return f"--learning-rate must be > 0, got {ns.learning_rate}"
    return None


def run_train(ns: argparse.Namespace) -> int:
    """The ``eventbus train`` handler: returns the process exit status."""
    problem = _check(ns)
    if problem:
        print(f"eventbus train: error: {problem}", file=sys.stderr)
        return 2
    # Heavy imports here, not at module import: `eventbus --help` stays fast.
    from eventbus.errors import EventBusError
    from trainer import EarlyStoppingCallback, Trainer, TrainingArguments
    from trainer.checkpoint import CheckpointError
    from trainer.trainer import TrainingInterrupted

    output_dir = os.path.abspath(ns.output_dir)
    if ns.resume:
        done = _resumed_step(output_dir)
        if done is not None and done[1] >= ns.max_steps:
            _print_nothing_to_train(output_dir, ns.max_steps, *done)
            return 0
    logging_dir = _prepare_output_dir(output_dir, resume=bool(ns.resume))
    try:
        args = TrainingArguments(
            logging_dir=logging_dir,
            output_dir=output_dir,
            max_steps=ns.max_steps,
            per_device_train_batch_size=ns.batch_size,
            per_device_eval_batch_size=256,
            learning_rate=ns.learning_rate,
            weight_decay=0.01,
            warmup_steps=0.05,
            lr_scheduler_type="cosine",
            logging_strategy="steps",
            logging_steps=ns.logging_steps,
            logging_first_step=True,
            eval_strategy="steps",
            eval_steps=ns.eval_steps,
            save_strategy="steps",
            save_steps=ns.eval_steps,
            save_total_limit=2,
            load_best_model_at_end=True,
            metric_for_best_model="accuracy",
            greater_is_better=True,
            seed=ns.seed,
            report_to=ns.report_to,
            run_name=os.path.basename(output_dir.rstrip(os.sep)) or "demo",
            disable_tqdm=bool(ns.no_progress),
        )
    except ValueError as exc:
        print(f"eventbus train: error: {exc}", file=sys.stderr)
        return 2

    x, y = make_spirals(600, seed=ns.seed)
    n_train = int(len(y) * 0.8)
    train_ds = SpiralDataset(x[:n_train], y[:n_train])
    eval_ds = SpiralDataset(x[n_train:], y[n_train:])
    model = _mlp_class()()

    try:
        trainer = Trainer(
            model,
            args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            compute_metrics=accuracy,
            callbacks=[EarlyStoppingCallback(early_stopping_patience=ns.patience, early_stopping_threshold=0.001)],
        )
    except (EventBusError, ValueError, ImportError) as exc:
        print(f"eventbus train: error: {exc}", file=sys.stderr)
        return 2

    status = 0
    outcome = ""
    try:
        result = trainer.train(resume_from_checkpoint=True if ns.resume else None)
    except TrainingInterrupted as exc:
        print(f"\neventbus train: {exc}", file=sys.stderr)
        status = 128 + int(exc.signum)
        result = None
        outcome = f"interrupted by {signal.Signals(int(exc.signum)).name} at step {trainer.state.global_step}"
    except CheckpointError as exc:
        print(f"eventbus train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\neventbus train: interrupted (second Ctrl-C); no checkpoint was saved for the last step", file=sys.stderr)
        _print_summary(trainer, args, None, outcome=f"interrupted by a second Ctrl-C at step {trainer.state.global_step} (not saved)")
        return 128 + signal.SIGINT
    except Exception as exc:  # the bus was closed with TrainEnd(status="failed")
        print(f"eventbus train: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        _print_summary(trainer, args, None, outcome=f"FAILED at step {trainer.state.global_step}: {type(exc).__name__} (see the error above)")
        return 1
    _print_summary(trainer, args, result, outcome=outcome)
    return status


def _prepare_output_dir(output_dir: str, *, resume: bool) -> str:
    """The logging directory, ``<output_dir>/logs``: the TensorBoard sink writes each
    run into a directory of its own there (a resumed run into its earlier one), so
    ``tensorboard --logdir <output_dir>/logs`` shows every run side by side. A fresh
    run in a directory that holds an earlier run's checkpoints removes them: they
    would mix with this run's in the rotation and in ``--resume``."""
    import shutil

    from trainer.checkpoint import sorted_checkpoints

    logs_root = os.path.join(output_dir, "logs")
    old = sorted_checkpoints(output_dir)
    if old and not resume:
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        print(
            f"eventbus train: starting fresh; removed {len(old)} checkpoint(s) of an earlier run in {output_dir} "
            "(pass --resume to continue that run instead)",
            file=sys.stderr,
        )
    return logs_root


def _resumed_step(output_dir: str) -> tuple[str, int] | None:
    """(the checkpoint ``--resume`` continues, its global step), or ``None`` when there
    is none or its state cannot be read (the trainer then says why)."""
    import json

    from trainer.checkpoint import TRAINER_STATE_NAME, get_last_checkpoint

    last = get_last_checkpoint(output_dir)
    if last is None:
        return None
    try:
        with open(os.path.join(last, TRAINER_STATE_NAME)) as f:
            return last, int(json.load(f)["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _print_nothing_to_train(output_dir: str, max_steps: int, checkpoint: str, step: int) -> None:
    lines = ["", "=" * 64, "eventbus train: summary", "=" * 64]
    lines.append(
        f"training      : nothing trained: the checkpoint to resume ({checkpoint}) is already at step {step}, "
        f"at or past --max-steps {max_steps}; pass a larger --max-steps to train further"
    )
    lines.append(f"output dir    : {output_dir}")
    print("\n".join(lines), flush=True)


def _tensorboard_command() -> str:
    """The ``tensorboard`` of this interpreter's environment (``.venv/bin/tensorboard``)
    when it has one: it need not be on PATH. Else the bare name."""
    import shutil

    here = shutil.which("tensorboard", path=os.path.dirname(sys.executable))
    return here or "tensorboard"


def _print_summary(trainer: Any, args: Any, result: Any, outcome: str = "") -> None:
    """What the run did and where its files are. ``result`` is ``None`` when training
    did not complete; ``outcome`` then says how it ended. Only paths that exist are
    printed: after a failure, what was never written is said to be missing. Printed
    by world rank 0 only (under torchrun, the other ranks have no sinks to report)."""
    if not trainer.is_world_process_zero():
        return
    state = trainer.state
    lines = ["", "=" * 64, "eventbus train: summary", "=" * 64]
    if result is not None:
        stopped_early = state.global_step < state.max_steps
        how = f"stopped early at step {state.global_step}/{state.max_steps}" if stopped_early else f"{state.global_step} steps"
        lines.append(f"training      : {how}, mean train loss {result.training_loss:.4f}")
    elif outcome:
        lines.append(f"training      : {outcome}")
    best = state.best_metric
    metric = args.metric_for_best_model
    if best is not None:
        best_dir = state.best_model_checkpoint
        where = best_dir if best_dir and os.path.isdir(best_dir) else "its checkpoint was not saved"
        lines.append(f"best {metric:<9}: {best:.4f} at step {state.best_global_step} ({where})")
    else:
        lines.append(f"best {metric:<9}: (no evaluation ran)")
    made = os.path.isdir(args.output_dir)
    lines.append(f"output dir    : {args.output_dir}" if made else f"output dir    : not created ({args.output_dir})")
    sinks = {s.name: s for s in trainer.bus.sinks}
    if "tensorboard" in sinks:
        from eventbus.rundir import run_directory

        # (An isolated sink resolved its directory in its child process: found again here.)
        logdir = run_directory(args.logging_dir, trainer.run_id)
        if os.path.isdir(logdir) and os.listdir(logdir):
            lines.append(f"tensorboard   : {logdir}")
            # The parent holds every run of this output dir: TensorBoard shows them side by side.
            lines.append(f"open with     : {_tensorboard_command()} --logdir {args.logging_dir}")
        else:
            lines.append("tensorboard   : nothing written")
    if "jsonl" in sinks:
        path = getattr(sinks["jsonl"], "path", None)
        lines.append(f"json lines    : {path}" if path and os.path.isfile(path) else "json lines    : nothing written")
    for name, sink in sinks.items():
        if name not in ("tensorboard", "jsonl"):
            where = getattr(sink, "path", None) or getattr(sink, "log_dir", None)
            if where and not os.path.exists(where):
                where = None
            lines.append(f"{name:<14}: {where or 'see the backend'}")
    if not sinks:
        lines.append("sinks         : none (report_to='none'); pass --report-to tensorboard,jsonl to keep logs")
    stats = trainer.bus.stats()
    lines.append("")
    lines.append(f"event bus     : {stats.published} events published, {stats.dropped} dropped")
    if stats.sinks:
        lines.append(stats.format_table())
    print("\n".join(lines), flush=True)
