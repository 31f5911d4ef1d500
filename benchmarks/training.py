"""A real CPU training loop with no sinks and with every sink, logging every step:
steps per second and their ratio.

Unlike ``overhead.py``, which counts only the time the training thread spends in the
callback handler, this counts everything the sinks cost the loop: publishing, and
the share of the GIL and of the CPU that the bus thread, the sinks' threads and the
SDKs' own threads take while the model trains. Runs alternate (none, all, none, ...)
in one process; the model is a small MLP at about a millisecond per step. "All
sinks" runs them as a user gets them by default: the SDK and HTTP sinks (TensorBoard,
MLflow, Neptune, Comet) in a child process each (``Sink.isolate``; training starts
once those children are up), the progress bar and JSON lines in the training
process; a third configuration runs every sink in-process, to show what isolation
buys, and a fourth every sink but the progress bar in a child.

When transformers and accelerate are installed, the same model trains through
transformers' ``Trainer`` with ``report_to="none"`` and ``report_to="tensorboard"``.

Run: ``python benchmarks/training.py`` (about a minute and a half on 2 cores);
``--quick`` for a smoke run. Targets are printed, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import StepTimer, TinyModel, log_every_step_args, make_dataset, median_min_max, quiet_stdout, say, train_transformers, transformers_trainer_status  # noqa: E402

from eventbus._bench import bench_sinks  # noqa: E402

BATCH = 32

BUSY_LABEL = "ours, no sinks, a busy process beside (nice 10)"

# The sinks of the overhead benchmark's configuration (c), which bench_sinks builds.
SINKS = ("progress", "tensorboard", "jsonl", "neptune", "comet_ml", "mlflow")
# isolate_sinks=[...] in TrainingArguments: every sink but the progress bar (a terminal
# observer) in a child process of its own.
ISOLATED = tuple(name for name in SINKS if name != "progress")
ISOLATED_LABEL = "ours, all sinks, all but progress isolated"


@contextlib.contextmanager
def _busy_neighbour() -> Any:
    """A process spinning in Python at nice 10 for the duration: the CPU any other
    process (an isolated sink's child, a tracking server, a data loader) takes from
    the machine, without touching this process's GIL or memory."""
    spin = subprocess.Popen([sys.executable, "-c", "import os\nos.nice(10)\nwhile True:\n    pass"])
    try:
        yield
    finally:
        spin.kill()
        spin.wait()


class _WaitForChildren:
    """Starts training once the isolated sinks' child processes have opened: their
    start-up (importing the SDK, ~1-2 s of CPU) is paid once per run, not per step,
    and would otherwise fall into a short benchmark's timed window."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Wait (at most a minute) for every isolated sink to be open in its child."""
        from eventbus._bench import _wait_for_isolated

        _wait_for_isolated(self.trainer.bus)


def run_ours(
    workdir: str, steps: int, with_sinks: bool, only: str | None = None, isolate: tuple[str, ...] | None = None
) -> tuple[float, str, dict[str, Any], float, int]:
    """Train ``steps`` steps through our Trainer; (steps/s, mlflow endpoint, sink
    stats, CPU µs per step of the other threads, full garbage collections in the
    timed window). ``only``: keep just that sink;
    ``isolate``: run exactly these sinks in a child process each (``None``: each
    sink's default)."""
    from trainer import PrinterCallback, ProgressCallback, Trainer

    torch.manual_seed(0)
    data = make_dataset(steps * BATCH)
    args = log_every_step_args(workdir, steps, BATCH)
    timer = StepTimer()
    how = ""
    with contextlib.ExitStack() as stack:
        sinks: list[Any] = []
        if with_sinks:
            sinks, how = stack.enter_context(bench_sinks(os.path.join(workdir, "sinks")))
            if only is not None:
                sinks = [s for s in sinks if s.name == only]
            if isolate is not None:
                for s in sinks:
                    s.isolate = s.name in isolate
        trainer = Trainer(TinyModel(), args, train_dataset=data, callbacks=[timer], sinks=sinks)
        if any(s.isolate for s in sinks):
            trainer.add_callback(_WaitForChildren(trainer))
        # Printing every log is an observer's job (the console sink), not the loop's.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        with quiet_stdout():
            trainer.train()
        stats = {s.name: s for s in trainer.bus.stats().sinks.values()}
    return timer.steps_per_second(), how, stats, timer.other_threads_cpu_us(), timer.full_collections()


def run_transformers(workdir: str, steps: int, report_to: str) -> float:
    """The same model and data through transformers' Trainer; steps/s."""
    torch.manual_seed(0)
    return train_transformers(TinyModel(), make_dataset(steps * BATCH), workdir, steps, BATCH, report_to, use_cpu=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 3000; --quick: 150)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' Trainer")
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="sys.setswitchinterval for the run (default: Python's 0.005): how long a thread that wants the GIL "
        "waits before the holder is asked to drop it",
    )
    parser.add_argument(
        "--each", action="store_true", help="also train with each sink alone (where does the cost go?)"
    )
    parser.add_argument(
        "--busy-neighbour",
        action="store_true",
        help="also train with no sinks beside a busy process (a Python spin loop at nice 10): what CPU used "
        "elsewhere on the machine costs this loop, sinks or not (the isolated sinks' children are such CPU)",
    )
    opts = parser.parse_args(argv)
    steps = opts.steps or (150 if opts.quick else 3000)
    repeats = opts.repeats or (1 if opts.quick else 3)
    if steps < 20:
        parser.error("--steps must be at least 20")
    torch.set_num_threads(1)  # steadier on a shared 2-core machine; the same for every run
    if opts.switch_interval is not None:
        sys.setswitchinterval(opts.switch_interval)
    for name in ("trainer", "eventbus", "sinks", "neptune", "comet_ml", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)

    root = tempfile.mkdtemp(prefix="eventbus-training-")
    # (label, with sinks, isolate, beside a busy process): "all" is what a user gets by default.
    configs = [
        ("ours, no sinks", False, None, False),
        ("ours, all sinks (tensorboard, mlflow, neptune, comet_ml isolated)", True, None, False),
        ("ours, all sinks in-process", True, (), False),
        (ISOLATED_LABEL, True, ISOLATED, False),
    ]
    if opts.busy_neighbour:
        configs.append((BUSY_LABEL, False, None, True))
    sps_of: dict[str, list[float]] = {c[0]: [] for c in configs}
    cpu_of: dict[str, list[float]] = {c[0]: [] for c in configs}
    how = ""
    drops: dict[str, int] = {}
    full_gcs_in_windows = 0
    try:
        for r in range(repeats):
            # Rotate the order every repeat: no configuration always runs first.
            for i in range(len(configs)):
                label, with_sinks, isolate, busy = configs[(i + r) % len(configs)]
                say(f"run {r + 1}/{repeats}: {label}")
                with _busy_neighbour() if busy else contextlib.nullcontext():
                    sps, h, stats, other, full_gcs = run_ours(os.path.join(root, f"ours-{r}-{i}"), steps, with_sinks, isolate=isolate)
                sps_of[label].append(sps)
                full_gcs_in_windows += full_gcs
                cpu_of[label].append(other)
                how = how or h
                for name, st in stats.items():
                    if st.dropped:
                        key = f"{name} ({label})"
                        drops[key] = drops.get(key, 0) + st.dropped
        each: list[tuple[str, float, float]] = []
        if opts.each:
            for name in SINKS:
                say(f"only {name}")
                sps, _, _, other, _ = run_ours(os.path.join(root, f"only-{name}"), steps, True, only=name, isolate=())
                each.append((f"ours, only {name}, in-process", sps, other))
        tf_rows: list[tuple[str, list[float]]] = []
        tf_status = "not asked (--no-transformers)" if opts.no_transformers else transformers_trainer_status()
        if tf_status is None:
            tf_none: list[float] = []
            tf_tb: list[float] = []
            for r in range(repeats):
                for report_to in ("none", "tensorboard") if r % 2 == 0 else ("tensorboard", "none"):
                    say(f"transformers run {r + 1}/{repeats}: report_to={report_to}")
                    sps = run_transformers(os.path.join(root, f"tf-{r}-{report_to}"), steps, report_to)
                    (tf_none if report_to == "none" else tf_tb).append(sps)
            tf_rows = [("transformers Trainer, report_to=none", tf_none), ("transformers Trainer, report_to=tensorboard", tf_tb)]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"# python benchmarks/training.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip())
    print(
        f"# {steps} steps per run, batch {BATCH}, logging every step, {repeats} run(s) per configuration, "
        f"steps/s from the 10th percentile step to the last; torch threads: 1; GIL switch interval "
        f"{sys.getswitchinterval() * 1000:g} ms"
    )
    print(f"# all sinks: progress, tensorboard, jsonl, neptune (offline), comet (offline), mlflow -> {how}")
    w = max(len(label) for label in [*(c[0] for c in configs), *(r[0] for r in tf_rows)])
    print(f"{'configuration':<{w}}  {'steps/s median [min-max]':>26}  {'other threads, CPU us/step':>27}")
    print("-" * (w + 57))
    for label, *_ in configs:
        print(f"{label:<{w}}  {median_min_max(sps_of[label]):>26}  {statistics.median(cpu_of[label]):>27,.0f}")
    none = statistics.median(sps_of[configs[0][0]])
    ratio = statistics.median(sps_of[configs[1][0]]) / none
    in_process_ratio = statistics.median(sps_of[configs[2][0]]) / none
    for name, sps, other in each:
        print(f"{name:<{w}}  {sps:>26,.0f}  {other:>27,.0f}")
    for name, values in tf_rows:
        print(f"{name:<{w}}  {median_min_max(values):>26}  {'-':>27}")
    print()
    ok = ratio >= 0.95
    print(
        f"target: all sinks within 5% of no sinks at logging_steps=1: {ratio:.3f}x ({'ok' if ok else 'MISSED'}; "
        "the isolated children's CPU is not in the last column)"
    )
    if repeats > 1:
        # Runs of one repeat are minutes apart at most: the ratio within each repeat
        # cancels the machine's slower drifts, which the ratio of medians does not.
        paired = [a / b for a, b in zip(sps_of[configs[1][0]], sps_of[configs[0][0]])]
        print(f"        (paired, all sinks / no sinks within each repeat: median {median_min_max(paired, '.3f')})")
    print(f"        (every sink in-process instead: {in_process_ratio:.3f}x)")
    isolated_ratio = statistics.median(sps_of[ISOLATED_LABEL]) / none
    print(f"        (every sink but progress isolated instead: {isolated_ratio:.3f}x; their children's CPU not counted)")
    if opts.busy_neighbour:
        busy_ratio = statistics.median(sps_of[BUSY_LABEL]) / none
        print(f"        (no sinks, a busy process beside the loop: {busy_ratio:.3f}x: what CPU used elsewhere costs here)")
    if tf_rows:
        tf_ratio = statistics.median(tf_rows[1][1]) / statistics.median(tf_rows[0][1])
        print(f"transformers: tensorboard / none = {tf_ratio:.3f}x")
    else:
        print(f"transformers' Trainer: skipped: {tf_status}")
    # Each run starts from a full collection (StepTimer); one inside a window
    # (150-330 ms here) is a few percent of that run.
    print(f"full garbage collections inside our runs' timed windows: {full_gcs_in_windows}")
    if drops:
        print(f"note: events dropped by sinks that could not keep up (counted, never waited for): {drops}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
