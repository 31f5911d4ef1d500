"""The fault matrix, through the real Trainer: a sink that raises (always, sometimes),
hangs, or is 100x slower than the producer; an MLflow backend (the loopback fault
server) that answers 500, 429 with Retry-After, 401, resets the connection or never
answers; a full spool disk; a spool file corrupted in the middle.

In every case: training completes, publish never blocks (the training thread's
longest single ``publish`` stays far below a step), a healthy witness sink gets every
event published, and for the affected sink
``received == delivered + spooled + dropped`` with ``queue_depth == 0`` after close,
with exact counts where the scenario makes them deterministic.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from typing import Any, Callable, Sequence

import anyio
import pytest

from eventbus import EventBus, Log, Overflow, Sink, ThreadedSink, TrainEnd
from eventbus.events import BaseEvent
from eventbus.replay import replay
from eventbus.spool import Spool, read_spool
from sinks.mlflow import MLflowSink
from tests._faultserver import FaultServer, no_mlflow_env, server  # noqa: F401 (fixtures)
from tests.eventbus.test_spool_faults import _corrupt_record
from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
from trainer import Trainer

TRAIN = make_dataset(32)
TOKEN = "tok-FAULTMATRIX-9f8e7d"
PUBLISH_BOUND_S = 0.1
"""A generous bound on one publish() (a deque append): it never waits for a sink."""


# -- sinks ---------------------------------------------------------------------------


class Witness(Sink):
    """Healthy: records every event."""

    name = "witness"
    max_delay = 0.01

    def __init__(self) -> None:
        self.got: list[BaseEvent] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.got.extend(batch)


class Faulty(Sink):
    """Records what it accepted; ``fail(call_index, batch)`` says whether to raise."""

    name = "faulty"
    max_delay = 0.01
    max_batch_size = 4  # several writes even when the whole run lands in one drain
    retry_backoff = 0.001
    retry_backoff_max = 0.005

    def __init__(self, exc: BaseException | None = None, every: int = 0) -> None:
        self.exc = exc
        self.every = every  # 0: always raise; n: every n-th call raises
        self.calls = 0
        self.raised = 0
        self.got: list[BaseEvent] = []
        self.lost: list[BaseEvent] = []  # batches of calls that raised

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.calls += 1
        if self.exc is not None and (self.every == 0 or self.calls % self.every == 0):
            self.raised += 1
            self.lost.extend(batch)
            raise self.exc
        self.got.extend(batch)


class Hangs(Sink):
    """An async write that never returns (a hung network call)."""

    name = "hangs"
    write_timeout = 0.1
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 3600.0

    def __init__(self) -> None:
        self.calls = 0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.calls += 1
        await anyio.sleep_forever()


class BlockingHangs(ThreadedSink):
    """A blocking SDK call that never returns: its thread is stuck, not the loop."""

    name = "blocking"
    write_timeout = 0.1
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 3600.0

    def __init__(self) -> None:
        self.release = threading.Event()

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        self.release.wait(60)


class Slow(Sink):
    """One event per write, each taking ``delay`` seconds (far slower than the loop).
    Asynchronous, so that the close deadline cancels a write cleanly: an event is
    either in ``got`` (delivered) or spooled, never both."""

    name = "slow"
    max_batch_size = 1
    capacity = 4
    overflow = Overflow.SPOOL
    max_delay = 0.0

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.got: list[BaseEvent] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        await anyio.sleep(self.delay * len(batch))
        self.got.extend(batch)


class Down(Sink):
    """A backend that is down: every write raises a transient error; spools."""

    name = "down"
    spool = True
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 3600.0
    max_delay = 0.01

    def __init__(self, down: bool = True) -> None:
        self.down = down
        self.got: list[BaseEvent] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        if self.down:
            raise ConnectionError("backend unreachable")
        self.got.extend(batch)


# -- the harness ---------------------------------------------------------------------


class PublishTimer:
    """Wraps ``EventBus.publish`` and ``EventBus.publish_log`` (every bus the run
    opens) to time each call."""

    def __init__(self) -> None:
        self.real = (EventBus.publish, EventBus.publish_log)
        self.calls = 0
        self.longest = 0.0

    def _timed(self, real: Callable[..., None]) -> Callable[..., None]:
        def call(bus: EventBus, *args: Any) -> None:
            t0 = time.perf_counter()
            real(bus, *args)
            dt = time.perf_counter() - t0
            self.calls += 1
            if dt > self.longest:
                self.longest = dt

        return call

    def __enter__(self) -> PublishTimer:
        EventBus.publish = self._timed(self.real[0])  # type: ignore[method-assign]
        EventBus.publish_log = self._timed(self.real[1])  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        EventBus.publish, EventBus.publish_log = self.real  # type: ignore[method-assign]


class Run:
    """One training run's outcome."""

    def __init__(self, trainer: Trainer, witness: Witness, timer: PublishTimer, wall: float) -> None:
        self.trainer = trainer
        self.witness = witness
        self.timer = timer
        self.wall = wall
        self.stats = trainer.bus.stats()
        self.published = self.stats.published

    def sink(self, name: str) -> Any:
        return self.stats.sinks[name]

    def subscribed(self, sink: Sink) -> int:
        """How many of the published events ``sink`` subscribes to."""
        return sum(1 for e in self.witness.got if type(e) in sink.events)


