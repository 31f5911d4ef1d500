"""DefaultFlowCallback and EarlyStoppingCallback: the documented schedule, and the same
control decisions as transformers' own callbacks for the same hook sequences."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import random

import pytest

from tests.conftest import require_module
from trainer.arguments import TrainingArguments
from trainer.callbacks import CallbackHandler
from trainer.flow import DefaultFlowCallback, EarlyStoppingCallback, EarlyStoppingConfigError
from trainer.state import ExportableState, TrainerControl, TrainerState


def simulate(handler, state, control, args, max_steps, steps_per_epoch):
    """Drive the hooks the way transformers' training loop does and record, after
    every on_step_end and on_epoch_end, the step and the control flags."""
    record = []
    num_epochs = -(-max_steps // steps_per_epoch)
    state.max_steps = max_steps
    state.compute_steps(args, max_steps)
    control = handler.on_train_begin(args, state, control)

    def act(control):
        # transformers' _maybe_log_save_evaluate: each action resets its flag via the hook.
        if control.should_log:
            control = handler.on_log(args, state, control, {"loss": 1.0})
        if control.should_evaluate:
            control = handler.on_evaluate(args, state, control, {"eval_loss": 1.0})
        if control.should_save:
            control = handler.on_save(args, state, control)
        return control

    for epoch in range(num_epochs):
        control = handler.on_epoch_begin(args, state, control)
        for i in range(steps_per_epoch):
            control = handler.on_step_begin(args, state, control)
            state.global_step += 1
            state.epoch = epoch + (i + 1) / steps_per_epoch
            control = handler.on_step_end(args, state, control)
            record.append(("step", state.global_step, *dataclasses.astuple(control)))
            control = act(control)
            if control.should_epoch_stop or control.should_training_stop:
                break
        control = handler.on_epoch_end(args, state, control)
        record.append(("epoch", state.global_step, *dataclasses.astuple(control)))
        control = act(control)
        if control.should_training_stop:
            break
    return record


def flags_of(record, kind, flag):
    idx = 2 + ["should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log"].index(flag)
    return [r[1] for r in record if r[0] == kind and r[idx]]


def ours(args, max_steps, steps_per_epoch):
    h = CallbackHandler([DefaultFlowCallback], None, None, None, None)
    return simulate(h, TrainerState(), TrainerControl(), args, max_steps, steps_per_epoch)


# -- DefaultFlowCallback: documented semantics ----------------------------------------------------


def test_steps_schedule():
    args = TrainingArguments(logging_steps=2, eval_strategy="steps", eval_steps=3, save_steps=4)
    rec = ours(args, max_steps=10, steps_per_epoch=100)
    assert flags_of(rec, "step", "should_log") == [2, 4, 6, 8, 10]
    # Every 3 steps, and the last step although 10 is not a multiple of 3.
    assert flags_of(rec, "step", "should_evaluate") == [3, 6, 9, 10]
    assert flags_of(rec, "step", "should_save") == [4, 8, 10]
    assert flags_of(rec, "step", "should_training_stop") == [10]


def test_last_step_on_the_eval_grid_is_evaluated_once():
    args = TrainingArguments(logging_steps=5, eval_strategy="steps", eval_steps=5, save_strategy="no")
    rec = ours(args, max_steps=10, steps_per_epoch=100)
    assert flags_of(rec, "step", "should_evaluate") == [5, 10]
    assert flags_of(rec, "step", "should_save") == []


def test_epoch_schedule_and_eval_delay():
    args = TrainingArguments(logging_strategy="epoch", eval_strategy="epoch", save_strategy="epoch", eval_delay=2)
    rec = ours(args, max_steps=12, steps_per_epoch=4)
    assert flags_of(rec, "step", "should_log") == [] and flags_of(rec, "step", "should_save") == []
    assert flags_of(rec, "epoch", "should_log") == [4, 8, 12]
    assert flags_of(rec, "epoch", "should_save") == [4, 8, 12]
    assert flags_of(rec, "epoch", "should_evaluate") == [8, 12]  # epoch >= eval_delay


def test_logging_first_step_and_fractional_steps():
    args = TrainingArguments(logging_steps=0.25, logging_first_step=True, save_strategy="no")
    rec = ours(args, max_steps=20, steps_per_epoch=100)
    assert flags_of(rec, "step", "should_log") == [1, 5, 10, 15, 20]


def test_eval_delay_in_steps_also_gates_the_final_evaluation():
    args = TrainingArguments(eval_strategy="steps", eval_steps=4, eval_delay=20, save_strategy="no")
    assert flags_of(ours(args, max_steps=10, steps_per_epoch=100), "step", "should_evaluate") == []


# -- DefaultFlowCallback: same decisions as transformers -----------------------------------------------


def _configs():
    strategies = ("no", "steps", "epoch")
    for log_s, eval_s, save_s, (max_steps, per_epoch), steps in itertools.product(
        strategies, strategies, ("no", "steps", "epoch"), ((10, 3), (12, 4), (7, 7)), ((2, 3, 6), (0.3, 0.3, 0.6), (1, 5, 5))
    ):
        yield dict(
            logging_strategy=log_s, logging_steps=steps[0], eval_strategy=eval_s, eval_steps=steps[1],
            save_strategy=save_s, save_steps=steps[2], logging_first_step=(max_steps == 7),
            eval_delay=2 if per_epoch == 4 else 0,
        ), max_steps, per_epoch


def test_default_flow_matches_transformers_across_the_matrix():
    tcb = require_module("transformers.trainer_callback")
    n = 0
    for kwargs, max_steps, per_epoch in _configs():
        args = TrainingArguments(**kwargs)
        mine = ours(args, max_steps, per_epoch)
        h = tcb.CallbackHandler([tcb.DefaultFlowCallback], None, None, None, None)
        theirs = simulate(h, tcb.TrainerState(), tcb.TrainerControl(), args, max_steps, per_epoch)
        assert mine == theirs, (kwargs, max_steps, per_epoch)
        n += 1
    assert n == 243


# -- EarlyStoppingCallback ----------------------------------------------------------------------------


def es_args(**kw):
    base = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                load_best_model_at_end=True, metric_for_best_model="loss")
    base.update(kw)
    return TrainingArguments(**base)


def run_early_stopping(cb, args, values, state=None, control=None):
    """Evaluate ``values`` in turn as transformers' Trainer does: on_evaluate (the
    callback compares with the best so far), then the best metric is updated.
    Returns the evaluation index at which training was told to stop, and counters."""
    state = state or TrainerState()
    control = control or TrainerControl()
    cb.on_train_begin(args, state, control)
    key = args.metric_for_best_model if args.metric_for_best_model.startswith("eval_") else f"eval_{args.metric_for_best_model}"
    counters = []
    for i, v in enumerate(values):
        cb.on_evaluate(args, state, control, metrics={key: v})
        counters.append(cb.early_stopping_patience_counter)
        if state.best_metric is None or (v > state.best_metric if args.greater_is_better else v < state.best_metric):
            state.best_metric = v
        if control.should_training_stop:
            return i, counters
    return None, counters


def test_patience_counts_evaluations_without_improvement():
    args = es_args()
    stop, counters = run_early_stopping(EarlyStoppingCallback(2), args, [1.0, 0.9, 0.95, 0.8, 0.85, 0.86, 0.5])
    assert counters == [0, 0, 1, 0, 1, 2]
    assert stop == 5


def test_threshold_requires_a_large_enough_improvement():
    args = es_args()
    stop, counters = run_early_stopping(EarlyStoppingCallback(3, 0.1), args, [1.0, 0.95, 0.92, 0.5, 0.45, 0.41, 0.40])
    # 0.95 and 0.92 improve by less than 0.1; 0.5 by 0.42; then 0.45, 0.41, 0.40 by < 0.1.
    assert counters == [0, 1, 2, 0, 1, 2, 3]
    assert stop == 6


def test_greater_is_better():
    args = es_args(metric_for_best_model="accuracy")
    assert args.greater_is_better is True
    stop, counters = run_early_stopping(EarlyStoppingCallback(2), args, [0.5, 0.6, 0.55, 0.7, 0.7, 0.69])
    assert counters == [0, 0, 1, 0, 1, 2] and stop == 5
    lower = es_args(metric_for_best_model="accuracy", greater_is_better=False)
    _, counters = run_early_stopping(EarlyStoppingCallback(5), lower, [0.5, 0.6, 0.4])
    assert counters == [0, 1, 0]


def test_eval_prefix_is_added_or_kept():
    for metric in ("loss", "eval_loss"):
        args = es_args(metric_for_best_model=metric)
        stop, _ = run_early_stopping(EarlyStoppingCallback(1), args, [1.0, 2.0])
        assert stop == 1


@pytest.mark.parametrize("seed", range(6))
def test_early_stopping_matches_transformers(seed):
    tcb = require_module("transformers.trainer_callback")
    rng = random.Random(seed)
    for _ in range(20):
        patience = rng.randint(1, 4)
        threshold = rng.choice([0.0, 0.01, 0.1])
        metric, gib = rng.choice([("loss", None), ("accuracy", None), ("accuracy", False), ("loss", True)])
        args = es_args(metric_for_best_model=metric, greater_is_better=gib)
        values = [round(rng.uniform(0, 1), 2) for _ in range(12)]
        mine = run_early_stopping(EarlyStoppingCallback(patience, threshold), args, values)
        theirs = run_early_stopping(tcb.EarlyStoppingCallback(patience, threshold), args, values,
                                    state=tcb.TrainerState(), control=tcb.TrainerControl())
        assert mine == theirs, (patience, threshold, metric, gib, values)


def test_missing_metric_warns_once_and_does_not_count(caplog):
    args = es_args(metric_for_best_model="accuracy")
    cb = EarlyStoppingCallback(1)
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for _ in range(3):
            cb.on_evaluate(args, state, control, metrics={"eval_loss": 1.0})
    warnings = [r.getMessage() for r in caplog.records if "eval_accuracy" in r.getMessage()]
    assert len(warnings) == 1 and "eval_loss" in warnings[0]
    assert cb.early_stopping_patience_counter == 0 and not control.should_training_stop


def test_requirements_are_clear_errors_not_asserts():
    cb = EarlyStoppingCallback(1)
    with pytest.raises(EarlyStoppingConfigError, match="metric_for_best_model"):
        cb.on_train_begin(TrainingArguments(eval_strategy="epoch"), TrainerState(), TrainerControl())
    with pytest.raises(EarlyStoppingConfigError, match='eval_strategy="no"'):
        cb.on_train_begin(TrainingArguments(metric_for_best_model="loss"), TrainerState(), TrainerControl())
    assert issubclass(EarlyStoppingConfigError, ValueError)
    with pytest.raises(EarlyStoppingConfigError, match="early_stopping_patience"):
        EarlyStoppingCallback(-1)
    with pytest.raises(EarlyStoppingConfigError, match="early_stopping_threshold"):
        EarlyStoppingCallback(1, -0.5)


def test_config_errors_are_also_assertion_errors_like_transformers():
    # transformers asserts these requirements: `except AssertionError` must keep working.
    assert issubclass(EarlyStoppingConfigError, AssertionError)
    assert issubclass(EarlyStoppingConfigError, ValueError)
    with pytest.raises(AssertionError):
        EarlyStoppingCallback(1).on_train_begin(TrainingArguments(eval_strategy="epoch"), TrainerState(), TrainerControl())
    with pytest.raises(AssertionError):
        EarlyStoppingCallback(1).on_train_begin(TrainingArguments(metric_for_best_model="loss"), TrainerState(), TrainerControl())


@pytest.mark.parametrize("bad_patience", [-1, 1.5, "2", None, True])
def test_nonsense_patience_is_rejected(bad_patience):
    with pytest.raises(EarlyStoppingConfigError, match="early_stopping_patience"):
        EarlyStoppingCallback(bad_patience)


@pytest.mark.parametrize("bad_threshold", [-0.1, float("nan"), "0.1", [0.1], True])
def test_nonsense_threshold_is_rejected(bad_threshold):
    with pytest.raises(EarlyStoppingConfigError, match="early_stopping_threshold"):
        EarlyStoppingCallback(1, bad_threshold)


def test_patience_zero_stops_at_first_evaluation_like_transformers():
    tcb = require_module("transformers.trainer_callback")
    args = es_args()
    mine = run_early_stopping(EarlyStoppingCallback(0), args, [1.0, 1.1])
    theirs = run_early_stopping(tcb.EarlyStoppingCallback(0), args, [1.0, 1.1],
                                state=tcb.TrainerState(), control=tcb.TrainerControl())
    assert mine == theirs == (0, [0])


def test_numpy_patience_and_threshold_are_accepted():
    np = pytest.importorskip("numpy")
    cb = EarlyStoppingCallback(np.int64(2), np.float32(0.05))
    assert cb.early_stopping_patience == 2 and type(cb.early_stopping_patience) is int
    assert cb.early_stopping_threshold == pytest.approx(0.05) and type(cb.early_stopping_threshold) is float
    json.dumps(cb.state())  # plain Python numbers: checkpoint state stays JSON
    stop, counters = run_early_stopping(EarlyStoppingCallback(np.int64(1), np.float32(0.05)), es_args(), [1.0, 0.99])
    assert (stop, counters) == (1, [0, 1])


def test_load_best_model_warning_comes_before_the_config_error(caplog):
    # transformers warns about load_best_model_at_end, then asserts.
    args = TrainingArguments(eval_strategy="epoch")
    assert args.metric_for_best_model is None and not args.load_best_model_at_end
    with caplog.at_level(logging.WARNING, logger="trainer"), pytest.raises(EarlyStoppingConfigError):
        EarlyStoppingCallback(1).on_train_begin(args, TrainerState(), TrainerControl())
    assert any("load_best_model_at_end" in r.getMessage() for r in caplog.records)


def test_without_load_best_model_at_end_it_warns(caplog):
    args = TrainingArguments(eval_strategy="epoch", metric_for_best_model="loss")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        EarlyStoppingCallback(1).on_train_begin(args, TrainerState(), TrainerControl())
    assert any("load_best_model_at_end" in r.getMessage() for r in caplog.records)


def test_early_stopping_is_exportable_state_like_transformers():
    tcb = require_module("transformers.trainer_callback")
    cb = EarlyStoppingCallback(3, 0.05)
    cb.early_stopping_patience_counter = 2
    assert isinstance(cb, ExportableState)
    theirs = tcb.EarlyStoppingCallback(3, 0.05)
    theirs.early_stopping_patience_counter = 2
    assert cb.state() == theirs.state()
    back = EarlyStoppingCallback.from_state(cb.state())
    assert (back.early_stopping_patience, back.early_stopping_threshold, back.early_stopping_patience_counter) == (3, 0.05, 2)
