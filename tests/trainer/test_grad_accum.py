"""Gradient accumulation: n micro-batches of size b train exactly like one batch of
size n*b (the loss is scaled by the number of micro-batches in the step, including
a short last step of the epoch), and the logged loss is the same."""

from __future__ import annotations

import pytest
import torch

from tests.trainer._loop_helpers import TinyClassifier, make_dataset
from trainer import Trainer, TrainerCallback, TrainingArguments


class GradSnapshot(TrainerCallback):
    """The accumulated gradient of every step, just before the optimizer applies it."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.substeps = 0

    def on_substep_end(self, args, state, control, **kwargs):
        self.substeps += 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.clone() for n, p in model.named_parameters()})


def _train(tmp_path, n, bs, ga, epochs=2, **kw):
    snap = GradSnapshot()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{bs}-ga{ga}"),
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        num_train_epochs=epochs,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        learning_rate=5e-2,
        weight_decay=0.01,
        **kw,
    )
    t = Trainer(TinyClassifier(), args, train_dataset=make_dataset(n), callbacks=[snap])
    t.train()
    losses = [float(h["loss"]) for h in t.state.log_history if "loss" in h]
    return t, snap, losses


@pytest.mark.parametrize("n", [32, 20], ids=["even", "short-last-step"])
@pytest.mark.parametrize("bs,ga", [(4, 2), (2, 4)])
def test_accumulation_equals_a_large_batch(tmp_path, n, bs, ga):
    big, big_snap, big_losses = _train(tmp_path, n, bs * ga, 1)
    acc, acc_snap, acc_losses = _train(tmp_path, n, bs, ga)

    assert acc.state.global_step == big.state.global_step
    assert len(acc_snap.grads) == len(big_snap.grads) == big.state.global_step
    # Each optimizer step saw the same accumulated gradient...
    for g_acc, g_big in zip(acc_snap.grads, big_snap.grads):
        for name in g_big:
            torch.testing.assert_close(g_acc[name], g_big[name], rtol=1e-4, atol=1e-6)
    # ...so the same weights, and the same logged loss curve.
    for (k, v_acc), v_big in zip(acc.model.state_dict().items(), big.model.state_dict().values()):
        torch.testing.assert_close(v_acc, v_big, rtol=1e-4, atol=1e-5)
    assert acc_losses == pytest.approx(big_losses, rel=1e-5)
    # The micro-steps between optimizer steps were reported.
    assert acc_snap.substeps > 0 and big_snap.substeps == 0


def test_short_last_step_of_an_epoch_is_scaled_by_its_own_size(tmp_path):
    # 5 batches, accumulation 2: steps of 2, 2 and 1 batches per epoch.
    t, snap, _ = _train(tmp_path, 20, 4, 2, epochs=1)
    assert t.state.global_step == 3
    assert t.current_gradient_accumulation_steps == 1


def test_logged_loss_is_the_mean_since_the_last_log(tmp_path):
    # logging every 2 steps: each logged loss is the mean of the two per-step losses.
    _, _, every = _train(tmp_path, 32, 4, 1, epochs=1)
    args_kw = dict(logging_steps=2)
    snap = GradSnapshot()
    t = Trainer(
        TinyClassifier(),
        TrainingArguments(
            output_dir=str(tmp_path / "every2"),
            per_device_train_batch_size=4,
            num_train_epochs=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            learning_rate=5e-2,
            weight_decay=0.01,
            **args_kw,
        ),
        train_dataset=make_dataset(32),
        callbacks=[snap],
    )
    t.train()
    pairs = [float(h["loss"]) for h in t.state.log_history if "loss" in h]
    expected = [(every[i] + every[i + 1]) / 2 for i in range(0, len(every), 2)]
    assert pairs == pytest.approx(expected, rel=1e-5)
