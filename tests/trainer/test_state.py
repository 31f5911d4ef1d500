"""TrainerState / TrainerControl / ExportableState: transformers' format and semantics."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import require_module
from trainer.flow import EarlyStoppingCallback
from trainer.state import ExportableState, TrainerControl, TrainerState, TrainerStateError

DATA = Path(__file__).resolve().parent.parent / "data" / "trainer_state.json"
"""Written by transformers 5.24's own TrainerState.save_to_json (3 epochs, 60 steps,
eval every 20, two EarlyStoppingCallbacks and the TrainerControl as stateful callbacks)."""


# -- TrainerControl -------------------------------------------------------------------


def _all_set() -> TrainerControl:
    return TrainerControl(True, True, True, True, True)


def test_control_new_training_resets_only_should_training_stop():
    c = _all_set()
    c._new_training()
    assert dataclasses.asdict(c) == {
        "should_training_stop": False, "should_epoch_stop": True, "should_save": True,
        "should_evaluate": True, "should_log": True,
    }


def test_control_new_epoch_resets_only_should_epoch_stop():
    c = _all_set()
    c._new_epoch()
    assert dataclasses.asdict(c) == {
        "should_training_stop": True, "should_epoch_stop": False, "should_save": True,
        "should_evaluate": True, "should_log": True,
    }


def test_control_new_step_resets_save_evaluate_log_but_not_stops():
    c = _all_set()
    c._new_step()
    assert dataclasses.asdict(c) == {
        "should_training_stop": True, "should_epoch_stop": True, "should_save": False,
        "should_evaluate": False, "should_log": False,
    }


def test_control_is_exportable_and_round_trips_in_place():
    c = TrainerControl(should_training_stop=True, should_log=True)
    assert isinstance(c, ExportableState)
    st = c.state()
    assert st == {
        "args": {"should_training_stop": True, "should_epoch_stop": False, "should_save": False,
                 "should_evaluate": False, "should_log": True},
        "attributes": {},
    }
    other = TrainerControl()
    before = id(other)
    other.load_state(st)
    assert id(other) == before and other == c
    assert TrainerControl.from_state(st) == c


def test_control_state_matches_transformers():
    tcb = require_module("transformers.trainer_callback")
    ours = TrainerControl(should_save=True, should_epoch_stop=True)
    theirs = tcb.TrainerControl(should_save=True, should_epoch_stop=True)
    assert ours.state() == theirs.state()
    assert [f.name for f in dataclasses.fields(ours)] == [f.name for f in dataclasses.fields(theirs)]


# -- TrainerState fields ----------------------------------------------------------------


def test_state_has_every_field_of_transformers_with_the_same_defaults():
    tcb = require_module("transformers.trainer_callback")
    theirs = {f.name: f.default for f in dataclasses.fields(tcb.TrainerState)}
    ours = {f.name: f.default for f in dataclasses.fields(TrainerState)}
    assert ours == theirs
    assert dataclasses.asdict(TrainerState()) == dataclasses.asdict(tcb.TrainerState())


def test_state_from_callback_list_groups_duplicates_like_transformers():
    tcb = require_module("transformers.trainer_callback")
    a, b = EarlyStoppingCallback(2), EarlyStoppingCallback(4, 0.5)
    a.early_stopping_patience_counter = 1
    ours = TrainerState(stateful_callbacks=[a, b, TrainerControl(should_log=True)]).stateful_callbacks
    ta, tb = tcb.EarlyStoppingCallback(2), tcb.EarlyStoppingCallback(4, 0.5)
    ta.early_stopping_patience_counter = 1
    theirs = tcb.TrainerState(stateful_callbacks=[ta, tb, tcb.TrainerControl(should_log=True)]).stateful_callbacks
    assert ours == theirs
    assert isinstance(ours["EarlyStoppingCallback"], list) and len(ours["EarlyStoppingCallback"]) == 2


def test_state_rejects_non_exportable_callbacks():
    with pytest.raises(TypeError, match="ExportableState"):
        TrainerState(stateful_callbacks=[object()])


# -- JSON: transformers' file both ways ------------------------------------------------------


def test_loads_the_file_transformers_wrote():
    st = TrainerState.load_from_json(DATA)
    assert st.global_step == 60 and st.max_steps == 60 and st.epoch == 3.0
    assert st.eval_steps == 20 and st.logging_steps == 10 and st.save_steps == 20
    assert st.best_metric == 1.4 and st.best_global_step == 60
    assert st.best_model_checkpoint == "out/checkpoint-60"
    assert st.num_input_tokens_seen == 7680 and st.total_flos == 123456789.0
    assert len(st.log_history) == 10
    assert st.log_history[0] == {"epoch": 0.5, "grad_norm": 1.5, "learning_rate": 4.166666666666667e-05, "loss": 1.9, "step": 10}
    es = st.stateful_callbacks["EarlyStoppingCallback"]
    assert [s["attributes"]["early_stopping_patience_counter"] for s in es] == [1, 2]
    assert st.stateful_callbacks["TrainerControl"]["args"]["should_save"] is True


def test_round_trip_writes_back_the_same_file(tmp_path):
    st = TrainerState.load_from_json(DATA)
    out = tmp_path / "trainer_state.json"
    st.save_to_json(out)
    assert json.loads(out.read_text()) == json.loads(DATA.read_text())
    # Byte for byte: sorted keys, indent 2, final newline, as transformers writes.
    assert out.read_text() == DATA.read_text()
    assert TrainerState.load_from_json(out) == st


def test_transformers_reads_what_we_write(tmp_path):
    tcb = require_module("transformers.trainer_callback")
    ours = TrainerState(global_step=7, max_steps=9, epoch=1.5, log_history=[{"loss": 0.5, "step": 7}],
                        best_metric=0.25, best_global_step=5, best_model_checkpoint="o/checkpoint-5",
                        stateful_callbacks=[EarlyStoppingCallback(3)])
    ours.save_to_json(tmp_path / "ours.json")
    theirs = tcb.TrainerState.load_from_json(str(tmp_path / "ours.json"))
    assert dataclasses.asdict(theirs) == dataclasses.asdict(ours)
    theirs.save_to_json(str(tmp_path / "theirs.json"))
    assert (tmp_path / "theirs.json").read_text() == (tmp_path / "ours.json").read_text()


def test_tensors_in_log_history_are_written_as_numbers(tmp_path):
    st = TrainerState(log_history=[{"loss": torch.tensor(0.5), "grad_norm": torch.tensor([2.0])[0], "step": 1}])
    st.save_to_json(tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["log_history"] == [{"grad_norm": 2.0, "loss": 0.5, "step": 1}]


def test_unserialisable_value_is_a_clear_error(tmp_path):
    st = TrainerState(log_history=[{"thing": object()}])
    with pytest.raises(TypeError, match="cannot be written to JSON"):
        st.save_to_json(tmp_path / "s.json")
    assert not list(tmp_path.iterdir())  # no partial file left behind


def test_unknown_keys_warn_once_and_are_kept(tmp_path, caplog):
    data = json.loads(DATA.read_text())
    data["future_field"] = {"x": 1}
    data["another_new_one"] = 3
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        st = TrainerState.load_from_json(path)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "future_field" in warnings[0].getMessage() and "another_new_one" in warnings[0].getMessage()
    assert str(path) in warnings[0].getMessage()
    assert st.global_step == 60
    st.save_to_json(path)
    again = json.loads(path.read_text())
    assert again["future_field"] == {"x": 1} and again["another_new_one"] == 3


def test_missing_keys_from_an_older_file_take_defaults(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"global_step": 3, "log_history": []}))
    st = TrainerState.load_from_json(path)
    assert st.global_step == 3 and st.best_global_step is None and st.stateful_callbacks == {}


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"global_step": 3, "log_hist', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"stateful_callbacks": [1]}', "stateful_callbacks"),
        ('{"log_history": 3}', "log_history"),
    ],
)
def test_corrupt_file_is_a_clear_error_naming_the_file(tmp_path, content, match):
    path = tmp_path / "trainer_state.json"
    path.write_text(content)
    with pytest.raises(TrainerStateError, match=match) as info:
        TrainerState.load_from_json(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TrainerStateError, match="no trainer state"):
        TrainerState.load_from_json(tmp_path / "nope.json")


# -- compute_steps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "logging_steps, eval_steps, save_steps, max_steps",
    [(10, 20, 30, 95), (0.1, 0.25, 0.5, 95), (0.1, None, 7, 33), (1, 0.999, 0.01, 1000), (0.3, 0.3, 0.3, 1)],
)
def test_compute_steps_matches_transformers(logging_steps, eval_steps, save_steps, max_steps):
    tcb = require_module("transformers.trainer_callback")
    args = SimpleNamespace(logging_steps=logging_steps, eval_steps=eval_steps, save_steps=save_steps)
    ours, theirs = TrainerState(), tcb.TrainerState()
    ours.compute_steps(args, max_steps)
    theirs.compute_steps(args, max_steps)
    assert (ours.logging_steps, ours.eval_steps, ours.save_steps) == (
        theirs.logging_steps, theirs.eval_steps, theirs.save_steps,
    )


def test_compute_steps_fraction_rounds_up():
    st = TrainerState()
    st.compute_steps(SimpleNamespace(logging_steps=0.1, eval_steps=None, save_steps=0.5), 95)
    assert st.logging_steps == 10  # ceil(9.5)
    assert st.eval_steps == 500  # None keeps the default
    assert st.save_steps == 48  # ceil(47.5)


# -- ExportableState ----------------------------------------------------------------------------


class _Counter(ExportableState):
    def __init__(self, step: int = 1):
        self.step = step
        self.count = 0

    def state(self) -> dict:
        return {"args": {"step": self.step}, "attributes": {"count": self.count}}


def test_from_state_builds_from_args_and_attributes():
    c = _Counter.from_state({"args": {"step": 3}, "attributes": {"count": 9}})
    assert (c.step, c.count) == (3, 9)


def test_load_state_keeps_the_instance():
    c = _Counter(step=1)
    same = c
    c.load_state({"args": {"step": 5}, "attributes": {"count": 2}})
    assert c is same and (c.step, c.count) == (5, 2)


def test_state_not_implemented_says_what_to_do():
    class Bare(ExportableState):
        pass

    with pytest.raises(NotImplementedError, match="Bare must implement state"):
        Bare().state()
