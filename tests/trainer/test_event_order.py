"""The sequence of hooks the loop fires equals transformers' for every combination of
logging, evaluation and save strategies and step counts.

Expected sequences are derived from the documented semantics (a small model of
transformers' ``_inner_training_loop``, ``_maybe_log_save_evaluate`` and
``DefaultFlowCallback``, written out below), and, for the full strategy matrix, also
compared with the real transformers Trainer running the same tiny model on the CPU.
"""

from __future__ import annotations

import itertools
import math

import pytest

from eventbus import EVENT_TYPES, HOOK_EVENTS
from tests.conftest import require_module
from tests.trainer._loop_helpers import (
    RecordingSink,
    TinyClassifier,
    make_dataset,
    recording_callback_class,
    run_transformers,
)
from trainer import Trainer, TrainingArguments

N_TRAIN = 10  # with batch size 4: 3 batches per epoch, the last one short
N_EVAL = 6  # with eval batch size 4: 2 evaluation batches
STRATEGIES = ("no", "steps", "epoch")


def expected_hooks(
    *,
    n_batches: int,
    ga: int,
    max_steps: int,
    num_train_epochs: int,
    logging: str,
    logging_steps: int,
    logging_first_step: bool,
    evaluation: str,
    eval_steps: int,
    save: str,
    save_steps: int,
    n_eval_batches: int,
) -> list[str]:
    """The hooks transformers fires, from its documented semantics.

    - a step is ``on_step_begin``, ``on_substep_end`` per extra micro-batch, then
      ``on_pre_optimizer_step``, ``on_optimizer_step``, ``on_step_end``;
    - after ``on_step_end`` and after ``on_epoch_end``: log (if asked and a step was
      taken since the last log), then evaluate (``on_prediction_step`` per batch,
      ``on_log``, ``on_evaluate``), then save (``on_save``);
    - DefaultFlowCallback asks for log/eval/save on the ``*_steps`` grid or at epoch
      end, and at ``max_steps`` stops, evaluates (when the last step is off the eval
      grid) and saves (save_strategy "steps");
    - the control flags reset at step begin and after their action;
    - the end: ``on_log`` (train metrics), ``on_train_end``.
    """
    nuspe = max(n_batches // ga + int(n_batches % ga > 0), 1)
    if max_steps > 0:
        epochs = max_steps // nuspe + int(max_steps % nuspe > 0)
    else:
        max_steps = math.ceil(num_train_epochs * nuspe)
        epochs = num_train_epochs
    seq = ["on_init_end", "on_train_begin"]
    flags = {"log": False, "eval": False, "save": False, "stop": False, "epoch_stop": False}
    gs = 0
    last_logged = 0

    def act() -> None:
        nonlocal last_logged
        if flags["log"] and gs > last_logged:
            seq.append("on_log")
            flags["log"] = False
            last_logged = gs
        if flags["eval"]:
            seq.extend(["on_prediction_step"] * n_eval_batches + ["on_log", "on_evaluate"])
            flags["eval"] = False
        if flags["save"]:
            seq.append("on_save")
            flags["save"] = False

    for _epoch in range(epochs):
        seq.append("on_epoch_begin")
        flags["epoch_stop"] = False
        remainder = n_batches % ga or ga
        for update in range(nuspe):
            micro = ga if update != nuspe - 1 else remainder
            for i in range(micro):
                if i == 0:
                    seq.append("on_step_begin")
                    flags["log"] = flags["eval"] = flags["save"] = False
                if i < micro - 1:
                    seq.append("on_substep_end")
                    continue
                seq += ["on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
                gs += 1
                if gs == 1 and logging_first_step:
                    flags["log"] = True
                if logging == "steps" and gs % logging_steps == 0:
                    flags["log"] = True
                if evaluation == "steps" and gs % eval_steps == 0:
                    flags["eval"] = True
                if save == "steps" and gs % save_steps == 0:
                    flags["save"] = True
                if gs >= max_steps:
                    flags["stop"] = True
                    if evaluation == "steps" and gs % eval_steps != 0:
                        flags["eval"] = True
                    if save == "steps":
                        flags["save"] = True
                act()
            if flags["stop"]:
                break
        seq.append("on_epoch_end")
        if logging == "epoch":
            flags["log"] = True
        if evaluation == "epoch":
            flags["eval"] = True
        if save == "epoch":
            flags["save"] = True
        act()
        if flags["stop"]:
            break
    seq += ["on_log", "on_train_end"]
    return seq


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "ours"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    base.update(kw)
    return base


def _run_ours(tmp_path, sinks=None, **kw):
    Recorder = recording_callback_class()
    rec = Recorder()
    trainer = Trainer(
        TinyClassifier(),
        TrainingArguments(**_args(tmp_path, **kw)),
        train_dataset=make_dataset(N_TRAIN),
        eval_dataset=make_dataset(N_EVAL, seed=1),
        callbacks=[rec],
        sinks=sinks,
    )
    trainer.train()
    return rec.calls, trainer


MATRIX = list(itertools.product(STRATEGIES, STRATEGIES, STRATEGIES))

# (max_steps, num_train_epochs, gradient_accumulation_steps, logging_first_step)
SHAPES = [
    (5, 1, 1, False),  # max_steps crosses an epoch boundary, last step off every grid
    (-1, 2, 1, True),  # epoch-based, two epochs
    (4, 1, 2, False),  # accumulation: 2 steps per epoch, the last one a single batch
    (6, 1, 1, False),  # last step on the eval grid: no extra end-of-training evaluation
]


def _kw(logging, evaluation, save, shape):
    max_steps, epochs, ga, first = shape
    kw = dict(
        logging_strategy=logging,
        eval_strategy=evaluation,
        save_strategy=save,
        logging_steps=2,
        eval_steps=2,
        save_steps=3,
        max_steps=max_steps,
        num_train_epochs=epochs,
        gradient_accumulation_steps=ga,
        logging_first_step=first,
    )
    return kw


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"max{s[0]}-ep{s[1]}-ga{s[2]}-first{int(s[3])}")
@pytest.mark.parametrize("logging,evaluation,save", MATRIX, ids=lambda v: v)
def test_hook_sequence_matches_documented_semantics(tmp_path, logging, evaluation, save, shape):
    kw = _kw(logging, evaluation, save, shape)
    calls, _ = _run_ours(tmp_path, **kw)
    expected = expected_hooks(
        n_batches=math.ceil(N_TRAIN / 4),
        ga=kw["gradient_accumulation_steps"],
        max_steps=kw["max_steps"],
        num_train_epochs=kw["num_train_epochs"],
        logging=logging,
        logging_steps=2,
        logging_first_step=kw["logging_first_step"],
        evaluation=evaluation,
        eval_steps=2,
        save=save,
        save_steps=3,
        n_eval_batches=math.ceil(N_EVAL / 4),
    )
    assert calls == expected


def test_end_of_training_evaluation_when_last_step_is_off_the_grid(tmp_path):
    # max_steps=5, eval_steps=2: evaluations at 2 and 4, and one more at 5 (the end).
    _, trainer = _run_ours(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=5, save_strategy="no")
    eval_steps = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_steps == [2, 4, 5]


def test_no_extra_evaluation_when_last_step_is_on_the_grid(tmp_path):
    _, trainer = _run_ours(tmp_path, eval_strategy="steps", eval_steps=2, max_steps=6, save_strategy="no")
    eval_steps = [h["step"] for h in trainer.state.log_history if "eval_loss" in h]
    assert eval_steps == [2, 4, 6]


def test_every_hook_is_published_to_a_subscribed_sink_in_order(tmp_path):
    sink = RecordingSink()
    calls, trainer = _run_ours(
        tmp_path,
        sinks=[sink],
        logging_strategy="steps",
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=3,
        max_steps=5,
    )
    by_type = {v: k for k, v in HOOK_EVENTS.items()}
    published = [by_type[type(e)] for e in sink.received]
    # InitEnd is published at construction, into the bus that the first train() starts.
    assert published == calls
    assert trainer.bus.stats().sinks["recording"].delivered == len(calls)
    assert set(type(e) for e in sink.received) <= set(EVENT_TYPES)


@pytest.mark.parametrize("logging,evaluation,save", MATRIX, ids=lambda v: v)
def test_hook_sequence_equals_real_transformers_trainer(tmp_path, logging, evaluation, save):
    transformers = require_module("transformers")
    require_module("accelerate")  # transformers' Trainer needs it
    shape = (5, 1, 1, True)
    kw = _kw(logging, evaluation, save, shape)
    ours, _ = _run_ours(tmp_path, **kw)

    Recorder = recording_callback_class(transformers.TrainerCallback)
    rec = Recorder()
    hf_kw = dict(kw)
    hf_kw.update(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        learning_rate=1e-2,
    )
    run_transformers(TinyClassifier(), hf_kw, make_dataset(N_TRAIN), make_dataset(N_EVAL, seed=1), [rec])
    assert ours == rec.calls


def test_hook_sequence_with_accumulation_equals_real_transformers_trainer(tmp_path):
    transformers = require_module("transformers")
    require_module("accelerate")
    kw = _kw("steps", "steps", "steps", (-1, 2, 2, False))
    ours, _ = _run_ours(tmp_path, **kw)
    Recorder = recording_callback_class(transformers.TrainerCallback)
    rec = Recorder()
    hf_kw = dict(kw, output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, per_device_eval_batch_size=4)
    run_transformers(TinyClassifier(), hf_kw, make_dataset(N_TRAIN), make_dataset(N_EVAL, seed=1), [rec])
    assert "on_substep_end" in ours
    assert ours == rec.calls
