"""The control callbacks that steer the loop: the default log/eval/save schedule and
early stopping, with transformers' behaviour."""

from __future__ import annotations

import logging
import operator
from typing import Any

from trainer.arguments import IntervalStrategy, SaveStrategy
from trainer.callbacks import TrainerCallback, ignores_kwargs
from trainer.state import ExportableState, TrainerControl, TrainerState

__all__ = ["DefaultFlowCallback", "EarlyStoppingCallback", "EarlyStoppingConfigError"]

logger = logging.getLogger("trainer")

# on_step_end runs every step: an enum member read through its class costs ~0.1 µs
# (more on cold caches), so the members compared against are read once, here.
_STEPS = IntervalStrategy.STEPS
_SAVE_STEPS = SaveStrategy.STEPS


class EarlyStoppingConfigError(ValueError, AssertionError):
    """:class:`EarlyStoppingCallback` is used without what it needs; the message says
    which training argument to set.

    Also an :class:`AssertionError`: transformers asserts these requirements, so code
    written against it (``except AssertionError``) still catches them."""


class DefaultFlowCallback(TrainerCallback):
    """Sets ``should_log``/``should_evaluate``/``should_save`` on the schedule the
    training arguments describe, and ``should_training_stop`` at ``max_steps``.

    As transformers: with ``eval_strategy="steps"``, the last step is evaluated even
    when it is not a multiple of ``eval_steps`` (once ``eval_delay`` has passed), and
    with ``save_strategy="steps"`` it is always saved.
    """

    @ignores_kwargs
    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        """Schedule logging, evaluation, saving and the end of training after a step."""
        step = state.global_step
        # Log
        if step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == _STEPS and step % state.logging_steps == 0:
            control.should_log = True

        # Evaluate
        eval_by_steps = args.eval_strategy == _STEPS
        if eval_by_steps and step % state.eval_steps == 0 and args.eval_delay <= step:
            control.should_evaluate = True

        # Save
        save_by_steps = args.save_strategy == _SAVE_STEPS
        if save_by_steps and state.save_steps > 0 and step % state.save_steps == 0:
            control.should_save = True

        # End training
        if step >= state.max_steps:
            control.should_training_stop = True
            # The last step is evaluated even off the eval_steps grid (not twice).
            if eval_by_steps and step % state.eval_steps != 0 and args.eval_delay <= step:
                control.should_evaluate = True
            if save_by_steps:
                control.should_save = True

        return control

    @ignores_kwargs
    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        """Schedule epoch-based logging, evaluation and saving."""
        if args.logging_strategy == IntervalStrategy.EPOCH:
            control.should_log = True
        if args.eval_strategy == IntervalStrategy.EPOCH and args.eval_delay <= state.epoch:
            control.should_evaluate = True
        if args.save_strategy == SaveStrategy.EPOCH:
            control.should_save = True
        return control


