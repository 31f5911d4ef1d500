"""``eventbus replay`` and ``eventbus.replay.replay``: a past run's spool or JSONL file
sent to a sink later."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path
import time
from typing import Sequence

import anyio
import pytest

from eventbus import EventBus, Log, RunInfo, Sink, StepEnd, TrainBegin
from eventbus.cli import main
from eventbus.errors import SinkConfigError, SinkError, SpoolError
from eventbus.events import BaseEvent, encode_json
from eventbus.registry import register_sink, unregister_sink
from eventbus.replay import read_events, replay
from eventbus.spool import Spool
from tests.conftest import require_module


class Target(Sink):
    """A sink the CLI builds by name; remembers its instances."""

    name = "replay-target"
    max_delay = 0.01
    instances: list["Target"] = []

    def __init__(self, label: str = "", delay: float = 0.0) -> None:
        self.label = label
        self.delay = delay
        self.got: list[BaseEvent] = []
        Target.instances.append(self)

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        self.got.extend(batch)


class Down(Sink):
    name = "replay-down"
    max_retries = 0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        raise ConnectionError("still down")


@pytest.fixture
def registered():
    Target.instances = []
    register_sink("replay-target", Target)
    register_sink("replay-down", Down)
    yield
    unregister_sink("replay-target")
    unregister_sink("replay-down")


def spool_of(tmp_path, n: int):
    """A spool directory as a run whose backend was down leaves it."""

    class Gone(Sink):
        name = "mlflow"
        spool = True
        max_retries = 0
        circuit_threshold = 1
        circuit_cooldown = 3600

        async def write(self, batch):
            raise ConnectionError("down")

    bus = EventBus([Gone()], run=RunInfo(output_dir=str(tmp_path)), flush_interval=0.01)
    with bus:
        bus.publish(TrainBegin(step=0, config={"lr": 0.1}))
        for i in range(n):
            bus.publish(Log(step=i, values={"loss": 1.0 / (i + 1)}))
        deadline = time.monotonic() + 20
        while bus.stats().sinks["mlflow"].spooled < n + 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    return tmp_path / "spool" / "mlflow"


def test_replay_a_spool_directory_in_order(tmp_path):
    d = spool_of(tmp_path, 25)
    t = Target()
    res = replay(d, t)
    assert isinstance(t.got[0], TrainBegin) and t.got[0].config == {"lr": 0.1}
    assert [e.step for e in t.got[1:]] == list(range(25))
    assert t.got[3].values == {"loss": 1.0 / 3}
    assert (res.read, res.sent, res.skipped, res.failed, res.unreadable, res.mark) == (26, 26, 0, 0, 0, 24)
    # Replay does not consume the spool: a resumed run still finds it.
    assert Spool(d).pending == 26


def test_replay_one_spool_file(tmp_path):
    d = spool_of(tmp_path, 5)
    (f,) = sorted(d.glob("*.spool"))
    t = Target()
    res = replay(f, t)
    assert res.sent == 6 and [e.step for e in t.got[1:]] == list(range(5))


def test_replay_skips_a_spool_file_with_a_bad_header_with_a_warning_as_the_bus_does(tmp_path, registered, capsys, caplog):
    d = tmp_path / "spool"
    sp = Spool(d, max_file_bytes=1024)
    for i in range(60):
        sp.append([Log(step=i, values={"pad": "y" * 20})])
    sp.close()
    names = sorted(p.name for p in d.glob("*.spool"))
    assert len(names) >= 3
    bad = d / names[1]
    lost = sum(1 for _ in read_events(bad))
    with open(bad, "r+b") as f:
        f.write(b"\0" * 8)  # bit rot, a partial copy: not a spool file any more
    assert Spool(d).read(10_000).corrupt == 1  # the bus's own drain skips it
    t = Target()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        res = replay(d, t)
    assert [e.step for e in t.got] == [i for i in range(60) if not lost <= i < 2 * lost]
    assert (res.read, res.sent, res.failed, res.unreadable) == (60 - lost, 60 - lost, 0, 1)
    assert f"{bad} is not an eventbus spool file" in caplog.text and "skipped" in caplog.text
    # The CLI reports it as it reports any unreadable record: counted, exit status 0.
    assert main(["replay", str(d), "--to", "replay-target", "--resume-mark", "-1"]) == 0
    assert f"read {60 - lost}, sent {60 - lost}" in capsys.readouterr().out


def test_replay_a_jsonl_file_skipping_a_bad_line_with_a_warning(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    lines = [encode_json(Log(step=i, values={"loss": float(i)})) for i in range(4)]
    lines.insert(2, b'{"type": "Log", "step": "not a number"}')
    path.write_bytes(b"\n".join(lines) + b"\n\n")
    t = Target()
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        res = replay(path, t)
    assert [e.step for e in t.got] == [0, 1, 2, 3]
    assert (res.read, res.sent, res.unreadable) == (4, 4, 1)
    assert "line 3" in caplog.text


def test_replay_applies_backpressure_instead_of_dropping(tmp_path):
    path = tmp_path / "many.jsonl"
    n = 3000
    path.write_bytes(b"\n".join(encode_json(StepEnd(step=i)) for i in range(n)))
    t = Target(delay=0.001)
    t.capacity = 64
    t.max_batch_size = 16
    res = replay(path, t)
    assert (res.sent, res.failed) == (n, 0)
    assert [e.step for e in t.got] == list(range(n))


def test_replay_counts_what_a_sink_still_down_did_not_take(tmp_path):
    d = spool_of(tmp_path, 3)
    res = replay(d, Down(), timeout=30)
    assert (res.read, res.sent, res.failed) == (4, 0, 4)


def test_read_events_rejects_a_missing_path(tmp_path):
    with pytest.raises(SpoolError, match="nothing to replay"):
        list(read_events(tmp_path / "nope"))


def test_replay_needs_a_sink_instance(tmp_path):
    with pytest.raises(SinkConfigError, match="Sink instance"):
        replay(tmp_path, "mlflow")  # type: ignore[arg-type]


def test_cli_replays_to_a_named_sink_with_options(tmp_path, registered, capsys):
    d = spool_of(tmp_path, 7)
    rc = main(["replay", str(d), "--to", "replay-target", "--option", "label=backfill", "--option", "delay=0"])
    assert rc == 0
    (t,) = Target.instances
    assert t.label == "backfill" and t.delay == 0
    assert [e.step for e in t.got[1:]] == list(range(7))
    out = capsys.readouterr().out
    assert "read 8, sent 8, skipped 0" in out and "replay-target" in out


def test_cli_exit_status_is_non_zero_when_events_failed(tmp_path, registered, capsys):
    d = spool_of(tmp_path, 2)
    assert main(["replay", str(d), "--to", "replay-down", "--timeout", "20"]) == 1
    assert "failed 3" in capsys.readouterr().out


def test_cli_clear_errors(tmp_path, registered, capsys):
    assert main(["replay", str(tmp_path / "missing"), "--to", "replay-target"]) == 2
    assert "nothing to replay" in capsys.readouterr().err
    assert main(["replay", str(tmp_path), "--to", "no-such-sink"]) == 2
    err = capsys.readouterr().err
    assert "unknown sink 'no-such-sink'" in err and "replay-target" in err
    assert main(["replay", str(tmp_path), "--to", "replay-target", "--option", "api_key=sk-SECRET-123"]) == 2
    err = capsys.readouterr().err
    assert "api_key" in err and "sk-SECRET-123" not in err
    with pytest.raises(SystemExit):
        main(["replay", str(tmp_path), "--to", "replay-target", "--option", "novalue"])
    assert "key=value" in capsys.readouterr().err


def test_replay_the_jsonl_sinks_own_file_with_nan_and_a_resumed_run(tmp_path):
    """A file written by the real jsonl sink: an interrupted run (steps 0..5), then a
    resumed run from the checkpoint at step 3 that redid 4..5 and went on to 7."""
    jsonl = require_module("sinks.jsonl")
    out = tmp_path / "run"

    def run(events):
        sink = jsonl.JSONLSink(path=str(out / "events.jsonl"))
        with EventBus([sink], run=RunInfo(output_dir=str(out)), flush_interval=0.01) as bus:
            for ev in events:
                bus.publish(ev)

    run([TrainBegin(step=0)] + [Log(step=i, values={"loss": float(i), "gn": math.nan}) for i in range(6)])
    run(
        [TrainBegin(step=3, resumed_from=str(out / "checkpoint-3"))]
        + [Log(step=i, values={"loss": 10.0 + i, "gn": math.inf}) for i in range(4, 8)]
    )
    t = Target()
    res = replay(out / "events.jsonl", t)
    logs = [e for e in t.got if isinstance(e, Log)]
    assert [e.step for e in logs] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [e.values["loss"] for e in logs] == [0.0, 1.0, 2.0, 3.0, 14.0, 15.0, 16.0, 17.0]
    assert math.isnan(logs[0].values["gn"]) and logs[-1].values["gn"] == math.inf
    assert (res.read, res.superseded, res.sent) == (12, 2, 10)


def test_console_script_replays_a_spool_into_the_real_jsonl_sink(tmp_path):
    """``eventbus replay DIR --to jsonl --option path=...`` as a user types it."""
    jsonl = require_module("sinks.jsonl")
    d = spool_of(tmp_path, 12)
    dest = tmp_path / "backfill.jsonl"
    exe = Path(sys.executable).with_name("eventbus")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "eventbus"]
    proc = subprocess.run(
        cmd + ["replay", str(d), "--to", "jsonl", "--option", f"path={dest}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sent 13" in proc.stdout
    events = jsonl.read_jsonl(dest)
    assert [type(e).__name__ for e in events] == ["TrainBegin"] + ["Log"] * 12
    assert [e.step for e in events[1:]] == list(range(12))
    # A second replay sends no step twice: the mark kept in the spool's state.json.
    again = subprocess.run(
        cmd + ["replay", str(d), "--to", "jsonl", "--option", f"path={dest}"], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr
    # Nor the TrainBegin: the first replay delivered everything it read.
    assert "sent 0, skipped 13" in again.stdout
    assert [type(e).__name__ for e in jsonl.read_jsonl(dest)] == ["TrainBegin"] + ["Log"] * 12


def test_a_missing_path_is_the_first_error_and_names_what_there_is_to_replay(tmp_path, registered, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events-abc.jsonl").write_bytes(encode_json(Log(step=1, values={"loss": 1.0})) + b"\n")
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with pytest.raises(SpoolError, match="no such file") as info:
            replay(run / "events.jsonl", Target())
    assert str(run / "events-abc.jsonl") in str(info.value)
    # Checked before a bus opens the sink: nothing else is logged first.
    assert not [r for r in caplog.records if r.name.startswith("eventbus")]
    assert Target.instances[0].got == []


def test_a_runs_output_dir_is_not_read_as_an_empty_spool(tmp_path, registered, capsys):
    d = spool_of(tmp_path, 3)  # tmp_path is the run's output dir; its spool is spool/mlflow
    (tmp_path / "events-1.jsonl").write_bytes(b"")
    with pytest.raises(SpoolError, match="not a spool directory") as info:
        replay(tmp_path, Target())
    assert str(d) in str(info.value) and str(tmp_path / "events-1.jsonl") in str(info.value)
    assert main(["replay", str(tmp_path), "--to", "replay-target"]) == 2
    err = capsys.readouterr().err
    assert "not a spool directory" in err and str(d) in err
    # An empty directory says there is nothing in it either.
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpoolError, match="holds no spool files or .jsonl files"):
        replay(tmp_path / "empty", Target())
    # A spool directory that was fully delivered (state.json, no files left) still reads as empty.
    assert replay(d, Target()).read == 4


class CannotOpen(Sink):
    name = "replay-cannot-open"

    async def open(self, run):
        raise SinkConfigError("no destination; pass --option path=...")

    async def write(self, batch):
        raise AssertionError("never opened")


def test_a_sink_that_cannot_open_is_an_error_not_a_count_and_moves_no_mark(tmp_path, capsys):
    d = spool_of(tmp_path, 3)
    state = (d / "state.json").read_bytes()
    with pytest.raises(SinkError, match="could not be opened.*no destination; pass --option path="):
        replay(d, CannotOpen(), timeout=30)
    assert (d / "state.json").read_bytes() == state
    register_sink("replay-cannot-open", CannotOpen)
    try:
        assert main(["replay", str(d), "--to", "replay-cannot-open", "--timeout", "30"]) == 2
    finally:
        unregister_sink("replay-cannot-open")
    err = capsys.readouterr().err
    assert "eventbus replay: error: the replay-cannot-open sink could not be opened" in err


@pytest.mark.parametrize("bad", [-5, 0, math.inf, math.nan, "10", True])
def test_replay_timeout_must_be_a_positive_number_of_seconds(tmp_path, bad):
    d = spool_of(tmp_path, 1)
    with pytest.raises(ValueError, match="positive number of seconds"):
        replay(d, Target(), timeout=bad)


@pytest.mark.parametrize("bad", ["-5", "0", "inf", "nan", "soon"])
def test_cli_timeout_must_be_a_positive_number_of_seconds(tmp_path, registered, capsys, bad):
    with pytest.raises(SystemExit) as info:
        main(["replay", str(tmp_path), "--to", "replay-target", "--timeout", bad])
    assert info.value.code == 2
    assert "--timeout: a positive number of seconds" in capsys.readouterr().err


class Opened(Target):
    name = "replay-opened"
    runs: list[RunInfo] = []

    async def open(self, run):
        Opened.runs.append(run)


def test_a_replay_continues_the_run_that_wrote_its_source(tmp_path):
    d = spool_of(tmp_path, 2)
    Opened.runs = []
    replay(d, Opened())
    run_id = Spool(d).run_id
    assert run_id and Opened.runs[-1].run_id == run_id and Opened.runs[-1].resumed
    # A JSONL file: the run id of its events, the run name of its TrainBegin's config.
    f = tmp_path / "events.jsonl"
    f.write_bytes(
        encode_json(TrainBegin(run_id="abc123", step=0, config={"run_name": "sweep-7"})) + b"\n"
        + encode_json(Log(run_id="abc123", step=1, values={"loss": 1.0})) + b"\n"
    )
    replay(f, Opened())
    assert (Opened.runs[-1].run_id, Opened.runs[-1].run_name, Opened.runs[-1].resumed) == ("abc123", "sweep-7", True)
    # Events that name no run (a bus used on its own), in the jsonl sink's file,
    # whose name carries the run id: that run.
    h = tmp_path / "events-xyz789-rank1.jsonl"
    h.write_bytes(encode_json(Log(step=1, values={"loss": 1.0})) + b"\n")
    replay(h, Opened())
    assert (Opened.runs[-1].run_id, Opened.runs[-1].resumed) == ("xyz789", True)
    # Events that name no run, in a file that does not either: a run of the replay's own.
    g = tmp_path / "anonymous.jsonl"
    g.write_bytes(encode_json(Log(step=1, values={"loss": 1.0})) + b"\n")
    replay(g, Opened())
    assert Opened.runs[-1].run_name == "replay" and not Opened.runs[-1].resumed


class Flaky(Target):
    """Fails every write while ``down``."""

    name = "replay-flaky"
    max_retries = 0
    down = True

    async def write(self, batch):
        if Flaky.down:
            raise ConnectionError("down")
        await super().write(batch)


def test_non_metric_events_are_sent_again_only_until_a_replay_delivered_everything(tmp_path):
    d = spool_of(tmp_path, 3)
    Flaky.down = True
    assert replay(d, Flaky(), timeout=30).failed == 4
    Flaky.down = False
    first = Flaky()
    res = replay(d, first, timeout=30)
    # The failed replay recorded nothing: everything goes, TrainBegin included.
    assert [type(e).__name__ for e in first.got] == ["TrainBegin", "Log", "Log", "Log"] and res.failed == 0
    again = Flaky()
    res = replay(d, again, timeout=30)
    assert again.got == [] and (res.read, res.sent, res.skipped) == (4, 0, 4)
    # --resume-mark -1 (another destination): everything, TrainBegin included.
    other = Flaky()
    replay(d, other, resume_mark=-1, timeout=30)
    assert [type(e).__name__ for e in other.got] == ["TrainBegin", "Log", "Log", "Log"]


class Back(Sink):
    """The spool's own sink (name "mlflow"), back up: remembers what it got."""

    name = "mlflow"
    spool = True
    max_delay = 0.01

    def __init__(self) -> None:
        self.got: list[BaseEvent] = []

    async def write(self, batch):
        self.got.extend(batch)


