"""Behaviours where this Trainer must do what transformers' Trainer does: named
evaluation sets, the evaluation loss, log_history after a second train(), the
signatures and data-loader methods subclasses override, checkpoint rotation after a
resume, the samples-per-second count, prediction_loss_only, and checkpoints that
move between the two trainers. Where transformers is importable (always in CI) the
tests compare with it directly."""

from __future__ import annotations

import inspect
import json
import os
import random
import time
from typing import Any

import pytest
import torch

from tests.conftest import require_module
from tests.trainer._loop_helpers import TinyClassifier, checkpoints, make_dataset
from trainer import Trainer, TrainerCallback, TrainingArguments
from trainer import checkpoint as ckpt
from trainer import trainer as trainer_module

TRAIN = make_dataset(10)
EVAL = make_dataset(7, seed=1)


def _args(out: Any, **kw: Any) -> TrainingArguments:
    base = dict(output_dir=str(out), report_to="none", disable_tqdm=True, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, save_strategy="no", logging_steps=100)
    base.update(kw)
    return TrainingArguments(**base)


def _hf_args(out: Any, **kw: Any) -> Any:
    transformers = require_module("transformers")
    base = dict(output_dir=str(out), report_to="none", disable_tqdm=True, use_cpu=True, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, save_strategy="no", logging_steps=100)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _hf_trainer(model: Any, out: Any, train: Any = None, eval_ds: Any = None, callbacks: Any = (), **kw: Any) -> Any:
    """transformers' own Trainer on the CPU, without downloads or reporting."""
    transformers = require_module("transformers")
    return transformers.Trainer(model=model, args=_hf_args(out, **kw), train_dataset=train, eval_dataset=eval_ds,
                                callbacks=list(callbacks))


def _tensors_in(history: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(i, k) for i, e in enumerate(history) for k, v in e.items() if isinstance(v, torch.Tensor)]


# -- 1. eval_dataset as a dict of named datasets -----------------------------------------


class _EvalPrefixes(TrainerCallback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, list[str]]] = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((state.global_step, sorted(k for k in metrics if k.endswith("_loss"))))


def test_a_dict_of_eval_datasets_is_evaluated_per_name_like_transformers(tmp_path):
    transformers = require_module("transformers")
    named = {"val": make_dataset(4, seed=2), "other": make_dataset(3, seed=3)}
    kw = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
              metric_for_best_model="eval_val_loss", load_best_model_at_end=True)

    ours_cb = _EvalPrefixes()
    t = Trainer(TinyClassifier(), _args(tmp_path / "ours", **kw), train_dataset=TRAIN, eval_dataset=named,
                callbacks=[ours_cb])
    t.train()

    class HfPrefixes(_EvalPrefixes, transformers.TrainerCallback):
        pass

    hf_cb = HfPrefixes()
    hf_cb.seen = []
    hf = _hf_trainer(TinyClassifier(), tmp_path / "hf", TRAIN, named, [hf_cb], **kw)
    hf.train()

    assert ours_cb.seen == hf_cb.seen == [
        (2, ["eval_val_loss"]), (2, ["eval_other_loss"]), (4, ["eval_val_loss"]), (4, ["eval_other_loss"])
    ]

    def eval_keys(history):
        return [sorted(k for k in e if k.startswith("eval_") and k.endswith("_loss")) for e in history
                if any(k.startswith("eval_") for k in e)]

    assert eval_keys(t.state.log_history) == eval_keys(hf.state.log_history)
    # The best-model lookup finds the named metric (the data orders differ, so each
    # trainer is checked against its own history).
    for trainer in (t, hf):
        val = [(e["eval_val_loss"], e["step"]) for e in trainer.state.log_history if "eval_val_loss" in e]
        assert (trainer.state.best_metric, trainer.state.best_global_step) == min(val)
    # evaluate() returns every dataset's metrics; a dict passed to it is used as given.
    metrics = t.evaluate()
    assert {"eval_val_loss", "eval_other_loss"} <= set(metrics)
    given = t.evaluate(eval_dataset={"x": EVAL}, metric_key_prefix="check")
    assert "check_x_loss" in given and "check_val_loss" not in given


# -- 2. the evaluation loss is the mean over examples ------------------------------------


