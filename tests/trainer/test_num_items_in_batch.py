"""transformers' loss normalisation over an accumulated batch (``num_items_in_batch``):
a model that takes loss kwargs (transformers' own) or ``compute_loss_func`` gets the
labelled positions of the whole optimizer step, and its loss is not divided again by
the accumulation steps, so that padded micro-batches weigh by their tokens, as in
transformers' Trainer; compared with it directly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import require_module
from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args, tiny_gpt2
from trainer import Trainer, TrainerCallback


def _padded_tokens(n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Rows of 12 tokens whose labels end in -100 padding of different lengths: the
    micro-batches of a step hold different numbers of labelled positions."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i, keep in enumerate([12, 3, 9, 5, 12, 7, 4, 10][:n]):
        ids = torch.randint(0, 40, (12,), generator=g)
        labels = ids.clone()
        labels[keep:] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class _Grads(TrainerCallback):
    """The accumulated gradient just before the optimizer applies it."""

    def __init__(self) -> None:
        self.grads: list[list[torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters()])


def _ours(model: Any, out: Any, data: Any, callbacks: Any = (), **kw: Any) -> Trainer:
    extra = {k: kw.pop(k) for k in ("compute_loss_func",) if k in kw}
    args = tiny_args(out, max_steps=1, max_grad_norm=0.0, learning_rate=1e-3, **kw)
    return Trainer(model, args, train_dataset=data, callbacks=list(callbacks), **extra)


def _theirs(model: Any, out: Any, data: Any, callbacks: Any = (), **kw: Any) -> Any:
    transformers = require_module("transformers")
    extra = {k: kw.pop(k) for k in ("compute_loss_func",) if k in kw}
    args = transformers.TrainingArguments(
        output_dir=str(out), report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no", max_steps=1,
        max_grad_norm=0.0, learning_rate=1e-3, logging_steps=1, **kw,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks), **extra)


def _assert_grads_close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_a_padded_causal_lm_accumulates_the_token_mean_of_the_step_as_transformers(tmp_path):
    """One step over the whole (4-row) dataset: the gradient does not depend on the
    order of the rows, so the two trainers must agree exactly; accumulating 2 x 2
    equals one batch of 4; per-micro-batch means (3 and 9 labels) would not."""
    data = _padded_tokens(4)
    runs = {}
    for name, make, kw in [
        ("ours_ga2", _ours, dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)),
        ("ours_bs4", _ours, dict(per_device_train_batch_size=4)),
        ("theirs_ga2", _theirs, dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)),
    ]:
        grads = _Grads()
        t = make(tiny_gpt2(), tmp_path / name, data, callbacks=[grads], **kw)
        loss = t.train().training_loss
        runs[name] = (grads.grads[0], loss)
    _assert_grads_close(runs["ours_ga2"][0], runs["theirs_ga2"][0])
    _assert_grads_close(runs["ours_ga2"][0], runs["ours_bs4"][0])
    assert runs["ours_ga2"][1] == pytest.approx(runs["theirs_ga2"][1], rel=1e-5)
    assert runs["ours_ga2"][1] == pytest.approx(runs["ours_bs4"][1], rel=1e-5)


def test_the_model_receives_the_count_of_the_whole_step(tmp_path):
    seen: list[int] = []

    class Counting(TinyClassifier):
        def forward(self, x, labels=None, **kwargs):
            seen.append(int(kwargs["num_items_in_batch"]))
            return super().forward(x, labels)

    data = make_dataset(8)
    for row in data[1:3]:
        row["labels"] = -100
    _ours(Counting(), tmp_path, data, per_device_train_batch_size=2, gradient_accumulation_steps=4).train()
    assert seen == [6, 6, 6, 6]  # 8 rows, two of them unlabelled, in every micro-batch of the step


def _sum_over_items(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs["logits"], labels, ignore_index=-100, reduction="sum") / num_items_in_batch


def test_compute_loss_func_gets_outputs_labels_and_the_count_as_in_transformers(tmp_path):
    calls: dict[str, list[tuple[tuple[int, ...], int]]] = {"ours": [], "theirs": []}

    def recording(who: str) -> Any:
        def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
            assert "loss" not in outputs  # the model was called without labels
            calls[who].append((tuple(labels.shape), int(num_items_in_batch)))
            return _sum_over_items(outputs, labels, num_items_in_batch)

        return loss

    data = make_dataset(6)
    data[0]["labels"] = -100
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    g_ours, g_theirs = _Grads(), _Grads()
    _ours(TinyClassifier(), tmp_path / "a", data, callbacks=[g_ours], compute_loss_func=recording("ours"), **kw).train()
    _theirs(TinyClassifier(), tmp_path / "b", data, callbacks=[g_theirs], compute_loss_func=recording("theirs"), **kw).train()
    assert calls["ours"] == [((2,), 5)] * 3
    assert sorted(calls["ours"]) == sorted(calls["theirs"])
    _assert_grads_close(g_ours.grads[0], g_theirs.grads[0])


def test_compute_loss_func_gives_the_evaluation_loss_too(tmp_path):
    data = make_dataset(8)
    t = Trainer(TinyClassifier(), tiny_args(tmp_path, per_device_eval_batch_size=8), eval_dataset=data,
                compute_loss_func=lambda outputs, labels, num_items_in_batch=None: _sum_over_items(outputs, labels, 1))
    logits = TinyClassifier()(torch.stack([d["x"] for d in data]))["logits"]
    expected = float(nn.functional.cross_entropy(logits, torch.tensor([d["labels"] for d in data]), reduction="sum"))
    assert t.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_the_evaluation_loss_of_a_causal_lm_is_transformers(tmp_path):
    transformers = require_module("transformers")
    data = _padded_tokens(8)
    ours = Trainer(tiny_gpt2(), tiny_args(tmp_path / "a", per_device_eval_batch_size=4), eval_dataset=data)
    theirs = transformers.Trainer(
        model=tiny_gpt2(), eval_dataset=data,
        args=transformers.TrainingArguments(output_dir=str(tmp_path / "b"), report_to="none", use_cpu=True,
                                            per_device_eval_batch_size=4),
    )
    assert ours.evaluate()["eval_loss"] == pytest.approx(theirs.evaluate()["eval_loss"], rel=1e-5)


def test_loss_is_scaled_for_ga_false_divides_a_normalised_loss_again(tmp_path):
    data = _padded_tokens(4)
    plain, overridden = _Grads(), _Grads()
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    _ours(tiny_gpt2(), tmp_path / "a", data, callbacks=[plain], **kw).train()
    class Mean(Trainer):  # transformers' way: a class attribute of a subclass
        loss_is_scaled_for_ga = False

    args = tiny_args(tmp_path / "b", max_steps=1, max_grad_norm=0.0, learning_rate=1e-3, **kw)
    Mean(tiny_gpt2(), args, train_dataset=data, callbacks=[overridden]).train()
    _assert_grads_close([g / 2 for g in plain.grads[0]], overridden.grads[0])


def test_a_compute_loss_override_without_the_count_keeps_batch_means(tmp_path):
    """An override written for the older signature gets no count: its loss is a
    batch mean, divided by the accumulation steps (2 x 2 trains as one batch of 4)."""

    class Older(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            outputs = model(**inputs)
            return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    class Kwargs(TinyClassifier):
        def forward(self, x, labels=None, **kwargs):
            assert "num_items_in_batch" not in kwargs
            return super().forward(x, labels)

    data = make_dataset(4)
    a, b = _Grads(), _Grads()
    Older(Kwargs(), tiny_args(tmp_path / "a", max_steps=1, max_grad_norm=0.0, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2), train_dataset=data, callbacks=[a]).train()
    Older(Kwargs(), tiny_args(tmp_path / "b", max_steps=1, max_grad_norm=0.0, per_device_train_batch_size=4),
          train_dataset=data, callbacks=[b]).train()
    _assert_grads_close(a.grads[0], b.grads[0])


def test_a_model_without_loss_kwargs_gets_no_count_and_no_labels_are_counted(tmp_path, monkeypatch):
    t = _ours(TinyClassifier(), tmp_path, make_dataset(4), per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert not t.model_accepts_loss_kwargs
    counted: list[Any] = []
    real = Trainer._get_num_items_in_batch
    monkeypatch.setattr(Trainer, "_get_num_items_in_batch", lambda self, *a, **k: counted.append(a) or real(self, *a, **k))
    t.train()
    assert counted == []  # nothing counted per step when nothing takes the count


def test_a_compute_loss_override_is_the_evaluation_loss_too_as_in_transformers(tmp_path):
    """transformers' documented pattern (a weighted loss in a Trainer subclass): its
    prediction_step goes through compute_loss, so eval_loss is the weighted one."""
    transformers = require_module("transformers")
    weights = torch.tensor([1.0, 2.0, 0.5])

    def weighted(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        outputs = model(x=inputs["x"])
        loss = nn.functional.cross_entropy(outputs["logits"], labels, weight=weights)
        return (loss, outputs) if return_outputs else loss

    ours_cls = type("Weighted", (Trainer,), {"compute_loss": weighted})
    theirs_cls = type("Weighted", (transformers.Trainer,), {"compute_loss": weighted})
    data = make_dataset(10, seed=1)
    ours = ours_cls(TinyClassifier(), tiny_args(tmp_path / "a", per_device_eval_batch_size=10), eval_dataset=data)
    theirs = theirs_cls(model=TinyClassifier(), eval_dataset=data, args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "b"), report_to="none", use_cpu=True, per_device_eval_batch_size=10))
    plain = Trainer(TinyClassifier(), tiny_args(tmp_path / "c", per_device_eval_batch_size=10), eval_dataset=data)
    m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
    assert m_ours["eval_loss"] == pytest.approx(m_theirs["eval_loss"], rel=1e-6)
    assert m_ours["eval_loss"] != pytest.approx(plain.evaluate()["eval_loss"], rel=1e-3)


def test_the_count_is_a_float_as_transformers_hands_it(tmp_path):
    seen: list[torch.dtype] = []

    def loss(outputs, labels, num_items_in_batch=None):
        seen.append(num_items_in_batch.dtype)
        return _sum_over_items(outputs, labels, num_items_in_batch)

    _ours(TinyClassifier(), tmp_path, make_dataset(4), compute_loss_func=loss, per_device_train_batch_size=4).train()
    assert seen == [torch.float32]


def test_a_causal_lm_predicts_its_logits_without_a_key_value_cache_as_in_transformers(tmp_path):
    """transformers sets model.config.use_cache to args.use_cache (False): GPT-2's
    outputs then hold no cache object, and predict()/preprocess_logits_for_metrics
    see the logits."""
    transformers = require_module("transformers")
    data = _padded_tokens(6)
    model = tiny_gpt2()
    assert model.config.use_cache is True
    ours = Trainer(model, tiny_args(tmp_path / "a", per_device_eval_batch_size=3), eval_dataset=data,
                   preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
                   compute_metrics=lambda p: {"n": float(p.predictions.size)})
    assert model.config.use_cache is False
    theirs = transformers.Trainer(model=tiny_gpt2(), eval_dataset=data, args=transformers.TrainingArguments(
        output_dir=str(tmp_path / "b"), report_to="none", use_cpu=True, per_device_eval_batch_size=3))
    out_ours, out_theirs = ours.predict(data), theirs.predict(data)
    assert out_ours.predictions.shape == (6, 12) == out_theirs.predictions.shape[:2]
    assert ours.evaluate()["eval_n"] == 72.0
    kept = Trainer(tiny_gpt2(), tiny_args(tmp_path / "c", use_cache=True), eval_dataset=data)
    assert kept.model.config.use_cache is True


def test_a_model_of_ones_own_taking_kwargs_is_warned_about_the_pitfall(tmp_path, caplog):
    class Kwargs(TinyClassifier):
        def forward(self, x, labels=None, **kwargs):
            return super().forward(x, labels)

    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with caplog.at_level("WARNING", logger="trainer"):
        _ours(Kwargs(), tmp_path / "a", make_dataset(4), **kw).train()
    assert "Kwargs.forward takes **kwargs" in caplog.text and "loss_is_scaled_for_ga = False" in caplog.text
    caplog.clear()

    class Declared(Kwargs):
        accepts_loss_kwargs = False  # transformers' switch: no count for it

    seen: list[Any] = []

    class Recording(Declared):
        def forward(self, x, labels=None, **kwargs):
            seen.append(kwargs)
            return super().forward(x, labels)

    with caplog.at_level("WARNING", logger="trainer"):
        _ours(Recording(), tmp_path / "b", make_dataset(4), **kw).train()
        _ours(tiny_gpt2(), tmp_path / "c", _padded_tokens(4), **kw).train()
    assert "takes **kwargs" not in caplog.text and seen == [{}, {}]
