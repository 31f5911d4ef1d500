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


def test_an_evaluate_after_a_resumed_train_is_delivered(tmp_path):
    # Run 1 completes to step 10; run 2 resumes from checkpoint-4 and trains to 10 again
    # (steps 5..10 held back: the sinks have them). Its evaluate() afterwards, at step
    # 10, publishes new metrics: not held back by the marks.
    store: list[Any] = []
    eval_ds = make_dataset(8, seed=1)
    t1 = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN, sinks=[Backend(store)])
    t1.train()
    out = t1.args.output_dir
    t2 = Trainer(TinyClassifier(), _args(tmp_path), train_dataset=TRAIN, eval_dataset=eval_ds, sinks=[Backend(store)])
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
    assert _log_steps(store) == list(range(1, 11))
    metrics = t2.evaluate(metric_key_prefix="final")
    st = t2.bus.stats().sinks["backend"]
    assert (st.skipped, st.delivered) == (0, st.received), st
    from eventbus import Evaluate

    (final,) = [e for e in store if isinstance(e, Evaluate) and e.prefix == "final"]
    assert final.step == 10 and final.metrics["final_loss"] == metrics["final_loss"]


class CrashInEvalAt:
    """compute_metrics that raises during the evaluation at ``step`` (once: a resumed
    run evaluates normally)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.trainer: Trainer | None = None
        self.armed = True

    def __call__(self, p: Any) -> dict[str, float]:
        assert self.trainer is not None
        if self.armed and self.trainer.state.global_step == self.step:
            self.armed = False
            raise RuntimeError("simulated crash in evaluation")
        preds, labels = p
        return {"accuracy": float((preds.argmax(-1) == labels).mean())}


def _eval_trainer(tmp_path, store: list[Any], metrics: Any, **kw: Any) -> Trainer:
    args = _args(tmp_path, eval_strategy="steps", eval_steps=3, **kw)
    t = Trainer(
        TinyClassifier(), args, train_dataset=TRAIN, eval_dataset=make_dataset(8, seed=1), sinks=[Backend(store)], compute_metrics=metrics
    )
    if isinstance(metrics, CrashInEvalAt):
        metrics.trainer = t
    return t


def _evaluations(events: Sequence[Any]) -> tuple[list[int], list[int]]:
    """The steps of the Evaluate events, and of the Logs of eval metrics."""
    from eventbus import Evaluate

    evals = [e.step for e in events if isinstance(e, Evaluate) and "eval_loss" in e.metrics]
    eval_logs = [e.step for e in events if isinstance(e, Log) and "eval_loss" in e.values]
    return evals, eval_logs


def _crash_in_eval_then_resume(tmp_path) -> tuple[list[Any], str, str]:
    """Run 1 (save every 4 steps, evaluate every 3) dies inside the evaluation at step 6,
    after the training Log of step 6 reached the sinks; run 2 resumes from checkpoint-4."""
    store: list[Any] = []
    t1 = _eval_trainer(tmp_path, store, CrashInEvalAt(6))
    with pytest.raises(RuntimeError, match="simulated crash in evaluation"):
        t1.train()
    out = t1.args.output_dir
    assert _log_steps(store) == list(range(1, 7))
    assert _evaluations(store) == ([3], [3])
    return store, out, t1.run_id


def test_a_crash_during_evaluation_resumes_with_that_evaluation_delivered_once(tmp_path):
    store, out, run_id = _crash_in_eval_then_resume(tmp_path)
    latest = json.load(open(os.path.join(out, MARKS_FILE)))
    assert latest["marks"]["backend"] == 6
    # The mark knows what the sink got at step 6: the training Log, not the evaluation.
    names = latest["mark_names"]["backend"]
    assert names["step"] == 6 and "Log/loss" in names["names"]
    assert not [n for n in names["names"] if "eval_" in n or n.startswith("Evaluate")]

    t2 = _eval_trainer(tmp_path, store, CrashInEvalAt(-1))
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
    assert t2.state.global_step == 10
    # The evaluation at step 6 reaches the sink once; the training loss of steps 5 and 6
    # is not sent again.
    assert _log_steps(store) == list(range(1, 11))
    assert _evaluations(store) == ([3, 6, 9, 10], [3, 6, 9, 10])  # 10: the end of training
    assert t2.bus.stats().sinks["backend"].skipped == 2  # Log(5), Log(6): the training losses

    # The same read back from real sinks: the run's JSONL file (a resumed run's orphans
    # purged by the reader) and TensorBoard.
    lines = read_jsonl(os.path.join(out, f"events-{run_id}.jsonl"))
    assert _log_steps(lines) == list(range(1, 11))
    assert _evaluations(lines) == ([3, 6, 9, 10], [3, 6, 9, 10])
    from tests.sinks.test_tensorboard import accumulate

    acc = accumulate(str(tmp_path / "tb"))
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6, 9, 10]
    replayed: list[Any] = []
    assert replay(os.path.join(out, f"events-{run_id}.jsonl"), Backend(replayed), save_mark=False).failed == 0
    assert _log_steps(replayed) == list(range(1, 11))
    assert _evaluations(replayed) == ([3, 6, 9, 10], [3, 6, 9, 10])

    # Run 2's marks at the end know both the training and the evaluation metrics.
    info = json.load(open(os.path.join(out, "checkpoint-8", "run_info.json")))
    assert info[RUN_INFO_KEY]["backend"] <= 8
    latest = json.load(open(os.path.join(out, MARKS_FILE)))
    assert latest["marks"]["backend"] == 10


def test_marks_saved_without_names_keep_the_step_rule(tmp_path):
    # Marks as an earlier version saved them (steps only, in run_info.json and in
    # eventbus_marks.json): every metric event at the mark's step counts as delivered,
    # the evaluation there included (it was, as far as such a mark can tell).
    store, out, run_id = _crash_in_eval_then_resume(tmp_path)
    latest_path = os.path.join(out, MARKS_FILE)
    latest = json.load(open(latest_path))
    with open(latest_path, "w") as fh:
        json.dump({"run_id": run_id, "marks": latest["marks"]}, fh)
    for ck in ("checkpoint-4",):
        path = os.path.join(out, ck, "run_info.json")
        info = json.load(open(path))
        info.pop("eventbus_mark_names", None)
        with open(path, "w") as fh:
            json.dump(info, fh)

    t2 = _eval_trainer(tmp_path, store, CrashInEvalAt(-1))
    t2.train(resume_from_checkpoint=os.path.join(out, "checkpoint-4"))
    assert _log_steps(store) == list(range(1, 11))
    assert _evaluations(store) == ([3, 9, 10], [3, 9, 10])
    assert t2.bus.stats().sinks["backend"].skipped == 4  # Log(5), Log(6), Evaluate(6), the eval Log(6)


def test_a_sink_left_out_of_one_resume_keeps_its_mark_for_the_next(tmp_path):
    # Run 1 [backend, jsonl] dies at step 7; run 2 resumes from checkpoint-4 without the
    # backend (its server down, say) and dies at 7 again; run 3 resumes from checkpoint-4
    # with the backend back: it has steps 1..6 already.
    store: list[Any] = []
    kw: dict[str, Any] = dict(report_to=["jsonl"])
    t1 = Trainer(TinyClassifier(), _args(tmp_path, **kw), train_dataset=TRAIN, sinks=[Backend(store)], callbacks=[CrashAt(7)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        t1.train()
    out = t1.args.output_dir
    ck4 = os.path.join(out, "checkpoint-4")
    t2 = Trainer(TinyClassifier(), _args(tmp_path, **kw), train_dataset=TRAIN, callbacks=[CrashAt(7)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        t2.train(resume_from_checkpoint=ck4)
    latest = json.load(open(os.path.join(out, MARKS_FILE)))
    assert latest["marks"] == {"jsonl": 6, "backend": 6}
    assert "Log/loss" in latest["mark_names"]["backend"]["names"]

    t3 = Trainer(TinyClassifier(), _args(tmp_path, **kw), train_dataset=TRAIN, sinks=[Backend(store)])
    t3.train(resume_from_checkpoint=ck4)
    assert _log_steps(store) == list(range(1, 11))
    assert t3.bus.stats().sinks["backend"].skipped == 2


def test_the_marks_file_of_another_run_is_replaced_not_merged(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKS_FILE).write_text(json.dumps({"run_id": "someone-else", "marks": {"gone": 99}}))
    t = Trainer(TinyClassifier(), _args(tmp_path, report_to="none", max_steps=4), train_dataset=TRAIN, sinks=[Backend([])])
    t.train()
    latest = json.load(open(out / MARKS_FILE))
    assert latest["run_id"] == t.run_id and latest["marks"] == {"backend": 4}


def test_merging_marks_from_several_places():
    from trainer import _marks

    a = {"x": 5, "y": {"step": 7, "names": ["Log/loss"]}, "z": {"step": 3, "names": ["Log/loss"]}}
    b = {"x": {"step": 6, "names": ["Evaluate/eval_loss"]}, "y": {"step": 7, "names": ["Evaluate/eval_loss"]}, "z": 3}
    assert _marks.merge(a, b, {"bad": "7"}) == {
        "x": {"step": 6, "names": ["Evaluate/eval_loss"]},  # the higher step wins, with its names
        "y": {"step": 7, "names": ["Evaluate/eval_loss", "Log/loss"]},  # equal: united
        "z": 3,  # a bare step (names not known: all of them) wins over names at its step
    }
    # One place's steps and names, read together: an entry for an older step says
    # nothing about the newer one.
    info = {RUN_INFO_KEY: {"x": 8, "y": 7}, "eventbus_mark_names": {"x": {"step": 6, "names": ["Log/a"]}, "y": {"step": 7, "names": ["Log/b"]}}}
    assert _marks.read_run_info(info) == {"x": 8, "y": {"step": 7, "names": ["Log/b"]}}