def test_eval_and_test_loss_are_the_mean_over_examples_like_transformers(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path / "ours"), eval_dataset=EVAL)  # 7 examples, batches of 4 and 3
    ours_eval = t.evaluate()["eval_loss"]
    ours_test = t.predict(EVAL).metrics["test_loss"]
    model = TinyClassifier()
    with torch.no_grad():
        x = torch.stack([e["x"] for e in EVAL])
        y = torch.tensor([e["labels"] for e in EVAL])
        expected = model(x, labels=y)["loss"].item()
    hf = _hf_trainer(TinyClassifier(), tmp_path / "hf", eval_ds=EVAL)
    assert ours_eval == pytest.approx(expected, rel=1e-6)
    assert ours_test == pytest.approx(expected, rel=1e-6)
    assert ours_eval == pytest.approx(hf.evaluate()["eval_loss"], rel=1e-6)


# -- 3. log_history holds numbers after a second train() or a resume ---------------------


def test_log_history_holds_no_tensor_after_a_second_train(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=6, logging_steps=1), train_dataset=TRAIN)
    t.train()
    t.train()
    assert _tensors_in(t.state.log_history) == []
    json.dumps(t.state.log_history)


def test_log_history_holds_no_tensor_after_resuming_in_the_same_trainer(tmp_path):
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=4, logging_steps=1, save_strategy="steps", save_steps=2),
                train_dataset=TRAIN)
    t.train()  # 4 logs and the train metrics: the count read so far is 5
    t.args.max_steps = 12
    t.args.save_strategy = "no"  # nothing reads log_history before the end of training
    t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert t.state.global_step == 12
    assert _tensors_in(t.state.log_history) == []


# -- 4. subclasses written for transformers ----------------------------------------------


def test_override_signatures_are_transformers(tmp_path):
    transformers = require_module("transformers")
    for name in ("compute_loss", "training_step", "get_train_dataloader", "get_eval_dataloader", "get_test_dataloader"):
        ours = list(inspect.signature(getattr(Trainer, name)).parameters)
        theirs = list(inspect.signature(getattr(transformers.Trainer, name)).parameters)
        assert ours == theirs, name


