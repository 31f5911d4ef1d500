"""TrainingArguments: transformers' defaults, derived values and validation errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tests.conftest import require_module
from trainer.arguments import (
    IntervalStrategy,
    SaveStrategy,
    SchedulerType,
    TrainingArguments,
    TrainingArgumentsError,
)

# Fields whose default differs from transformers' on purpose (see the class docstring).
_OUR_DEFAULTS = {"restore_callback_states_from_checkpoint"}


def test_defaults_match_transformers():
    ta = require_module("transformers.training_args")
    theirs = {f.name: f.default for f in dataclasses.fields(ta.TrainingArguments)}
    ours = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    shared = sorted(set(ours) & set(theirs) - _OUR_DEFAULTS)
    assert len(shared) >= 35
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert ours["restore_callback_states_from_checkpoint"] is True


def test_post_init_defaults(tmp_path):
    a = TrainingArguments()
    assert a.output_dir == "trainer_output"
    assert a.logging_dir == "trainer_output/logs"
    b = TrainingArguments(output_dir=tmp_path)
    assert b.output_dir == str(tmp_path) and b.logging_dir == str(tmp_path / "logs")
    assert TrainingArguments(output_dir="o", logging_dir="elsewhere").logging_dir == "elsewhere"
    assert a.report_to == []
    assert a.disable_tqdm is False
    assert a.eval_strategy is IntervalStrategy.NO and a.save_strategy is SaveStrategy.STEPS
    assert a.lr_scheduler_type is SchedulerType.LINEAR


def test_strategies_accept_strings_and_compare_as_strings():
    a = TrainingArguments(eval_strategy="epoch", save_strategy="epoch", logging_strategy=IntervalStrategy.EPOCH)
    assert a.eval_strategy == "epoch" and a.eval_strategy is IntervalStrategy.EPOCH
    assert a.save_strategy == SaveStrategy.EPOCH and a.logging_strategy == "epoch"
    assert str(a.eval_strategy) == "epoch"


def test_strategies_compare_equal_to_transformers_enums():
    tu = require_module("transformers.trainer_utils")
    a = TrainingArguments(eval_strategy="steps", eval_steps=5, save_strategy="best", metric_for_best_model="acc")
    assert a.eval_strategy == tu.IntervalStrategy.STEPS
    assert a.save_strategy == tu.SaveStrategy.BEST


def test_eval_steps_falls_back_to_logging_steps():
    assert TrainingArguments(eval_strategy="steps", logging_steps=7).eval_steps == 7
    assert TrainingArguments(eval_strategy="steps", logging_steps=7, eval_steps=0).eval_steps == 7
    assert TrainingArguments(eval_strategy="steps", logging_steps=7, eval_steps=3).eval_steps == 3
    assert TrainingArguments(eval_strategy="no").eval_steps is None


def test_fractional_steps_are_allowed_and_whole_numbers_become_ints():
    a = TrainingArguments(logging_steps=0.1, eval_strategy="steps", eval_steps=0.25, save_steps=0.5)
    assert (a.logging_steps, a.eval_steps, a.save_steps) == (0.1, 0.25, 0.5)
    b = TrainingArguments(logging_steps=10.0, save_steps=20.0)
    assert b.logging_steps == 10 and isinstance(b.logging_steps, int)
    assert b.save_steps == 20 and isinstance(b.save_steps, int)


def test_best_model_defaults():
    a = TrainingArguments(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True)
    assert a.metric_for_best_model == "loss" and a.greater_is_better is False
    b = TrainingArguments(metric_for_best_model="accuracy")
    assert b.greater_is_better is True
    c = TrainingArguments(metric_for_best_model="eval_loss", greater_is_better=True)
    assert c.greater_is_better is True
    assert TrainingArguments().greater_is_better is None


def test_load_best_model_accepts_matching_strategies_and_multiples():
    TrainingArguments(eval_strategy="steps", eval_steps=10, save_steps=30, load_best_model_at_end=True)
    TrainingArguments(eval_strategy="steps", eval_steps=0.1, save_steps=0.2, load_best_model_at_end=True)
    TrainingArguments(eval_strategy="steps", eval_steps=10, save_strategy="best", load_best_model_at_end=True)
    TrainingArguments(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True)


def test_report_to_normalisation():
    assert TrainingArguments(report_to="none").report_to == []
    assert TrainingArguments(report_to=None).report_to == []
    assert TrainingArguments(report_to="all").report_to == ["all"]
    assert TrainingArguments(report_to=["all"]).report_to == ["all"]
    assert TrainingArguments(report_to="jsonl").report_to == ["jsonl"]
    assert TrainingArguments(report_to="jsonl, tensorboard").report_to == ["jsonl", "tensorboard"]
    assert TrainingArguments(report_to=["tensorboard", "jsonl", "tensorboard"]).report_to == ["tensorboard", "jsonl"]


def test_warmup_steps():
    assert TrainingArguments(warmup_steps=10).get_warmup_steps(100) == 10
    assert TrainingArguments(warmup_steps=0.1).get_warmup_steps(95) == 10
    assert TrainingArguments(warmup_ratio=0.05).get_warmup_steps(100) == 5
    assert TrainingArguments().get_warmup_steps(100) == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"eval_strategy": "sometimes"}, "eval_strategy"),
        ({"save_strategy": "always"}, "save_strategy"),
        ({"logging_strategy": "often"}, "logging_strategy"),
        ({"lr_scheduler_type": "greedy"}, "lr_scheduler_type"),
        ({"logging_steps": -1}, "logging_steps"),
        ({"logging_steps": 0}, "logging_steps"),
        ({"logging_steps": 2.5}, "logging_steps"),
        ({"eval_strategy": "steps", "eval_steps": -5}, "eval_steps"),
        ({"eval_strategy": "steps", "eval_steps": 3.5}, "eval_steps"),
        ({"eval_strategy": "steps", "logging_strategy": "no", "logging_steps": 0}, "eval_steps"),
        ({"save_steps": -10}, "save_steps"),
        ({"save_steps": 0}, "save_steps"),
        ({"max_steps": -2}, "max_steps"),
        ({"num_train_epochs": -1}, "num_train_epochs"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"per_device_eval_batch_size": -1}, "per_device_eval_batch_size"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
        ({"gradient_accumulation_steps": 2.0}, "gradient_accumulation_steps"),
        ({"learning_rate": -1e-3}, "learning_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"adam_beta1": 1.0}, "adam_beta1"),
        ({"adam_beta2": -0.1}, "adam_beta2"),
        ({"adam_epsilon": -1.0}, "adam_epsilon"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"warmup_ratio": 0.1, "warmup_steps": 10}, "warmup_ratio"),
        ({"eval_delay": -1}, "eval_delay"),
        ({"save_total_limit": -1}, "save_total_limit"),
        ({"dataloader_num_workers": -1}, "dataloader_num_workers"),
        ({"seed": "42"}, "seed"),
        ({"logging_first_step": "yes"}, "logging_first_step"),
        ({"greater_is_better": 1}, "greater_is_better"),
        ({"metric_for_best_model": 3}, "metric_for_best_model"),
        ({"bus_close_timeout": 0}, "bus_close_timeout"),
        ({"bus_flush_interval": -0.1}, "bus_flush_interval"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"report_to": ["all", "jsonl"]}, "report_to"),
        ({"report_to": "none,jsonl"}, "report_to"),
        ({"output_dir": ""}, "output_dir"),
        ({"load_best_model_at_end": True}, "eval_strategy"),
        ({"load_best_model_at_end": True, "eval_strategy": "epoch"}, "save_strategy"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 10, "save_steps": 25}, "save_steps"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 0.1, "save_steps": 20}, "save_steps"),
        ({"load_best_model_at_end": True, "eval_strategy": "steps", "eval_steps": 0.1, "save_steps": 0.25}, "save_steps"),
        ({"save_strategy": "best"}, "eval_strategy"),
        ({"save_strategy": "best", "eval_strategy": "epoch"}, "metric_for_best_model"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(TrainingArgumentsError) as info:
        TrainingArguments(**kwargs)
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_invalid_enum_lists_the_choices():
    with pytest.raises(TrainingArgumentsError, match="'no', 'steps', 'epoch', 'best'"):
        TrainingArguments(save_strategy="sometimes")
    with pytest.raises(TrainingArgumentsError, match="'constant_with_warmup'"):
        TrainingArguments(lr_scheduler_type="greedy")


def test_mismatched_strategies_message_says_the_fix():
    with pytest.raises(TrainingArgumentsError, match='set save_strategy="epoch"'):
        TrainingArguments(load_best_model_at_end=True, eval_strategy="epoch", save_strategy="steps")


@dataclasses.dataclass
class _WithSecret(TrainingArguments):
    hub_token: str | None = None
    mlflow_api_key: str | None = None


def test_to_dict_is_json_with_enum_values_and_secrets_redacted():
    a = _WithSecret(eval_strategy="epoch", hub_token="hf_secret_value", mlflow_api_key="k-12345", report_to="jsonl")
    d = a.to_dict()
    assert d["eval_strategy"] == "epoch" and type(d["eval_strategy"]) is str
    assert d["hub_token"] == "***" and d["mlflow_api_key"] == "***"
    assert d["report_to"] == ["jsonl"]
    text = json.dumps(d)
    assert "hf_secret_value" not in text and "k-12345" not in text
    assert "hf_secret_value" not in repr(a) and "hf_secret_value" not in str(a)
    assert a.hub_token == "hf_secret_value"  # the field itself is untouched
    assert "hf_secret_value" not in a.to_json_string()


def test_to_sanitized_dict_matches_transformers_shape():
    a = _WithSecret(hub_token="hf_secret_value", run_name=None, per_device_train_batch_size=4)
    s = a.to_sanitized_dict()
    assert all(type(v) in (bool, int, float, str) for v in s.values())
    assert s["train_batch_size"] == 4 and s["eval_batch_size"] == 8
    assert s["run_name"] == "None"  # transformers stringifies what TensorBoard's hparams cannot take
    assert s["report_to"] == "[]"
    assert s["hub_token"] == "***"


def test_ddp_fields_are_validated(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), ddp_backend="gloo", ddp_timeout=60)
    assert (args.ddp_backend, args.ddp_timeout) == ("gloo", 60)
    with pytest.raises(TrainingArgumentsError, match="ddp_backend must be 'nccl', 'gloo' or None"):
        TrainingArguments(output_dir=str(tmp_path), ddp_backend="mpi")
    with pytest.raises(TrainingArgumentsError, match="ddp_timeout must be > 0"):
        TrainingArguments(output_dir=str(tmp_path), ddp_timeout=0)


# -- attributes transformers-written callbacks read -------------------------------------------------

_PROCESS_PROPERTIES = ("should_save", "should_log", "process_index", "local_process_index", "world_size", "device", "n_gpu")
_HF_FIELDS = ("label_names", "push_to_hub", "hub_model_id", "include_num_input_tokens_seen", "local_rank",
              "log_on_each_node", "save_on_each_node")


def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_process_attributes_in_a_single_process(monkeypatch):
    import torch

    _single_process(monkeypatch)
    a = TrainingArguments()
    assert (a.should_save, a.should_log, a.process_index, a.local_process_index, a.world_size) == (True, True, 0, 0, 1)
    assert isinstance(a.device, torch.device)
    assert a.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert a.n_gpu == (1 if a.device.type == "cuda" else 0)
    assert (a.label_names, a.push_to_hub, a.hub_model_id, a.include_num_input_tokens_seen, a.local_rank) == (
        None, False, None, "no", -1)


def test_process_attributes_follow_the_torchrun_environment(monkeypatch):
    import torch

    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    a = TrainingArguments(ddp_backend="gloo")
    assert (a.process_index, a.local_process_index, a.world_size) == (5, 1, 8)
    assert a.should_save is False and a.should_log is False
    assert a.device == torch.device("cpu") and a.n_gpu == 0
    monkeypatch.setenv("LOCAL_RANK", "0")  # the first process of the second node
    assert a.should_log is True and a.should_save is False
    assert TrainingArguments(log_on_each_node=False).should_log is False
    monkeypatch.setenv("RANK", "0")
    assert a.should_save is True and TrainingArguments(log_on_each_node=False).should_log is True
    assert a.local_rank == -1  # transformers' deprecated parser field, not the environment


def test_process_attributes_match_transformers_in_a_single_process(monkeypatch):
    ta = require_module("transformers.training_args")
    _single_process(monkeypatch)
    theirs = ta.TrainingArguments(output_dir="o", use_cpu=True, report_to="none")
    ours = TrainingArguments(output_dir="o")
    ours._trainer_device = theirs.device  # as a Trainer whose model is on the CPU records it
    for name in _PROCESS_PROPERTIES + _HF_FIELDS:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_new_fields_are_serialised_like_transformers_and_properties_are_not(monkeypatch):
    ta = require_module("transformers.training_args")
    _single_process(monkeypatch)
    theirs = ta.TrainingArguments(output_dir="o", use_cpu=True, report_to="none", label_names=["y"], hub_model_id="me/m")
    ours = TrainingArguments(output_dir="o", label_names=["y"], hub_model_id="me/m")
    d, t = ours.to_dict(), theirs.to_dict()
    for name in _HF_FIELDS:
        assert d[name] == t[name], name
    for name in _PROCESS_PROPERTIES:
        assert name not in d and name not in t
    assert json.loads(ours.to_json_string())["label_names"] == ["y"]
    ours.device  # noqa: B018 - reading the properties changes nothing that is compared or serialised
    ours._trainer_device = "cpu"
    again = TrainingArguments(**json.loads(ours.to_json_string()))
    assert again == ours and again.to_dict() == d
    assert dataclasses.replace(ours) == ours


def test_transformers_field_values_are_normalised_or_refused():
    assert TrainingArguments(include_num_input_tokens_seen=False).include_num_input_tokens_seen == "no"
    assert TrainingArguments(label_names=("y", "z")).label_names == ["y", "z"]
    assert TrainingArguments(local_rank=3).local_rank == 3
    for kwargs, message in (
        ({"push_to_hub": True}, "push_to_hub"),
        ({"save_on_each_node": True}, "save_on_each_node"),
        ({"include_num_input_tokens_seen": True}, "include_num_input_tokens_seen"),
        ({"include_num_input_tokens_seen": "non_padding"}, "include_num_input_tokens_seen"),
        ({"include_num_input_tokens_seen": "some"}, "include_num_input_tokens_seen"),
        ({"label_names": "labels"}, "label_names"),
        ({"hub_model_id": 3}, "hub_model_id"),
        ({"local_rank": "0"}, "local_rank"),
        ({"log_on_each_node": "yes"}, "log_on_each_node"),
    ):
        with pytest.raises(TrainingArgumentsError, match=message):
            TrainingArguments(**kwargs)


def test_the_trainer_records_its_device_and_label_names_are_used(tmp_path):
    import torch

    from tests.trainer._loop_helpers import TinyClassifier
    from trainer import Trainer, TrainerCallback

    seen = []

    class MainOnly(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen.append((args.should_save, args.process_index, args.device, args.n_gpu))

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, save_steps=1, report_to="none", label_names=["y"])
    data = [{"x": torch.randn(4), "y": torch.tensor(1)} for _ in range(4)]

    class YModel(TinyClassifier):
        def forward(self, x, y=None):
            return super().forward(x, labels=y)

    t = Trainer(YModel(), args, train_dataset=data, eval_dataset=data, callbacks=[MainOnly()])
    assert t.label_names == ["y"]
    t.train()
    assert seen == [(True, 0, torch.device("cpu"), 0)]
    assert t.predict(data).label_ids is not None
