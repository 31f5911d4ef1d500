"""transformers' evaluation and checkpoint options, each compared with transformers'
own Trainer where it runs here: preprocess_logits_for_metrics, include_for_metrics,
eval_do_concat_batches=False, batch_eval_metrics, bf16/fp16_full_eval, auto_find_batch_size,
save_only_model, neftune_noise_alpha, optimizer_cls_and_kwargs, EvalPrediction."""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import require_module
from tests.trainer._loop_helpers import TinyClassifier, checkpoints, make_dataset, tiny_args, tiny_gpt2
from trainer import Trainer, TrainerCallback
from trainer import checkpoint as ckpt
from trainer.arguments import TrainingArgumentsError
from trainer.trainer import EvalPrediction, TrainingInterrupted

TRAIN = make_dataset(16)
EVAL = make_dataset(10, seed=1)  # batches of 4, 4 and 2
EVEN = make_dataset(8, seed=1)  # batches of 4 and 4


class _XInput(TinyClassifier):
    main_input_name = "x"


class _Casting(TinyClassifier):
    """Takes its features in its own dtype, as transformers' models embed token ids:
    a half-precision model then runs on float32 data."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return super().forward(x.to(self.lin.weight.dtype), labels)


def _hf_trainer(model: Any, out: Any, eval_ds: Any, train: Any = None, **kw: Any) -> Any:
    """transformers' own Trainer on the CPU, without downloads or reporting."""
    transformers = require_module("transformers")
    extra = {k: kw.pop(k) for k in ("compute_metrics", "preprocess_logits_for_metrics", "callbacks") if k in kw}
    base = dict(output_dir=str(out), report_to="none", disable_tqdm=True, use_cpu=True, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, save_strategy="no")
    args = transformers.TrainingArguments(**{**base, **kw})
    return transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_ds, **extra)


def _ours(model: Any, out: Any, eval_ds: Any, train: Any = None, **kw: Any) -> Trainer:
    extra = {k: kw.pop(k) for k in ("compute_metrics", "preprocess_logits_for_metrics", "callbacks") if k in kw}
    return Trainer(model, tiny_args(out, per_device_eval_batch_size=4, **kw), train_dataset=train, eval_dataset=eval_ds,
                   **extra)