def test_overrides_with_transformers_signatures_calling_super_train(tmp_path):
    seen: list[Any] = []

    class Loss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append(("loss", num_items_in_batch))
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    class Step(Trainer):
        def training_step(self, model, inputs, num_items_in_batch):  # no default, as some overrides are
            seen.append(("step", num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)

    class OldStep(Trainer):
        def training_step(self, model, inputs):  # the two-argument form keeps working
            seen.append(("old",))
            return super().training_step(model, inputs)

    for cls in (Loss, Step, OldStep):
        out = cls(TinyClassifier(), _args(tmp_path, max_steps=2), train_dataset=TRAIN).train()
        assert out.global_step == 2
    assert seen == [("loss", None)] * 2 + [("step", None)] * 2 + [("old",)] * 2


def test_data_loader_overrides_are_used_for_train_eval_and_predict(tmp_path):
    calls: list[str] = []

    class Loaders(Trainer):
        def get_train_dataloader(self):
            calls.append("train")
            return torch.utils.data.DataLoader(self.train_dataset, batch_size=2, collate_fn=self.data_collator)

        def get_eval_dataloader(self, eval_dataset=None):
            calls.append("eval")
            return torch.utils.data.DataLoader(eval_dataset or self.eval_dataset, batch_size=5,
                                               collate_fn=self.data_collator)

        def get_test_dataloader(self, test_dataset):
            calls.append("test")
            return torch.utils.data.DataLoader(test_dataset, batch_size=5, collate_fn=self.data_collator)

    batches: list[int] = []

    class CountBatches(TrainerCallback):
        def on_prediction_step(self, args, state, control, num_batches=None, **kwargs):
            batches.append(num_batches)

    t = Loaders(TinyClassifier(), _args(tmp_path, num_train_epochs=2, eval_strategy="epoch"), train_dataset=TRAIN,
                eval_dataset=EVAL, callbacks=[CountBatches()])
    out = t.train()
    assert out.global_step == 10  # 10 examples in batches of 2 (not 4), 2 epochs
    t.predict(EVAL)
    assert calls == ["train", "eval", "eval", "test"]
    assert set(batches) == {2}  # 7 examples in batches of 5


def test_an_override_calling_super_resumes_exactly(tmp_path):
    calls: list[int] = []

    class Super(Trainer):
        def get_train_dataloader(self):
            calls.append(1)
            return super().get_train_dataloader()

    def losses(t):
        return [(e["step"], round(float(e["loss"]), 6)) for e in t.state.log_history if "loss" in e]

    kw = dict(num_train_epochs=3, logging_steps=1, save_strategy="steps", save_steps=4)  # 3 steps an epoch
    full = Trainer(TinyClassifier(), _args(tmp_path / "full", **kw), train_dataset=TRAIN)
    full.train()
    resumed = Super(TinyClassifier(), _args(tmp_path / "full", **kw), train_dataset=TRAIN)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert calls == [1]
    assert losses(resumed) == losses(full)


# -- 5. rotation keeps the checkpoint just written ---------------------------------------


def _stale_layout(root: Any) -> None:
    now = time.time()
    for step, age in ((4, 3000), (8, 2000), (12, 1000), (6, 0)):  # 8 and 12: an abandoned run; 6 written now
        p = os.path.join(root, f"checkpoint-{step}")
        os.makedirs(p)
        os.utime(p, (now - age, now - age))


def test_rotation_keeps_the_checkpoint_just_saved_like_transformers(tmp_path):
    trainer_utils = require_module("transformers.trainer_utils")
    _stale_layout(tmp_path / "ours")
    _stale_layout(tmp_path / "hf")
    ckpt.rotate_checkpoints(tmp_path / "ours", 1, None, current=str(tmp_path / "ours" / "checkpoint-6"))
    trainer_utils.rotate_checkpoints(str(tmp_path / "hf"), 1, None, use_mtime=True)
    assert checkpoints(str(tmp_path / "ours")) == checkpoints(str(tmp_path / "hf")) == ["checkpoint-6"]


def test_rotation_deletes_checkpoints_past_the_one_just_saved_first(tmp_path):
    # transformers (by mtime) would keep checkpoint-12 here, which resume=True (the
    # highest step) would then pick: a run this one abandoned. This keeps this run's.
    _stale_layout(tmp_path)
    deleted = ckpt.rotate_checkpoints(tmp_path, 2, None, current=str(tmp_path / "checkpoint-6"))
    assert sorted(os.path.basename(d) for d in deleted) == ["checkpoint-12", "checkpoint-8"]
    assert sorted(checkpoints(str(tmp_path))) == ["checkpoint-4", "checkpoint-6"]
    assert ckpt.get_last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-6")
    # The best checkpoint is kept even when stale.
    _stale_layout(tmp_path / "b")
    ckpt.rotate_checkpoints(tmp_path / "b", 1, str(tmp_path / "b" / "checkpoint-12"), current=str(tmp_path / "b" / "checkpoint-6"))
    assert sorted(checkpoints(str(tmp_path / "b"))) == ["checkpoint-12", "checkpoint-6"]


def test_resuming_from_an_earlier_checkpoint_does_not_delete_what_it_saves(tmp_path):
    on_disk: list[tuple[int, list[str]]] = []

    class Show(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            on_disk.append((state.global_step, checkpoints(args.output_dir)))

    Trainer(TinyClassifier(), _args(tmp_path, max_steps=12, save_strategy="steps", save_steps=4),
            train_dataset=TRAIN).train()
    assert set(checkpoints(str(tmp_path))) == {"checkpoint-4", "checkpoint-8", "checkpoint-12"}
    os.rename(tmp_path / "checkpoint-8", tmp_path / "checkpoint-9")  # a stale step this run never saves
    t = Trainer(TinyClassifier(), _args(tmp_path, max_steps=12, save_strategy="steps", save_steps=4, save_total_limit=1),
                train_dataset=TRAIN, callbacks=[Show()])
    t.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert on_disk == [(8, ["checkpoint-8"]), (12, ["checkpoint-12"])]


# -- 6. train_samples_per_second counts the samples transformers counts -------------------


@pytest.mark.parametrize(
    "kw",
    [dict(num_train_epochs=2), dict(num_train_epochs=2, gradient_accumulation_steps=2), dict(max_steps=3),
     dict(num_train_epochs=1.5)],
)
def test_train_samples_counted_like_transformers(tmp_path, monkeypatch, kw):
    hf_trainer = require_module("transformers.trainer")
    counted: dict[str, float] = {}

    def spy(name, real):
        def f(split, start, num_samples=None, num_steps=None, *a, **k):
            if split == "train":
                counted[name] = num_samples
            return real(split, start, num_samples=num_samples, num_steps=num_steps, *a, **k)

        return f

    monkeypatch.setattr(trainer_module, "_speed_metrics", spy("ours", trainer_module._speed_metrics))
    monkeypatch.setattr(hf_trainer, "speed_metrics", spy("hf", hf_trainer.speed_metrics))
    Trainer(TinyClassifier(), _args(tmp_path / "ours", **kw), train_dataset=TRAIN).train()
    _hf_trainer(TinyClassifier(), tmp_path / "hf", TRAIN, **kw).train()
    assert counted["ours"] == pytest.approx(counted["hf"])


# -- 7. checkpoints move between the two trainers ----------------------------------------


def test_rng_state_is_in_the_format_transformers_reads(tmp_path):
    random.seed(3)
    ckpt.save_rng_state(tmp_path)
    saved = torch.load(tmp_path / ckpt.RNG_STATE_NAME, weights_only=True)  # no pickle needed
    assert saved["python"] == random.getstate()
    random.seed(4)
    random.setstate(saved["python"])  # what transformers' _load_rng_state does
    ckpt.load_rng_state(tmp_path)
    assert random.getstate() == saved["python"]


def test_transformers_resumes_from_our_checkpoint(tmp_path):
    Trainer(TinyClassifier(), _args(tmp_path / "ours", max_steps=4, save_strategy="steps", save_steps=2, logging_steps=1),
            train_dataset=TRAIN).train()
    random.seed(99)
    hf = _hf_trainer(TinyClassifier(), tmp_path / "hf", TRAIN, max_steps=6, logging_steps=1)
    hf.train(resume_from_checkpoint=str(tmp_path / "ours" / "checkpoint-2"))
    assert hf.state.global_step == 6
    assert [e["step"] for e in hf.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]


def test_we_resume_from_a_transformers_checkpoint(tmp_path):
    _hf_trainer(TinyClassifier(), tmp_path / "hf", TRAIN, max_steps=4, save_strategy="steps", save_steps=2,
                logging_steps=1).train()
    source = tmp_path / "hf" / "checkpoint-2"
    assert (source / ckpt.SAFE_WEIGHTS_NAME).is_file() and not (source / ckpt.WEIGHTS_NAME).is_file()
    t = Trainer(TinyClassifier(seed=5), _args(tmp_path / "ours", max_steps=4, logging_steps=1), train_dataset=TRAIN)
    t.train(resume_from_checkpoint=str(source))
    assert t.state.global_step == 4
    assert [e["step"] for e in t.state.log_history if "loss" in e] == [1, 2, 3, 4]
    # The weights came from transformers' model.safetensors.
    restored = TinyClassifier(seed=5)
    ckpt.load_model_weights(restored, source)
    reference = TinyClassifier(seed=5)
    assert not torch.equal(restored.lin.weight, reference.lin.weight)


# -- 8. prediction_loss_only ----------------------------------------------------------------


def test_prediction_loss_only_is_an_argument_like_transformers(tmp_path):
    transformers = require_module("transformers")
    assert TrainingArguments().prediction_loss_only is transformers.TrainingArguments().prediction_loss_only is False
    calls: list[int] = []

    def metrics(p):
        calls.append(1)
        return {"acc": 1.0}

    t = Trainer(TinyClassifier(), _args(tmp_path, prediction_loss_only=True), eval_dataset=EVAL,
                compute_metrics=metrics)
    out = t.predict(EVAL)
    assert out.predictions is None and out.label_ids is None and "test_loss" in out.metrics
    assert "eval_loss" in t.evaluate() and calls == []
    hf = transformers.Trainer(model=TinyClassifier(), args=_hf_args(tmp_path / "hf", prediction_loss_only=True),
                              compute_metrics=metrics)
    theirs = hf.predict(EVAL)
    assert theirs.predictions is None and theirs.label_ids is None and calls == []
