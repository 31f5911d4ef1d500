"""transformers' training options this trainer implements beyond the loop itself:
activation (gradient) checkpointing, torch.compile, full determinism and emptying
the device cache every N steps."""

from __future__ import annotations

import math
import os

import pytest
import torch

import trainer.trainer as trainer_module
from trainer import Trainer, TrainerCallback, TrainingArguments
from trainer.arguments import TrainingArgumentsError

from tests.conftest import require_module, tb_run_dir

from ._loop_helpers import TinyClassifier, make_dataset, tiny_args

N = 32


def _losses(t: Trainer) -> list[float]:
    return [h["loss"] for h in t.state.log_history if "loss" in h]


# -- activation checkpointing --------------------------------------------------------


def _tiny_gpt2():
    """A real transformers model (built from a config: nothing downloaded), without
    dropout so that two runs compare exactly."""
    transformers = require_module("transformers")
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _token_data(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (n, 12), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


class _CheckpointSpy(TrainerCallback):
    """Whether the model was checkpointing when training began."""

    def __init__(self) -> None:
        self.at_begin: bool | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.at_begin = model.is_activation_checkpointing


class _SavedTensorsCounting(Trainer):
    """Counts the tensors autograd saves for backward in each training step (what
    activation checkpointing cuts down)."""

    saved_per_step: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.saved_per_step = getattr(self, "saved_per_step", []) + [count[0]]
        return loss


def test_activation_checkpointing_enables_the_models_own_and_trains_the_same(tmp_path):
    data = _token_data(N)
    plain = _SavedTensorsCounting(
        _tiny_gpt2(), tiny_args(tmp_path / "a", max_steps=4, per_device_train_batch_size=8), train_dataset=data
    )
    plain.train()
    spy = _CheckpointSpy()
    model = _tiny_gpt2()
    args = tiny_args(tmp_path / "b", max_steps=4, per_device_train_batch_size=8, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False})
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}
    checkpointed = _SavedTensorsCounting(model, args, train_dataset=data, callbacks=[spy])
    assert not model.is_activation_checkpointing  # switched on when training starts, as transformers
    checkpointed.train()
    assert spy.at_begin is True and model.is_activation_checkpointing
    # The blocks' activations are recomputed in backward, not kept: far fewer saved.
    assert max(checkpointed.saved_per_step) < min(plain.saved_per_step) / 2
    assert _losses(checkpointed) == pytest.approx(_losses(plain), rel=1e-5)


def test_activation_checkpointing_options_reach_the_model(tmp_path):
    class Recording(TinyClassifier):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[dict] = []

        def activation_checkpointing_enable(self, **kwargs):
            self.calls.append(kwargs)

    class Older(TinyClassifier):
        """A model with only the older switch (sentence-transformers' kind)."""

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[dict] = []

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.calls.append({"gradient_checkpointing_kwargs": gradient_checkpointing_kwargs})

    model = Recording()
    options = '{"use_reentrant": false, "every_n_layers": 2}'  # a JSON object, as from a command line
    Trainer(model, tiny_args(tmp_path, max_steps=1, activation_checkpointing=True, activation_checkpointing_kwargs=options),
            train_dataset=make_dataset(N)).train()
    assert model.calls == [{"activation_checkpointing_kwargs": {"use_reentrant": False}, "every_n_layers": 2, "offload": False}]

    older = Older()
    Trainer(older, tiny_args(tmp_path, max_steps=1, gradient_checkpointing=True), train_dataset=make_dataset(N)).train()
    assert older.calls == [{"gradient_checkpointing_kwargs": None}]


def test_activation_checkpointing_of_a_model_without_the_switch_is_refused_when_built(tmp_path):
    with pytest.raises(TrainingArgumentsError, match="TinyClassifier has no activation_checkpointing_enable.*torch.utils.checkpoint"):
        Trainer(TinyClassifier(), tiny_args(tmp_path, activation_checkpointing=True), train_dataset=make_dataset(N))


def test_checkpointing_aliases_mirror_each_other_as_in_transformers():
    assert TrainingArguments(output_dir="x").gradient_checkpointing is False
    args = TrainingArguments(output_dir="x", activation_checkpointing=True)
    assert args.gradient_checkpointing is True
    with pytest.raises(TrainingArgumentsError, match="activation_checkpointing_kwargs: not a JSON object"):
        TrainingArguments(output_dir="x", activation_checkpointing_kwargs="{oops")


