"""A resumed run never logs a step twice to a sink: the Trainer keeps the bus's per-sink
high-water marks with each checkpoint and in ``<output_dir>/eventbus_marks.json``, and
builds the resumed run's bus with them (``resume_marks``, ``RunInfo(resumed=True)``)."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any, Sequence

import pytest

from eventbus import Log, Sink
from eventbus.replay import replay
from sinks.jsonl import read_jsonl
from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
from trainer import Trainer, TrainerCallback, TrainingArguments
from trainer._marks import MARKS_FILE, RUN_INFO_KEY

TRAIN = make_dataset(40)


class Backend(Sink):
    """A tracking backend that outlives the process: what it got is kept in ``store``."""

    name = "backend"
    max_delay = 0.01

    def __init__(self, store: list[Any]) -> None:
        self.store = store
        self.runs: list[Any] = []

    async def open(self, run: Any) -> None:
        self.runs.append(run)

    async def write(self, batch: Sequence[Any]) -> None:
        self.store.extend(batch)


class CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def _args(tmp_path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        logging_dir=str(tmp_path / "tb"),
        max_steps=10,
        save_strategy="steps",
        save_steps=4,
        report_to=["jsonl", "tensorboard"],
        bus_close_timeout=10.0,
    )
    base.update(kw)
    return tiny_args(tmp_path / "out", **base)


def _log_steps(events: Sequence[Any]) -> list[int]:
    # The final train_* summary is a Log at the last step too: count the per-step ones.
    return [e.step for e in events if isinstance(e, Log) and "loss" in e.values]


def test_resume_from_an_earlier_checkpoint_never_logs_a_step_twice(tmp_path):
    store: list[Any] = []
    t1 = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN, sinks=[Backend(store)], callbacks=[CrashAt(7)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        t1.train()
    out = t1.args.output_dir
    # Training went past checkpoint-4 before the crash (in on_step_end, before step 7
    # is logged): the sinks have steps 1..6.
    assert _log_steps(store) == list(range(1, 7))
    info = json.load(open(os.path.join(out, "checkpoint-4", "run_info.json")))
    # What had been delivered when it was saved (the sinks lag a little behind).
    assert set(info[RUN_INFO_KEY]) <= {"jsonl", "backend", "tensorboard"} and all(v <= 4 for v in info[RUN_INFO_KEY].values())
    latest = json.load(open(os.path.join(out, MARKS_FILE)))
    assert latest["run_id"] == t1.run_id and latest["marks"] == {"jsonl": 6, "backend": 6, "tensorboard": 6}

    backend2 = Backend(store)
    t2 = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN, sinks=[backend2])
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
    assert t2.state.global_step == 10
    assert backend2.runs[0].resumed is True and backend2.runs[0].run_id == t1.run_id

    # Steps 5 and 6 were published again by the resumed run, and skipped for both sinks.
    steps = _log_steps(store)
    assert steps == list(range(1, 11)), steps
    st = t2.bus.stats().sinks
    for name in ("backend", "jsonl", "tensorboard"):
        assert st[name].skipped == 2
        assert st[name].received == st[name].delivered + st[name].dropped + st[name].spooled + st[name].queue_depth
    lines = read_jsonl(os.path.join(out, f"events-{t1.run_id}.jsonl"))
    jsonl_steps = _log_steps(lines)
    assert sorted(jsonl_steps) == list(range(1, 11))
    assert not [s for s, n in Counter(jsonl_steps).items() if n > 1]
    assert json.load(open(os.path.join(out, MARKS_FILE)))["marks"]["backend"] == 10

    # Readers that purge a resumed run's orphans keep the steps it did not redo.
    from tests.sinks.test_tensorboard import accumulate

    tb_steps = [e.step for e in accumulate(str(tmp_path / "tb")).Scalars("train/loss")]
    assert tb_steps == list(range(1, 11)), tb_steps
    replayed: list[Any] = []
    result = replay(os.path.join(out, f"events-{t1.run_id}.jsonl"), Backend(replayed), save_mark=False)
    assert result.failed == 0
    assert _log_steps(replayed) == list(range(1, 11))


def test_checkpoint_marks_alone_are_used_when_the_latest_file_is_gone(tmp_path):
    store: list[Any] = []
    t1 = Trainer(TinyClassifier(), _args(tmp_path, report_to="none"), train_dataset=TRAIN, sinks=[Backend(store)])
    t1.train()
    out = t1.args.output_dir
    ck8 = os.path.join(out, "checkpoint-8")
    run_info = os.path.join(ck8, "run_info.json")
    info = json.load(open(run_info))
    assert isinstance(info[RUN_INFO_KEY], dict)
    # As if the backend had been delivered step 9 before this checkpoint was written
    # (an Evaluate ahead of the save, say), and the latest-marks file were lost.
    info[RUN_INFO_KEY] = {"backend": 9}
    with open(run_info, "w") as fh:
        json.dump(info, fh)
    os.remove(os.path.join(out, MARKS_FILE))
    store.clear()
    t2 = Trainer(TinyClassifier(), _args(tmp_path, report_to="none"), train_dataset=TRAIN, sinks=[Backend(store)])
    t2.train(resume_from_checkpoint=ck8)
    assert _log_steps(store) == [10]
    assert t2.bus.stats().sinks["backend"].skipped == 1


def test_a_fresh_run_has_no_marks_and_a_foreign_marks_file_is_ignored(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKS_FILE).write_text(json.dumps({"run_id": "someone-else", "marks": {"backend": 99}}))
    store: list[Any] = []
    t = Trainer(TinyClassifier(), _args(tmp_path, report_to="none", max_steps=4), train_dataset=TRAIN, sinks=[Backend(store)])
    t.train()
    assert _log_steps(store) == [1, 2, 3, 4]
    t2 = Trainer(TinyClassifier(), _args(tmp_path, report_to="none", max_steps=8), train_dataset=TRAIN, sinks=[Backend(store)])
    t2.train(resume_from_checkpoint=True)
    assert _log_steps(store) == list(range(1, 9))