class EarlyStoppingCallback(TrainerCallback, ExportableState):
    """Stops training when ``metric_for_best_model`` has not improved for
    ``early_stopping_patience`` evaluations in a row.

    An evaluation improves when its metric is better than ``state.best_metric`` (in
    the direction of ``greater_is_better``) by more than ``early_stopping_threshold``.
    Needs ``metric_for_best_model`` (the ``eval_`` prefix is added when missing) and
    an ``eval_strategy`` other than ``"no"``; without ``load_best_model_at_end`` it
    warns that the best model will not be loaded at the end (a missing requirement
    raises :class:`EarlyStoppingConfigError`, which is both a ``ValueError`` and the
    ``AssertionError`` transformers raises). As transformers, a patience of 0 stops
    at the first evaluation that reports the metric. Its patience counter is saved in
    checkpoints and restored on resume.
    """

    def __init__(self, early_stopping_patience: int = 1, early_stopping_threshold: float | None = 0.0) -> None:
        # As transformers, patience 0 is allowed (stop at the first evaluation); any
        # integer type (numpy's too) is accepted and stored as an int, any real number
        # (numpy's too) as a float threshold.
        try:
            if isinstance(early_stopping_patience, bool):
                raise TypeError
            patience = operator.index(early_stopping_patience)
        except TypeError:
            patience = None
        if patience is None or patience < 0:
            raise EarlyStoppingConfigError(
                f"early_stopping_patience must be an integer >= 0 (evaluations without improvement), "
                f"got {early_stopping_patience!r}"
            )
        threshold = early_stopping_threshold
        if threshold is not None:
            try:
                if isinstance(threshold, (bool, str, bytes)):
                    raise TypeError
                threshold = float(threshold)
            except (TypeError, ValueError):
                threshold = None
            if threshold is None or not threshold >= 0:  # rejects NaN too
                raise EarlyStoppingConfigError(
                    f"early_stopping_threshold must be a number >= 0, got {early_stopping_threshold!r}"
                )
        early_stopping_patience, early_stopping_threshold = patience, threshold
        self.early_stopping_patience = early_stopping_patience
        self.early_stopping_threshold = early_stopping_threshold
        # The number of evaluations in a row whose metric did not improve.
        self.early_stopping_patience_counter = 0

    def check_metric_value(self, args: Any, state: TrainerState, control: TrainerControl, metric_value: Any) -> None:
        """Reset the patience counter if ``metric_value`` improves on
        ``state.best_metric`` by more than the threshold, else count one more miss."""
        threshold = self.early_stopping_threshold or 0.0
        best = state.best_metric
        if best is None:
            self.early_stopping_patience_counter = 0
            return
        # NaN compares false both ways: a NaN metric counts as no improvement.
        improved = metric_value > best if args.greater_is_better else metric_value < best
        if improved and abs(metric_value - best) > threshold:
            self.early_stopping_patience_counter = 0
        else:
            self.early_stopping_patience_counter += 1

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Check the training arguments early stopping depends on."""
        self._warned_missing = False
        # The warning first, then the checks: transformers' order.
        if not args.load_best_model_at_end:
            logger.warning(
                "Using EarlyStoppingCallback without load_best_model_at_end=True. "
                "Once training is finished, the best model will not be loaded automatically."
            )
        if args.metric_for_best_model is None:
            raise EarlyStoppingConfigError(
                "EarlyStoppingCallback needs TrainingArguments(metric_for_best_model=...) to know which evaluation "
                'metric to watch, e.g. metric_for_best_model="loss" (or load_best_model_at_end=True, which '
                'defaults it to "loss")'
            )
        if args.eval_strategy == IntervalStrategy.NO:
            raise EarlyStoppingConfigError(
                'EarlyStoppingCallback needs evaluations, but eval_strategy="no"; set '
                'TrainingArguments(eval_strategy="steps") or "epoch"'
            )

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, metrics: Any = None, **kwargs: Any) -> None:
        """Count an evaluation without improvement and stop once patience runs out."""
        metric_to_check = args.metric_for_best_model
        if not metric_to_check.startswith("eval_"):
            metric_to_check = f"eval_{metric_to_check}"
        metric_value = (metrics or {}).get(metric_to_check)

        if metric_value is None:
            if not getattr(self, "_warned_missing", False):
                self._warned_missing = True
                logger.warning(
                    "early stopping needs the metric %r (metric_for_best_model), but the evaluation metrics are %s; "
                    "early stopping is disabled until it appears. Fix metric_for_best_model or compute_metrics",
                    metric_to_check,
                    sorted(metrics or {}),
                )
            return

        self.check_metric_value(args, state, control, metric_value)
        if self.early_stopping_patience_counter >= self.early_stopping_patience:
            control.should_training_stop = True

    def state(self) -> dict:
        """The patience settings and counter, in transformers' checkpoint format."""
        return {
            "args": {
                "early_stopping_patience": self.early_stopping_patience,
                "early_stopping_threshold": self.early_stopping_threshold,
            },
            "attributes": {
                "early_stopping_patience_counter": self.early_stopping_patience_counter,
            },
        }