# -- torch.compile -------------------------------------------------------------------


def test_torch_compile_trains_through_the_compiled_model_with_the_backend_asked_for(tmp_path):
    from torch._dynamo import register_backend

    graphs = []

    @register_backend(name="eventbus_test_recording")
    def recording(gm, example_inputs):  # noqa: ANN001
        graphs.append(gm)
        return gm.forward

    reference = Trainer(TinyClassifier(), tiny_args(tmp_path / "a", max_steps=6), train_dataset=make_dataset(N))
    reference.train()
    args = tiny_args(tmp_path / "b", max_steps=6, torch_compile_backend="eventbus_test_recording")
    assert args.torch_compile is True  # a backend asks for compiling, as in transformers
    model = TinyClassifier()
    t = Trainer(model, args, train_dataset=make_dataset(N), eval_dataset=make_dataset(8))
    t.train()
    assert graphs, "the backend never compiled a graph"
    assert type(t.model_wrapped).__name__ == "OptimizedModule" and t.model_wrapped._orig_mod is model
    assert _losses(t) == pytest.approx(_losses(reference), rel=1e-6)
    # Checkpoints and evaluation use the model itself (no "_orig_mod." in its keys).
    assert not any(k.startswith("_orig_mod") for k in t.model.state_dict())
    assert "eval_loss" in t.evaluate()
    # A second train() of the same trainer reuses the compiled module.
    compiled = t.model_wrapped
    t.args.max_steps = 2
    t.train()
    assert t.model_wrapped is compiled


def test_torch_compile_defaults_to_inductor_and_trains_the_same(tmp_path):
    args = tiny_args(tmp_path / "b", max_steps=3, torch_compile=True)
    assert args.torch_compile_backend == "inductor"
    reference = Trainer(TinyClassifier(), tiny_args(tmp_path / "a", max_steps=3), train_dataset=make_dataset(N))
    reference.train()
    t = Trainer(TinyClassifier(), args, train_dataset=make_dataset(N))
    t.train()
    assert type(t.model_wrapped).__name__ == "OptimizedModule"
    assert _losses(t) == pytest.approx(_losses(reference), rel=1e-5)


# -- full determinism, empty cache ---------------------------------------------------


def test_full_determinism_turns_on_torchs_deterministic_algorithms(tmp_path, monkeypatch):
    for name in ("CUBLAS_WORKSPACE_CONFIG", "CUDA_LAUNCH_BLOCKING", "FLASH_ATTENTION_DETERMINISTIC"):
        monkeypatch.delenv(name, raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        runs = []
        for sub in ("a", "b"):
            t = Trainer(TinyClassifier(dropout=0.3), tiny_args(tmp_path / sub, max_steps=4, full_determinism=True),
                        train_dataset=make_dataset(N))
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
            t.train()
            runs.append(_losses(t))
        assert runs[0] == runs[1]  # seeded again by the second trainer: the same run
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


def test_torch_empty_cache_steps_clears_the_device_cache_on_its_schedule(tmp_path, monkeypatch):
    at_steps: list[int] = []
    t = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=7, torch_empty_cache_steps=3, gradient_accumulation_steps=2),
                train_dataset=make_dataset(64))
    monkeypatch.setattr(trainer_module, "clear_device_cache", lambda: at_steps.append(t.state.global_step))
    t.train()
    # As transformers: in each micro-batch's training step whose global_step (the
    # steps done before it) is a multiple of 3.
    assert at_steps == [0, 0, 3, 3, 6, 6]
    with pytest.raises(TrainingArgumentsError, match="torch_empty_cache_steps must be a positive integer"):
        TrainingArguments(output_dir="x", torch_empty_cache_steps=0)


# -- label smoothing -----------------------------------------------------------------


def test_label_smoother_computes_what_transformers_does():
    from transformers.trainer_pt_utils import LabelSmoother as Theirs

    from trainer.label_smoothing import LabelSmoother

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=g)
    labels = torch.randint(0, 11, (4, 7), generator=g)
    labels[0, :3] = -100  # padding, ignored
    for shift in (False, True):
        ours = LabelSmoother(epsilon=0.2)({"logits": logits}, labels, shift_labels=shift)
        theirs = Theirs(epsilon=0.2)({"logits": logits}, labels, shift_labels=shift)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    # A classifier's labels (one per example), a tuple output.
    flat = torch.randn(5, 3, generator=g)
    y = torch.tensor([0, 2, 1, 1, -100])
    assert float(LabelSmoother(0.1)((flat,), y)) == pytest.approx(float(Theirs(0.1)((flat,), y)), rel=1e-6)