def train(tmp_path: Any, sinks: list[Sink], *, resume: str | None = None, **kw: Any) -> Run:
    args = tiny_args(tmp_path / "out", **{"max_steps": 6, "bus_close_timeout": 2.0, **kw})
    witness = Witness()
    t = Trainer(TinyClassifier(), args, train_dataset=TRAIN, sinks=[witness, *sinks])
    t0 = time.monotonic()
    with PublishTimer() as timer:
        out = t.train(resume_from_checkpoint=resume)
    wall = time.monotonic() - t0
    run = Run(t, witness, timer, wall)
    # Training completed, publish never blocked, the witness got every event.
    assert out.global_step == args.max_steps and t.state.global_step == args.max_steps
    assert not t.bus.running
    assert timer.calls == run.published and run.stats.ingress_dropped == 0
    assert timer.longest < PUBLISH_BOUND_S, f"a publish took {timer.longest * 1e3:.1f} ms"
    w = run.sink("witness")
    assert len(witness.got) == run.published == w.received == w.delivered and w.dropped == 0
    assert isinstance(witness.got[-1], TrainEnd) and witness.got[-1].status == "completed"
    for s in run.stats.sinks.values():
        assert s.queue_depth == 0, s
        assert s.received == s.delivered + s.spooled + s.dropped, s
    return run


def counts(s: Any) -> tuple[int, int, int, int, int]:
    return (s.received, s.delivered, s.spooled, s.dropped, s.failed)


def keys(events: Sequence[BaseEvent]) -> list[tuple[str, int]]:
    return [(type(e).__name__, e.step) for e in events]


# -- sinks that misbehave ------------------------------------------------------------


def test_a_sink_that_always_raises(tmp_path, caplog):
    sink = Faulty(RuntimeError("broken sink"))
    run = train(tmp_path, [sink])
    n = run.published
    assert counts(run.sink("faulty")) == (n, 0, 0, n, n)
    assert sink.got == [] and len(sink.lost) <= n  # the open circuit spares it calls
    assert "broken sink" in (run.sink("faulty").last_error or "")
    # Logged at a bounded rate, not once per failure.
    assert 1 <= sum("broken sink" in r.getMessage() for r in caplog.records) <= 2


def test_a_sink_that_sometimes_raises_a_transient_error_loses_nothing(tmp_path):
    sink = Faulty(ConnectionError("blip"), every=2)
    sink.max_retries = 3
    run = train(tmp_path, [sink])
    n = run.published
    s = run.sink("faulty")
    assert counts(s) == (n, n, 0, 0, 0)
    assert s.retries == sink.raised >= 1
    # In order, each event exactly once: the failed attempts were retried, not doubled.
    assert keys(sink.got) == keys(run.witness.got)


