"""Callbacks and scripts written for transformers' ``TrainingArguments`` on ours: every
field of transformers' exists with its default (a callback reading ``args.bf16`` does
not kill the run), the ones that carry no behaviour are stored and serialised, the
features this trainer does not implement are refused when set, and transformers'
``parallel_mode``, ``get_process_log_level()`` and ``main_process_first()`` work."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from typing import Any

import pytest

from eventbus import TrainBegin
from tests.conftest import require_module
from tests.trainer._loop_helpers import RecordingSink, TinyClassifier, make_dataset
from trainer import Trainer, TrainingArguments
from trainer.arguments import TrainingArgumentsError

# Where our value differs from transformers' on purpose: restore_callback_states_from_checkpoint
# (see TrainingArguments' docstring); accelerator_config, which transformers turns into
# accelerate's AcceleratorConfig object and this trainer (no accelerate) keeps at the
# field's default, None.
_DIFFERS_ON_PURPOSE = {"restore_callback_states_from_checkpoint", "accelerator_config"}

# Fields that carry no behaviour for a trainer, with a non-default value each.
_NO_BEHAVIOUR = {
    "do_train": True,
    "do_eval": True,
    "do_predict": True,
    "resume_from_checkpoint": "runs/x/checkpoint-500",
    "project": "my-project",
    "trackio_space_id": "me/trackio",
    "trackio_bucket_id": "bucket",
    "trackio_static_space_id": "me/static",
    "hub_model_id": "me/model",
    "hub_private_repo": True,
    "hub_strategy": "checkpoint",
    "hub_always_push": True,
    "hub_revision": "dev",
    "log_level": "info",
    "log_level_replica": "error",
    "log_on_each_node": False,
    "label_names": ["labels"],
    "length_column_name": "n_tokens",
    "gradient_checkpointing_kwargs": {"use_reentrant": False},
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "liger_kernel_config": {"rope": True},
    "fsdp_config": {"min_num_params": 0},
    "remove_unused_columns": False,
    "eval_accumulation_steps": 4,
    "eval_use_gather_object": True,
    "enable_jit_checkpoint": True,
}

# Fields that change training in transformers and that this trainer does not
# implement, with a value other than the default each.
_NOT_IMPLEMENTED = {
    "optim": "adafactor",
    "optim_target_modules": ["attn"],
    "use_liger_kernel": True,
    "accelerator_config": {"split_batches": True},
    "parallelism_config": object(),
    "dataloader_in_order": False,
    "train_sampling_strategy": "group_by_length",
    "fsdp": "full_shard",
    "deepspeed": "ds_config.json",
    "debug": "underflow_overflow",
    "skip_memory_metrics": False,
}


def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _hf_field_names() -> list[str]:
    ta = require_module("transformers.training_args")
    return [f.name for f in dataclasses.fields(ta.TrainingArguments) if f.init]


def test_a_transformers_callback_reads_every_transformers_field_during_training(tmp_path, monkeypatch):
    transformers = require_module("transformers")
    _single_process(monkeypatch)
    names = _hf_field_names()
    assert len(names) >= 110  # 114 in transformers 5.24
    common = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True, max_steps=2, save_steps=1,
                  per_device_train_batch_size=4)
    theirs = transformers.TrainingArguments(**common)
    read: dict[str, dict[str, Any]] = {}

    class ReadsArgs(transformers.TrainerCallback):
        """Written for transformers' Trainer: reads what integrations read."""

        def on_train_begin(self, args, state, control, **kwargs):
            read["train_begin"] = {name: getattr(args, name) for name in names}
            read["precision"] = {"p": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"}

        def on_save(self, args, state, control, **kwargs):
            read["save"] = {"hub_strategy": args.hub_strategy, "every_save": args.hub_strategy == "every_save",
                            "private": args.hub_private_repo, "resume": args.resume_from_checkpoint}

    t = Trainer(TinyClassifier(), TrainingArguments(**common), train_dataset=make_dataset(8),
                callbacks=[ReadsArgs()])
    t.train()
    assert t.state.global_step == 2
    got = read["train_begin"]
    assert sorted(got) == sorted(names)
    for name in names:
        if name in _DIFFERS_ON_PURPOSE:
            continue
        assert got[name] == getattr(theirs, name), name
    assert got["accelerator_config"] is None
    assert read["precision"] == {"p": "fp32"}
    assert read["save"] == {"hub_strategy": "every_save", "every_save": True, "private": None, "resume": None}


def test_every_transformers_field_exists_with_transformers_default():
    ta = require_module("transformers.training_args")
    theirs = {f.name: f for f in dataclasses.fields(ta.TrainingArguments) if f.init}
    ours = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
    assert set(theirs) - set(ours) == set()
    for name, f in theirs.items():
        if name in _DIFFERS_ON_PURPOSE - {"accelerator_config"}:
            continue
        if f.default_factory is not dataclasses.MISSING:
            assert ours[name].default_factory() == f.default_factory(), name
        else:
            assert ours[name].default == f.default, name


def test_fields_without_behaviour_are_stored_and_serialised_like_transformers(tmp_path, monkeypatch):
    transformers = require_module("transformers")
    _single_process(monkeypatch)
    secret = "hf_SeCrEt_token_1234567"
    ours = TrainingArguments(output_dir=str(tmp_path), hub_token=secret, **_NO_BEHAVIOUR)
    theirs = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", hub_token=secret,
                                            **_NO_BEHAVIOUR)
    d, t = ours.to_dict(), theirs.to_dict()
    for name, value in _NO_BEHAVIOUR.items():
        assert getattr(ours, name) == value, name
        assert d[name] == value == t[name], name
    assert ours.hub_strategy == theirs.hub_strategy  # transformers' HubStrategy member
    # The token is kept for whoever reads it, and never written out.
    assert ours.hub_token == secret
    assert d["hub_token"] == "***"
    for text in (repr(ours), str(ours), ours.to_json_string(), json.dumps(ours.to_sanitized_dict())):
        assert secret not in text
    again = TrainingArguments(**{**json.loads(ours.to_json_string()), "hub_token": secret})
    assert again == ours

    # What the sinks get (MLflow's params, TensorBoard's hparams...): the same fields.
    sink = RecordingSink()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", disable_tqdm=True, max_steps=1,
                             save_strategy="no", per_device_train_batch_size=4, hub_token=secret, **_NO_BEHAVIOUR)
    Trainer(TinyClassifier(), args, train_dataset=make_dataset(4), sinks=[sink]).train()
    config = sink.of(TrainBegin)[0].config
    for name in ("do_train", "do_eval", "resume_from_checkpoint", "project", "hub_strategy", "log_level"):
        assert config[name] == _NO_BEHAVIOUR[name], name
    assert config["hub_token"] == "***"