def test_label_smoothing_trains_and_evaluates_on_the_smoothed_loss(tmp_path):
    from trainer.label_smoothing import LabelSmoother

    def smoothed_and_plain(model, data):
        x = torch.stack([d["x"] for d in data])
        y = torch.tensor([d["labels"] for d in data])
        with torch.no_grad():
            return float(LabelSmoother(0.25)(model(x), y)), float(model(x, y)["loss"])

    model = TinyClassifier()
    train_data, eval_data = make_dataset(N), make_dataset(8, seed=1)
    expected_eval, plain_eval = smoothed_and_plain(model, eval_data)
    expected_first_step, _ = smoothed_and_plain(model, train_data)
    t = Trainer(
        model, tiny_args(tmp_path, max_steps=3, label_smoothing_factor=0.25, per_device_train_batch_size=N,
                         per_device_eval_batch_size=8),
        train_dataset=train_data, eval_dataset=eval_data,
    )
    assert t.evaluate()["eval_loss"] == pytest.approx(expected_eval, rel=1e-6)
    assert expected_eval != pytest.approx(plain_eval, rel=1e-3)
    t.train()
    # The first step's batch is the whole training set: its loss is the smoothed one.
    assert _losses(t)[0] == pytest.approx(expected_first_step, rel=1e-5)
    with pytest.raises(TrainingArgumentsError, match=r"label_smoothing_factor must be in \[0, 1\)"):
        TrainingArguments(output_dir="x", label_smoothing_factor=1.5)


def test_label_smoothing_shifts_the_labels_of_a_causal_language_model(tmp_path):
    from trainer.label_smoothing import LabelSmoother, is_causal_lm

    transformers = require_module("transformers")
    model = _tiny_gpt2()
    assert is_causal_lm(model) and not is_causal_lm(TinyClassifier())
    data = _token_data(8)
    ids = torch.stack([d["input_ids"] for d in data])
    # Shifted: 8 x 11 predicted positions; transformers' Trainer divides their sum by
    # the labelled positions it counts for GPT-2 (whose loss_type is unset): 8 x 12.
    with torch.no_grad():
        expected = float(LabelSmoother(0.1)(model(input_ids=ids), ids, shift_labels=True, num_items_in_batch=96))
        unshifted = float(LabelSmoother(0.1)(model(input_ids=ids), ids, shift_labels=False, num_items_in_batch=96))
    assert expected != pytest.approx(unshifted, rel=1e-3)
    t = Trainer(model, tiny_args(tmp_path, label_smoothing_factor=0.1, per_device_eval_batch_size=8), eval_dataset=data)
    theirs = transformers.Trainer(
        model=_tiny_gpt2(), eval_dataset=data,
        args=transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), report_to="none", use_cpu=True,
                                            label_smoothing_factor=0.1, per_device_eval_batch_size=8),
    )
    assert t.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert theirs.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)


# -- use_cpu, tf32 -------------------------------------------------------------------


