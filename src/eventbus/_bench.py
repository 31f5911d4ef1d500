"""The engine behind ``eventbus bench`` and ``benchmarks/overhead.py``: what the
training thread pays, per optimizer step, for callbacks and observers.

One step fires the hooks the loop fires around an optimizer step (``on_step_begin``,
``on_pre_optimizer_step``, ``on_optimizer_step``, ``on_step_end``, and ``on_log`` when
the flow sets ``should_log``). Only the time spent in those handler calls is counted;
between steps the thread spends ``gap`` seconds with the GIL released, a stand-in for
the forward and backward pass, so background threads (the bus, the sinks,
TensorBoard's writer) run when they would in training instead of queueing up behind
a tight loop. By default (``gap_kind="compute"``) the gap is one CPU matrix product
sized to last ``gap`` (torch releases the GIL inside it, as in a real step's kernels);
``gap_kind="sleep"`` sleeps instead, which on a virtual machine also lets the vCPU
halt, so every step then starts with cold caches (and reads 2.5 to 3 times slower
for both sides). The cost the background threads take from the training thread's
throughput is what ``benchmarks/training.py`` measures.

Each configuration runs in blocks of steps; ours and transformers' blocks alternate
in the same process (the order flips every repeat), and each side reports the median
of its blocks' means with their min and max.

This module imports ``trainer``, ``sinks``, torch and (when asked) transformers
lazily, inside functions: ``import eventbus`` never pays for it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from eventbus.events import Log
from eventbus.sink import ThreadedSink
from eventbus.values import Snapshot

__all__ = [
    "CONFIGS",
    "BACKEND_MODULES",
    "Measure",
    "Row",
    "OverheadResult",
    "ProfileResult",
    "SlowSink",
    "run_overhead",
    "profile_callbacks",
    "bench_sinks",
    "BENCH_SINK_NAMES",
    "import_checks",
    "trainer_backend_imports",
    "format_targets",
    "load_callback",
]

BACKEND_MODULES: tuple[str, ...] = ("tensorboard", "neptune", "comet_ml", "mlflow", "transformers", "lightning")
"""Backend SDKs that ``import trainer`` must not import."""

CONFIGS: dict[str, tuple[str, str]] = {
    "a": ("no callbacks", "no callbacks"),
    "b": ("flow + early stopping", "DefaultFlow + EarlyStopping"),
    "c": ("(b) + 6 sinks: progress, tensorboard, jsonl, neptune, comet, mlflow", "(b) + Progress + TensorBoard"),
    "d": ("(c) + a sink taking 20 ms per event", "(c) + a callback sleeping 20 ms in on_log"),
}
"""Configuration key -> (what ours runs, what transformers' handler runs)."""

SLOW_SECONDS = 0.02


class SlowSink(ThreadedSink):
    """Takes 20 ms per ``Log`` event, like a logger making a network call per log."""

    name = "slow20ms"  # type: ignore[assignment]
    events = (Log,)
    max_batch_size = 1
    # A short queue (the oldest are dropped, and counted): closing the bus then
    # waits at most about a second for this sink, not minutes.
    capacity = 50

    def write_sync(self, batch: Sequence[Any]) -> None:
        """Sleep 20 ms per event."""
        time.sleep(SLOW_SECONDS * len(batch))


# -- results ----------------------------------------------------------------------------


@dataclass
class Measure:
    """Microseconds per step on the step path (wall clock): the median of the blocks'
    means, the min and max over blocks; ``cpu`` the median of the blocks' mean CPU
    time of the training thread in the same calls (what the handler computes, without
    the time the OS gave other threads: the steadier figure on a busy machine, but
    blind to sleeps and waits); the steps per block and the number of blocks."""

    median: float
    min: float
    max: float
    cpu: float
    steps: int
    blocks: int
    walls: tuple[float, ...] = ()
    """Each block's wall mean, in the order measured (blocks of configurations
    measured together pair up by index: :attr:`OverheadResult.together`)."""

    @classmethod
    def of(cls, per_block: Sequence[tuple[float, float]], steps: int) -> Measure:
        """Summarise the per-block (wall, CPU) means."""
        wall = [w for w, _ in per_block]
        return cls(
            statistics.median(wall), min(wall), max(wall), statistics.median(c for _, c in per_block), steps, len(wall),
            tuple(wall),
        )

    def __str__(self) -> str:
        return f"{_fmt(self.median)} [{_fmt(self.min)}-{_fmt(self.max)}]"


@dataclass
class Row:
    """One configuration at one ``logging_steps``: ours and transformers' handler."""

    config: str
    logging_steps: int
    ours: Measure
    theirs: Measure | None = None

    @property
    def ratio(self) -> float | None:
        """How many times more the step path costs with transformers' handler."""
        if self.theirs is None or self.ours.median <= 0:
            return None
        return self.theirs.median / self.ours.median


@dataclass
class OverheadResult:
    """Everything one overhead run measured, plus what it ran against."""

    rows: list[Row]
    gap_s: float
    transformers: str | None
    """transformers' version, or why its handler did not run."""
    mlflow: str = ""
    """Which MLflow endpoint the mlflow sink talked to."""
    log_floats: bool = False
    """Our side logged Python floats instead of tensors."""
    timer_overhead_us: tuple[float, float] = (0.0, 0.0)
    """(wall, CPU) µs per step the clocks cost, already subtracted from every figure."""
    gap_kind: str = "compute"
    """What filled the gap between steps (:class:`Gap`)."""
    isolated: list[str] = field(default_factory=list)
    """The sinks that ran in a child process each."""
    notes: list[str] = field(default_factory=list)
    together: list[list[str]] = field(default_factory=list)
    """Configurations set up side by side and measured in interleaved blocks
    (``[["c", "d"]]`` by default): their comparison is paired, block by block."""

    def row(self, config: str, logging_steps: int) -> Row | None:
        """The row of ``config`` at ``logging_steps``, if it was measured."""
        for r in self.rows:
            if r.config == config and r.logging_steps == logging_steps:
                return r
        return None

    def format_table(self) -> str:
        """The results as a fixed-width text table."""
        head = (
            f"{'config':<7}{'logging_steps':>13}  {'ours us/step [min-max]':>26}  {'(cpu)':>7}  "
            f"{'transformers us/step [min-max]':>32}  {'(cpu)':>7}  {'ratio':>7}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            theirs = str(r.theirs) if r.theirs is not None else "-"
            theirs_cpu = _fmt(r.theirs.cpu) if r.theirs is not None else "-"
            ratio = f"{r.ratio:,.0f}x" if r.ratio is not None else "-"
            lines.append(
                f"{'(' + r.config + ')':<7}{r.logging_steps:>13}  {str(r.ours):>26}  {_fmt(r.ours.cpu):>7}  "
                f"{theirs:>32}  {theirs_cpu:>7}  {ratio:>7}"
            )
        lines.append("")
        for key, (ours, theirs) in CONFIGS.items():
            if any(r.config == key for r in self.rows):
                lines.append(f"  ({key}) ours: {ours}; transformers: {theirs}")
        return "\n".join(lines)

    def targets(self) -> list[tuple[str, str, str, bool | None]]:
        """(measure, value, target, met) for the issue's targets this run can judge."""
        out: list[tuple[str, str, str, bool | None]] = []
        tf_c1 = self.row("c", 1)
        for key in ("b", "c"):
            r = self.row(key, 1)
            if r is None:
                continue
            out.append(
                (f"({key}) ours at logging_steps=1, us/step wall (cpu)", f"{_fmt(r.ours.median)} ({_fmt(r.ours.cpu)})", "<= 3", r.ours.median <= 3.0)
            )
            if tf_c1 is not None and tf_c1.theirs is not None:
                ratio = tf_c1.theirs.median / max(r.ours.median, 1e-9)
                out.append(
                    (f"({key}) ours vs transformers' handler with TensorBoard, logging_steps=1", f"{ratio:,.0f}x less", ">= 50x", ratio >= 50)
                )
        for ls in sorted({r.logging_steps for r in self.rows}):
            c, d = self.row("c", ls), self.row("d", ls)
            if c is None or d is None:
                continue
            # Blocks measured next to each other (paired): the VM's slow spells hit both.
            paired = self.paired_change(c, d)
            extra = paired if paired is not None else (d.ours.median - c.ours.median) / max(c.ours.median, 1e-9)
            value = f"{extra:+.1%}" + (" paired" if paired is not None else "")
            out.append((f"(d) vs (c), ours, logging_steps={ls}", value, "within 5%", abs(extra) <= 0.05))
            if c.theirs is not None and d.theirs is not None:
                per_log = (d.theirs.median - c.theirs.median) * ls / 1000.0
                out.append((f"(d) - (c), transformers, per logged step, logging_steps={ls}", f"{per_log:+.1f} ms", "(+20 ms expected)", None))
        return out

    def paired_change(self, base: Row, other: Row) -> float | None:
        """Ours: the median over block pairs of ``other / base - 1``, when the two
        configurations were measured together (:attr:`together`: blocks interleaved,
        one pair per repeat); else None."""
        if not any(base.config in group and other.config in group for group in self.together):
            return None
        a, b = base.ours.walls, other.ours.walls
        if not a or len(a) != len(b):
            return None
        return statistics.median(y / max(x, 1e-9) - 1.0 for x, y in zip(a, b))

    def pairing_notes(self) -> list[str]:
        """What a "paired" target value is, per pair of rows measured together."""
        notes = []
        for group in self.together:
            base = group[0] if group[0] == "c" else group[-1]
            for ls in sorted({r.logging_steps for r in self.rows}):
                rows = {r.config: r for r in self.rows if r.logging_steps == ls and r.config in group}
                if len(rows) != 2:
                    continue
                a = rows[base]
                b = next(r for name, r in rows.items() if name != base)
                paired = self.paired_change(a, b)
                if paired is None:
                    continue
                medians = (b.ours.median - a.ours.median) / max(a.ours.median, 1e-9)
                notes.append(
                    f"({b.config}) vs ({a.config}), logging_steps={ls}, paired: the median change over "
                    f"{len(a.ours.walls)} pairs of blocks of the same repeat ({', '.join(f'{(y / max(x, 1e-9) - 1):+.0%}' for x, y in zip(a.ours.walls, b.ours.walls))}); "
                    f"of the medians: {medians:+.1%}"
                )
        return notes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (for plots and docs)."""
        return {
            "together": self.together,
            "gap_s": self.gap_s,
            "gap_kind": self.gap_kind,
            "isolated": self.isolated,
            "log_floats": self.log_floats,
            "transformers": self.transformers,
            "mlflow": self.mlflow,
            "timer_overhead_us": self.timer_overhead_us,
            "rows": [
                {
                    "config": r.config,
                    "logging_steps": r.logging_steps,
                    "ours": vars(r.ours),
                    "theirs": vars(r.theirs) if r.theirs is not None else None,
                }
                for r in self.rows
            ],
        }


def _fmt(us: float) -> str:
    if us >= 1000:
        return f"{us:,.0f}"
    if us >= 10:
        return f"{us:.1f}"
    return f"{us:.2f}"


def format_targets(targets: Sequence[tuple[str, str, str, bool | None]]) -> str:
    """Targets as a table: measure, value, target, ok/MISSED."""
    if not targets:
        return ""
    w = max(len(t[0]) for t in targets)
    lines = [f"{'target':<{w}}  {'value':>14}  {'wanted':>18}  result", "-" * (w + 46)]
    for name, value, target, ok in targets:
        lines.append(f"{name:<{w}}  {value:>14}  {target:>18}  {'-' if ok is None else ('ok' if ok else 'MISSED')}")
    return "\n".join(lines)


# -- sinks for the benchmark -------------------------------------------------------------

_ACCEPT_ALL_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BODY = json.dumps({"run": {"info": {"run_id": "bench0000"}, "data": {}}, "experiment": {"experiment_id": "0"},
                   "experiment_id": "0"}).encode()

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _answer
    def log_message(self, *args):
        pass

def _exit_with_parent():
    # stdin is a pipe from the benchmark: EOF means it is gone, however it ended.
    sys.stdin.read()
    os._exit(0)

import os, threading
threading.Thread(target=_exit_with_parent, daemon=True).start()
server = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _mlflow_endpoint(workdir: str) -> Iterator[tuple[str, str]]:
    """(tracking URI, description): a real ``mlflow server`` when
    ``EVENTBUS_MLFLOW_BIN`` names one, else a loopback server answering 200 to
    everything. Each runs in a process of its own, so its CPU is not counted in ours
    (the step path does not wait for it either way)."""
    binary = os.environ.get("EVENTBUS_MLFLOW_BIN")
    if binary:
        import httpx

        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        log = open(os.path.join(workdir, "mlflow-server.log"), "wb")
        proc = subprocess.Popen(
            [binary, "server", "--backend-store-uri", f"sqlite:///{os.path.join(workdir, 'mlflow.db')}",
             "--default-artifact-root", os.path.join(workdir, "mlruns"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120.0
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"EVENTBUS_MLFLOW_BIN={binary}: mlflow server exited with {proc.returncode}; see {log.name}")
                try:
                    if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"EVENTBUS_MLFLOW_BIN={binary}: mlflow server did not answer /health in 120 s")
                time.sleep(0.5)
            yield url, f"real mlflow server ({binary})"
        finally:
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            log.close()
        return
    proc = subprocess.Popen(
        [sys.executable, "-c", _ACCEPT_ALL_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().strip())
        yield f"http://127.0.0.1:{port}", "loopback HTTP server that accepts everything (set EVENTBUS_MLFLOW_BIN for a real one)"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def _offline_sdk_env(workdir: str) -> Iterator[None]:
    """Neptune and Comet offline, writing under ``workdir``, with no config file and
    no API key picked up from the user's environment; restored afterwards."""
    names = ("NEPTUNE_MODE", "COMET_CONFIG", "COMET_API_KEY", "COMET_START_ONLINE", "COMET_MODE")
    saved = {k: os.environ.get(k) for k in names}
    cwd = os.getcwd()
    os.environ["NEPTUNE_MODE"] = "offline"
    os.environ["COMET_CONFIG"] = os.path.join(workdir, "no-such.comet.config")
    os.environ["COMET_START_ONLINE"] = "0"
    for k in ("COMET_API_KEY", "COMET_MODE"):
        os.environ.pop(k, None)
    os.chdir(workdir)  # neptune's offline queue goes to ./.neptune
    try:
        yield
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_sdks() -> Iterator[None]:
    """Neptune and Comet configure their loggers (printing to stdout) when imported:
    import them first, then keep them to errors for the benchmark's lifetime."""
    for name in ("neptune", "comet_ml"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with _errors_only(("neptune", "comet_ml")):
        yield


BENCH_SINK_NAMES: tuple[str, ...] = ("progress", "tensorboard", "jsonl", "neptune", "comet_ml", "mlflow", SlowSink.name)
"""The names of the sinks :func:`bench_sinks` builds for (c), then (d)'s slow one: what
``--isolate`` may name (checked before anything is measured)."""


@contextlib.contextmanager
def bench_sinks(workdir: str, *, slow: bool = False, progress_file: Any = None) -> Iterator[tuple[list[Any], str]]:
    """The sinks of configuration (c): progress, tensorboard, jsonl, neptune (offline),
    comet (offline) and mlflow; with ``slow``, (d)'s 20 ms sink too. Yields (sinks,
    description of the MLflow endpoint). Everything is written under ``workdir``."""
    from sinks.comet import CometSink
    from sinks.console import ProgressSink
    from sinks.jsonl import JSONLSink
    from sinks.mlflow import MLflowSink
    from sinks.neptune import NeptuneSink
    from sinks.tensorboard import TensorBoardSink

    os.makedirs(workdir, exist_ok=True)
    with contextlib.ExitStack() as stack:
        uri, how = stack.enter_context(_mlflow_endpoint(workdir))
        stack.enter_context(_offline_sdk_env(workdir))
        stack.enter_context(_quiet_sdks())
        if progress_file is None:
            progress_file = stack.enter_context(open(os.devnull, "w"))
        sinks: list[Any] = [
            ProgressSink(file=progress_file),
            TensorBoardSink(log_dir=os.path.join(workdir, "tb")),
            JSONLSink(dir=os.path.join(workdir, "jsonl")),
            NeptuneSink(mode="offline"),
            CometSink(online=False, offline_directory=os.path.join(workdir, "comet")),
            MLflowSink(uri, experiment_name=None),
        ]
        if slow:
            sinks.append(SlowSink())
        yield sinks, how


# -- the two handlers ----------------------------------------------------------------------


GAP_KINDS = ("compute", "sleep")


class Gap:
    """What the training thread does between steps, with the GIL released: one CPU
    matrix product sized to last about ``seconds`` (``"compute"``, calibrated on
    first use, on one torch thread), or ``time.sleep`` (``"sleep"``); nothing when
    ``seconds`` is 0."""

    def __init__(self, seconds: float, kind: str = "compute") -> None:
        if kind not in GAP_KINDS:
            raise ValueError(f"gap kind must be one of {GAP_KINDS}, got {kind!r}")
        if seconds < 0:
            raise ValueError(f"gap must be >= 0 seconds, got {seconds}")
        self.seconds = seconds
        self.kind = kind
        self._call: Callable[[], Any] | None = None

    def __bool__(self) -> bool:
        return self.seconds > 0

    def __call__(self) -> None:
        if self._call is None:
            self._call = self._calibrate()
        self._call()

    def _calibrate(self) -> Callable[[], Any]:
        if self.kind == "sleep":
            seconds = self.seconds
            return lambda: time.sleep(seconds)
        import torch

        def timed(n: int) -> tuple[float, Callable[[], Any]]:
            a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
            call = lambda: torch.mm(a, b, out=out)  # noqa: E731
            for _ in range(3):
                call()
            reps = 20
            t0 = time.perf_counter()
            for _ in range(reps):
                call()
            return (time.perf_counter() - t0) / reps, call

        n = 128
        t, call = timed(n)
        n = max(8, round(n * (self.seconds / max(t, 1e-9)) ** (1 / 3)))
        _, call = timed(n)
        return call


def _steps(h: Any, args: Any, state: Any, control: Any, n: int, make_logs: Callable[[Any], dict[str, Any]], gap: Gap | None) -> tuple[int, int, Any]:
    """Fire ``n`` optimizer steps' hooks, with ``gap`` between them; returns (wall ns
    and training-thread CPU ns spent in the handler calls, control)."""
    perf = time.perf_counter_ns
    cpu = time.thread_time_ns
    step_begin, pre, opt = h.on_step_begin, h.on_pre_optimizer_step, h.on_optimizer_step
    step_end, on_log = h.on_step_end, h.on_log
    wall = 0
    busy = 0
    pause = gap if gap else None
    for _ in range(n):
        if pause is not None:
            pause()
        c0 = cpu()
        t0 = perf()
        control = step_begin(args, state, control)
        control = pre(args, state, control)
        control = opt(args, state, control)
        state.global_step += 1
        control = step_end(args, state, control)
        if control.should_log:
            control = on_log(args, state, control, make_logs(state))
        wall += perf() - t0
        busy += cpu() - c0
    return wall, busy, control


class _Side:
    """A handler with its callbacks, args, state and control, ready to run steps."""

    handler: Any
    args: Any
    state: Any
    control: Any
    quiet: bool = False

    def make_logs(self, state: Any) -> dict[str, Any]:
        raise NotImplementedError

    def block(self, n: int, logging_steps: int, gap: Gap | None, collect: bool = True) -> tuple[float, float]:
        """Run ``n`` steps; (wall, CPU) µs per step spent in the handler. ``collect``:
        start from a fresh garbage collection, so one block's garbage is not paid by
        the next (the other side's) block."""
        self.state.logging_steps = logging_steps
        if collect:
            gc.collect()
        with self._quiet():
            wall, busy, self.control = _steps(self.handler, self.args, self.state, self.control, n, self.make_logs, gap)
        over_wall, over_cpu = _timer_overhead_us()
        return max(0.0, wall / n / 1000.0 - over_wall), max(0.0, busy / n / 1000.0 - over_cpu)

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        if not self.quiet:
            yield
            return
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
            yield

    def close(self) -> None:
        """Tell the callbacks training ended, release what they hold."""


# Both handlers' training arguments. eval_strategy="steps" with an unreachable
# eval_steps: EarlyStopping's checks pass and no evaluation ever runs.
_ARGS = {
    "logging_steps": 1,
    "save_strategy": "no",
    "eval_strategy": "steps",
    "eval_steps": 10**9,
    "metric_for_best_model": "loss",
    "report_to": "none",
}


def _our_args(output_dir: str) -> Any:
    from trainer import TrainingArguments

    return TrainingArguments(output_dir=output_dir, disable_tqdm=True, **_ARGS)


def _wait_for_isolated(bus: Any, timeout: float = 60.0) -> None:
    """Measure once isolated sinks' children are up: their start-up (importing an
    SDK, seconds of CPU) is paid once per run, not per step."""
    from eventbus.isolation import ProcessSink

    deadline = time.monotonic() + timeout
    proxies = [s for s in bus.sinks if isinstance(s, ProcessSink)]
    while not all(p.opened for p in proxies) and time.monotonic() < deadline:
        time.sleep(0.01)


class _Ours(_Side):
    def __init__(
        self, config: str, workdir: str, stack: contextlib.ExitStack, notes: list[str], isolate: Sequence[str] | None = None
    ) -> None:
        import torch

        from eventbus.bus import EventBus
        from eventbus.sink import RunInfo
        from trainer import CallbackHandler, DefaultFlowCallback, EarlyStoppingCallback, TrainerControl, TrainerState

        self.args = _our_args(os.path.join(workdir, "ours"))
        callbacks = [] if config == "a" else [DefaultFlowCallback(), EarlyStoppingCallback(early_stopping_patience=3)]
        sinks: list[Any] = []
        self.mlflow = ""
        if config in ("c", "d"):
            sinks, self.mlflow = stack.enter_context(bench_sinks(os.path.join(workdir, f"sinks-{config}"), slow=config == "d"))
            if isolate is not None:  # exactly these; None: the sinks' own defaults
                unknown = set(isolate) - set(BENCH_SINK_NAMES)
                if unknown:
                    raise ValueError(f"--isolate {sorted(unknown)}: not a sink of (c) or (d); choose among {list(BENCH_SINK_NAMES)}")
                for s in sinks:
                    s.isolate = s.name in isolate
        self.bus = EventBus(sinks, run=RunInfo(run_name=f"bench-{config}", output_dir=os.path.join(workdir, f"run-{config}")))
        self.handler = CallbackHandler(callbacks, None, None, None, None, bus=self.bus)
        self.bus.start()
        _wait_for_isolated(self.bus)
        self.state = TrainerState()
        self.state.max_steps = 10**9
        self.state.compute_steps(self.args, self.state.max_steps)
        self.control = TrainerControl()
        self.control = self.handler.on_train_begin(self.args, self.state, self.control)
        # What our loop logs: the loss and gradient norm stay tensors (the bus resolves
        # them), handed to on_log in a Snapshot, as the trainer does on the CPU.
        self._loss = torch.tensor(0.5)
        self._grad_norm = torch.tensor(1.0)
        self.notes = notes
        self.config = config

    log_floats = False

    def drain(self, timeout: float = 10.0) -> None:
        """Wait (up to ``timeout``) until the sinks have handled what was published
        (the bus's ingress included: the pump hands it over every 0.2 s)."""
        self.bus.wait_handed(timeout)

    def make_logs(self, state: Any) -> dict[str, Any]:
        if self.log_floats:
            return {"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": state.global_step / 1e4}
        return Snapshot(loss=self._loss, grad_norm=self._grad_norm, learning_rate=1e-4, epoch=state.global_step / 1e4)

    def close(self) -> None:
        self.control = self.handler.on_train_end(self.args, self.state, self.control)
        stats = self.bus.close(timeout=60.0)
        for s in stats.sinks.values():
            if s.failed or s.errors:
                self.notes.append(
                    f"({self.config}) sink {s.name}: {s.failed} events failed, {s.errors} errors (last: {s.last_error})"
                )
        if self.config in ("c", "d"):
            lost = {s.name: s.dropped for s in stats.sinks.values() if s.dropped and s.name != SlowSink.name}
            if lost:
                # Steps a few hundred µs apart are far faster than any real loop:
                # sinks that cannot keep up drop (counted), never slow the steps.
                self.notes.append(f"({self.config}) events dropped by sinks that fell behind: {lost}")


def _their_args(output_dir: str) -> Any:
    """transformers' own TrainingArguments, as ours; where they cannot be built (they
    need accelerate), ours: its callbacks only read fields that ours has with the same
    names and values."""
    try:
        from transformers import TrainingArguments

        return TrainingArguments(output_dir=output_dir, use_cpu=True, **_ARGS)
    except ImportError:
        return _our_args(output_dir)


class _Theirs(_Side):
    quiet = True  # transformers' ProgressCallback writes bars and logs to stdout/stderr

    def __init__(self, config: str, workdir: str) -> None:
        from transformers import TrainerControl, TrainerState
        from transformers.trainer_callback import (
            CallbackHandler,
            DefaultFlowCallback,
            EarlyStoppingCallback,
            ProgressCallback,
            TrainerCallback,
        )

        class Sleep20msOnLog(TrainerCallback):
            """A logger making a 20 ms network call per log, inline."""

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                time.sleep(SLOW_SECONDS)

        callbacks: list[Any] = []
        if config != "a":
            callbacks += [DefaultFlowCallback(), EarlyStoppingCallback(early_stopping_patience=3)]
        if config in ("c", "d"):
            from transformers.integrations import TensorBoardCallback

            callbacks += [ProgressCallback(), TensorBoardCallback()]
        if config == "d":
            callbacks.append(Sleep20msOnLog())
        self.args = _their_args(os.path.join(workdir, "theirs", config))
        self.handler = CallbackHandler(callbacks, None, None, None, None)
        self.state = TrainerState()
        self.state.max_steps = 10**9
        self.state.compute_steps(self.args, self.state.max_steps)
        self.control = TrainerControl()
        with self._quiet():
            self.control = self.handler.on_train_begin(self.args, self.state, self.control)

    def make_logs(self, state: Any) -> dict[str, Any]:
        # What transformers' loop logs: plain floats (it calls .item() before on_log).
        return {"loss": 0.5, "grad_norm": 1.0, "learning_rate": 1e-4, "epoch": state.global_step / 1e4}

    def close(self) -> None:
        with self._quiet():
            self.control = self.handler.on_train_end(self.args, self.state, self.control)


def _transformers_status() -> str | None:
    """transformers' version when its handler can run here, else None."""
    try:
        import transformers
    except ImportError:
        return None
    return str(transformers.__version__)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """The benchmark's setup warns by design (early stopping without
    load_best_model_at_end, a handler with no flow callback): keep the output to the
    figures."""
    with _errors_only(("trainer", "eventbus", "sinks", "transformers", "neptune", "comet_ml", "urllib3", "httpx")):
        yield


@contextlib.contextmanager
def _errors_only(names: Sequence[str]) -> Iterator[None]:
    """These loggers at ERROR, and Neptune's NVML note (no GPU metrics on this machine)
    silenced, until the block ends; levels restored after."""
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*NVML.*")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


_TIMER: list[tuple[float, float]] = []


def _timer_overhead_us() -> tuple[float, float]:
    """(wall, CPU) µs that reading the clocks adds to one step's timed section: the
    medians of empty sections timed as :func:`_steps` times a step; subtracted from
    every figure. Measured once per process."""
    if not _TIMER:
        perf, cpu = time.perf_counter_ns, time.thread_time_ns
        walls, cpus = [], []
        for _ in range(5000):
            c0 = cpu()
            t0 = perf()
            walls.append(perf() - t0)
            cpus.append(cpu() - c0)
        _TIMER.append((statistics.median(walls) / 1000.0, statistics.median(cpus) / 1000.0))
    return _TIMER[0]


def run_overhead(
    *,
    configs: Sequence[str] = ("a", "b", "c", "d"),
    logging_steps: Sequence[int] = (1, 50),
    steps: int = 2000,
    repeats: int = 5,
    gap: float = 0.0002,
    gap_kind: str = "compute",
    max_block_s: float = 1.0,
    with_transformers: bool = True,
    log_floats: bool = False,
    isolate: Sequence[str] | None = None,
    workdir: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> OverheadResult:
    """Measure µs per step on the step path for each configuration and logging
    interval, ours and (when installed and asked) transformers' handler, interleaved.

    ``steps`` is the block size (fewer when a block would take more than
    ``max_block_s``, e.g. transformers' handler with a 20 ms callback), ``repeats``
    the number of blocks per side, ``gap`` the seconds between steps and ``gap_kind``
    what fills them (:class:`Gap`; a compute gap runs torch on one thread). ``log_floats``:
    our side logs a plain dict of Python floats, as transformers' loop does (it calls
    ``.item()`` before ``on_log``), instead of what our trainer logs on the CPU (its
    loss and grad norm tensors in a :class:`~eventbus.values.Snapshot`, which on_log
    hands over to the bus without looking at its values): what copying and checking
    each value costs is the difference. ``isolate``: the sinks of (c)/(d) that
    run in a child process each (``Sink.isolate``), exactly; ``None``: each sink's
    default (tensorboard, mlflow, neptune and comet_ml isolated). Measuring starts once they are open.
    """
    for c in configs:
        if c not in CONFIGS:
            raise ValueError(f"unknown configuration {c!r}; choose among {', '.join(CONFIGS)}")
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps and repeats must be >= 1, got steps={steps}, repeats={repeats}")
    if any(ls < 1 for ls in logging_steps):
        raise ValueError(f"logging_steps must be >= 1, got {list(logging_steps)}")
    say = progress or (lambda msg: None)
    tf_version = _transformers_status() if with_transformers else None
    tf_note = tf_version if tf_version else ("not asked (--no-transformers)" if not with_transformers else None)
    if with_transformers and tf_version is None:
        tf_note = "not installed (pip install 'eventbus-telemetry[bench]')"
    pause = Gap(gap, gap_kind)
    result = OverheadResult(
        rows=[], gap_s=gap, gap_kind=gap_kind, transformers=tf_note, log_floats=log_floats, timer_overhead_us=_timer_overhead_us()
    )
    own_dir = workdir is None
    root = tempfile.mkdtemp(prefix="eventbus-bench-") if own_dir else workdir
    assert root is not None
    import torch

    threads = torch.get_num_threads()
    # The compute gap stands for a training step on one core: torch's own thread
    # pool would otherwise take the core the bus and the sinks run on.
    torch.set_num_threads(1)
    from eventbus.isolation import ProcessSink

    try:
        with _quiet_loggers():
            for group in _groups(configs):
                result.together.extend([group] if len(group) > 1 else [])
                with contextlib.ExitStack() as stack:
                    sides: list[tuple[str, _Ours, _Theirs | None]] = []
                    for config in group:
                        say(f"({config}) setting up")
                        ours = _Ours(config, root, stack, result.notes, isolate)
                        stack.callback(ours.close)  # closed in reverse: transformers' side first
                        ours.log_floats = log_floats
                        if ours.mlflow:
                            result.mlflow = ours.mlflow
                        for s in ours.bus.sinks:
                            if isinstance(s, ProcessSink) and s.name not in result.isolated:
                                result.isolated.append(s.name)
                        theirs = _Theirs(config, root) if tf_version else None
                        if theirs is not None:
                            stack.callback(theirs.close)
                        sides.append((config, ours, theirs))
                    for ls in logging_steps:
                        result.rows.extend(_measure_group(sides, ls, steps, repeats, pause, max_block_s, say))
        # Configuration by configuration, each at its logging intervals.
        result.rows.sort(key=lambda r: (configs.index(r.config), list(logging_steps).index(r.logging_steps)))
    finally:
        torch.set_num_threads(threads)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    return result


def _block_size(side: _Side, steps: int, ls: int, gap: Gap | None, max_block_s: float) -> int:
    """``steps``, or fewer (a multiple of ``ls``, at least ``ls``) when a block would
    take longer than ``max_block_s``. Runs a warm-up (200 steps or a fifth of
    ``max_block_s``, whichever comes first) that also estimates the time per step."""
    done = 0
    t0 = time.perf_counter()
    while True:
        side.block(ls, ls, gap, collect=False)
        done += ls
        elapsed = time.perf_counter() - t0
        if done >= min(steps, 200) or elapsed >= max_block_s / 5:
            break
    per_step = elapsed / done
    n = min(steps, max(1, int(max_block_s / max(per_step, 1e-9))))
    if n >= ls:
        n -= n % ls
    return max(n, min(ls, steps))


def _groups(configs: Sequence[str]) -> list[list[str]]:
    """The configurations in the order asked, (c) and (d) in one group when both are:
    set up side by side, their blocks interleaved, so that "(d) within 5% of (c)"
    compares blocks run seconds apart, not minutes (the VM's slow spells last that
    long and move a figure by 20 to 40%). An idle configuration's bus and children
    wait on their queues, costing the other nothing."""
    groups: list[list[str]] = []
    both = "c" in configs and "d" in configs
    for config in configs:
        if both and config in ("c", "d"):
            if config == next(c for c in configs if c in ("c", "d")):
                groups.append(["c", "d"] if config == "c" else ["d", "c"])
            continue
        groups.append([config])
    return groups


def _measure_group(
    sides: Sequence[tuple[str, _Ours, _Theirs | None]], ls: int, steps: int, repeats: int, gap: Gap, max_block_s: float,
    say: Callable[[str], None],
) -> list[Row]:
    """One row per configuration of the group at ``ls``: every repeat runs one block
    of each side (ours and transformers', of each configuration), in an order
    reversed every other repeat, so each side takes each position equally."""
    runs: list[tuple[_Side, int, list[tuple[float, float]]]] = []
    for _config, ours, theirs in sides:
        for side in (ours, theirs):
            if side is not None:
                runs.append((side, _block_size(side, steps, ls, gap, max_block_s), []))
    for r in range(repeats):
        for side, n, out in runs if r % 2 == 0 else reversed(runs):
            out.append(side.block(n, ls, gap))
            if isinstance(side, _Ours):
                # What its sinks still hold is drained before the next block starts, so
                # that block (the other configuration's, paired with this one) does not
                # run beside this one's backlog; within its own blocks each pays for its
                # own background work as in a run.
                side.drain()
    measured = {id(side): Measure.of(out, n) for side, n, out in runs}
    rows = []
    for config, ours, theirs in sides:
        row = Row(config, ls, measured[id(ours)], measured[id(theirs)] if theirs is not None else None)
        say(f"({config}) logging_steps={ls}: ours {row.ours} us/step" + (f", transformers {row.theirs}" if row.theirs else ""))
        rows.append(row)
    return rows


# -- the per-callback profiler ------------------------------------------------------------


def load_callback(spec: str) -> Any:
    """``module:Class`` (or ``module.Class``) -> an instance built with no arguments."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    else:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"--callbacks {spec!r}: write it as module:Class, e.g. mypkg.callbacks:MyCallback")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--callbacks {spec!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    except Exception as exc:  # a SyntaxError in it, or an error its top level raised
        where = ""
        if isinstance(exc, SyntaxError) and exc.filename:
            where = f" at {exc.filename}:{exc.lineno}"
        raise ValueError(
            f"--callbacks {spec!r}: importing module {module_name!r} failed{where} ({type(exc).__name__}: {exc})"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"--callbacks {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if isinstance(obj, type):
        if not _hooks_of(obj):
            raise ValueError(
                f"--callbacks {spec!r}: {attr} is a class that implements none of TrainerCallback's hooks "
                "(on_step_end, on_log, ...); point at a callback class (or an instance of one)"
            )
        try:
            return obj()
        except Exception as exc:
            raise ValueError(
                f"--callbacks {spec!r}: {attr}() with no arguments failed ({type(exc).__name__}: {exc}); "
                "the profiler builds each callback class without arguments: give them defaults, or point at an "
                "instance (module:name_of_instance)"
            ) from None
    # An instance: its class must implement a hook (a module, a function or a number
    # does not, even one with an attribute named like a hook).
    if not _hooks_of(type(obj)):
        raise ValueError(
            f"--callbacks {spec!r}: {attr} is {_describe(obj)}, not a callback: point at a class that implements "
            f"at least one of TrainerCallback's hooks (on_step_end, on_log, ...) or an instance of one"
        )
    return obj


def _hooks_of(cls: type) -> list[str]:
    """The hooks of TrainerCallback that class ``cls`` implements: defines something
    other than the no-op of our base class or of transformers' (see ``overrides``)."""
    from trainer.callbacks import HOOKS, _OUR_NOOPS

    theirs = [k for k in cls.__mro__ if k.__name__ == "TrainerCallback" and k.__module__.startswith("transformers")]
    found = []
    for hook in HOOKS:
        method = getattr(cls, hook, None)
        if method is None or not callable(method):
            continue
        func = getattr(method, "__func__", method)
        if func is _OUR_NOOPS.get(hook) or any(func is k.__dict__.get(hook) for k in theirs):
            continue
        found.append(hook)
    return found


def _describe(obj: Any) -> str:
    text = repr(obj)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"an object of type {type(obj).__name__} ({text})"


class ProfileError(Exception):
    """A profiled callback raised: names the callback, the hook and the step."""


EVAL_EVERY = 100
"""The profiler's schedule: ``on_evaluate`` (after two ``on_prediction_step``) and
``on_save`` every this many steps, and an epoch (``on_epoch_end``, then
``on_epoch_begin``) every :data:`EPOCH_STEPS`; fewer steps in all: once, at the end."""
EPOCH_STEPS = 500


@dataclass
class ProfileResult:
    """What :func:`profile_callbacks` measured."""

    steps: int
    logging_steps: int
    handler_us_per_step: float
    per_hook: dict[tuple[str, str], dict[str, float]]
    not_exercised: dict[str, list[str]] = field(default_factory=dict)
    """Per callback class: hooks it implements that the profiler never called."""

    def format_table(self) -> str:
        """One row per (callback, hook), most expensive first."""
        head = f"{'callback':<28}{'hook':<24}{'calls':>8}{'mean us':>12}{'us/step':>12}{'share':>8}"
        lines = [head, "-" * len(head)]
        total_per_step = self.handler_us_per_step or 1e-9
        rows = sorted(self.per_hook.items(), key=lambda kv: -kv[1]["total_s"])
        for (cls, hook), v in rows:
            per_step = v["total_s"] * 1e6 / self.steps
            lines.append(
                f"{cls[:27]:<28}{hook:<24}{int(v['calls']):>8}{v['mean_s'] * 1e6:>12.2f}{per_step:>12.2f}"
                f"{per_step / total_per_step:>8.0%}"
            )
        lines.append(
            f"handler total: {self.handler_us_per_step:.2f} us/step over {self.steps} steps, logging every "
            f"{self.logging_steps} (share: of the handler's time per step)"
        )
        lines.append(
            f"each step: on_step_begin, one on_substep_end (gradient_accumulation_steps=2), on_pre_optimizer_step, "
            f"on_optimizer_step, on_step_end, on_log when due; every {min(EVAL_EVERY, self.steps)} steps two "
            f"on_prediction_step, on_evaluate and on_save; an epoch every {min(EPOCH_STEPS, self.steps)} steps"
        )
        for cls, hooks in self.not_exercised.items():
            lines.append(f"not exercised: {cls}.{', '.join(hooks)} (implemented, never called by the profiler)")
        return "\n".join(lines)


def profile_callbacks(
    callbacks: Sequence[Any], *, steps: int = 2000, logging_steps: int = 1, gap: float = 0.0, gap_kind: str = "compute"
) -> ProfileResult:
    """Run ``callbacks`` (after our DefaultFlowCallback, as the trainer does) through
    the handler with its profiler on for ``steps`` steps; time per (callback, hook).

    Besides the per-step hooks of the overhead table, each step ends a micro-batch
    first (``on_substep_end``), and the hooks of a run's schedule are fired too:
    ``on_init_end`` and ``on_train_begin`` once, ``on_evaluate`` (with a small
    metrics dict, after two ``on_prediction_step``) and ``on_save`` every
    :data:`EVAL_EVERY` steps, an epoch every :data:`EPOCH_STEPS` steps. The hooks
    get a small ``torch.nn.Linear`` as ``model``, an SGD ``optimizer`` and a
    ``LambdaLR`` ``lr_scheduler``. A callback that raises: :class:`ProfileError`.
    What the callbacks print (progress bars, logs) goes to ``os.devnull``."""
    import torch

    from trainer import CallbackHandler, DefaultFlowCallback, TrainerControl, TrainerState

    loss, grad_norm = torch.tensor(0.5), torch.tensor(1.0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    every = max(1, min(EVAL_EVERY, steps))
    epoch_steps = max(1, min(EPOCH_STEPS, steps))
    pause = Gap(gap, gap_kind) or None
    perf = time.perf_counter_ns

    def logs(state: Any) -> dict[str, Any]:
        return {"loss": loss, "grad_norm": grad_norm, "learning_rate": 1e-4, "epoch": state.epoch}

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="eventbus-profile-"))
        stack.enter_context(_quiet_loggers())
        devnull = stack.enter_context(open(os.devnull, "w"))
        stack.enter_context(contextlib.redirect_stdout(devnull))
        stack.enter_context(contextlib.redirect_stderr(devnull))
        args = _our_args(tmp)
        handler = CallbackHandler([DefaultFlowCallback(), *callbacks], model, None, optimizer, scheduler)
        handler.profile = True
        h = handler
        state = TrainerState()
        state.max_steps = steps
        state.compute_steps(args, state.max_steps)
        state.logging_steps = logging_steps
        state.num_train_epochs = -(-steps // epoch_steps)
        state.epoch = 0.0
        control = TrainerControl()
        wall = 0
        try:
            control = h.on_init_end(args, state, control)
            t0 = perf()
            control = h.on_train_begin(args, state, control)
            control = h.on_epoch_begin(args, state, control)
            wall += perf() - t0
            for i in range(1, steps + 1):
                if pause is not None:
                    pause()
                t0 = perf()
                control = h.on_step_begin(args, state, control)
                control = h.on_substep_end(args, state, control)  # the first of two micro-batches
                control = h.on_pre_optimizer_step(args, state, control)
                control = h.on_optimizer_step(args, state, control)
                state.global_step += 1
                state.epoch = state.global_step / epoch_steps
                control = h.on_step_end(args, state, control)
                if control.should_log:
                    control = h.on_log(args, state, control, logs(state))
                if i % every == 0 or i == steps:
                    for _ in range(2):
                        control = h.on_prediction_step(args, state, control)
                    metrics = {"eval_loss": 0.5, "eval_accuracy": 0.75, "eval_runtime": 0.1, "epoch": state.epoch}
                    control = h.on_evaluate(args, state, control, metrics=metrics)
                    control = h.on_save(args, state, control, checkpoint_dir=os.path.join(tmp, f"checkpoint-{i}"))
                if i % epoch_steps == 0 or i == steps:
                    control = h.on_epoch_end(args, state, control)
                    if i < steps:
                        control = h.on_epoch_begin(args, state, control)
                wall += perf() - t0
            t0 = perf()
            h.on_train_end(args, state, control)
            wall += perf() - t0
        except Exception as exc:
            raise ProfileError(_blame(exc, handler.callbacks, state.global_step)) from exc
        report = handler.profile_report()
    not_exercised = {}
    for cb in callbacks:
        name = type(cb).__name__
        missing = [hook for hook in _hooks_of(type(cb)) if (name, hook) not in report]
        if missing:
            not_exercised[name] = missing
    return ProfileResult(steps, logging_steps, wall / steps / 1000.0, report, not_exercised)


def _blame(exc: BaseException, callbacks: Sequence[Any], step: int) -> str:
    """``exc``'s message naming the callback and hook it came from (the outermost
    frame of a callback's method in its traceback), and the step."""
    import traceback

    ours = {id(cb): cb for cb in callbacks}
    where = "a callback"
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        me = frame.f_locals.get("self")
        if me is not None and id(me) in ours and frame.f_code.co_name.startswith("on_"):
            where = f"{type(me).__name__}.{frame.f_code.co_name}"
            break
        tb = tb.tb_next
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    at = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{where} raised at step {step}: {type(exc).__name__}: {exc}{at}"


# -- imports -------------------------------------------------------------------------------


def import_checks(runs: int = 5) -> tuple[float, list[str]]:
    """(ms of ``import eventbus`` in a fresh interpreter, the best of ``runs``: noise
    on a shared machine only ever adds; backend SDKs that ``import trainer`` pulled
    into ``sys.modules``).

    Measured with compiled bytecode, as an installed package is imported: the runs
    share a fresh ``PYTHONPYCACHEPREFIX`` that one untimed run fills first. Without it
    (``PYTHONDONTWRITEBYTECODE`` set, as on the development VM, or a read-only
    checkout) every run would compile the package's sources again, 60-90 ms there."""
    code = "import time; t = time.perf_counter(); import eventbus; print(time.perf_counter() - t)"
    times = []
    with tempfile.TemporaryDirectory(prefix="eventbus-pyc-") as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        for i in range(runs + 1):
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
            if i:  # the first run compiled what the others read
                times.append(float(out.strip()) * 1000)
    return min(times), trainer_backend_imports()


def trainer_backend_imports() -> list[str]:
    """Backend SDKs found in ``sys.modules`` after ``import trainer`` in a fresh interpreter."""
    code = (
        "import sys, trainer; "
        f"print(','.join(m for m in {BACKEND_MODULES!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return [m for m in out.split(",") if m]