@pytest.mark.parametrize("name", sorted(_NOT_IMPLEMENTED))
def test_a_feature_this_trainer_does_not_implement_is_refused_naming_the_field(name):
    with pytest.raises(TrainingArgumentsError) as err:
        TrainingArguments(**{name: _NOT_IMPLEMENTED[name]})
    message = str(err.value)
    assert message.startswith(f"{name}=")
    assert "default" in message


def test_defaults_and_their_equivalents_of_unimplemented_features_are_accepted():
    a = TrainingArguments(gradient_checkpointing=False, activation_checkpointing=False, optim="adamw_torch",
                          fsdp="", debug="", lr_scheduler_kwargs={}, label_smoothing_factor=0, tf32=None)
    # What a DDP script commonly sets explicitly, which is what this trainer does anyway.
    TrainingArguments(ddp_find_unused_parameters=False, ddp_broadcast_buffers=True, ddp_static_graph=False,
                      ddp_bucket_cap_mb=25, tf32=False, bf16=False, fp16=False)
    assert a.gradient_checkpointing is False and a.activation_checkpointing is False  # None -> False, as transformers
    assert a.optim == "adamw_torch" and a.debug == [] and a.to_dict()["optim"] == "adamw_torch"
    b = TrainingArguments()
    assert b.optim == "adamw_torch_fused" and b.gradient_checkpointing is False and b.debug == []


def test_parallel_mode_compares_as_transformers_callbacks_write_it(tmp_path, monkeypatch):
    transformers = require_module("transformers")
    from transformers.training_args import ParallelMode

    _single_process(monkeypatch)
    ours = TrainingArguments(output_dir=str(tmp_path))
    theirs = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none")
    mode = ours.parallel_mode
    assert mode == theirs.parallel_mode == ParallelMode.NOT_PARALLEL
    assert ParallelMode.NOT_PARALLEL == mode
    assert mode != ParallelMode.DISTRIBUTED and not (mode == ParallelMode.DISTRIBUTED)
    assert mode in [ParallelMode.NOT_PARALLEL, ParallelMode.NOT_DISTRIBUTED]  # transformers' modelcard
    assert mode == "not_parallel" and mode.value == "not_parallel" and str(mode) == "not_parallel"
    assert "parallel_mode" not in ours.to_dict()

    # A rank of a two-process run (as torchrun describes it).
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    mode = ours.parallel_mode
    assert mode == ParallelMode.DISTRIBUTED and not (mode != ParallelMode.DISTRIBUTED)
    assert mode not in [ParallelMode.NOT_PARALLEL, ParallelMode.NOT_DISTRIBUTED]
    assert ("multi-GPU" if mode == ParallelMode.DISTRIBUTED else mode.value) == "multi-GPU"