def test_use_cpu_trains_on_the_cpu_and_picks_gloo_for_a_process_group(tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr(trainer_module.distributed, "init_process_group",
                        lambda timeout=None, backend=None: chosen.append(backend) or False)
    model = TinyClassifier()
    t = Trainer(model, tiny_args(tmp_path, max_steps=2, use_cpu=True), train_dataset=make_dataset(N))
    t.train()
    assert chosen == ["gloo"] and str(t.args.device) == "cpu" and t.args.n_gpu == 0
    assert all(p.device.type == "cpu" for p in model.parameters())
    Trainer(TinyClassifier(), tiny_args(tmp_path, use_cpu=True, ddp_backend="nccl"), train_dataset=make_dataset(N))
    Trainer(TinyClassifier(), tiny_args(tmp_path), train_dataset=make_dataset(N))
    assert chosen[1:] == ["nccl", None]  # the backend asked for; without use_cpu, the device decides


def test_tf32_false_turns_torchs_switches_off_and_true_needs_an_ampere_gpu(tmp_path):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        Trainer(TinyClassifier(), tiny_args(tmp_path, tf32=False), train_dataset=make_dataset(N))
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (False, False)
        Trainer(TinyClassifier(), tiny_args(tmp_path), train_dataset=make_dataset(N))  # None: left alone
        assert torch.backends.cuda.matmul.allow_tf32 is False
        if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
            Trainer(TinyClassifier(), tiny_args(tmp_path, tf32=True), train_dataset=make_dataset(N))
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        else:
            with pytest.raises(TrainingArgumentsError, match="tf32=True needs an NVIDIA GPU of the Ampere generation"):
                Trainer(TinyClassifier(), tiny_args(tmp_path, tf32=True), train_dataset=make_dataset(N))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# -- schedules -----------------------------------------------------------------------


def test_lr_scheduler_kwargs_reach_the_schedule(tmp_path):
    args = tiny_args(tmp_path, max_steps=8, learning_rate=0.1, lr_scheduler_type="cosine_with_min_lr",
                     lr_scheduler_kwargs='{"min_lr": 0.025}')  # a JSON object, as from a command line
    t = Trainer(TinyClassifier(), args, train_dataset=make_dataset(N))
    t.train()
    rates = [h["learning_rate"] for h in t.state.log_history if "learning_rate" in h]
    # The rate each step trained with: a half cosine from 0.1 down towards min_lr.
    expected = [0.025 + 0.075 * 0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8)]
    assert rates == pytest.approx(expected)


@pytest.mark.parametrize(
    "kind,options,message",
    [
        ("cosine", {"num_cycle": 2}, r"lr_scheduler_kwargs \['num_cycle'\] are not options of the 'cosine' schedule"),
        ("cosine_with_min_lr", None, "needs min_lr or min_lr_rate"),
        ("warmup_stable_decay", {}, "needs num_decay_steps"),
        ("reduce_lr_on_plateau", {"patiense": 2}, "lr_scheduler_kwargs for reduce_lr_on_plateau"),
        ("polynomial", {"lr_end": "0.0"}, "give numbers as numbers"),
    ],
)
def test_wrong_schedule_options_are_refused_when_the_trainer_is_built(tmp_path, kind, options, message):
    args = tiny_args(tmp_path, lr_scheduler_type=kind, lr_scheduler_kwargs=options, eval_strategy="steps", eval_steps=5)
    with pytest.raises(TrainingArgumentsError, match=message):
        Trainer(TinyClassifier(), args, train_dataset=make_dataset(N), eval_dataset=make_dataset(8))


def test_reduce_lr_on_plateau_steps_on_each_evaluation_metric(tmp_path):
    with pytest.raises(TrainingArgumentsError, match="reduce_lr_on_plateau.*eval_strategy"):
        TrainingArguments(output_dir="x", lr_scheduler_type="reduce_lr_on_plateau")
    args = tiny_args(tmp_path, max_steps=8, learning_rate=1e-3, lr_scheduler_type="reduce_lr_on_plateau",
                     lr_scheduler_kwargs={"patience": 0, "factor": 0.5}, eval_strategy="steps", eval_steps=2)
    assert args.metric_for_best_model == "loss"  # as transformers
    seen = []

    class Metric(TrainerCallback):
        """The steps evaluated at."""

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen.append(state.global_step)

    class Flat(Trainer):
        def evaluate(self, *a, **kw):
            metrics = super().evaluate(*a, **kw)
            metrics["eval_loss"] = 1.0
            return metrics

    for eval_on_start in (False, True):
        seen.clear()
        args.eval_on_start = eval_on_start
        t = Flat(TinyClassifier(), args, train_dataset=make_dataset(N), eval_dataset=make_dataset(8), callbacks=[Metric()])
        t.train()
        rates = {h["step"]: h["learning_rate"] for h in t.state.log_history if "learning_rate" in h}
        # Steps never move it; each evaluation after the first without improvement
        # halves it. The evaluation before training (eval_on_start) does not count, as
        # in transformers.
        assert seen == [0] * eval_on_start + [2, 4, 6, 8]
        assert [rates[s] for s in (1, 2, 3, 4, 5, 6, 7, 8)] == pytest.approx(
            [1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
        )


# -- optimizers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "optim,optim_args",
    [
        ("adamw_torch_fused", None),
        ("adamw_torch", None),
        ("sgd", "momentum=0.9,nesterov=true,dampening=0"),
        ("adagrad", "lr_decay=0.01,eps=1e-8"),
        ("rmsprop", "momentum=0.5, alpha=0.9, centered=True"),
    ],
)
def test_optimizers_are_built_as_transformers_builds_them(tmp_path, optim, optim_args):
    transformers = require_module("transformers")
    kw = dict(optim=optim, optim_args=optim_args, learning_rate=0.01, adam_beta1=0.8, adam_epsilon=1e-7)
    theirs_cls, theirs_kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(
        transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to="none", **kw)
    )
    t = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=2, **kw), train_dataset=make_dataset(N))
    t.train()
    assert type(t.optimizer) is theirs_cls
    for key, value in theirs_kwargs.items():
        assert t.optimizer.defaults[key] == value, key
    assert [h["loss"] for h in t.state.log_history if "loss" in h]


