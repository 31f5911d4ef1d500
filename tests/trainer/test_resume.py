"""Checkpoints and resume: a resumed run continues exactly where the interrupted one
stopped (same data order, same loss curve, same weights), checkpoints rotate without
losing the best one, and a broken checkpoint is a clear error."""

from __future__ import annotations

import json
import os

import pytest
import torch

from eventbus import Save, TrainBegin
from tests.trainer._loop_helpers import RecordingSink, TinyClassifier, checkpoints, make_dataset
from trainer import EarlyStoppingCallback, ExportableState, Trainer, TrainerCallback, TrainingArguments
from trainer.checkpoint import (
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    rotate_checkpoints,
)

TRAIN = make_dataset(18)  # batch 4 -> 5 batches per epoch
EVAL = make_dataset(6, seed=1)


def _args(out, **kw):
    # Evaluation only where a test passes eval_dataset (and asks for it).
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=12,
        logging_steps=1,
        save_steps=5,
        eval_strategy="steps",
        eval_steps=4,
        report_to="none",
        disable_tqdm=True,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.1,
    )
    base.update(kw)
    return TrainingArguments(**base)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _losses(trainer):
    return [(h["step"], float(h["loss"])) for h in trainer.state.log_history if "loss" in h]


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _uninterrupted(out, **kw):
    t = Trainer(TinyClassifier(dropout=0.3), _args(out, **kw), train_dataset=TRAIN, eval_dataset=EVAL)
    t.train()
    return t


@pytest.mark.parametrize("ga,stop", [(1, 5), (2, 5), (1, 10)], ids=["ga1-mid-epoch", "ga2-mid-epoch", "ga1-epoch-boundary"])
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, ga, stop):
    full = _uninterrupted(tmp_path / "full", gradient_accumulation_steps=ga)

    out = tmp_path / "cut"
    first = Trainer(
        TinyClassifier(dropout=0.3),
        _args(out, gradient_accumulation_steps=ga),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=[StopAt(stop)],
    )
    first.train()
    assert checkpoints(str(out))[-1] == f"checkpoint-{stop}"

    # A differently initialised model: everything must come from the checkpoint.
    resumed = Trainer(TinyClassifier(dropout=0.3, seed=99), _args(out, gradient_accumulation_steps=ga), train_dataset=TRAIN, eval_dataset=EVAL)
    resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{stop}"))

    assert resumed.state.global_step == 12
    full_curve = _losses(full)
    resumed_curve = _losses(resumed)
    assert [s for s, _ in resumed_curve] == [s for s, _ in full_curve]
    for (_, a), (_, b) in zip(full_curve, resumed_curve):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    fw, rw = _weights(full.model), _weights(resumed.model)
    for k in fw:
        torch.testing.assert_close(rw[k], fw[k], rtol=1e-5, atol=1e-6)
    full_evals = [h["eval_loss"] for h in full.state.log_history if "eval_loss" in h]
    res_evals = [h["eval_loss"] for h in resumed.state.log_history if "eval_loss" in h]
    assert res_evals == pytest.approx(full_evals, rel=1e-5)


