"""CallbackHandler: transformers' API and control resets, dispatch tables, publishing to
the bus only what a sink subscribes to, profiling, stateful callbacks."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from types import SimpleNamespace
from typing import Any, Sequence

import pytest
import torch

from eventbus import EventBus, RunInfo, Sink
from eventbus.events import (
    HOOK_EVENTS,
    Evaluate,
    Log,
    Predict,
    PredictionStep,
    Save,
    StepBegin,
    StepEnd,
    TrainBegin,
    TrainEnd,
)
from tests.conftest import require_module
from trainer.arguments import TrainingArguments
from trainer.callbacks import HOOKS, CallbackHandler, TrainerCallback, overrides
from trainer.flow import DefaultFlowCallback, EarlyStoppingCallback
from trainer.state import ExportableState, TrainerControl, TrainerState

FLAGS = ("should_training_stop", "should_epoch_stop", "should_save", "should_evaluate", "should_log")


def handler(*callbacks: Any, bus: Any = None, model: Any = None) -> CallbackHandler:
    return CallbackHandler([DefaultFlowCallback, *callbacks], model, "proc", "opt", "sched", bus=bus)


def all_set() -> TrainerControl:
    return TrainerControl(True, True, True, True, True)


def call_hook(h: Any, hook: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
    if hook in ("on_evaluate", "on_predict"):
        kwargs.setdefault("metrics", {"eval_loss": 1.0})
    if hook == "on_log":
        kwargs.setdefault("logs", {"loss": 1.0})
    return getattr(h, hook)(args, state, control, **kwargs)


class RecordingSink(Sink):
    """Records every event it is given, in order."""

    name = "recording"

    def __init__(self, events: tuple[type, ...]) -> None:
        self.events = events  # type: ignore[misc]
        self.got: list[Any] = []
        self.max_delay = 0.0

    async def write(self, batch: Sequence[Any]) -> None:
        self.got.extend(batch)


# -- API surface ----------------------------------------------------------------------------


def test_hooks_and_signatures_match_transformers():
    tcb = require_module("transformers.trainer_callback")
    theirs = [n for n in vars(tcb.TrainerCallback) if n.startswith("on_")]
    assert list(HOOKS) == theirs
    for hook in HOOKS:
        ours_sig = inspect.signature(getattr(TrainerCallback, hook))
        their_sig = inspect.signature(getattr(tcb.TrainerCallback, hook))
        assert list(ours_sig.parameters) == list(their_sig.parameters), hook
    for hook in HOOKS:  # the handler's hook methods take the same arguments too
        assert list(inspect.signature(getattr(CallbackHandler, hook)).parameters) == list(
            inspect.signature(getattr(tcb.CallbackHandler, hook)).parameters
        ), hook


def test_add_by_class_or_instance_and_callback_list():
    es = EarlyStoppingCallback(3)
    h = handler(es, TrainerCallback)
    assert [type(c) for c in h.callbacks] == [DefaultFlowCallback, EarlyStoppingCallback, TrainerCallback]
    assert h.callbacks[1] is es
    assert h.callback_list == "DefaultFlowCallback\nEarlyStoppingCallback\nTrainerCallback"


def test_duplicate_class_warns(caplog):
    h = handler()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        h.add_callback(DefaultFlowCallback())
    assert any("already one" in r.getMessage() and "DefaultFlowCallback" in r.getMessage() for r in caplog.records)
    assert len(h.callbacks) == 2


def test_missing_default_flow_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        CallbackHandler([TrainerCallback], None, None, None, None)
    assert any("DefaultFlowCallback" in r.getMessage() for r in caplog.records)


def test_pop_and_remove_follow_transformers_semantics():
    a, b = EarlyStoppingCallback(1), EarlyStoppingCallback(2)
    h = handler(a, b)
    assert h.pop_callback(EarlyStoppingCallback) is a  # by class: the first one
    assert h.pop_callback(b) is b  # by instance
    assert h.pop_callback(b) is None and h.pop_callback(EarlyStoppingCallback) is None
    h.add_callback(a)
    h.remove_callback(EarlyStoppingCallback)
    assert a not in h.callbacks
    h.remove_callback(EarlyStoppingCallback)  # by class, none left: nothing happens
    with pytest.raises(ValueError, match="not one of this trainer's callbacks"):
        h.remove_callback(a)  # by instance, absent: an error, as list.remove
    assert [type(c) for c in h.callbacks] == [DefaultFlowCallback]


def test_transformers_handler_api_on_the_same_list():
    """The same add/pop/remove sequence on transformers' handler leaves the same list."""
    tcb = require_module("transformers.trainer_callback")
    ours = handler()
    theirs = tcb.CallbackHandler([tcb.DefaultFlowCallback], None, None, None, None)
    for h, es in ((ours, EarlyStoppingCallback), (theirs, tcb.EarlyStoppingCallback)):
        h.add_callback(es)
        h.add_callback(es(5))
        h.pop_callback(es)
        h.add_callback(es(7))
        h.remove_callback(es)
    assert ours.callback_list == theirs.callback_list
    assert [c.early_stopping_patience for c in ours.callbacks[1:]] == [c.early_stopping_patience for c in theirs.callbacks[1:]]


# -- control resets --------------------------------------------------------------------------