def test_optim_args_the_optimizer_does_not_take_are_refused_when_built(tmp_path):
    with pytest.raises(TrainingArgumentsError, match=r"optim_args \['betas'\] are not options of optim='sgd'; it takes: momentum"):
        Trainer(TinyClassifier(), tiny_args(tmp_path, optim="sgd", optim_args="betas=0.9"), train_dataset=make_dataset(N))
    with pytest.raises(TrainingArgumentsError, match="'momentum' is not key=value"):
        Trainer(TinyClassifier(), tiny_args(tmp_path, optim="sgd", optim_args="momentum"), train_dataset=make_dataset(N))
    with pytest.raises(TrainingArgumentsError, match="optim_args: momentum='fast' is not a number"):
        Trainer(TinyClassifier(), tiny_args(tmp_path, optim="sgd", optim_args="momentum=fast"), train_dataset=make_dataset(N))
    with pytest.raises(TrainingArgumentsError, match="optim='adafactor' is not implemented.*'rmsprop'"):
        TrainingArguments(output_dir="x", optim="adafactor")


# -- TensorBoard directories per run -------------------------------------------------


def test_runs_started_again_in_one_output_dir_are_separate_tensorboard_runs(tmp_path):
    ea = require_module("tensorboard.backend.event_processing.event_accumulator")

    def rates(run_dir: str) -> list[tuple[int, float]]:
        acc = ea.EventAccumulator(run_dir, size_guidance={"scalars": 0})
        acc.Reload()
        return [(e.step, round(e.value, 6)) for e in acc.Scalars("train/learning_rate")]

    out = tmp_path / "out"
    trainers = []
    for lr in (1e-3, 5e-2):  # the same script run twice with another learning rate
        t = Trainer(TinyClassifier(), tiny_args(out, max_steps=4, learning_rate=lr, report_to="tensorboard",
                                                save_strategy="steps", save_steps=2), train_dataset=make_dataset(N))
        t.train()
        trainers.append(t)
    logs = out / "logs"
    first, second = (tb_run_dir(logs, t.run_id) for t in trainers)
    assert first != second
    assert rates(first) == [(1, 0.001), (2, 0.00075), (3, 0.0005), (4, 0.00025)]
    assert rates(second) == [(1, 0.05), (2, 0.0375), (3, 0.025), (4, 0.0125)]
    # Resuming the second run continues in its directory (its run id), not a third one.
    resumed = Trainer(TinyClassifier(), tiny_args(out, max_steps=6, learning_rate=5e-2, report_to="tensorboard"),
                      train_dataset=make_dataset(N))
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    assert resumed.run_id == trainers[1].run_id
    assert sorted(os.listdir(logs)) == sorted(os.path.basename(d) for d in (first, second))
    assert [s for s, _ in rates(second)] == [1, 2, 3, 4, 5, 6]
    # A TensorBoard sink passed to the Trainer (not from report_to) does the same on a
    # second train() of one trainer: a new run, a directory of its own.
    from sinks.tensorboard import TensorBoardSink

    own = tmp_path / "own"
    t = Trainer(TinyClassifier(), tiny_args(own, max_steps=2), train_dataset=make_dataset(N), sinks=[TensorBoardSink()])
    ids = []
    for _ in range(2):
        t.train()
        ids.append(t.run_id)
    assert ids[0] != ids[1] and [rates(tb_run_dir(own / "logs", i)) for i in ids] == [[(1, 5e-05), (2, 2.5e-05)]] * 2
    # An explicit logging_dir is written to as it is, as transformers does.
    explicit = tmp_path / "mine"
    Trainer(TinyClassifier(), tiny_args(out, max_steps=1, report_to="tensorboard", logging_dir=str(explicit)),
            train_dataset=make_dataset(N)).train()
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(explicit))