class _Seen:
    """A compute_metrics that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, p: Any, compute_result: bool | None = None) -> dict[str, float] | None:
        self.calls.append({"p": p, "compute_result": compute_result, "elements": len(tuple(p))})
        return {"n": float(len(self.calls)), "last": float(bool(compute_result))}


def _np(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, (list, tuple)):
        return [_np(v) for v in value]
    return value


def _assert_same(a: Any, b: Any) -> None:
    a, b = _np(a), _np(b)
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (a, b)
        for x, y in zip(a, b):
            _assert_same(x, y)
        return
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


# -- preprocess_logits_for_metrics ------------------------------------------------------


def _argmax(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return logits.argmax(-1)


def test_preprocess_logits_for_metrics_reaches_compute_metrics_and_predict_as_in_transformers(tmp_path):
    ours_seen, theirs_seen = _Seen(), _Seen()
    ours = _ours(TinyClassifier(), tmp_path / "a", EVAL, compute_metrics=ours_seen, preprocess_logits_for_metrics=_argmax)
    theirs = _hf_trainer(TinyClassifier(), tmp_path / "b", EVAL, compute_metrics=theirs_seen,
                         preprocess_logits_for_metrics=_argmax)
    ours.evaluate()
    theirs.evaluate()
    (mine,), (hf,) = ours_seen.calls, theirs_seen.calls
    assert mine["p"].predictions.shape == (10,)  # class ids, not logits
    _assert_same(mine["p"].predictions, hf["p"].predictions)
    _assert_same(mine["p"].label_ids, hf["p"].label_ids)
    _assert_same(ours.predict(EVAL).predictions, theirs.predict(EVAL).predictions)


# -- include_for_metrics ----------------------------------------------------------------


def test_include_for_metrics_passes_inputs_and_losses_as_transformers(tmp_path):
    ours_seen, theirs_seen = _Seen(), _Seen()
    kw = dict(include_for_metrics=["inputs", "loss"])
    _ours(_XInput(), tmp_path / "a", EVEN, compute_metrics=ours_seen, **kw).evaluate()
    _hf_trainer(_XInput(), tmp_path / "b", EVEN, compute_metrics=theirs_seen, **kw).evaluate()
    (mine,), (hf,) = ours_seen.calls, theirs_seen.calls
    assert mine["elements"] == hf["elements"] == 4  # unpacks as preds, labels, inputs, losses
    preds, labels, inputs, losses = mine["p"]
    assert inputs.shape == (8, 4) and losses.shape == (8,)
    for name in ("predictions", "label_ids", "inputs", "losses"):
        _assert_same(getattr(mine["p"], name), getattr(hf["p"], name))


def test_included_losses_line_up_with_the_predictions_when_the_last_batch_is_short(tmp_path):
    seen = _Seen()
    t = _ours(TinyClassifier(), tmp_path, EVAL, compute_metrics=seen, include_for_metrics=["loss"])
    metrics = t.evaluate()
    p = seen.calls[0]["p"]
    assert p.inputs is None and len(tuple(p)) == 3
    assert p.losses.shape == (10,) == p.predictions.shape[:1]
    # Each example carries its batch's loss: 4 + 4 + 2, and their mean is eval_loss.
    assert len(set(p.losses[:4].tolist())) == 1 and len(set(p.losses[8:].tolist())) == 1
    assert metrics["eval_loss"] == pytest.approx(float(p.losses.astype(np.float64).mean()), rel=1e-6)


def test_include_for_metrics_inputs_needs_the_main_input_in_the_batches(tmp_path):
    t = _ours(TinyClassifier(), tmp_path, EVAL, compute_metrics=_Seen(), include_for_metrics=["inputs"])
    with pytest.raises(ValueError, match=r"'input_ids' \(the model's main_input_name\).*\['labels', 'x'\].*main_input_name"):
        t.evaluate()


@pytest.mark.parametrize("value", [["input"], "losses", [3]])
def test_include_for_metrics_refuses_unknown_names(tmp_path, value):
    with pytest.raises(TrainingArgumentsError, match="include_for_metrics.*'inputs', 'loss'"):
        tiny_args(tmp_path, include_for_metrics=value)


# -- eval_do_concat_batches=False -------------------------------------------------------


def test_eval_do_concat_batches_false_keeps_per_batch_arrays_as_transformers(tmp_path):
    ours_seen, theirs_seen = _Seen(), _Seen()
    kw = dict(eval_do_concat_batches=False, include_for_metrics=["inputs", "loss"])
    ours = _ours(_XInput(), tmp_path / "a", EVAL, compute_metrics=ours_seen, **kw)
    theirs = _hf_trainer(_XInput(), tmp_path / "b", EVAL, compute_metrics=theirs_seen, **kw)
    m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
    mine, hf = ours_seen.calls[0]["p"], theirs_seen.calls[0]["p"]
    assert isinstance(mine.predictions, list) and [a.shape for a in mine.predictions] == [(4, 3), (4, 3), (2, 3)]
    for name in ("predictions", "label_ids", "inputs"):
        _assert_same(getattr(mine, name), getattr(hf, name))
    # transformers repeats the last batch's loss eval_batch_size times; here once per example.
    assert [len(a) for a in mine.losses] == [4, 4, 2]
    assert m_ours["eval_loss"] == pytest.approx(m_theirs["eval_loss"], rel=0.2)
    out = ours.predict(EVAL)
    assert isinstance(out.predictions, list) and len(out.predictions) == 3
    _assert_same(out.predictions, theirs.predict(EVAL).predictions)


# -- batch_eval_metrics -----------------------------------------------------------------


def test_batch_eval_metrics_calls_compute_metrics_per_batch_as_transformers(tmp_path):
    ours_seen, theirs_seen = _Seen(), _Seen()
    m_ours = _ours(TinyClassifier(), tmp_path / "a", EVAL, compute_metrics=ours_seen, batch_eval_metrics=True).evaluate()
    m_theirs = _hf_trainer(TinyClassifier(), tmp_path / "b", EVAL, compute_metrics=theirs_seen,
                           batch_eval_metrics=True).evaluate()
    assert [c["compute_result"] for c in ours_seen.calls] == [c["compute_result"] for c in theirs_seen.calls] == [
        False, False, True]
    for mine, hf in zip(ours_seen.calls, theirs_seen.calls):
        assert isinstance(mine["p"].predictions, torch.Tensor)  # the batch's tensors, as transformers
        _assert_same(mine["p"].predictions, hf["p"].predictions)
        _assert_same(mine["p"].label_ids, hf["p"].label_ids)
    # The metrics are those of the last call.
    assert m_ours["eval_n"] == m_theirs["eval_n"] == 3.0 and m_ours["eval_last"] == 1.0
    assert m_ours["eval_loss"] == pytest.approx(m_theirs["eval_loss"], rel=0.2)


def test_batch_eval_metrics_knows_the_last_batch_of_an_unsized_loader(tmp_path):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(EVAL)

    seen = _Seen()
    _ours(TinyClassifier(), tmp_path, Stream(), compute_metrics=seen, batch_eval_metrics=True).evaluate()
    assert [c["compute_result"] for c in seen.calls] == [False, False, True]


def test_batch_eval_metrics_with_predict_still_returns_every_prediction(tmp_path):
    seen = _Seen()
    out = _ours(TinyClassifier(), tmp_path, EVAL, compute_metrics=seen, batch_eval_metrics=True).predict(EVAL)
    assert out.predictions.shape == (10, 3) and len(seen.calls) == 3 and out.metrics["test_n"] == 3.0


def test_batch_eval_metrics_needs_compute_result_in_compute_metrics(tmp_path):
    with pytest.raises(ValueError, match="batch_eval_metrics=True.*compute_result"):
        _ours(TinyClassifier(), tmp_path, EVAL, compute_metrics=lambda p: {}, batch_eval_metrics=True)


# -- bf16_full_eval / fp16_full_eval ----------------------------------------------------


@pytest.mark.parametrize(("flag", "dtype"), [("bf16_full_eval", torch.bfloat16), ("fp16_full_eval", torch.float16)])
def test_full_half_precision_evaluation_casts_the_model_as_transformers(tmp_path, flag, dtype):
    reference = _ours(_Casting(), tmp_path / "ref", EVAL).evaluate()["eval_loss"]
    ours = _ours(_Casting(), tmp_path / "a", EVAL, **{flag: True})
    theirs = _hf_trainer(_Casting(), tmp_path / "b", EVAL, **{flag: True})
    m_ours, m_theirs = ours.evaluate(), theirs.evaluate()
    assert {p.dtype for p in ours.model.parameters()} == {p.dtype for p in theirs.model.parameters()} == {dtype}
    assert m_ours["eval_loss"] == pytest.approx(m_theirs["eval_loss"], rel=0.05)
    assert m_ours["eval_loss"] == pytest.approx(reference, rel=0.05) and m_ours["eval_loss"] != reference


def test_full_half_precision_evaluation_leaves_evaluations_during_training_alone(tmp_path):
    dtypes: list[set[torch.dtype]] = []

    class Dtypes(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, **kwargs):
            dtypes.append({p.dtype for p in model.parameters()})

    t = _ours(_Casting(), tmp_path, EVAL, train=TRAIN, bf16_full_eval=True, max_steps=2, eval_strategy="steps",
              eval_steps=1, callbacks=[Dtypes()])
    t.train()
    assert dtypes == [{torch.float32}, {torch.float32}]
    t.evaluate()
    assert dtypes[-1] == {torch.bfloat16}


# -- save_only_model --------------------------------------------------------------------


def test_save_only_model_writes_the_model_and_state_only_and_refuses_a_resume(tmp_path):
    args = dict(max_steps=4, save_strategy="steps", save_steps=2, save_only_model=True)
    t = _ours(TinyClassifier(), tmp_path, None, train=TRAIN, **args)
    t.train()
    assert checkpoints(t.args.output_dir) == ["checkpoint-2", "checkpoint-4"]
    last = os.path.join(t.args.output_dir, "checkpoint-4")
    names = set(os.listdir(last))
    assert {ckpt.WEIGHTS_NAME, ckpt.TRAINER_STATE_NAME} <= names
    assert not names & {ckpt.OPTIMIZER_NAME, ckpt.SCHEDULER_NAME, "scaler.pt"}
    assert not [n for n in names if n.startswith("rng_state")]
    # The weights are the trained model's.
    fresh = TinyClassifier(seed=5)
    ckpt.load_model_weights(fresh, last)
    for a, b in zip(fresh.parameters(), t.model.parameters()):
        assert torch.equal(a, b)
    again = _ours(TinyClassifier(), tmp_path, None, train=TRAIN, **{**args, "max_steps": 6})
    with pytest.raises(ckpt.CheckpointError, match="save_only_model=True.*cannot resume.*load_model_weights"):
        again.train(resume_from_checkpoint=True)


def test_save_only_model_keeps_load_best_model_at_end_working(tmp_path):
    t = _ours(TinyClassifier(), tmp_path, EVAL, train=TRAIN, max_steps=4, save_strategy="steps", save_steps=1,
              eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, save_only_model=True,
              learning_rate=0.5)
    t.train()
    best = t.state.best_model_checkpoint
    assert best is not None
    expected = TinyClassifier(seed=5)
    ckpt.load_model_weights(expected, best)
    for a, b in zip(expected.parameters(), t.model.parameters()):
        assert torch.equal(a, b)


def test_an_interrupted_run_saves_a_whole_checkpoint_despite_save_only_model(tmp_path):
    class Term(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:  # just saved (model only) at this very step
                os.kill(os.getpid(), signal.SIGTERM)

    args = dict(max_steps=6, save_strategy="steps", save_steps=2, save_only_model=True)
    t = _ours(TinyClassifier(), tmp_path, None, train=TRAIN, callbacks=[Term()], **args)
    with pytest.raises(TrainingInterrupted) as info:
        t.train()
    assert info.value.checkpoint.endswith("checkpoint-2")
    assert ckpt.OPTIMIZER_NAME in os.listdir(info.value.checkpoint)
    resumed = _ours(TinyClassifier(), tmp_path, None, train=TRAIN, **args)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6


# -- neftune_noise_alpha ----------------------------------------------------------------


def _tokens(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (n, 12), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


def test_neftune_noise_is_transformers_own_and_only_while_training(tmp_path):
    neftune = require_module("transformers.integrations.neftune")
    model = tiny_gpt2()
    seen: list[torch.Tensor] = []
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            emb = model.get_input_embeddings()
            plain = torch.nn.functional.embedding(ids, emb.weight)
            emb.train()
            torch.manual_seed(3)
            noisy = emb(ids)
            torch.manual_seed(3)
            theirs = neftune.neftune_post_forward_hook(emb, (ids,), plain)
            seen.append(noisy - plain)
            torch.testing.assert_close(noisy, theirs)
            emb.eval()
            assert torch.equal(emb(ids), plain)  # no noise in evaluation mode
            emb.train()

    t = Trainer(model, tiny_args(tmp_path, max_steps=2, neftune_noise_alpha=5.0), train_dataset=_tokens(8),
                callbacks=[Probe()])
    t.train()
    bound = 5.0 / (12 * 16) ** 0.5
    assert len(seen) == 2 and all(0 < d.abs().max() <= bound for d in seen)
    emb = t.model.get_input_embeddings()
    assert not emb._forward_hooks and not hasattr(emb, "neftune_noise_alpha")  # removed after training


def test_neftune_hook_is_removed_when_training_fails(tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("boom")

    t = Trainer(tiny_gpt2(), tiny_args(tmp_path, max_steps=2, neftune_noise_alpha=5.0), train_dataset=_tokens(8),
                callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        t.train()
    assert not t.model.get_input_embeddings()._forward_hooks


def test_neftune_needs_the_models_input_embeddings(tmp_path):
    with pytest.raises(TrainingArgumentsError, match="neftune_noise_alpha=5.0.*get_input_embeddings.*TinyClassifier"):
        Trainer(TinyClassifier(), tiny_args(tmp_path, neftune_noise_alpha=5.0), train_dataset=TRAIN)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), "5", True])
def test_neftune_alpha_must_be_a_positive_number(tmp_path, alpha):
    with pytest.raises(TrainingArgumentsError, match="neftune_noise_alpha must be a number > 0"):
        tiny_args(tmp_path, neftune_noise_alpha=alpha)


# -- optimizer_cls_and_kwargs -----------------------------------------------------------


def test_optimizer_cls_and_kwargs_builds_that_optimizer_with_weight_decay_groups(tmp_path):
    t = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=1, weight_decay=0.1), train_dataset=TRAIN,
                optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}))
    t.train()
    opt = t.optimizer
    assert type(opt) is torch.optim.SGD
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)


def test_optimizer_cls_and_kwargs_is_checked_as_transformers(tmp_path):
    model = TinyClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="both `optimizers` and `optimizer_cls_and_kwargs`"):
        Trainer(model, tiny_args(tmp_path), optimizers=(opt, None), optimizer_cls_and_kwargs=(torch.optim.SGD, {}))
    with pytest.raises(TypeError, match=r"optimizer_cls_and_kwargs must be a pair .*torch.optim.AdamW"):
        Trainer(model, tiny_args(tmp_path), optimizer_cls_and_kwargs=("sgd", {}))


# -- EvalPrediction ---------------------------------------------------------------------


def test_eval_prediction_behaves_as_transformers():
    trainer_utils = require_module("transformers.trainer_utils")
    a, b, c = np.zeros(2), np.ones(2), np.full(2, 2.0)
    for kwargs in ({}, {"inputs": c}, {"losses": c}, {"inputs": c, "losses": a}):
        ours, theirs = EvalPrediction(a, b, **kwargs), trainer_utils.EvalPrediction(a, b, **kwargs)
        assert len(tuple(ours)) == len(tuple(theirs)) == len(ours)
        for x, y in zip(ours, theirs):
            assert x is y
        assert ours[len(ours) - 1] is theirs[len(tuple(theirs)) - 1]
        with pytest.raises(IndexError):
            ours[len(ours)]
    assert "predictions=<ndarray (2,)>" in repr(EvalPrediction(a, b))


# -- auto_find_batch_size ---------------------------------------------------------------


class _Fits(TinyClassifier):
    """Runs out of device memory on batches larger than ``limit`` (the error CUDA's
    allocator raises); records every batch size it saw."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen: list[int] = []

    def forward(self, x, labels=None):
        self.seen.append(x.shape[0])
        if self.training and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 1.00 GiB free)")
        return super().forward(x, labels)


