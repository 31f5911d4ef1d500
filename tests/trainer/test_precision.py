"""Mixed precision (``bf16=True`` / ``fp16=True``): the forward runs under autocast in
training and evaluation, the weights stay float32, fp16 scales the loss, skips an
overflowed step and keeps its scale across a resume; what cannot work is refused
when the trainer is built."""

from __future__ import annotations

import copy
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from trainer import Trainer, TrainerCallback, TrainingArguments
from trainer.arguments import TrainingArgumentsError

from ._loop_helpers import TinyClassifier, accuracy, checkpoints, make_dataset, tiny_args

N = 32


class DtypeSpy(TinyClassifier):
    """Records the dtype its first layer computes in, per mode (train/eval); while
    ``boom`` is set, its loss is multiplied by 1e30 (an overflow under fp16)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[bool, set[torch.dtype]] = {True: set(), False: set()}
        self.boom = False

    def forward(self, x, labels=None):  # type: ignore[override]
        self.seen[self.training].add(self.lin(x).dtype)
        out = super().forward(x, labels)
        if self.boom and labels is not None:
            out["loss"] = out["loss"] * 1e30
        return out


def _reference_losses(model: nn.Module, data: list[dict], steps: int, dtype: torch.dtype, lr: float) -> list[float]:
    """The same training written out by hand: one batch of everything per step, AdamW,
    a linear schedule, the norm clipped at 1, the forward under autocast."""
    x = torch.stack([d["x"] for d in data])
    y = torch.tensor([d["labels"] for d in data])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype):
            loss = model(x, y)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("flag,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_training_and_evaluation_run_under_autocast_with_float32_weights(tmp_path, flag, dtype):
    model = DtypeSpy()
    reference = copy.deepcopy(model)
    data = make_dataset(N)
    seen_predictions = []

    def metrics(p):
        seen_predictions.append(p.predictions.dtype)
        return accuracy(p)

    args = tiny_args(tmp_path, max_steps=6, per_device_train_batch_size=N, learning_rate=1e-2, **{flag: True})
    t = Trainer(model, args, train_dataset=data, eval_dataset=make_dataset(16, seed=1), compute_metrics=metrics)
    t.train()
    result = t.evaluate()

    assert model.seen[True] == {dtype} and model.seen[False] == {dtype}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # compute_metrics gets float32 numpy predictions (numpy has no bfloat16).
    assert seen_predictions == [np.dtype("float32")]
    assert np.isfinite(result["eval_loss"]) and 0.0 <= result["eval_accuracy"] <= 1.0
    # The losses are those of the same training written by hand under autocast.
    logged = [h["loss"] for h in t.state.log_history if "loss" in h]
    expected = _reference_losses(reference, data, 6, dtype, 1e-2)
    assert logged == pytest.approx(expected, rel=2e-2)
    assert logged[-1] < logged[0]
    assert (t.scaler is not None) == (flag == "fp16")


def test_full_precision_runs_without_autocast_or_scaler(tmp_path):
    model = DtypeSpy()
    t = Trainer(model, tiny_args(tmp_path, max_steps=2), train_dataset=make_dataset(N), eval_dataset=make_dataset(8))
    t.train()
    t.evaluate()
    assert model.seen == {True: {torch.float32}, False: {torch.float32}}
    assert t.scaler is None


class _Weights(TrainerCallback):
    """The first layer's weight before and after each optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.changed: dict[int, bool] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before[state.global_step + 1] = model.lin.weight.detach().clone()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        self.changed[step] = not torch.equal(self.before[step], model.lin.weight)


def test_fp16_skips_an_overflowed_step_on_the_device_and_lowers_the_scale(tmp_path):
    model = DtypeSpy()
    watch = _Weights()
    scales: list[float] = []

    class Boom(TrainerCallback):
        """Makes step 3's loss overflow; records the loss scale after each step."""

        def on_step_begin(self, args, state, control, **kwargs):
            model.boom = state.global_step + 1 == 3

        def on_step_end(self, args, state, control, **kwargs):
            scales.append(t.scaler.get_scale())

    t = Trainer(
        model, tiny_args(tmp_path, max_steps=5, per_device_train_batch_size=8, fp16=True),
        train_dataset=make_dataset(N), callbacks=[watch, Boom()],
    )
    t.train()

    assert watch.changed == {1: True, 2: True, 3: False, 4: True, 5: True}
    assert scales[0] == scales[1] == 65536.0 and scales[2:] == [32768.0] * 3
    # The fused AdamW (the default optim) took the overflow flag itself: its step
    # count holds the four steps it ran, not the skipped one.
    assert t.optimizer.defaults["fused"] is True
    assert {int(s["step"]) for s in t.optimizer.state.values()} == {4}
    norms = {h["step"]: h["grad_norm"] for h in t.state.log_history if "grad_norm" in h}
    assert not np.isfinite(norms[3]) and all(np.isfinite(norms[s]) for s in (1, 2, 4, 5))
    # The schedule went on through the skipped step (no host check of the flag).
    assert t.lr_scheduler.last_epoch == 5


def test_fp16_scale_is_saved_in_checkpoints_and_restored_on_resume(tmp_path):
    def trainer(max_steps: int, **kw) -> Trainer:
        model = TinyClassifier()
        return Trainer(
            model, tiny_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, **kw),
            train_dataset=make_dataset(N),
        )

    first = trainer(2, fp16=True)
    first.train()
    ckpt = os.path.join(tmp_path, checkpoints(tmp_path)[-1])
    saved = torch.load(os.path.join(ckpt, "scaler.pt"), weights_only=True)
    assert saved["scale"] == first.scaler.get_scale()

    # A scale the fresh scaler would not have: the resume must read it from the file.
    saved["scale"] = 1024.0
    torch.save(saved, os.path.join(ckpt, "scaler.pt"))
    second = trainer(3, fp16=True)
    second.train(resume_from_checkpoint=ckpt)
    assert second.scaler.get_scale() == 1024.0


def test_fp16_resume_from_a_full_precision_checkpoint_warns_and_starts_a_fresh_scale(tmp_path, caplog):
    first = Trainer(
        TinyClassifier(), tiny_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=make_dataset(N),
    )
    first.train()
    ckpt = os.path.join(tmp_path, checkpoints(tmp_path)[-1])
    assert not os.path.exists(os.path.join(ckpt, "scaler.pt"))
    second = Trainer(
        TinyClassifier(), tiny_args(tmp_path, max_steps=3, save_strategy="steps", save_steps=2, fp16=True),
        train_dataset=make_dataset(N),
    )
    with caplog.at_level(logging.WARNING, logger="trainer"):
        second.train(resume_from_checkpoint=ckpt)
    assert "holds no scaler.pt" in caplog.text
    assert second.state.global_step == 3


def test_bf16_and_fp16_together_are_refused():
    with pytest.raises(TrainingArgumentsError, match="choose one mixed precision"):
        TrainingArguments(output_dir="x", bf16=True, fp16=True)


def test_bf16_must_be_a_bool():
    with pytest.raises(TrainingArgumentsError, match="bf16 must be True or False"):
        TrainingArguments(output_dir="x", bf16="yes")


def test_fp16_with_a_half_precision_model_is_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(TrainingArgumentsError, match=r"fp16=True .* torch\.float16 .* keep the model in float32"):
        Trainer(TinyClassifier().half(), tiny_args(tmp_path, fp16=True), train_dataset=make_dataset(N))
    # bf16 autocast over bfloat16 weights is fine (nothing to unscale).
    Trainer(TinyClassifier().to(torch.bfloat16), tiny_args(tmp_path, bf16=True), train_dataset=make_dataset(N))