def test_resume_true_picks_the_latest_checkpoint(tmp_path):
    out = tmp_path / "run"
    Trainer(TinyClassifier(), _args(out, max_steps=12, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[StopAt(9)]).train()
    assert checkpoints(str(out)) == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]

    sink = RecordingSink()
    t = Trainer(TinyClassifier(), _args(out, max_steps=12, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL, sinks=[sink])
    t.train(resume_from_checkpoint=True)
    assert t.state.global_step == 12
    # Steps 1..9 came from the checkpoint: only 10..12 were trained (and logged) here.
    assert [h["step"] for h in t.state.log_history if "loss" in h][-3:] == [10, 11, 12]
    begin = sink.of(TrainBegin)[0]
    assert begin.resumed_from is not None and begin.resumed_from.endswith("checkpoint-9")
    assert sink.opened_with.resumed is True


def test_resume_keeps_the_run_id(tmp_path):
    out = tmp_path / "run"
    first_sink = RecordingSink()
    first = Trainer(TinyClassifier(), _args(out, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL, sinks=[first_sink], callbacks=[StopAt(3)])
    first.train()
    second_sink = RecordingSink()
    second = Trainer(TinyClassifier(), _args(out, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL, sinks=[second_sink])
    second.train(resume_from_checkpoint=True)
    assert second_sink.opened_with.run_id == first_sink.opened_with.run_id
    assert {e.run_id for e in second_sink.received} == {first_sink.opened_with.run_id}


def test_resume_true_without_checkpoint_is_a_clear_error(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path / "empty"), train_dataset=TRAIN, eval_dataset=EVAL)
    with pytest.raises(CheckpointError, match="no checkpoint-<step> directory"):
        t.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("missing", [WEIGHTS_NAME, OPTIMIZER_NAME, RNG_STATE_NAME, "trainer_state.json"])
def test_checkpoint_with_missing_files_names_them(tmp_path, missing):
    out = tmp_path / "run"
    Trainer(TinyClassifier(), _args(out, max_steps=3, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL).train()
    ck = out / "checkpoint-3"
    os.remove(ck / missing)
    t = Trainer(TinyClassifier(), _args(out, max_steps=6, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL)
    with pytest.raises(CheckpointError) as info:
        t.train(resume_from_checkpoint=str(ck))
    assert missing in str(info.value) and "incomplete" in str(info.value)


def test_checkpoint_contents_and_weights_only_loading(tmp_path):
    out = tmp_path / "run"
    Trainer(TinyClassifier(), _args(out, max_steps=3, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL).train()
    ck = out / "checkpoint-3"
    for name in (WEIGHTS_NAME, OPTIMIZER_NAME, "scheduler.pt", RNG_STATE_NAME, "trainer_state.json", "run_info.json"):
        assert (ck / name).is_file(), name
    # Every torch file loads without pickle.
    for name in (WEIGHTS_NAME, OPTIMIZER_NAME, "scheduler.pt", RNG_STATE_NAME):
        torch.load(ck / name, weights_only=True)
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    # Tensor losses were resolved to numbers in the file.
    assert all(isinstance(h["loss"], float) for h in state["log_history"] if "loss" in h)
    assert "TrainerControl" in state["stateful_callbacks"]
    # No staging directory left behind.
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_rotation_keeps_the_best_and_the_latest(tmp_path):
    # The metric improves only at the first evaluation (step 2): checkpoint-2 is best.
    calls = {"n": 0}

    def metrics(_):
        calls["n"] += 1
        return {"score": 1.0 if calls["n"] == 1 else 0.0}

    out = tmp_path / "run"
    args = _args(
        out,
        max_steps=10,
        eval_steps=2,
        save_steps=2,
        save_total_limit=2,
        metric_for_best_model="score",
        greater_is_better=True,
    )
    t = Trainer(TinyClassifier(), args, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=metrics)
    t.train()
    assert t.state.best_global_step == 2
    assert t.state.best_model_checkpoint == str(out / "checkpoint-2")
    assert checkpoints(str(out)) == ["checkpoint-2", "checkpoint-10"]


def test_rotate_checkpoints_function(tmp_path):
    for step in (1, 2, 3, 4, 5):
        (tmp_path / f"checkpoint-{step}").mkdir()
    deleted = rotate_checkpoints(tmp_path, 2, best_model_checkpoint=str(tmp_path / "checkpoint-1"))
    assert sorted(os.path.basename(d) for d in deleted) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert checkpoints(str(tmp_path)) == ["checkpoint-1", "checkpoint-5"]
    assert rotate_checkpoints(tmp_path, None) == []


def test_load_best_model_at_end(tmp_path):
    calls = {"n": 0}

    def metrics(_):
        calls["n"] += 1
        return {"score": [0.1, 0.9, 0.2, 0.3, 0.4, 0.5][calls["n"] - 1]}

    out = tmp_path / "run"
    args = _args(
        out,
        max_steps=12,
        eval_steps=2,
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="score",
    )
    sink = RecordingSink()
    t = Trainer(TinyClassifier(), args, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=metrics, sinks=[sink])
    t.train()
    assert t.state.best_metric == 0.9 and t.state.best_global_step == 4
    best = torch.load(out / "checkpoint-4" / WEIGHTS_NAME, weights_only=True)
    for k, v in t.model.state_dict().items():
        torch.testing.assert_close(v, best[k])
    last = torch.load(out / "checkpoint-12" / WEIGHTS_NAME, weights_only=True)
    assert any(not torch.equal(v, last[k]) for k, v in t.model.state_dict().items())
    saves = sink.of(Save)
    # The first evaluation is a best by definition; then only step 4 improves.
    assert [s.is_best for s in saves] == [True, True, False, False, False, False]
    assert saves[1].checkpoint_dir == str(out / "checkpoint-4")


def test_save_strategy_best_saves_only_improvements(tmp_path):
    scores = iter([0.5, 0.4, 0.7, 0.6, 0.8, 0.1])

    out = tmp_path / "run"
    args = _args(out, max_steps=12, eval_steps=2, save_strategy="best", metric_for_best_model="score")
    t = Trainer(TinyClassifier(), args, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=lambda _: {"score": next(scores)})
    t.train()
    assert checkpoints(str(out)) == ["checkpoint-2", "checkpoint-6", "checkpoint-10"]


def test_save_total_limit_one_keeps_only_the_best_at_the_end(tmp_path):
    scores = iter([0.9, 0.1, 0.1, 0.1])
    out = tmp_path / "run"
    args = _args(out, max_steps=8, eval_steps=2, save_steps=2, save_total_limit=1, metric_for_best_model="score")
    t = Trainer(TinyClassifier(), args, train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=lambda _: {"score": next(scores)})
    t.train()
    assert checkpoints(str(out)) == ["checkpoint-2"]


class Counter(TrainerCallback, ExportableState):
    def __init__(self, start: int = 0) -> None:
        self.count = start

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1

    def state(self):
        return {"args": {"start": 0}, "attributes": {"count": self.count}}


def test_stateful_callbacks_are_saved_and_restored_into_the_same_instances(tmp_path):
    out = tmp_path / "run"
    a, b = Counter(), Counter()
    Trainer(TinyClassifier(), _args(out, save_steps=3), train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[a, b, StopAt(6)]).train()
    assert (a.count, b.count) == (6, 6)

    a2, b2 = Counter(), Counter()
    b2.count = 100  # overwritten by the checkpoint's state
    early = EarlyStoppingCallback(early_stopping_patience=50)  # not in the checkpoint: starts fresh
    t = Trainer(
        TinyClassifier(),
        _args(out, save_steps=3, metric_for_best_model="loss"),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=[a2, b2, early],
    )
    t.train(resume_from_checkpoint=True)
    assert (a2.count, b2.count) == (12, 12)
    assert a2 in t.callback_handler.callbacks and b2 in t.callback_handler.callbacks