def test_a_resumed_run_does_not_drain_again_what_a_replay_of_its_spool_delivered(tmp_path):
    d = spool_of(tmp_path, 3)
    run_id = Spool(d).run_id
    replayed = Back()
    assert replay(d, replayed).sent == 4
    assert [type(e).__name__ for e in replayed.got] == ["TrainBegin", "Log", "Log", "Log"]
    # The run resumes in the same output dir: its sink finds the spool still there
    # (replay does not consume it), and gets nothing twice, TrainBegin included.
    live = Back()
    with EventBus([live], run=RunInfo(run_id=run_id, output_dir=str(tmp_path), resumed=True), flush_interval=0.01) as bus:
        bus.publish(Log(run_id=run_id, step=3, values={"loss": 0.1}))
    assert [(type(e).__name__, e.step) for e in live.got] == [("Log", 3)]
    st = bus.stats().sinks["mlflow"]
    assert (st.received, st.delivered, st.skipped) == (5, 1, 4)


def test_a_spool_a_live_run_holds_is_not_replayed(tmp_path, registered, capsys):
    # Its bus delivers what the spool holds once the sink is back: a replay meanwhile
    # would send all of it twice.
    d = spool_of(tmp_path, 3)

    class Live(Back):
        async def write(self, batch):
            raise ConnectionError("still down")

    live = Live()
    live.max_retries = 0
    bus = EventBus([live], run=RunInfo(run_id=Spool(d).run_id, output_dir=str(tmp_path), resumed=True)).start()
    try:
        with pytest.raises(SpoolError, match="in use by a live run"):
            replay(d, Target())
        assert main(["replay", str(d), "--to", "replay-target"]) == 2
        assert "in use by a live run" in capsys.readouterr().err
        assert Target.instances[-1].got == []
    finally:
        bus.close(5)
    assert replay(d, Target()).sent == 4  # once that run has ended