def test_get_process_log_level(tmp_path, monkeypatch):
    transformers = require_module("transformers")
    _single_process(monkeypatch)
    trainer_logger = logging.getLogger("trainer")
    monkeypatch.setattr(trainer_logger, "level", logging.ERROR)
    assert TrainingArguments().get_process_log_level() == logging.ERROR  # passive: the logger's level
    for level, expected in (("debug", logging.DEBUG), ("info", logging.INFO), ("critical", logging.CRITICAL)):
        ours = TrainingArguments(log_level=level)
        theirs = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", log_level=level)
        assert ours.get_process_log_level() == theirs.get_process_log_level() == expected

    # A replica (not the first process of its node): log_level_replica.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert TrainingArguments(log_level="debug").get_process_log_level() == logging.WARNING
    assert TrainingArguments(log_level_replica="error").get_process_log_level() == logging.ERROR
    assert TrainingArguments(log_level_replica="passive").get_process_log_level() == logging.ERROR

    with pytest.raises(TrainingArgumentsError, match="log_level='loud'"):
        TrainingArguments(log_level="loud")


def test_main_process_first_on_one_process(monkeypatch):
    _single_process(monkeypatch)
    args = TrainingArguments()
    ran = []
    with args.main_process_first(desc="tokenize"):
        ran.append("local")
    with args.main_process_first(local=False):
        ran.append("global")
    assert ran == ["local", "global"]
    with pytest.raises(KeyError):
        with args.main_process_first():
            raise KeyError("the block's error is not swallowed")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _main_process_first_rank(rank: int, port: int, out: str) -> None:
    """One rank of a two-process gloo group: rank 0 writes a file in the block; rank 1
    records whether it was there when its own block began."""
    import datetime

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        marker = os.path.join(out, "main-done")
        with TrainingArguments(output_dir=out).main_process_first(desc="preprocess"):
            if rank == 0:
                time.sleep(1.0)  # not a timing assertion: without a barrier rank 1 would get here first
                with open(marker, "w") as f:
                    f.write("done")
            else:
                with open(os.path.join(out, "replica-saw"), "w") as f:
                    f.write(str(os.path.exists(marker)))
    finally:
        dist.destroy_process_group()


def test_main_process_first_lets_the_main_process_finish_first(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_main_process_first_rank, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "replica-saw").read_text() == "True"


def test_dataloader_settings_reach_the_loaders(tmp_path):
    """Common in transformers scripts: with workers, their persistence, prefetch and
    start method go to every DataLoader the trainer builds, as transformers passes them."""
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", dataloader_num_workers=1, dataloader_persistent_workers=True,
        dataloader_prefetch_factor=3, dataloader_multiprocessing_context="spawn", average_tokens_across_devices=False,
    )
    trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(8), eval_dataset=make_dataset(8))
    for loader in (trainer.get_train_dataloader(), trainer.get_eval_dataloader()):
        assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (1, True, 3)
        assert loader.multiprocessing_context is not None and loader.multiprocessing_context.get_start_method() == "spawn"
    # without workers, torch takes none of them (as transformers passes none)
    plain = Trainer(TinyClassifier(), TrainingArguments(output_dir=str(tmp_path / "p"), report_to="none"),
                    train_dataset=make_dataset(8)).get_train_dataloader()
    assert (plain.num_workers, plain.persistent_workers) == (0, False)


def test_hf_argument_parser_builds_these_arguments_from_a_command_line(tmp_path):
    """transformers' example scripts parse their TrainingArguments with
    HfArgumentParser: the same command line gives ours (the field types are declared
    as transformers declares them, which its parser needs)."""
    transformers = require_module("transformers")

    @dataclasses.dataclass
    class ModelArguments:
        model_name: str = "tiny"

    parser = transformers.HfArgumentParser((ModelArguments, TrainingArguments))
    model_args, args = parser.parse_args_into_dataclasses([
        "--model_name", "x", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "4",
        "--report_to", "tensorboard", "--do_train", "--eval_strategy", "steps", "--eval_steps", "5", "--bf16", "False",
        "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1", "--seed", "3", "--load_best_model_at_end",
        "--metric_for_best_model", "eval_loss", "--save_strategy", "steps", "--save_steps", "5",
        "--ddp_find_unused_parameters", "True", "--hub_token", "hf_SeCrEt_token_1234567",
    ])  # fmt: skip
    assert type(args) is TrainingArguments and model_args.model_name == "x"
    assert (args.report_to, args.do_train, args.eval_strategy, args.lr_scheduler_type, args.seed) == (
        ["tensorboard"], True, "steps", "cosine", 3
    )
    assert args.ddp_find_unused_parameters is True and args.bf16 is False and args.load_best_model_at_end is True
    assert "hf_SeCrEt" not in repr(args)
