"""What transformers' example scripts call on the trainer after training
(log_metrics, save_metrics, save_state, create_model_card) and its other public
helpers, compared with transformers' own functions run on the same metrics."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import require_module
from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args, tiny_gpt2
from trainer import Trainer
from trainer.state import TrainerState

METRICS = {"train_runtime": 3725.456, "train_loss": 0.123456789, "train_samples": 80, "epoch": 2.0,
           "total_flos": 3 * 2**30 + 5, "train_mem_cpu_alloc_delta": 5 * 2**20}


def _trained(tmp_path, **kw):
    t = Trainer(TinyClassifier(), tiny_args(tmp_path / "out", max_steps=2, eval_strategy="steps", eval_steps=1,
                                            per_device_eval_batch_size=4, **kw),
                train_dataset=make_dataset(8), eval_dataset=make_dataset(4, seed=1))
    t.train()
    return t


def test_log_metrics_prints_what_transformers_prints(tmp_path, capsys):
    pt_utils = require_module("transformers.trainer_pt_utils")
    t = _trained(tmp_path)
    capsys.readouterr()
    t.log_metrics("train", METRICS)
    ours = capsys.readouterr().out
    pt_utils.log_metrics(t, "train", METRICS)
    assert ours == capsys.readouterr().out
    assert "***** train metrics *****" in ours and "1:02:05.45" in ours and "3GF" in ours and "5MB" in ours
    assert t.metrics_format(METRICS) == pt_utils.metrics_format(METRICS)


def test_save_metrics_writes_the_files_transformers_writes(tmp_path):
    pt_utils = require_module("transformers.trainer_pt_utils")
    t = _trained(tmp_path)
    eval_metrics = t.evaluate()
    t.save_metrics("train", METRICS)
    t.save_metrics("eval", eval_metrics)
    out = t.args.output_dir
    ours = {name: open(os.path.join(out, name)).read() for name in ("train_results.json", "eval_results.json",
                                                                    "all_results.json")}
    t.args.output_dir = str(tmp_path / "theirs")
    os.makedirs(t.args.output_dir)
    pt_utils.save_metrics(t, "train", METRICS)
    pt_utils.save_metrics(t, "eval", eval_metrics)
    for name, text in ours.items():
        assert json.loads(text) == json.load(open(os.path.join(t.args.output_dir, name))), name
    assert set(json.loads(ours["all_results.json"])) == set(METRICS) | set(eval_metrics)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # written atomically


def test_save_state_writes_a_state_transformers_reads(tmp_path):
    trainer_callback = require_module("transformers.trainer_callback")
    t = _trained(tmp_path)
    t.save_state()
    path = os.path.join(t.args.output_dir, "trainer_state.json")
    theirs = trainer_callback.TrainerState.load_from_json(path)
    ours = TrainerState.load_from_json(path)
    assert theirs.global_step == ours.global_step == 2
    assert [e.get("eval_loss") for e in theirs.log_history] == [e.get("eval_loss") for e in t.state.log_history]
    assert all(not isinstance(v, torch.Tensor) for e in theirs.log_history for v in e.values())


def test_create_model_card_is_transformers_card_from_this_run(tmp_path):
    require_module("transformers")
    t = Trainer(tiny_gpt2(), tiny_args(tmp_path / "out", max_steps=2, eval_strategy="steps", eval_steps=1,
                                       per_device_eval_batch_size=4),
                train_dataset=[{"input_ids": torch.arange(12) % 40, "labels": torch.arange(12) % 40}] * 8,
                eval_dataset=[{"input_ids": torch.arange(12) % 40, "labels": torch.arange(12) % 40}] * 4)
    t.train()
    t.create_model_card(model_name="tiny-lm", dataset="toy", language="en", tags=["eventbus"])
    card = open(os.path.join(t.args.output_dir, "README.md")).read()
    assert "# tiny-lm" in card and "- eventbus" in card and "on the toy dataset" in card
    assert "| Training Loss | Epoch | Step | Validation Loss |" in card
    assert "- training_steps: 2" in card and "- train_batch_size: 4" in card


def test_the_optimizer_and_parameter_helpers(tmp_path):
    t = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=3, weight_decay=0.1, learning_rate=0.2),
                train_dataset=make_dataset(8))
    with pytest.raises(ValueError, match="optimizer is None"):
        t.get_learning_rates()
    t.create_optimizer_and_scheduler(num_training_steps=3)
    assert t.optimizer is not None and t.lr_scheduler is not None
    assert t.get_learning_rates() == [0.2, 0.2]
    assert t.get_num_trainable_parameters() == sum(p.numel() for p in t.model.parameters())
    assert t.get_decay_parameter_names(t.model) == ["lin.weight", "out.weight"]
    bias_group = t.get_optimizer_group("lin.bias")
    assert bias_group["weight_decay"] == 0.0
    assert t.get_optimizer_group(t.model.lin.weight)["weight_decay"] == 0.1
    assert len(t.get_optimizer_group()) == 2
    assert t.num_examples(t.get_train_dataloader()) == 8


def test_end_closes_an_open_bus_and_is_harmless_in_one_process(tmp_path):
    t = Trainer(TinyClassifier(), tiny_args(tmp_path), eval_dataset=make_dataset(4))
    t.bus.start()
    t.end()
    assert not t.bus.running
    t.end()  # again: nothing left to do


# What transformers' Trainer has and this one leaves out, on purpose: the Hub,
# hyperparameter search, accelerate, FLOPs counting
# and the sequence/context/tensor-parallel sizes.
_LEFT_OUT = {"create_accelerator_and_postprocess", "floating_point_ops", "get_batch_samples",
             "get_cp_size", "get_optimizer_cls_and_kwargs", "get_sp_size", "get_total_train_batch_size", "get_tp_size",
             "hyperparameter_search", "init_hf_repo", "push_to_hub", "set_initial_training_values", "store_flos"}


def test_every_public_method_of_transformers_trainer_exists_here_but_the_ones_left_out():
    transformers = require_module("transformers")
    theirs = {n for n in dir(transformers.Trainer) if not n.startswith("_")}
    ours = {n for n in dir(Trainer) if not n.startswith("_")}
    assert sorted(theirs - ours - _LEFT_OUT) == []
    assert sorted(_LEFT_OUT & ours) == []


# -- model_init -------------------------------------------------------------------------


def test_model_init_builds_a_fresh_seeded_model_for_every_train_as_transformers(tmp_path):
    transformers = require_module("transformers")
    built: list[torch.nn.Module] = []
    inits: list[list[torch.Tensor]] = []

    def model_init():
        # Its weights drawn from the global generator: the trainer's seed decides them.
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        built.append(TinyClassifier.__new__(TinyClassifier))
        m = built[-1]
        torch.nn.Module.__init__(m)
        m.lin, m.norm, m.drop, m.out = torch.nn.Linear(4, 16), torch.nn.LayerNorm(16), torch.nn.Dropout(0.0), \
            torch.nn.Linear(16, 3)
        inits.append([p.detach().clone() for p in m.parameters()])
        return m

    args = dict(max_steps=2, learning_rate=0.1, seed=11)
    t = Trainer(model_init=model_init, args=tiny_args(tmp_path / "a", **args), train_dataset=make_dataset(8))
    first = t.train()
    second = t.train()
    assert len(built) == 3 and t.model is built[-1]  # one at build, one per train()
    assert first.training_loss == pytest.approx(second.training_loss, rel=1e-6)  # each run starts afresh, seeded
    theirs = transformers.Trainer(
        model_init=model_init, train_dataset=make_dataset(8),
        args=transformers.TrainingArguments(output_dir=str(tmp_path / "b"), report_to="none", use_cpu=True,
                                            disable_tqdm=True, per_device_train_batch_size=4, save_strategy="no",
                                            logging_steps=1, **args),
    )
    theirs.train()
    assert theirs.model is built[-1]
    # Every model started from the same seeded weights, ours at build and per train(),
    # transformers' per train().
    for weights in inits[1:]:
        for a, b in zip(weights, inits[0]):
            assert torch.equal(a, b)


def test_model_init_is_checked_as_transformers(tmp_path):
    with pytest.raises(RuntimeError, match="needs a model .* or a model_init"):
        Trainer(args=tiny_args(tmp_path))
    with pytest.raises(ValueError, match="either a `model` or `model_init` argument, but not both"):
        Trainer(TinyClassifier(), tiny_args(tmp_path), model_init=TinyClassifier)
    opt = torch.optim.SGD(TinyClassifier().parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="`model_init` is incompatible with providing the `optimizers`"):
        Trainer(args=tiny_args(tmp_path), model_init=TinyClassifier, optimizers=(opt, None))
    with pytest.raises(RuntimeError, match="model_init should not return None"):
        Trainer(args=tiny_args(tmp_path), model_init=lambda: None)
    with pytest.raises(RuntimeError, match="model_init should have 0 or 1 argument"):
        Trainer(args=tiny_args(tmp_path), model_init=lambda a, b: TinyClassifier())
    trials = []
    t = Trainer(args=tiny_args(tmp_path), model_init=lambda trial: trials.append(trial) or TinyClassifier())
    assert trials == [None] and isinstance(t.call_model_init({"lr": 1}), TinyClassifier) and trials[-1] == {"lr": 1}