@pytest.mark.parametrize("hook", HOOKS)
def test_control_reset_per_hook_matches_transformers(hook):
    tcb = require_module("transformers.trainer_callback")
    args, state = TrainingArguments(), TrainerState()
    ours = CallbackHandler([], None, None, None, None)
    theirs = tcb.CallbackHandler([], None, None, None, None)
    c1, c2 = all_set(), all_set()
    r1 = call_hook(ours, hook, args, state, c1)
    r2 = call_hook(theirs, hook, args, state, c2)
    assert r1 is c1
    assert dataclasses.asdict(c1) == dataclasses.asdict(c2), hook


def test_control_resets_exactly():
    args, state, h = TrainingArguments(), TrainerState(), CallbackHandler([], None, None, None, None)
    expected_cleared = {
        "on_train_begin": {"should_training_stop"},
        "on_epoch_begin": {"should_epoch_stop"},
        "on_step_begin": {"should_log", "should_evaluate", "should_save"},
        "on_log": {"should_log"},
        "on_evaluate": {"should_evaluate"},
        "on_save": {"should_save"},
    }
    for hook in HOOKS:
        c = all_set()
        call_hook(h, hook, args, state, c)
        cleared = {f for f in FLAGS if not getattr(c, f)}
        assert cleared == expected_cleared.get(hook, set()), hook


