"""No duplicates: a resumed run, or a replay of events a sink already has, never logs a
step twice to that sink (per-sink high-water marks of Log/Evaluate/Predict steps)."""

from __future__ import annotations

import json
from typing import Sequence

from eventbus import EventBus, Evaluate, Log, Predict, RunInfo, Sink, StepEnd
from eventbus.events import BaseEvent
from eventbus.replay import replay
from eventbus.spool import STATE_FILE
from tests.conftest import wait_for


class Recorder(Sink):
    name = "rec"
    max_delay = 0.01

    def __init__(self, name: str = "rec", spool: bool = False) -> None:
        self.name = name  # type: ignore[misc]
        self.spool = spool
        self.down = False
        self.got: list[BaseEvent] = []
        self.max_retries = 0
        self.circuit_threshold = 1
        self.circuit_cooldown = 0.05

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        if self.down:
            raise ConnectionError("down")
        self.got.extend(batch)


def metric_steps(events: Sequence[BaseEvent]) -> list[int]:
    return [e.step for e in events if isinstance(e, (Log, Evaluate, Predict))]


def test_resume_marks_skip_metric_events_at_or_below_the_mark_only(tmp_path):
    rec, other = Recorder(), Recorder("other")
    bus = EventBus([rec, other], resume_marks={"rec": 5}, flush_interval=0.01)
    with bus:
        for i in range(11):
            bus.publish(Log(step=i, values={"loss": 1.0}))
            bus.publish(StepEnd(step=i))
        bus.publish(Evaluate(step=3, metrics={"eval_loss": 1.0}))
        bus.publish(Predict(step=5, metrics={"test_loss": 1.0}))
        bus.publish(Evaluate(step=10, metrics={"eval_loss": 1.0}))
    st = bus.stats().sinks["rec"]
    assert metric_steps(rec.got) == [6, 7, 8, 9, 10, 10]
    assert [e.step for e in rec.got if isinstance(e, StepEnd)] == list(range(11))  # not step-keyed metrics
    assert (st.received, st.delivered, st.skipped, st.dropped) == (25, 17, 8, 8)
    assert st.received == st.delivered + st.dropped + st.spooled + st.queue_depth
    assert len(other.got) == 25  # the mark is per sink
    assert bus.high_water_marks() == {"rec": 10, "other": 10}


def test_several_metric_events_at_the_same_step_in_one_run_are_all_delivered():
    rec = Recorder()
    bus = EventBus([rec], flush_interval=0.01)
    with bus:
        bus.publish(Log(step=3, values={"loss": 1.0}))
        bus.publish(Evaluate(step=3, metrics={"eval_loss": 1.0}))
        bus.publish(Log(step=3, values={"eval_loss": 1.0}))
        bus.publish(Log(step=2, values={"late": 1.0}))  # out of order within a run: kept
    assert metric_steps(rec.got) == [3, 3, 3, 2]
    assert bus.stats().sinks["rec"].skipped == 0
    assert bus.high_water_marks() == {"rec": 3}


def test_mark_is_persisted_next_to_the_spool_and_used_on_resume(tmp_path):
    out = str(tmp_path)
    first = Recorder(spool=True)
    bus = EventBus([first], run=RunInfo(run_id="run1", output_dir=out), flush_interval=0.01)
    with bus:
        for i in range(11):
            bus.publish(Log(step=i))
    state = json.loads((tmp_path / "spool" / "rec" / STATE_FILE).read_text())
    assert state["marks"] == {"rec": 10} and state["run_id"] == "run1"

    # The checkpoint was at step 7 (mark 7 stored with it), but the sink had step 10
    # before the crash: the mark next to the spool wins, and 8..10 are not sent twice.
    second = Recorder(spool=True)
    bus2 = EventBus(
        [second], run=RunInfo(run_id="run1", output_dir=out, resumed=True), resume_marks={"rec": 7}, flush_interval=0.01
    )
    with bus2:
        for i in range(8, 16):
            bus2.publish(Log(step=i))
    assert metric_steps(second.got) == [11, 12, 13, 14, 15]
    assert bus2.stats().sinks["rec"].skipped == 3
    assert bus2.high_water_marks() == {"rec": 15}


def test_a_new_run_in_the_same_directory_is_not_muted_by_an_old_mark(tmp_path):
    out = str(tmp_path)
    bus = EventBus([Recorder(spool=True)], run=RunInfo(run_id="old", output_dir=out), flush_interval=0.01)
    with bus:
        for i in range(20):
            bus.publish(Log(step=i))
    fresh = Recorder(spool=True)
    bus2 = EventBus([fresh], run=RunInfo(run_id="new", output_dir=out), flush_interval=0.01)
    with bus2:
        for i in range(5):
            bus2.publish(Log(step=i))
    assert metric_steps(fresh.got) == [0, 1, 2, 3, 4]