def test_auto_find_batch_size_shrinks_the_batch_until_it_fits_as_transformers(tmp_path, caplog):
    ours, theirs = _Fits(limit=5), _Fits(limit=5)
    kw = dict(max_steps=3, per_device_train_batch_size=8, auto_find_batch_size=True)
    t = _ours(ours, tmp_path / "a", None, train=make_dataset(40), **kw)
    with caplog.at_level("WARNING", logger="trainer"):
        t.train()
    _hf_trainer(theirs, tmp_path / "b", None, train=make_dataset(40), max_steps=3, per_device_train_batch_size=8,
                auto_find_batch_size=True).train()
    # 8, 7, 6 (int(7 * 0.9)) run out; 5 trains its 3 steps.
    assert [n for n in ours.seen if n > 5] == [8, 7, 6] == [n for n in theirs.seen if n > 5]
    assert ours.seen[3:] == [5, 5, 5] and t.state.train_batch_size == 5 and t.state.global_step == 3
    assert "out of memory with a per-device batch of 8; training again from the start with 7" in caplog.text


def test_auto_find_batch_size_resumes_with_the_size_it_found(tmp_path):
    first = _Fits(limit=5)
    kw = dict(max_steps=4, per_device_train_batch_size=8, auto_find_batch_size=True, save_strategy="steps", save_steps=2)
    _ours(first, tmp_path, None, train=make_dataset(40), **kw).train()
    again = _Fits(limit=5)
    t = _ours(again, tmp_path, None, train=make_dataset(40), **{**kw, "max_steps": 6})
    t.train(resume_from_checkpoint=os.path.join(t.args.output_dir, "checkpoint-2"))
    assert again.seen == [5] * 4 and t.state.global_step == 6  # no new search: 5 from the checkpoint's state


def test_auto_find_batch_size_leaves_other_errors_and_gives_up_at_zero(tmp_path):
    class Broken(TinyClassifier):
        def forward(self, x, labels=None):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _ours(Broken(), tmp_path / "a", None, train=make_dataset(8), max_steps=1, auto_find_batch_size=True).train()
    never = _Fits(limit=0)
    with pytest.raises(RuntimeError, match="per-device batch of 1 .*reached zero"):
        _ours(never, tmp_path / "b", None, train=make_dataset(8), max_steps=1, auto_find_batch_size=True).train()
    assert never.seen == [4, 3, 2, 1]


def test_auto_find_batch_size_is_refused_in_a_distributed_run(tmp_path, monkeypatch):
    from trainer import distributed
    from trainer import trainer as trainer_module

    monkeypatch.setattr(trainer_module.distributed, "init_process_group", lambda **kw: False)
    monkeypatch.setattr(trainer_module.distributed, "get_info", lambda: distributed.DistributedInfo(rank=0, world_size=2))
    with pytest.raises(TrainingArgumentsError, match="auto_find_batch_size=True is not available in a distributed run"):
        _ours(TinyClassifier(), tmp_path, None, train=make_dataset(8), auto_find_batch_size=True)
