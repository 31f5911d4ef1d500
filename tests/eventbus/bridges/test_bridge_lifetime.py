"""How long the transformers bridge keeps its bus: a callback dropped without close()
(a sweep or a notebook building a fresh one per Trainer) closes its bus, and one
callback reused for another Trainer closes the previous trainer's bus first. Driven
by the real ``transformers.Trainer`` on the CPU, report_to jsonl."""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_module, wait_collected
from tests.eventbus.bridges.test_transformers_bridge import TinyRegressor, _args, _Data

try:
    from transformers import Trainer

    from eventbus.bridges.transformers import EventBusCallback
except ImportError:  # checked per test by _frameworks (skips locally, fails in CI)
    pass


@pytest.fixture(autouse=True)
def _frameworks() -> None:
    require_module("transformers")
    require_module("accelerate")




def _bus_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` by a bus ("eventbus..."): this test's."""
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("eventbus")]


def _trainer(out: Path, callback: Any) -> Trainer:
    return Trainer(
        model=TinyRegressor(),
        args=_args(out, save_strategy="no", eval_strategy="no"),
        train_dataset=_Data(32, 0),
        callbacks=[callback],
    )


def _events(folder: Path) -> list[str]:
    files = sorted(folder.glob("events-*.jsonl"))
    return [json.loads(line)["type"] for f in files for line in f.read_text().splitlines()]


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "isolated"])
def test_a_callback_dropped_without_close_closes_its_bus(tmp_path: Path, isolate: bool) -> None:
    before = set(threading.enumerate())
    cb = EventBusCallback(report_to=["jsonl"])
    for s in cb.sinks:
        s.isolate = isolate
    trainer = _trainer(tmp_path, cb)
    trainer.train()
    bus = cb.bus
    assert bus is not None and bus.running  # flushed, not closed: evaluate() may follow
    proc = next((s.process for s in bus.sinks if hasattr(s, "process")), None)
    assert (proc is not None) == isolate
    threads = _bus_threads(before)
    assert threads
    ref = weakref.ref(bus)

    del trainer, cb, bus
    assert wait_collected(lambda: ref() is None and not any(t.is_alive() for t in threads)), (
        ref(),
        [t.name for t in threads if t.is_alive()],
    )
    if proc is not None:
        assert wait_collected(lambda: proc.poll() is not None), "the isolated sink's child process still runs"
    # Closed, not abandoned: the training's events were all written.
    events = _events(tmp_path / "out")
    assert events[0] == "InitEnd" and events[-1] == "TrainEnd"


def test_sweep_of_fresh_callbacks_keeps_no_bus_per_run(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    refs = []
    for i in range(3):
        cb = EventBusCallback(report_to=["jsonl"])
        trainer = _trainer(tmp_path / f"t{i}", cb)
        trainer.train()
        refs.append(weakref.ref(cb.bus))
        del trainer, cb
    assert wait_collected(lambda: all(r() is None for r in refs) and not _bus_threads(before))
    for i in range(3):
        assert _events(tmp_path / f"t{i}" / "out")[-1] == "TrainEnd"


def test_a_callback_reused_for_another_trainer_closes_the_previous_bus(tmp_path: Path) -> None:
    cb = EventBusCallback(report_to=["jsonl"])
    first = _trainer(tmp_path / "a", cb)
    first.train()
    first_bus = cb.bus
    first_run = cb._holder.run.run_id
    assert first_bus is not None and first_bus.running

    second = _trainer(tmp_path / "b", cb)  # its on_init_end: a new run begins
    assert not first_bus.running
    second.train()
    second_bus = cb.bus
    assert second_bus is not first_bus and second_bus.running
    assert cb._holder.run.run_id != first_run

    # Each trainer's events in its own output folder, once.
    for name in ("a", "b"):
        events = _events(tmp_path / name / "out")
        assert events.count("TrainBegin") == 1 and events[-1] == "TrainEnd", (name, events)
    cb.close()


def test_evaluate_keeps_the_bus_and_a_second_train_is_a_run_of_its_own(tmp_path: Path) -> None:
    # evaluate() after train() reaches the training's bus and run; train() again from
    # step 0 is a new run (transformers' MLflowCallback starts a run per train()), with
    # a file of its own, rather than every step twice in the first run's.
    cb = EventBusCallback(report_to=["jsonl"])
    trainer = Trainer(
        model=TinyRegressor(),
        args=_args(tmp_path, save_strategy="no", eval_strategy="no"),
        train_dataset=_Data(32, 0),
        eval_dataset=_Data(16, 1),
        callbacks=[cb],
    )
    trainer.train()
    bus = cb.bus
    trainer.evaluate()
    assert cb.bus is bus and bus.running
    trainer.train()
    assert cb.bus is not bus and not bus.running and cb.bus.running
    cb.close()
    files = sorted((tmp_path / "out").glob("events-*.jsonl"), key=lambda f: f.stat().st_mtime)
    assert len(files) == 2
    kinds = [[json.loads(line)["type"] for line in f.read_text().splitlines()] for f in files]
    assert [k.count("TrainBegin") for k in kinds] == [1, 1]
    assert [k.count("Evaluate") for k in kinds] == [1, 0]


def test_trainers_sharing_one_args_object_are_runs_of_their_own(tmp_path: Path) -> None:
    # A notebook defines TrainingArguments once and builds a Trainer per model.
    cb = EventBusCallback(report_to=["jsonl"])
    args = _args(tmp_path, save_strategy="no", eval_strategy="no")
    first = Trainer(model=TinyRegressor(), args=args, train_dataset=_Data(32, 0), callbacks=[cb])
    first.train()
    first_run = cb._holder.run.run_id
    second = Trainer(model=TinyRegressor(), args=args, train_dataset=_Data(32, 0), callbacks=[cb])
    second.train()
    assert cb._holder.run.run_id != first_run
    cb.close()
    files = sorted((tmp_path / "out").glob("events-*.jsonl"))
    assert len(files) == 2
    for f in files:
        types = [json.loads(line)["type"] for line in f.read_text().splitlines()]
        assert types.count("TrainBegin") == 1 and types[-1] == "TrainEnd", (f.name, types)


def test_each_hyperparameter_search_trial_is_a_run_of_its_own(tmp_path: Path) -> None:
    # As transformers' CometCallback: one experiment per trial. Each trial's bus is
    # closed at its end, and the next one opens with a new run id (a Comet sink would
    # otherwise continue the first trial's experiment).
    from transformers import TrainerControl, TrainerState

    cb = EventBusCallback(report_to=["jsonl"])
    args = _args(tmp_path)
    runs = []
    for _ in range(2):
        state, control = TrainerState(is_hyper_param_search=True), TrainerControl()
        cb.on_train_begin(args, state, control, model=TinyRegressor())
        runs.append(cb._holder.run.run_id)
        cb.on_train_end(args, state, control)
        assert not cb.bus.running
    assert runs[0] != runs[1]
    assert len(list((tmp_path / "out").glob("events-*.jsonl"))) == 2