def test_resume_after_a_crash_with_a_spool_left_behind_logs_each_step_once(tmp_path):
    """Run 1 delivers steps 0..4, then the backend goes down: 5..9 are spooled when
    the process dies. The checkpoint (step 7) stored mark 4. Run 2 resumes at step 8:
    the leftover 5..9 is delivered first, then 8 and 9 from run 2 are duplicates."""
    out = str(tmp_path)
    first = Recorder(spool=True)
    first.circuit_cooldown = 3600
    bus = EventBus([first], run=RunInfo(run_id="r", output_dir=out), flush_interval=0.01)
    with bus:
        for i in range(5):
            bus.publish(Log(step=i))
        wait_for(lambda: bus.stats().sinks["rec"].delivered == 5)
        first.down = True
        for i in range(5, 10):
            bus.publish(Log(step=i))
        wait_for(lambda: bus.stats().sinks["rec"].spooled == 5)
    checkpoint_marks = {"rec": 4}

    second = Recorder(spool=True)
    run2 = RunInfo(run_id="r", output_dir=out, resumed=True)
    bus2 = EventBus([second], run=run2, resume_marks=checkpoint_marks, flush_interval=0.01)
    with bus2:
        for i in range(8, 13):
            bus2.publish(Log(step=i))
    assert metric_steps(first.got) + metric_steps(second.got) == list(range(13))
    st = bus2.stats().sinks["rec"]
    assert (st.received, st.delivered, st.skipped, st.spooled) == (10, 8, 2, 0)


def test_replaying_twice_sends_each_step_once(tmp_path):
    out = str(tmp_path)
    down = Recorder(spool=True)
    down.down = True
    down.circuit_cooldown = 3600
    bus = EventBus([down], run=RunInfo(output_dir=out), flush_interval=0.01)
    with bus:
        for i in range(10):
            bus.publish(Log(step=i))
        wait_for(lambda: bus.stats().sinks["rec"].spooled == 10)
    spool_dir = tmp_path / "spool" / "rec"

    target = Recorder("backfill")
    r1 = replay(spool_dir, target)
    assert (r1.read, r1.sent, r1.skipped, r1.mark) == (10, 10, 0, 9)
    again = Recorder("backfill")
    r2 = replay(spool_dir, again)
    assert (r2.read, r2.sent, r2.skipped) == (10, 0, 10)
    assert again.got == []
    assert json.loads((spool_dir / STATE_FILE).read_text())["marks"]["backfill"] == 9


def test_replay_with_an_explicit_mark(tmp_path):
    path = tmp_path / "events.jsonl"
    from eventbus.events import encode_json

    path.write_bytes(b"\n".join(encode_json(Log(step=i)) for i in range(6)) + b"\n")
    rec = Recorder()
    res = replay(path, rec, resume_mark=3, save_mark=False)
    assert metric_steps(rec.got) == [4, 5]
    assert (res.sent, res.skipped) == (2, 4)
    assert not (tmp_path / "events.jsonl.marks.json").exists()


def test_bad_resume_marks_are_a_clear_error():
    import pytest

    from eventbus.errors import SinkConfigError

    with pytest.raises(SinkConfigError, match=r"resume_marks must map sink names to steps"):
        EventBus([Recorder()], resume_marks={"rec": "12"})  # type: ignore[dict-item]
    with pytest.raises(SinkConfigError, match=r"dict\[str, int\]"):
        EventBus([Recorder()], resume_marks=[("rec", 1)])  # type: ignore[arg-type]


def test_a_mark_with_names_holds_back_at_its_step_only_what_the_sink_got():
    # The interrupted run delivered the training Log of step 5, then died in the
    # evaluation at step 5: the resumed run's Evaluate and eval Log at 5 go out, its
    # training Log at 5 does not.
    rec, plain = Recorder(), Recorder("plain")
    entry = {"step": 5, "names": ["Log/epoch", "Log/loss"]}
    bus = EventBus([rec, plain], resume_marks={"rec": entry, "plain": 5}, flush_interval=0.01)
    with bus:
        for i in range(4, 7):
            bus.publish(Log(step=i, values={"loss": 1.0, "epoch": 0.1}))
        bus.publish(Evaluate(step=5, metrics={"eval_loss": 1.0}))
        bus.publish(Log(step=5, values={"eval_loss": 1.0, "epoch": 0.1}))
        bus.publish(Log(step=5, values={"loss": 1.0}))  # a subset of what it got: held back
        bus.publish(Predict(step=4, metrics={"test_loss": 1.0}))  # below the mark: held back
    assert [(type(e).__name__, e.step) for e in rec.got] == [("Log", 6), ("Evaluate", 5), ("Log", 5)]
    assert bus.stats().sinks["rec"].skipped == 4
    # A bare step: everything at it counts as delivered, as before.
    assert metric_steps(plain.got) == [6]
    assert bus.high_water_marks() == {"rec": 6, "plain": 6}
    assert bus.high_water_names() == {
        "rec": {"step": 6, "names": ["Log/epoch", "Log/loss"]},
        "plain": {"step": 6, "names": ["Log/epoch", "Log/loss"]},
    }