def test_a_sink_that_sometimes_raises_a_permanent_error_loses_exactly_those_batches(tmp_path):
    sink = Faulty(ValueError("bad batch"), every=2)
    run = train(tmp_path, [sink])
    n = run.published
    lost = len(sink.lost)
    assert sink.raised >= 1 and lost >= 1
    assert counts(run.sink("faulty")) == (n, n - lost, 0, lost, lost)
    assert run.sink("faulty").retries == 0  # not transient: never retried
    assert Counter(keys(sink.got)) + Counter(keys(sink.lost)) == Counter(keys(run.witness.got))


def test_a_sink_that_hangs(tmp_path):
    sink = Hangs()
    run = train(tmp_path, [sink])
    n = run.published
    s = run.sink("hangs")
    assert (s.received, s.delivered, s.spooled, s.dropped) == (n, 0, 0, n)
    assert s.failed + s.abandoned == n
    assert sink.calls >= 1 and "TimeoutError" in (s.last_error or "")
    assert run.wall < 60  # a generous deadline bound: the close deadline held


def test_a_blocking_sdk_that_hangs_does_not_hold_the_loop(tmp_path):
    sink = BlockingHangs()
    try:
        run = train(tmp_path, [sink])
    finally:
        sink.release.set()
    n = run.published
    s = run.sink("blocking")
    assert (s.received, s.delivered, s.spooled, s.dropped) == (n, 0, 0, n)
    assert s.failed + s.abandoned == n
    assert run.wall < 60


def test_a_sink_100x_slower_than_the_producer_spools_and_loses_nothing(tmp_path):
    # The loop publishes an event every few tens of microseconds; this sink takes 20 ms
    # per event (>> 100x), with room for 4 in memory and the rest on disk.
    sink = Slow(delay=0.02)
    run = train(tmp_path, [sink], max_steps=8, bus_close_timeout=0.5)
    n = run.published
    s = run.sink("slow")
    assert (s.received, s.dropped, s.failed) == (n, 0, 0)
    assert s.delivered == len(sink.got) and s.delivered + s.spooled == n
    assert s.spooled > 0  # it could not keep up within the close deadline
    on_disk = list(read_spool(tmp_path / "out" / "spool" / "slow"))
    assert len(on_disk) == s.spooled
    # Every event is either delivered or on disk for a replay: none lost, none twice.
    assert Counter(keys(sink.got)) + Counter(keys(on_disk)) == Counter(keys(run.witness.got))


# -- an MLflow backend that misbehaves (the loopback fault server) ---------------------


def mlflow_sink(server: FaultServer, **kw: Any) -> MLflowSink:
    sink = MLflowSink(
        server.url,
        experiment_name="faults",
        token=TOKEN,
        timeout=kw.pop("timeout", 5.0),
        max_attempts=kw.pop("max_attempts", 3),
    )
    sink.retry_backoff = 0.01
    sink.retry_backoff_max = 0.05
    for k, v in kw.items():
        setattr(sink, k, v)
    return sink