def test_returned_control_replaces_and_none_keeps():
    replacement = TrainerControl(should_log=True)

    class Replace(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            return replacement

    class Keep(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_save = True  # mutates what it got, returns None

    h = CallbackHandler([Replace, Keep], None, None, None, None)
    c = TrainerControl()
    out = h.on_epoch_end(TrainingArguments(), TrainerState(), c)
    assert out is replacement and replacement.should_save and not c.should_save


def test_lean_step_end_callbacks_replace_or_keep_the_control_and_are_profiled():
    # on_step_end calls callbacks that all ignore kwargs without going through _call:
    # the same rules (a returned control replaces, None keeps), and the profiler sees them.
    from trainer.callbacks import ignores_kwargs

    replacement = TrainerControl()

    class Replace(TrainerCallback):
        @ignores_kwargs
        def on_step_end(self, args, state, control, **kwargs):
            return replacement

    class Keep(TrainerCallback):
        @ignores_kwargs
        def on_step_end(self, args, state, control, **kwargs):
            control.should_save = True

    h = CallbackHandler([Replace, Keep], None, None, None, None)
    assert h._l_on_step_end is not None  # the direct path is the one under test
    c = TrainerControl()
    assert h.on_step_end(TrainingArguments(), TrainerState(), c) is replacement
    assert replacement.should_save and not c.should_save
    h.profile = True
    h.on_step_end(TrainingArguments(), TrainerState(), TrainerControl())
    assert {key for key in h.profile_report()} == {("Replace", "on_step_end"), ("Keep", "on_step_end")}


def test_callbacks_get_transformers_keyword_arguments_and_loop_extras():
    seen = {}

    class Spy(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            seen["save"] = kwargs

        def on_log(self, args, state, control, logs=None, **kwargs):
            seen["log"] = logs

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            seen["eval"] = metrics

    h = handler(Spy, model="the-model")
    h.train_dataloader, h.eval_dataloader = "train-dl", "eval-dl"
    args, state, c = TrainingArguments(), TrainerState(), TrainerControl()
    h.on_save(args, state, c, checkpoint_dir="out/checkpoint-3")
    h.on_log(args, state, c, {"loss": 0.5})
    h.on_evaluate(args, state, c, {"eval_loss": 0.25})
    assert seen["save"] == {
        "model": "the-model", "processing_class": "proc", "optimizer": "opt", "lr_scheduler": "sched",
        "train_dataloader": "train-dl", "eval_dataloader": "eval-dl", "checkpoint_dir": "out/checkpoint-3",
    }
    assert seen["log"] == {"loss": 0.5} and seen["eval"] == {"eval_loss": 0.25}


# -- dispatch tables ---------------------------------------------------------------------------


class Counting(TrainerCallback):
    def __init__(self):
        self.n = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.n += 1


class Quiet(TrainerCallback):
    """Overrides nothing: it must never be entered."""


def test_non_overriding_callback_is_never_entered():
    counting, quiet = Counting(), Quiet()
    h = CallbackHandler([quiet, counting], None, None, None, None)
    assert h.dispatch_table("on_step_end") == (counting,)
    for hook in HOOKS:
        assert quiet not in h.dispatch_table(hook)
    noop_codes = {getattr(TrainerCallback, hook).__code__ for hook in HOOKS}
    entered = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code in noop_codes:
            entered.append(frame.f_code.co_name)

    args, state = TrainingArguments(), TrainerState()
    sys.setprofile(profiler)
    try:
        for _ in range(10):
            for hook in HOOKS:
                call_hook(h, hook, args, state, TrainerControl())
    finally:
        sys.setprofile(None)
    assert counting.n == 10
    assert entered == []


def test_dispatch_tables_follow_list_edits():
    counting = Counting()
    h = CallbackHandler([], None, None, None, None)
    assert h.dispatch_table("on_step_end") == ()
    h.callbacks.append(counting)  # direct edit, as some transformers code does
    assert h.dispatch_table("on_step_end") == (counting,)
    h.callbacks.insert(0, Counting())
    assert len(h.dispatch_table("on_step_end")) == 2
    del h.callbacks[0]
    assert h.dispatch_table("on_step_end") == (counting,)
    h.callbacks = [Quiet()]
    assert h.dispatch_table("on_step_end") == ()
    h.callbacks += [counting]
    assert h.dispatch_table("on_step_end") == (counting,)
    h.callbacks.clear()
    assert h.dispatch_table("on_step_end") == ()
    with pytest.raises(ValueError, match="unknown hook"):
        h.dispatch_table("on_nothing")


def test_inherited_and_instance_overrides_count():
    class Sub(DefaultFlowCallback):
        pass

    assert overrides(Sub(), "on_step_end") and not overrides(Sub(), "on_log")
    q = Quiet()
    q.on_log = lambda *a, **k: None
    assert overrides(q, "on_log")
    assert not overrides(object(), "on_log")  # duck-typed objects without the hook


def test_callback_written_for_transformers_runs_unchanged():
    tcb = require_module("transformers.trainer_callback")
    calls = []

    class TheirStyle(tcb.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            calls.append(("log", dict(logs), kwargs["model"]))
            control.should_save = True
            return control

    cb = TheirStyle()
    assert overrides(cb, "on_log") and not overrides(cb, "on_step_end")
    h = handler(cb, model="m")
    assert h.dispatch_table("on_step_end") == (h.callbacks[0],)  # only DefaultFlowCallback
    c = TrainerControl()
    out = h.on_log(TrainingArguments(), TrainerState(), c, {"loss": 1.0})
    assert calls == [("log", {"loss": 1.0}, "m")] and out.should_save


# -- publishing --------------------------------------------------------------------------------


def test_publishes_only_subscribed_hooks():
    sink = RecordingSink((Log, StepEnd, TrainEnd))
    bus = EventBus([sink], run=RunInfo(run_id="run-1", rank=0), flush_interval=0.01)
    h = handler(bus=bus)
    assert {hook for hook in HOOKS if h.publishes(hook)} == {"on_log", "on_step_end", "on_train_end"}
    args = TrainingArguments()
    state = TrainerState(max_steps=3, epoch=0.5)
    with bus:
        for step in range(1, 4):
            c = TrainerControl()
            h.on_step_begin(args, state, c)
            state.global_step = step
            h.on_substep_end(args, state, c)
            h.on_pre_optimizer_step(args, state, c)
            h.on_optimizer_step(args, state, c)
            h.on_step_end(args, state, c)
        h.on_log(args, state, c, {"loss": 0.5})
        h.on_train_end(args, state, c, status="stopped")
    # Nothing else was even built: the bus counts everything published.
    assert bus.stats().published == 5
    assert [type(e).__name__ for e in sink.got] == ["StepEnd", "StepEnd", "StepEnd", "Log", "TrainEnd"]
    assert [e.step for e in sink.got] == [1, 2, 3, 3, 3]
    assert all(e.run_id == "run-1" and e.rank == 0 and e.epoch == 0.5 for e in sink.got)
    assert sink.got[3].values == {"loss": 0.5}
    assert sink.got[4].status == "stopped"


def test_no_bus_publishes_nothing():
    h = handler()
    assert not any(h.publishes(hook) for hook in HOOKS)
    h.on_step_end(TrainingArguments(), TrainerState(max_steps=5), TrainerControl())


def test_log_tensors_are_snapshotted_and_the_callers_dict_is_not_shared():
    sink = RecordingSink((Log,))
    bus = EventBus([sink], flush_interval=0.01)

    class Popper(TrainerCallback):  # edits the logs after the event is built
        accepts_tensor_logs = True  # takes the loop's tensors as they are

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs.pop("total_flos", None)

    h = handler(Popper, bus=bus)
    loss = torch.tensor(2.0)
    logs = {"loss": loss, "total_flos": 12.0}
    with bus:
        h.on_log(TrainingArguments(), TrainerState(global_step=4), TrainerControl(), logs)
        loss.add_(1.0)  # the loop reuses its running-loss tensor
    (event,) = sink.got
    assert event.values == {"loss": 2.0, "total_flos": 12.0}
    assert logs == {"loss": loss}  # the loop's dict: the callback's edit, no copy leaked into it
    assert isinstance(logs["loss"], torch.Tensor)


def test_event_payloads():
    sink = RecordingSink((TrainBegin, TrainEnd, Save, Evaluate, Predict, PredictionStep))
    bus = EventBus([sink], run=RunInfo(run_id="r", rank=0), flush_interval=0.01)

    @dataclasses.dataclass
    class Args(TrainingArguments):
        hub_token: str | None = None

    class Config:
        def to_dict(self):
            return {"hidden_size": 8, "api_token": "tok-secret", "dtype": torch.float32}

    model = SimpleNamespace(config=Config())
    h = handler(bus=bus, model=model)
    args = Args(hub_token="hf_very_secret", eval_strategy="steps", eval_steps=5)
    state = TrainerState(max_steps=20, num_train_epochs=2, best_metric=0.1, best_model_checkpoint="o/checkpoint-5")
    with bus:
        c = TrainerControl()
        h.on_train_begin(args, state, c, resumed_from="o/checkpoint-3")
        state.global_step = 5
        h.on_prediction_step(args, state, c, batch_index=2, num_batches=4)
        metrics = {"eval_loss": 0.5}
        h.on_evaluate(args, state, c, metrics)
        metrics["eval_loss"] = 9.0  # later edits do not reach the event
        h.on_predict(args, state, c, {"test_loss": 0.7})
        h.on_save(args, state, c, checkpoint_dir="o/checkpoint-5", is_best=True)
        h.on_train_end(args, state, c, status="failed", error=RuntimeError("boom"))
    begin, step, ev, pred, save, end = sink.got
    assert begin.config["hub_token"] == "***" and begin.hparams["hub_token"] == "***"
    assert begin.config["eval_strategy"] == "steps" and begin.hparams["train_batch_size"] == 8
    assert begin.model_config == {"hidden_size": 8, "api_token": "***", "dtype": "torch.float32"}
    assert (begin.max_steps, begin.num_train_epochs, begin.resumed_from) == (20, 2, "o/checkpoint-3")
    assert (step.batch_index, step.num_batches, step.phase) == (2, 4, "eval")
    assert ev.metrics == {"eval_loss": 0.5} and ev.prefix == "eval" and ev.step == 5
    assert pred.metrics == {"test_loss": 0.7} and pred.prefix == "test"
    assert save.checkpoint_dir == "o/checkpoint-5" and save.is_best is True
    assert (end.status, end.error, end.best_metric, end.best_model_checkpoint) == (
        "failed", "RuntimeError: boom", 0.1, "o/checkpoint-5",
    )
    assert "hf_very_secret" not in repr(sink.got) and "tok-secret" not in repr(sink.got)


def test_numpy_metrics_reach_sinks_as_numbers():
    np = require_module("numpy")
    from eventbus.events import encode_json

    sink = RecordingSink((Evaluate, Log))
    bus = EventBus([sink], flush_interval=0.01)
    h = handler(bus=bus)
    with bus:
        h.on_evaluate(TrainingArguments(), TrainerState(), TrainerControl(),
                      {"eval_accuracy": np.float64(0.75), "eval_n": np.int64(3), "eval_hist": np.array([1.0, 2.0])})
        h.on_log(TrainingArguments(), TrainerState(), TrainerControl(), {"x": np.float32(0.5)})
    ev, log = sink.got
    assert ev.metrics == {"eval_accuracy": 0.75, "eval_n": 3, "eval_hist": [1.0, 2.0]}
    assert type(ev.metrics["eval_accuracy"]) is float and type(ev.metrics["eval_n"]) is int
    assert log.values == {"x": 0.5}
    encode_json(ev), encode_json(log)  # every sink can encode them


def test_set_bus_later_switches_publishing():
    h = handler()
    sink = RecordingSink((StepBegin,))
    bus = EventBus([sink])
    h.set_bus(bus)
    assert h.publishes("on_step_begin") and not h.publishes("on_step_end")
    h.set_bus(None)
    assert not h.publishes("on_step_begin")
    assert set(HOOK_EVENTS) == set(HOOKS)


# -- profiling ------------------------------------------------------------------------------------


def test_profile_off_calls_the_callbacks_own_methods():
    counting = Counting()
    h = CallbackHandler([counting], None, None, None, None)
    assert h.profile is False
    assert h._d_on_step_end == ((counting.on_step_end, False),)
    assert h.profile_report() == {}


def test_profile_records_time_per_class_and_hook():
    counting = Counting()
    h = handler(counting)
    h.profile = True
    args, state = TrainingArguments(), TrainerState(max_steps=100)
    for step in range(1, 6):
        state.global_step = step
        h.on_step_end(args, state, TrainerControl())
    report = h.profile_report()
    assert report[("Counting", "on_step_end")]["calls"] == 5
    assert report[("DefaultFlowCallback", "on_step_end")]["calls"] == 5
    assert report[("Counting", "on_step_end")]["total_s"] >= 0
    assert counting.n == 5
    h.profile = False
    assert tuple(fn for fn, _ in h._d_on_step_end) == tuple(cb.on_step_end for cb in h.callbacks)


# -- stateful callbacks ----------------------------------------------------------------------------


class Stateful(TrainerCallback, ExportableState):
    def __init__(self, tag: str = "x"):
        self.tag = tag
        self.evals = 0

    def on_evaluate(self, args, state, control, **kwargs):
        self.evals += 1

    def state(self) -> dict:
        return {"args": {"tag": self.tag}, "attributes": {"evals": self.evals}}


def test_export_uses_transformers_format():
    tcb = require_module("transformers.trainer_callback")
    a, b = EarlyStoppingCallback(2), EarlyStoppingCallback(3)
    a.early_stopping_patience_counter = 1
    control = TrainerControl(should_save=True)
    states = handler(a, b).export_callback_states(control)
    ta, tb = tcb.EarlyStoppingCallback(2), tcb.EarlyStoppingCallback(3)
    ta.early_stopping_patience_counter = 1
    expected = tcb.TrainerState(stateful_callbacks=[ta, tb, tcb.TrainerControl(should_save=True)]).stateful_callbacks
    assert states == expected
    # One callback of a class: a plain state, not a list.
    assert isinstance(handler(a).export_callback_states()["EarlyStoppingCallback"], dict)


def test_two_callbacks_of_one_class_keep_separate_states(tmp_path):
    a, b = Stateful("a"), Stateful("b")
    a.evals, b.evals = 3, 7
    control = TrainerControl(should_epoch_stop=True)
    state = TrainerState(stateful_callbacks=handler(a, b).export_callback_states(control))
    state.save_to_json(tmp_path / "trainer_state.json")
    loaded = TrainerState.load_from_json(tmp_path / "trainer_state.json")

    a2, b2 = Stateful("a"), Stateful("b")
    h = handler(a2, b2)
    c2 = TrainerControl()
    assert h.restore_callback_states(loaded.stateful_callbacks, c2) == []
    assert (a2.tag, a2.evals, b2.tag, b2.evals) == ("a", 3, "b", 7)
    assert c2.should_epoch_stop is True


def test_restore_loads_into_the_users_instance_which_keeps_its_place_and_events():
    user = Stateful("mine")
    h = handler(TrainerCallback, user, Counting)
    h.restore_callback_states({"Stateful": {"args": {"tag": "mine"}, "attributes": {"evals": 4}}})
    assert h.callbacks[2] is user and user.evals == 4
    assert h.dispatch_table("on_evaluate") == (user,)
    h.on_evaluate(TrainingArguments(), TrainerState(), TrainerControl(), {"eval_loss": 1.0})
    assert user.evals == 5


def test_new_stateful_callback_missing_from_checkpoint_starts_fresh(caplog):
    es = EarlyStoppingCallback(2)
    fresh = Stateful("new")
    h = handler(es, fresh)
    states = {"EarlyStoppingCallback": {"args": {"early_stopping_patience": 2, "early_stopping_threshold": 0.0},
                                        "attributes": {"early_stopping_patience_counter": 1}}}
    assert h.restore_callback_states(states) == []
    assert es.early_stopping_patience_counter == 1
    assert (fresh.tag, fresh.evals) == ("new", 0)
    # A second instance of a class the checkpoint has only one state for starts fresh too.
    s1, s2 = Stateful("one"), Stateful("two")
    h2 = handler(s1, s2)
    h2.restore_callback_states({"Stateful": {"args": {"tag": "one"}, "attributes": {"evals": 9}}})
    assert (s1.evals, s2.tag, s2.evals) == (9, "two", 0)


def test_checkpoint_states_of_absent_callbacks_are_ignored_with_a_warning(caplog):
    h = handler()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        ignored = h.restore_callback_states({"GoneCallback": {"args": {}, "attributes": {}}})
    assert ignored == ["GoneCallback"]
    assert any("GoneCallback" in r.getMessage() for r in caplog.records)


def test_restore_from_the_transformers_written_file():
    from tests.trainer.test_state import DATA

    state = TrainerState.load_from_json(DATA)
    a, b = EarlyStoppingCallback(3, 0.01), EarlyStoppingCallback(5)
    control = TrainerControl()
    handler(a, b).restore_callback_states(state.stateful_callbacks, control)
    assert (a.early_stopping_patience, a.early_stopping_threshold, a.early_stopping_patience_counter) == (3, 0.01, 1)
    assert (b.early_stopping_patience, b.early_stopping_patience_counter) == (5, 2)
    assert control.should_save is True


def test_restore_keeps_the_arguments_a_callback_is_given_now(caplog):
    """Resuming with EarlyStoppingCallback(early_stopping_patience=10) means 10, not the
    checkpoint's 2 (transformers, with restore_callback_states_from_checkpoint=True,
    would rebuild it with 2); its counter is restored all the same, with one warning."""
    states = {"EarlyStoppingCallback": {"args": {"early_stopping_patience": 2, "early_stopping_threshold": 0.0},
                                        "attributes": {"early_stopping_patience_counter": 1}}}
    es = EarlyStoppingCallback(10)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        assert handler(es).restore_callback_states(states) == []
    assert (es.early_stopping_patience, es.early_stopping_patience_counter) == (10, 1)
    (warning,) = [r.getMessage() for r in caplog.records if "EarlyStoppingCallback" in r.getMessage()]
    assert "early_stopping_patience=10" in warning and "early_stopping_patience=2" in warning
    # The same arguments: restored without a word.
    caplog.clear()
    same = EarlyStoppingCallback(2)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        handler(same).restore_callback_states(states)
    assert same.early_stopping_patience_counter == 1 and not caplog.records


def test_transformers_stateful_callback_is_exported_and_restored():
    tcb = require_module("transformers.trainer_callback")
    theirs = tcb.EarlyStoppingCallback(4)
    theirs.early_stopping_patience_counter = 2
    states = handler(theirs).export_callback_states()
    assert states["EarlyStoppingCallback"]["attributes"] == {"early_stopping_patience_counter": 2}
    again = tcb.EarlyStoppingCallback(4)
    handler(again).restore_callback_states(states)
    assert again.early_stopping_patience_counter == 2


def test_incompatible_state_is_a_clear_error():
    from trainer.state import CallbackStateError

    class NeedsMore(Stateful):
        """Its state() does not hold all its constructor needs: it cannot be rebuilt."""

        def __init__(self, tag: str, other: int) -> None:
            super().__init__(tag)
            self.other = other

    h = handler(NeedsMore("a", 1))
    with pytest.raises(CallbackStateError, match="NeedsMore.*restore_callback_states_from_checkpoint=False"):
        h.restore_callback_states({"NeedsMore": {"args": {"tag": "a"}, "attributes": {}}})


def _handler_recording_logs():
    """A handler whose bus wants Log events, and the list of the events it publishes,
    as built on the training thread (the bus never runs)."""
    from eventbus import EventBus, Log, Sink
    from trainer import CallbackHandler

    class Keep(Sink):
        name = "keep"
        events = (Log,)

        async def write(self, batch):
            pass

    from tests.trainer._loop_helpers import log_as_built

    published: list = []
    bus = EventBus([Keep()])
    bus.publish = published.append
    bus.publish_log = lambda *fields: published.append(log_as_built(*fields))
    return CallbackHandler([], None, None, None, None, bus=bus), published


def test_fresh_logs_are_handed_off_and_other_logs_are_copied():
    """With logs_are_fresh (the trainer's own results) a CPU tensor reaches the Log
    event as is; otherwise the event holds a copy that later in-place changes miss."""
    import torch

    from eventbus.values import Deferred, Snapshot
    from trainer import TrainerControl, TrainerState

    handler, published = _handler_recording_logs()
    state, control = TrainerState(), TrainerControl()
    fresh, other = torch.tensor(1.0), torch.tensor(2.0)
    handler.logs_are_fresh = True
    handler.on_log(None, state, control, {"loss": fresh})
    handler.logs_are_fresh = False
    handler.on_log(None, state, control, {"loss": other})
    assert published[0].values["loss"] is fresh  # kept as is; the bus thread reads it
    assert type(published[0].values) is Snapshot
    assert published[1].values["loss"] == 2.0  # a small CPU tensor: read when logged
    other.add_(5)
    assert published[1].values["loss"] == 2.0
    big = torch.ones(100)
    handler.on_log(None, state, control, {"hist": big})
    assert isinstance(published[2].values["hist"], Deferred) and published[2].values["hist"].tensor is not big
    big.zero_()
    assert published[2].values["hist"].resolve() == [1.0] * 100


def test_a_snapshot_given_to_on_log_is_handed_over_and_callbacks_get_a_copy():
    """Logs handed over as a Snapshot (the trainer's on the CPU) are taken as captured:
    the Log event keeps that very mapping with its very tensors (no copy, no snapshot,
    no torch call), and on_log callbacks get a plain copy whose changes (PrinterCallback
    pops "total_flos") do not reach the event."""
    import torch

    from eventbus.values import Snapshot
    from trainer import TrainerCallback, TrainerControl, TrainerState

    seen = []

    class Printer(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(logs)
            logs.pop("total_flos")
            logs["learning_rate"] = 0.2

    handler, published = _handler_recording_logs()
    loss, hist = torch.tensor(1.0), torch.ones(100)
    logs = Snapshot(loss=loss, hist=hist, learning_rate=0.1, total_flos=5.0)
    handler.on_log(None, TrainerState(), TrainerControl(), logs)
    values = published[0].values
    assert values is logs  # not copied: nothing else holds it
    assert values["loss"] is loss and values["hist"] is hist  # not read, not cloned

    handler.add_callback(Printer())
    logs = Snapshot(loss=loss, learning_rate=0.1, total_flos=5.0)
    handler.on_log(None, TrainerState(), TrainerControl(), logs)
    values = published[1].values
    assert values is logs and seen[0] is not logs and type(seen[0]) is dict
    assert values == {"loss": loss, "learning_rate": 0.1, "total_flos": 5.0}  # the callback's edits stayed in its copy
    assert seen[0] == {"loss": loss, "learning_rate": 0.2}


def test_a_snapshot_to_a_bus_without_publish_log_is_published_as_a_copy():
    """A bus stand-in with only publish() gets the Log built on the training thread,
    from a copy of the mapping: what the caller or a callback changes afterwards does
    not reach it."""
    import torch

    from eventbus import Log, RunInfo
    from eventbus.values import Snapshot
    from trainer import TrainerControl, TrainerState

    class PlainBus:
        run = RunInfo(run_id="plain")

        def __init__(self):
            self.published = []

        def wants(self, event_type):
            return event_type is Log

        def publish(self, event):
            self.published.append(event)

    bus = PlainBus()
    handler = CallbackHandler([], None, None, None, None, bus=bus)
    handler.logs_are_fresh = True
    loss = torch.tensor(1.0)
    logs = Snapshot(loss=loss, learning_rate=0.1)
    handler.on_log(None, TrainerState(global_step=3), TrainerControl(), logs)
    (event,) = bus.published
    assert type(event) is Log and event.run_id == "plain" and event.step == 3
    assert event.values is not logs and event.values["loss"] is loss  # fresh: not cloned
    logs["learning_rate"] = 0.2
    assert event.values["learning_rate"] == 0.1


def test_step_end_is_sampled_when_every_sink_of_it_samples_it(monkeypatch):
    """With only sampling sinks subscribed (a progress bar), on_step_end builds a
    StepEnd at most once per interval; a sink that needs each one gets each one."""
    from eventbus import EventBus, Sink, StepEnd
    from trainer import CallbackHandler, TrainerControl, TrainerState, callbacks

    class Steps(Sink):
        events = (StepEnd,)
        max_delay = 0.25

        async def write(self, batch):
            pass

    class Bar(Steps):
        name = "bar"
        sampled = (StepEnd,)

    clock = [100.0]
    monkeypatch.setattr(callbacks, "_monotonic", lambda: clock[0])

    def steps_published(*sinks):
        published: list = []
        bus = EventBus(list(sinks))
        bus.publish = published.append
        handler = CallbackHandler([], None, None, None, None, bus=bus)
        state, control = TrainerState(), TrainerControl()
        for _ in range(10):  # ten steps 0.125 s apart
            state.global_step += 1
            handler.on_step_end(None, state, control)
            clock[0] += 0.125
        return [e.step for e in published]

    assert steps_published(Bar()) == [1, 3, 5, 7, 9]  # one per 0.25 s, the first at once
    every = Steps()
    every.name = "every"
    assert steps_published(Bar(), every) == list(range(1, 11))


def test_a_hook_marked_ignores_kwargs_is_called_without_them_and_others_get_them():
    from trainer.callbacks import ignores_kwargs

    seen: list[tuple[str, dict]] = []

    class Lean(TrainerCallback):
        @ignores_kwargs
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(("lean", kwargs))

    class Full(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(("full", kwargs))

    class LeanSubclassUsingKwargs(Lean):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(("override", kwargs))

    model = object()
    h = CallbackHandler([Lean(), Full(), LeanSubclassUsingKwargs()], model, None, "opt", None)
    h.train_dataloader = "loader"
    h.on_step_end(TrainingArguments(), TrainerState(max_steps=10), TrainerControl())
    expected = {"model": model, "processing_class": None, "optimizer": "opt", "lr_scheduler": None,
                "train_dataloader": "loader", "eval_dataloader": None}
    assert seen == [("lean", {}), ("full", expected), ("override", expected)]
    assert h.model is model and h.train_dataloader == "loader"


def test_default_flow_per_step_hooks_are_called_without_kwargs():
    h = CallbackHandler([DefaultFlowCallback()], None, None, None, None)
    assert [lean for _, lean in h._d_on_step_end] == [True]
    # on_epoch_end is looked up at each call; @ignores_kwargs is honoured there too.
    assert DefaultFlowCallback.on_epoch_end.__eventbus_ignores_kwargs__ is True
    from trainer.callbacks import ignores_kwargs

    seen = []

    class LeanEpoch(TrainerCallback):
        @ignores_kwargs
        def on_epoch_end(self, args, state, control, **kwargs):
            seen.append(kwargs)

    CallbackHandler([LeanEpoch()], "m", None, None, None).on_epoch_end(TrainingArguments(), TrainerState(), TrainerControl())
    assert seen == [{}]


# -- hook lookup: live for the occasional hooks, bound for the per-step ones -------------------------

from unittest import mock  # noqa: E402

from trainer.callbacks import BOUND_HOOKS, ignores_kwargs  # noqa: E402

_LIVE_HOOKS = [h for h in HOOKS if h not in BOUND_HOOKS]


def test_bound_hooks_are_the_per_step_ones():
    assert set(BOUND_HOOKS) == {"on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end",
                                "on_substep_end", "on_log", "on_prediction_step"}
    assert set(_LIVE_HOOKS) == {"on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end",
                                "on_evaluate", "on_predict", "on_save", "on_push_begin"}


def test_mock_patch_object_on_an_added_callback_is_called():
    class Real(TrainerCallback):
        def __init__(self):
            self.real_calls = 0

        def on_evaluate(self, args, state, control, **kwargs):
            self.real_calls += 1

    cb = Real()
    h = handler(cb)
    with mock.patch.object(cb, "on_evaluate") as patched:
        h.on_evaluate(TrainingArguments(), TrainerState(), TrainerControl(), {"eval_loss": 1.0})
    assert patched.called and cb.real_calls == 0
    assert patched.call_args.kwargs["metrics"] == {"eval_loss": 1.0}
    h.on_evaluate(TrainingArguments(), TrainerState(), TrainerControl(), {"eval_loss": 1.0})
    assert cb.real_calls == 1  # the patch undone: the real method again


@pytest.mark.parametrize("hook", _LIVE_HOOKS)
def test_occasional_hooks_set_after_add_callback_are_called(hook):
    calls = []

    class Plain(TrainerCallback):
        pass

    on_instance = Plain()
    h = handler(on_instance)
    on_instance_hook = lambda args, state, control, **kw: calls.append(("instance", sorted(kw)))  # noqa: E731
    setattr(on_instance, hook, on_instance_hook)
    call_hook(h, hook, TrainingArguments(), TrainerState(), TrainerControl())
    assert [c[0] for c in calls] == ["instance"]
    assert {"model", "optimizer", "train_dataloader", "eval_dataloader"} <= set(calls[0][1])
    assert h.dispatch_table(hook)[-1] is on_instance

    class Later(TrainerCallback):
        pass

    h2 = handler(Later())
    setattr(Later, hook, lambda self, args, state, control, **kw: calls.append(("class", hook)))
    call_hook(h2, hook, TrainingArguments(), TrainerState(), TrainerControl())
    assert calls[-1] == ("class", hook)


def test_live_hooks_keep_returned_control_ignores_kwargs_and_profiling():
    replacement = TrainerControl()
    seen = []

    class Replace(TrainerCallback):
        pass

    class Look(TrainerCallback):
        @ignores_kwargs
        def on_save(self, args, state, control, **kwargs):
            seen.append((control is replacement, kwargs))

    r = Replace()
    h = CallbackHandler([r, Look()], "m", None, None, None)
    h.profile = True
    r.on_save = lambda args, state, control, **kw: replacement  # after the last rebuild
    out = h.on_save(TrainingArguments(), TrainerState(), TrainerControl(), checkpoint_dir="x")
    assert out is replacement and seen == [(True, {})]
    assert {key for key in h.profile_report()} == {("Replace", "on_save"), ("Look", "on_save")}


def test_bound_hooks_are_reread_by_refresh():
    class Plain(TrainerCallback):
        pass

    cb = Plain()
    h = handler(cb)
    calls = []
    cb.on_log = lambda args, state, control, **kw: calls.append(dict(kw["logs"]))
    h.on_log(TrainingArguments(), TrainerState(), TrainerControl(), {"loss": 1.0})
    assert calls == []  # bound when added: documented, refresh() re-reads
    h.refresh()
    h.on_log(TrainingArguments(), TrainerState(), TrainerControl(), {"loss": 2.0})
    assert calls == [{"loss": 2.0}]
    assert "refresh" in CallbackHandler.__doc__ and "on_step_end" in CallbackHandler.__doc__
    assert "bound" in CallbackHandler.refresh.__doc__


def test_call_event_dispatches_any_event_name_like_transformers():
    calls = []

    class Custom(TrainerCallback):
        def on_custom(self, args, state, control, **kwargs):
            calls.append(sorted(kwargs))
            control.should_save = True
            return control

    h = handler(Custom())  # DefaultFlowCallback has no on_custom: skipped
    out = h.call_event("on_custom", TrainingArguments(), TrainerState(), TrainerControl(), extra=1)
    assert out.should_save and calls == [sorted(["model", "processing_class", "optimizer", "lr_scheduler",
                                                 "train_dataloader", "eval_dataloader", "extra"])]
    assert h.call_event("on_nobody_has_this", TrainingArguments(), TrainerState(), TrainerControl()) is not None
    # Known hooks still go through call_event, bound or live.
    cb = h.callbacks[-1]
    with mock.patch.object(cb, "on_evaluate") as patched:
        h.call_event("on_evaluate", TrainingArguments(), TrainerState(), TrainerControl(), metrics={})
    assert patched.called


def test_call_event_matches_transformers_for_a_custom_event():
    tcb = require_module("transformers.trainer_callback")
    results = []
    for TC, H, S, C in ((TrainerCallback, CallbackHandler, TrainerState, TrainerControl),
                        (tcb.TrainerCallback, tcb.CallbackHandler, tcb.TrainerState, tcb.TrainerControl)):
        calls = []

        class Custom(TC):
            def on_custom(self, args, state, control, **kwargs):
                calls.append(sorted(kwargs))

        H([Custom()], None, None, None, None).call_event("on_custom", SimpleNamespace(), S(), C())
        results.append(calls)
    assert results[0] == results[1]


@pytest.mark.parametrize("name", ["DefaultFlowCallback", "ProgressCallback", "PrinterCallback", "EarlyStoppingCallback"])
def test_transformers_classes_name_our_counterparts(name: str, caplog) -> None:
    """Code written for transformers removes the printer with
    remove_callback(transformers.PrinterCallback): ours goes, as theirs would."""
    tcb = require_module("transformers.trainer_callback")
    import trainer as ours

    theirs_cls = getattr(tcb, name)
    mine = getattr(ours, name)() if name != "EarlyStoppingCallback" else ours.EarlyStoppingCallback(2)
    h = CallbackHandler([mine], None, None, None, None)
    assert h.pop_callback(theirs_cls) is mine and h.callbacks == []
    h = CallbackHandler([mine], None, None, None, None)
    h.remove_callback(theirs_cls)
    assert h.callbacks == []
    # adding theirs beside ours is a duplicate, with transformers' warning
    h = CallbackHandler([mine], None, None, None, None)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        h.add_callback(theirs_cls() if name != "EarlyStoppingCallback" else theirs_cls(2))
    assert any("there is already one" in r.getMessage() for r in caplog.records)
    # a class of the user's with the same name is not ours
    Other = type(name, (TrainerCallback,), {})
    h = CallbackHandler([mine], None, None, None, None)
    assert h.pop_callback(Other) is None and h.callbacks == [mine]


def test_removing_an_integration_callback_report_to_made_a_sink_says_so(tmp_path, caplog) -> None:
    integrations = require_module("transformers.integrations")
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
    from trainer import Trainer

    t = Trainer(TinyClassifier(), tiny_args(tmp_path, max_steps=1, report_to=["jsonl"]), train_dataset=make_dataset(8))
    with caplog.at_level(logging.WARNING, logger="trainer"):
        t.remove_callback(integrations.TensorBoardCallback)
        assert t.pop_callback(integrations.MLflowCallback) is None
    messages = [r.getMessage() for r in caplog.records]
    assert any("TensorBoardCallback is not among this trainer's callbacks" in m and "report_to" in m for m in messages)
    assert any("MLflowCallback is not among" in m for m in messages)
