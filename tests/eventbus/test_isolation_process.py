"""Process isolation (``Sink.isolate``): the sink's hooks run in a child process, the
bus's queueing, retries and stats work unchanged, a dead child is restarted, a hung
one is terminated by the close deadline, and a child outlives neither its parent nor
a Ctrl-C of its own.

The sinks here live in this module, which the child imports to unpickle them: it
imports nothing heavier than eventbus and pytest (no torch).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import pytest

from eventbus import EventBus, Log, RunInfo, Sink, StepEnd, ThreadedSink, TransientSinkError
from eventbus.errors import SinkConfigError
from eventbus.events import BaseEvent
from eventbus.isolation import ProcessSink

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]




class FileSink(ThreadedSink):
    """Appends ``<type> <step> <pid>`` per event to ``path``; in open, imports the
    module ``sdk`` (a stand-in for a backend SDK) and notes what the process holds."""

    events = (Log, StepEnd)

    def __init__(self, name: str, path: str, sdk: str | None = None, **opts: Any) -> None:
        self.name = name  # type: ignore[misc]
        self.path = path
        self.sdk = sdk
        self.child_pid: int | None = None
        self.isolate = True
        self.max_delay = 0.0
        self.retry_backoff = 0.01
        for k, v in opts.items():
            setattr(self, k, v)

    def open_sync(self, run: RunInfo) -> None:
        if self.sdk:
            __import__(self.sdk)
        self.child_pid = os.getpid()  # copied back to the parent's instance
        with open(self.path + ".open", "a") as f:
            f.write(f"{os.getpid()} sdk={self.sdk in sys.modules} torch={'torch' in sys.modules} run={run.run_id}\n")
        logging.getLogger("tests.isolation").warning("opened in pid %d", os.getpid())

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        with open(self.path, "a") as f:
            f.writelines(f"{type(ev).__name__} {ev.step} {os.getpid()}\n" for ev in batch)

    def close_sync(self) -> None:
        with open(self.path + ".closed", "a") as f:
            f.write(f"{os.getpid()}\n")


def read_lines(path: str) -> list[list[str]]:
    with open(path) as f:
        return [line.split() for line in f]


def test_isolated_sink_writes_every_event_in_order_from_its_own_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A module only the child may import: the SDK stays out of the training process.
    sdk = f"fake_sdk_{os.getpid()}"
    (tmp_path / f"{sdk}.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = str(tmp_path / "events.txt")
    sink = FileSink("file", path, sdk=sdk, max_batch_size=7)
    caplog.set_level(logging.WARNING, logger="tests.isolation")
    n = 500
    with EventBus([sink], run=RunInfo(run_id="run-iso")) as bus:
        [proxy] = bus.sinks
        assert isinstance(proxy, ProcessSink) and proxy.sink is sink
        assert (proxy.name, proxy.events, proxy.max_batch_size) == ("file", (Log, StepEnd), 7)
        wait_for(lambda: proxy.opened, what="the child to open the sink")
        assert sink.child_pid is not None  # set by open() in the child, copied back
        pid = proxy.pid
        # Ctrl-C reaches the whole process group; the child ignores it (the parent shuts down in order).
        os.kill(pid, signal.SIGINT)
        for i in range(n):
            bus.publish(Log(step=i, values={"loss": float(i)}) if i % 2 else StepEnd(step=i))
    stats = bus.stats().sinks["file"]
    assert (stats.received, stats.delivered, stats.dropped, stats.failed, stats.errors, stats.retries) == (n, n, 0, 0, 0, 0)
    lines = read_lines(path)
    assert [(t, int(s)) for t, s, _ in lines] == [("Log" if i % 2 else "StepEnd", i) for i in range(n)]
    assert {p for _, _, p in lines} == {str(pid)} and pid != os.getpid() and sink.child_pid == pid
    assert read_lines(path + ".open") == [[str(pid), "sdk=True", "torch=False", "run=run-iso"]]
    assert read_lines(path + ".closed") == [[str(pid)]]
    assert sdk not in sys.modules  # imported in the child only
    # The child's log records reach the parent's loggers.
    assert [r.getMessage() for r in caplog.records if r.name == "tests.isolation"] == [f"opened in pid {pid}"]
    assert proxy.process is None and not proxy.opened  # the child exited and was reaped at close


class FlakySink(ThreadedSink):
    """Raises ``exc`` on its first ``fail_times`` writes (state kept in the child)."""

    events = (Log,)

    def __init__(self, name: str, exc: BaseException, fail_times: int, path: str, transient_types: tuple[type, ...] = ()) -> None:
        self.name = name  # type: ignore[misc]
        self.exc = exc
        self.fail_times = fail_times
        self.path = path
        self.transient_types = transient_types
        self.calls = 0
        self.isolate = True
        self.max_delay = 0.0
        self.retry_backoff = 0.0
        self.max_retries = 5
        self.max_batch_size = 10_000

    def is_transient(self, exc: BaseException) -> bool:
        return isinstance(exc, self.transient_types) or super().is_transient(exc)

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        self.calls += 1
        if self.calls <= self.fail_times:
            raise self.exc
        with open(self.path, "a") as f:
            f.writelines(f"{ev.step}\n" for ev in batch)


def test_errors_in_the_child_are_classified_by_the_sink_retried_and_counted(tmp_path: Path) -> None:
    n = 20
    transient = FlakySink("transient", TransientSinkError("busy", retry_after=0.0), 2, str(tmp_path / "t"))
    # KeyError is transient only because this sink's is_transient says so: the child asks it.
    own = FlakySink("own", KeyError("later"), 3, str(tmp_path / "o"), transient_types=(KeyError,))
    permanent = FlakySink("permanent", ValueError("bad value"), 10**9, str(tmp_path / "p"))
    bus = EventBus([transient, own, permanent])
    for i in range(n):  # before start: one batch of n per sink
        bus.publish(Log(step=i, values={"x": i}))
    bus.start()
    stats = bus.close(timeout=30).sinks
    t, o, p = stats["transient"], stats["own"], stats["permanent"]
    assert (t.delivered, t.failed, t.errors, t.retries) == (n, 0, 2, 2)
    assert (o.delivered, o.failed, o.errors, o.retries) == (n, 0, 3, 3)
    assert (p.delivered, p.failed, p.dropped, p.errors, p.retries) == (0, n, n, 1, 0)
    assert "ValueError: bad value" in p.last_error and "SinkError" in p.last_error
    assert "KeyError" in o.last_error and "TransientSinkError" in o.last_error
    assert [int(x) for x in open(tmp_path / "t").read().split()] == list(range(n))
    assert [int(x) for x in open(tmp_path / "o").read().split()] == list(range(n))
    assert not (tmp_path / "p").exists()


class RetrySeesSameBatch(ThreadedSink):
    """Fails its first write; writes to ``path`` whether the retry got the very list
    that failed (what an in-process sink gets, and what MLflowSink resumes by)."""

    name = "same-batch"
    events = (Log,)
    isolate = True
    max_delay = 0.0
    retry_backoff = 0.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._failed: Any = None

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        if self._failed is None:
            self._failed = batch
            raise TransientSinkError("once")
        with open(self.path, "w") as f:
            f.write(f"{batch is self._failed} {len(batch)}")


def test_a_retried_batch_reaches_the_isolated_sink_as_the_same_list(tmp_path: Path) -> None:
    path = str(tmp_path / "same")
    bus = EventBus([RetrySeesSameBatch(path)])
    for i in range(5):  # before start: one batch
        bus.publish(Log(step=i, values={"x": i}))
    bus.start()
    stats = bus.close(timeout=30).sinks["same-batch"]
    assert (stats.delivered, stats.retries) == (5, 1)
    assert open(path).read() == "True 5"


def test_a_killed_child_is_restarted_and_its_batch_retried(tmp_path: Path) -> None:
    path = str(tmp_path / "events.txt")
    sink = FileSink("file", path)
    with EventBus([sink]) as bus:
        [proxy] = bus.sinks
        for i in range(10):
            bus.publish(Log(step=i, values={}))
        wait_for(lambda: bus.stats().sinks["file"].delivered == 10, what="the first events")
        first = proxy.process
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        for i in range(10, 25):
            bus.publish(Log(step=i, values={}))
        wait_for(lambda: bus.stats().sinks["file"].delivered == 25, what="delivery after the restart")
        second = proxy.pid
    stats = bus.stats().sinks["file"]
    assert (stats.received, stats.delivered, stats.failed, stats.dropped, stats.errors, stats.retries) == (25, 25, 0, 0, 1, 1)
    assert "ConnectionError" in stats.last_error and f"pid {first.pid}" in stats.last_error
    lines = read_lines(path)
    assert [int(s) for _, s, _ in lines] == list(range(25))  # nothing lost, nothing twice
    assert {p for _, s, p in lines if int(s) < 10} == {str(first.pid)}
    assert {p for _, s, p in lines if int(s) >= 10} == {str(second)} and second != first.pid
    # The sink was opened again in the new child, and closed there.
    assert [line[0] for line in read_lines(path + ".open")] == [str(first.pid), str(second)]
    assert read_lines(path + ".closed") == [[str(second)]]


class HangingSink(ThreadedSink):
    """Ignores SIGTERM, then hangs in its first write (after touching ``path``)."""

    events = (Log,)
    isolate = True
    max_delay = 0.0

    def __init__(self, path: str) -> None:
        self.path = path

    def open_sync(self, run: RunInfo) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # so that only SIGKILL ends it

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        Path(self.path).touch()
        time.sleep(3600)


def test_a_hanging_child_is_terminated_by_the_close_deadline(tmp_path: Path) -> None:
    flag = tmp_path / "writing"
    bus = EventBus([HangingSink(str(flag))]).start()
    [proxy] = bus.sinks
    for i in range(5):
        bus.publish(Log(step=i, values={}))
    wait_for(flag.exists, what="the child to enter write")
    proc = proxy.process
    assert proc is not None and proc.poll() is None
    t0 = time.monotonic()
    stats = bus.close(timeout=1.0)
    assert time.monotonic() - t0 < 5.0  # generous: the deadline is 1 s
    s = stats.sinks["sink"]
    assert (s.delivered, s.abandoned, s.dropped) == (0, 5, 5)
    # SIGTERM is ignored by this sink: the child is killed KILL_GRACE seconds later.
    wait_for(lambda: proc.poll() is not None, timeout=15, what="the child to be killed")
    assert proc.returncode == -signal.SIGKILL


def test_the_proxy_reads_and_writes_the_wrapped_sinks_settings(tmp_path: Path) -> None:
    sink = FileSink("file", str(tmp_path / "x"), capacity=50, spool=True, spool_dir=str(tmp_path / "spool"))
    bus = EventBus([sink])  # never started: no child
    [proxy] = bus.sinks
    assert isinstance(proxy, ProcessSink) and not proxy.opened and proxy.pid is None
    assert (proxy.capacity, proxy.spool, proxy.max_delay, proxy.retry_backoff) == (50, True, 0.0, 0.01)
    assert proxy.spool_dir == str(tmp_path / "spool")
    sink.capacity = 7  # after attaching, as before start is allowed
    proxy.max_retries = 2
    assert (proxy.capacity, sink.max_retries) == (7, 2)
    assert proxy.path == sink.path  # other attributes read through too
    assert "ProcessSink" in repr(proxy) and "file" in repr(proxy)
    bus.close()
    # The bus asks the proxy whether its sink samples an event type.
    sink = FileSink("bar", str(tmp_path / "y"), events=(StepEnd,), sampled=(StepEnd,), max_delay=0.5)
    bus = EventBus([sink])
    [proxy] = bus.sinks
    assert isinstance(proxy, ProcessSink) and proxy.sampled == (StepEnd,)
    assert bus.sample_interval(StepEnd) == 0.5
    bus.close()


class Unpicklable(Sink):
    """Holds a lock: cannot be sent to a child process."""

    name = "locked"
    isolate = True

    def __init__(self) -> None:
        self.lock = threading.Lock()

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        pass


def test_an_unpicklable_sink_is_a_clear_error_when_attached() -> None:
    with pytest.raises(SinkConfigError) as info:
        EventBus([Unpicklable()])
    message = str(info.value)
    assert "'locked'" in message and "pickled" in message and "isolate=False" in message
    bus = EventBus()
    bad = Unpicklable()
    bad.isolate = False  # in-process: fine
    bus.add_sink(bad)
    assert bus.sinks == [bad]


class Preferring(Sink):
    """Isolated by preference only (as the library's SDK sinks are); ``lock``: holds
    one, and so cannot be pickled."""

    name = "preferring"
    isolate = True
    isolate_optional = True

    def __init__(self, lock: bool = False) -> None:
        if lock:
            self.lock = threading.Lock()

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        pass


def test_isolation_by_preference_falls_back_to_this_process_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="eventbus")
    # picklable: isolated, as preferred
    [proxy] = EventBus([Preferring()]).sinks
    assert isinstance(proxy, ProcessSink)
    # cannot be pickled: runs here, and the log says so
    here = Preferring(lock=True)
    assert EventBus([here]).sinks == [here]
    assert "'preferring' runs in this process" in caplog.text and "pickled" in caplog.text
    # its class in __main__ (a child would run the user's script to import it): here too
    scripted = type("Scripted", (Preferring,), {"__module__": "__main__"})()
    assert EventBus([scripted]).sinks == [scripted]
    assert "defined in __main__" in caplog.text
    # asked for on the instance, isolation must work: the error, as without the preference
    asked = Preferring(lock=True)
    asked.isolate = True
    with pytest.raises(SinkConfigError, match="cannot be pickled"):
        EventBus([asked])


@pytest.mark.parametrize("value", [1, "yes", None])
def test_a_bad_isolate_optional_is_a_clear_error(value: Any) -> None:
    sink = Preferring()
    sink.isolate_optional = value
    with pytest.raises(SinkConfigError, match="isolate_optional must be True or False"):
        EventBus([sink])


class AsyncFileSink(Sink):
    """An async sink: its hooks run on one event loop in the child."""

    name = "async"
    events = (Log,)
    isolate = True
    max_delay = 0.0

    def __init__(self, path: str) -> None:
        self.path = path

    async def open(self, run: RunInfo) -> None:
        import asyncio

        self.loop_id = id(asyncio.get_running_loop())  # type: ignore[attr-defined]

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        import asyncio

        await asyncio.sleep(0)
        with open(self.path, "a") as f:
            same = id(asyncio.get_running_loop()) == self.loop_id  # type: ignore[attr-defined]
            f.writelines(f"{ev.step} {same}\n" for ev in batch)


def test_an_async_sink_runs_on_one_loop_in_the_child(tmp_path: Path) -> None:
    path = str(tmp_path / "a.txt")
    with EventBus([AsyncFileSink(path)]) as bus:
        for i in range(30):
            bus.publish(Log(step=i, values={}))
            if i == 10:
                wait_for(lambda: bus.stats().sinks["async"].delivered == 11, what="a first batch")
    assert bus.stats().sinks["async"].delivered == 30
    assert read_lines(path) == [[str(i), "True"] for i in range(30)]


def test_the_child_closes_its_sink_and_exits_when_the_parent_dies(tmp_path: Path) -> None:
    # A parent process that opens an isolated sink and is then SIGKILLed.
    path = str(tmp_path / "events.txt")
    child = _child_of_a_killed_parent(f'FileSink("file", {path!r})', path)
    wait_for(lambda: _gone(child), timeout=20, what="the orphaned child to exit")
    assert read_lines(path) == [["Log", "1", str(child)]]
    assert read_lines(path + ".closed") == [[str(child)]]  # it closed the sink first


class HangsInWrite(FileSink):
    """Its write hangs (a stuck tracking server), after touching ``<path>.writing``."""

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        Path(self.path + ".writing").touch()
        time.sleep(3600)


def _child_of_a_killed_parent(sink: str, wait_for_file: str) -> int:
    """Run a parent process that attaches ``sink`` (source text, a class of this
    module) to a bus, publishes one Log, waits for ``wait_for_file`` to exist, and is
    then SIGKILLed; returns the pid of the isolated sink's child it left behind."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "src")!r}]
        from eventbus import EventBus, Log
        from tests.eventbus.test_isolation_process import FileSink, HangsInWrite
        bus = EventBus([{sink}]).start()
        bus.publish(Log(step=1, values={{}}))
        while not os.path.exists({wait_for_file!r}):
            time.sleep(0.01)
        print(bus.sinks[0].pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    parent = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    return int(parent.stdout.split()[0])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # exited but not reaped yet (a zombie): gone as well
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_the_child_exits_when_the_parent_dies_during_a_write_that_hangs(tmp_path: Path) -> None:
    # The request loop cannot see the parent go while the sink's write hangs: a
    # thread of the child watches it, closes the sink (on a thread of its own) and exits.
    path = str(tmp_path / "events.txt")
    child = _child_of_a_killed_parent(f'HangsInWrite("file", {path!r}, write_timeout=None)', path + ".writing")
    try:
        wait_for(lambda: _gone(child), timeout=20, what="the orphaned child stuck in a write to exit")
    finally:
        if not _gone(child):
            os.kill(child, signal.SIGKILL)
    assert read_lines(path + ".closed") == [[str(child)]]  # it closed the sink first


class Unavailable(FileSink):
    """A backend that answers 503 to every write."""

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        raise TransientSinkError("HTTP 503")


def test_the_close_deadline_during_a_retry_backoff_closes_the_sink_in_its_child_which_exits(tmp_path: Path) -> None:
    path = str(tmp_path / "events.txt")
    bus = EventBus([Unavailable("unavailable", path, retry_backoff=30.0)], flush_interval=0.01).start()
    [proxy] = bus.sinks
    for i in range(5):
        bus.publish(Log(step=i, values={}))
    wait_for(lambda: bus.stats().sinks["unavailable"].retries == 1, what="the first retry backoff")
    proc = proxy.process
    assert proc is not None
    try:
        t0 = time.monotonic()
        stats = bus.close(timeout=1.0)
        assert time.monotonic() - t0 < 3.0  # generous: the deadline is 1 s
        assert stats.sinks["unavailable"].abandoned == 5
        # Not left behind: the idle child is asked to close the sink, and exits.
        wait_for(lambda: proc.poll() is not None, timeout=15, what="the child to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert read_lines(path + ".closed") == [[str(proc.pid)]]


def test_a_sink_class_defined_in_a_script_runs_isolated(tmp_path: Path) -> None:
    # The child imports the script as __mp_main__ (as multiprocessing's spawn does),
    # so its class unpickles there; the guarded part does not run again.
    out = tmp_path / "out.txt"
    script = tmp_path / "train_script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.path[:0] = [{str(ROOT / "src")!r}]
            from eventbus import EventBus, Log, ThreadedSink

            class ScriptSink(ThreadedSink):
                name = "script"
                isolate = True
                max_delay = 0.0

                def write_sync(self, batch):
                    with open({str(out)!r}, "a") as f:
                        f.writelines(f"{{ev.step}} {{os.getpid()}} {{__name__}}\\n" for ev in batch)

            if __name__ == "__main__":
                with open({str(out)!r} + ".main", "a") as f:
                    f.write(f"{{os.getpid()}}\\n")
                with EventBus([ScriptSink()]) as bus:
                    for i in range(3):
                        bus.publish(Log(step=i, values={{}}))
                print(bus.stats().sinks["script"].delivered, flush=True)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["3"]
    [main_pid] = (out.parent / (out.name + ".main")).read_text().split()
    lines = read_lines(str(out))
    assert [s for s, _, _ in lines] == ["0", "1", "2"]
    assert {(p, m) for _, p, m in lines} == {(lines[0][1], "__mp_main__")} and lines[0][1] != main_pid


class NicenessSink(ThreadedSink):
    """Notes the CPU niceness of the process that opens it (copied back to the parent)."""

    events = (Log,)

    def __init__(self, name: str, **opts: Any) -> None:
        self.name = name  # type: ignore[misc]
        self.isolate = True
        self.niceness: int | None = None
        for k, v in opts.items():
            setattr(self, k, v)

    def open_sync(self, run: RunInfo) -> None:
        self.niceness = os.nice(0)

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        pass


def test_the_child_runs_below_the_training_process_cpu_priority() -> None:
    parent = os.nice(0)
    lowered, same = NicenessSink("lowered"), NicenessSink("same", isolate_nice=0)
    with EventBus([lowered, same]) as bus:
        for proxy in bus.sinks:
            wait_for(lambda p=proxy: p.opened, what="the children to open")
    assert os.nice(0) == parent  # the parent's own priority is untouched
    assert lowered.niceness == min(parent + 10, 19)
    assert same.niceness == parent


@pytest.mark.parametrize("value", [-1, 20, 2.5, True])
def test_a_bad_isolate_nice_is_a_clear_error(value: Any) -> None:
    with pytest.raises(SinkConfigError, match="isolate_nice"):
        EventBus([NicenessSink("bad", isolate_nice=value)])


def test_a_signal_to_the_training_process_s_group_does_not_reach_the_child(tmp_path: Path) -> None:
    # torchrun stops a worker with killpg(SIGTERM); a trainer handles SIGTERM and
    # closes its bus in order. The isolated child must still be there to get the
    # events and close its sink (with what its SDK buffers).
    path = str(tmp_path / "events.txt")
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "src")!r}]
        from eventbus import EventBus, Log
        from tests.eventbus.test_isolation_process import FileSink
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        bus = EventBus([FileSink("file", {path!r})]).start()
        while not bus.sinks[0].opened:
            time.sleep(0.01)
        os.killpg(os.getpgrp(), signal.SIGTERM)  # as torchrun does to a worker
        while not stop:
            time.sleep(0.01)
        bus.publish(Log(step=1, values={{}}))
        s = bus.close(30).sinks["file"]
        print(s.delivered, s.failed, s.errors)
        """
    )
    # In a session of its own, so that its killpg reaches nothing of this test's.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90, start_new_session=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "0", "0"], done.stderr
    [[_, _, child]] = read_lines(path)
    assert read_lines(path + ".closed") == [[child]]  # closed in order, not killed