def logged_metrics(events: Sequence[BaseEvent]) -> set[tuple[str, int]]:
    """(key, step) of every numeric value the Trainer logged."""
    return {
        (k, e.step)
        for e in events
        if isinstance(e, Log)
        for k, v in e.values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def server_metrics(server: FaultServer) -> set[tuple[str, int]]:
    """(key, step) of every metric the server holds; each exactly once."""
    (run,) = server.runs.values()
    got = Counter((m["key"], m["step"]) for m in run["metrics"])
    assert [k for k, c in got.items() if c > 1] == [], "a metric was logged twice"
    return set(got)


@pytest.mark.parametrize(
    "faults, sink_kw",
    [
        pytest.param([500, 503, 500], {"max_attempts": 2, "max_retries": 3}, id="500"),
        pytest.param([(429, {"Retry-After": "0.1"}), (429, {"Retry-After": "0"})], {}, id="429-retry-after"),
        pytest.param(["reset", "reset"], {}, id="connection-reset"),
        pytest.param(["hang"], {"timeout": 0.3}, id="never-answers"),
    ],
)
def test_mlflow_backend_errors_that_pass_lose_nothing_and_log_nothing_twice(tmp_path, server, faults, sink_kw, caplog):
    server.fail("/runs/log-batch", *faults)
    sink = mlflow_sink(server, **sink_kw)
    run = train(tmp_path, [sink])
    n = run.subscribed(sink)
    s = run.sink("mlflow")
    assert counts(s) == (n, n, 0, 0, 0)
    assert server_metrics(server) == logged_metrics(run.witness.got)  # each exactly once
    (mrun,) = server.runs.values()
    assert mrun["status"] == "FINISHED"
    assert server.count("/runs/log-batch") >= 1 + len(faults)
    assert TOKEN not in caplog.text


def test_mlflow_401_is_isolated_and_counted(tmp_path, server, caplog):
    server.valid_tokens = {"another-token"}
    sink = mlflow_sink(server, max_retries=0, circuit_threshold=1, circuit_cooldown=3600.0)
    run = train(tmp_path, [sink])
    n = run.subscribed(sink)
    s = run.sink("mlflow")
    assert counts(s) == (n, 0, 0, n, n)
    assert "401" in (s.last_error or "")
    assert server.runs == {} and TOKEN not in caplog.text and TOKEN not in (s.last_error or "")


def test_mlflow_down_for_the_whole_run_spools_everything_then_a_replay_delivers_it_once(tmp_path, server):
    server.fail("/experiments/get-by-name", *[503] * 1000)
    sink = mlflow_sink(server, max_attempts=1, max_retries=0, circuit_threshold=1, circuit_cooldown=3600.0)
    sink.spool = True
    run = train(tmp_path, [sink])
    n = run.subscribed(sink)
    assert counts(run.sink("mlflow")) == (n, 0, n, 0, 0)
    assert server.runs == {}
    spool_dir = tmp_path / "out" / "spool" / "mlflow"
    assert len(list(read_spool(spool_dir))) == n

    server.faults.clear()  # the server is back: replay what the run spooled
    result = replay(spool_dir, mlflow_sink(server), timeout=60)
    assert (result.sent, result.failed, result.unreadable) == (n, 0, 0)
    assert server_metrics(server) == logged_metrics(run.witness.got)
    (mrun,) = server.runs.values()
    assert mrun["status"] == "FINISHED"


# -- the spool's own faults ---------------------------------------------------------------


def test_the_spool_disk_is_full(tmp_path, monkeypatch, caplog):
    def enospc(self: Any, fd: Any, data: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "_write", enospc)
    sink = Down()
    with caplog.at_level(logging.ERROR, logger="eventbus"):
        run = train(tmp_path, [sink])
    n = run.published
    s = run.sink("down")
    assert counts(s) == (n, 0, 0, n, n)
    assert "spool" in (s.last_error or "")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "disk is full" in r.getMessage()]
    assert len(errors) == 1 and "training continues" in errors[0].getMessage()


def test_a_spool_file_corrupted_in_the_middle_is_drained_around_the_bad_record(tmp_path, caplog):
    # Run 1: the backend is down; everything is spooled; a checkpoint at step 4.
    first = Down()
    run1 = train(tmp_path, [first], max_steps=4, save_strategy="steps", save_steps=4)
    n1 = run1.published
    assert counts(run1.sink("down")) == (n1, 0, n1, 0, 0)
    spool_dir = tmp_path / "out" / "spool" / "down"
    (name,) = [f for f in os.listdir(spool_dir) if f.endswith(".spool")]
    bad = n1 // 2
    _corrupt_record(spool_dir / name, bad)

    # Run 2 resumes with the backend back: the leftover (less the bad record) first.
    second = Down(down=False)
    with caplog.at_level(logging.WARNING):
        run2 = train(tmp_path, [second], max_steps=8, resume=str(tmp_path / "out" / "checkpoint-4"))
    n2 = run2.published
    s = run2.sink("down")
    expected = [k for i, k in enumerate(keys(run1.witness.got)) if i != bad] + keys(run2.witness.got)
    assert keys(second.got) == expected
    assert (s.delivered, s.spooled, s.queue_depth) == (n1 - 1 + n2, 0, 0)
    assert s.received == s.delivered + s.dropped
    assert any("corrupt" in r.getMessage() for r in caplog.records)