def test_names_at_the_mark_grow_while_it_stays_and_restart_when_it_moves():
    rec = Recorder()
    bus = EventBus([rec], flush_interval=0.01).start()
    bus.publish(Log(step=3, values={"loss": 1.0}))
    wait_for(lambda: bus.high_water_names().get("rec", {}).get("names") == ["Log/loss"])
    bus.publish(Evaluate(step=3, metrics={"eval_loss": 1.0}))
    bus.publish(Log(step=2, values={"late": 1.0}))  # below the mark: names unchanged
    bus.publish(Log(step=3, values={}))  # no values: named by its type
    wait_for(lambda: len(rec.got) == 4)
    assert bus.high_water_names() == {"rec": {"step": 3, "names": ["Evaluate/eval_loss", "Log", "Log/loss"]}}
    bus.publish(Log(step=4, values={"loss": 1.0}))
    bus.close(timeout=5)
    assert bus.high_water_names() == {"rec": {"step": 4, "names": ["Log/loss"]}}
    assert bus.high_water_marks() == {"rec": 4}


def test_a_bare_resume_mark_stays_without_names_until_it_moves():
    rec = Recorder()
    bus = EventBus([rec], resume_marks={"rec": 5}, flush_interval=0.01)
    with bus:
        bus.publish(Evaluate(step=5, metrics={"eval_loss": 1.0}))
    assert rec.got == [] and bus.high_water_marks() == {"rec": 5}
    assert bus.high_water_names() == {}  # not known: a resume from it holds back all of step 5


def test_names_at_the_mark_are_kept_next_to_the_spool_and_used_on_resume(tmp_path):
    out = str(tmp_path)
    first = Recorder(spool=True)
    bus = EventBus([first], run=RunInfo(run_id="run1", output_dir=out), flush_interval=0.01)
    with bus:
        for i in range(6):
            bus.publish(Log(step=i, values={"loss": 1.0}))
    state = json.loads((tmp_path / "spool" / "rec" / STATE_FILE).read_text())
    assert state["marks"] == {"rec": 5}
    assert state["mark_names"] == {"rec": {"step": 5, "names": ["Log/loss"]}}

    # As after a SIGKILL in the evaluation at step 5 (the checkpoint at step 3): the
    # spool's state.json is all that knows the sink got the training Log of step 5.
    second = Recorder(spool=True)
    run = RunInfo(run_id="run1", output_dir=out, resumed=True)
    bus2 = EventBus([second], run=run, resume_marks={"rec": 3}, flush_interval=0.01)
    assert run.resume_marks == {"rec": 5}
    with bus2:
        for i in range(4, 7):
            bus2.publish(Log(step=i, values={"loss": 1.0}))
            if i == 5:
                bus2.publish(Evaluate(step=5, metrics={"eval_loss": 1.0}))
    assert [(type(e).__name__, e.step) for e in second.got] == [("Evaluate", 5), ("Log", 6)]

    # A state.json of an older version (steps only): the whole step is held back.
    state = json.loads((tmp_path / "spool" / "rec" / STATE_FILE).read_text())
    assert state["mark_names"] == {"rec": {"step": 6, "names": ["Log/loss"]}}
    del state["mark_names"]
    (tmp_path / "spool" / "rec" / STATE_FILE).write_text(json.dumps(state))
    third = Recorder(spool=True)
    bus3 = EventBus([third], run=RunInfo(run_id="run1", output_dir=out, resumed=True), flush_interval=0.01)
    with bus3:
        bus3.publish(Evaluate(step=6, metrics={"eval_loss": 1.0}))
        bus3.publish(Log(step=7, values={"loss": 1.0}))
    assert metric_steps(third.got) == [7]


def test_replay_uses_the_names_kept_with_the_mark(tmp_path):
    from eventbus.events import encode_json

    path = tmp_path / "events.jsonl"
    events = [Log(step=1, values={"loss": 1.0}), Log(step=2, values={"loss": 1.0}), Evaluate(step=2, metrics={"eval_loss": 1.0})]
    path.write_bytes(b"\n".join(encode_json(e) for e in events) + b"\n")
    marks_file = tmp_path / "events.jsonl.marks.json"
    marks_file.write_text(json.dumps({"marks": {"rec": 2}, "mark_names": {"rec": {"step": 2, "names": ["Log/loss"]}}}))
    rec = Recorder()
    res = replay(path, rec)
    assert [(type(e).__name__, e.step) for e in rec.got] == [("Evaluate", 2)]
    assert (res.sent, res.skipped, res.mark) == (1, 2, 2)
    saved = json.loads(marks_file.read_text())
    assert saved["mark_names"] == {"rec": {"step": 2, "names": ["Evaluate/eval_loss", "Log/loss"]}}
    assert replay(path, Recorder()).sent == 0  # twice: nothing twice


def test_resume_marks_take_names_entries_and_refuse_malformed_ones():
    import pytest

    from eventbus.errors import SinkConfigError

    EventBus([Recorder()], resume_marks={"rec": {"step": 3, "names": ["Log/loss"]}})
    for bad in ({"step": "3", "names": []}, {"step": 3}, {"step": 3, "names": "Log/loss"}, {"step": 3, "names": [1]}, True):
        with pytest.raises(SinkConfigError, match=r"resume_marks must map sink names to steps"):
            EventBus([Recorder()], resume_marks={"rec": bad})
