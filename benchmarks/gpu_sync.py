"""Proof that the step path never synchronises the GPU, and steps/s beside
transformers' Trainer.

On a CUDA machine: trains a small MLP through our Trainer, logging every step to the
jsonl and (when installed) tensorboard sinks, with
``torch.cuda.set_sync_debug_mode("error")`` on from the first step to the last logged
step: any ``.item()``, ``.cpu()``, ``float(tensor)`` or blocking copy there raises.
Logged losses and gradient norms stay on the device; the bus resolves them on its own
thread through pinned-memory copies and CUDA events (an event wait is not a stream
or device synchronisation, so the debug mode allows it). Then it times steps/s with
the debug mode off, ours and (when transformers and accelerate are installed)
transformers' Trainer with ``report_to="tensorboard"``.

Without a GPU it says so and exits 0. Run: ``python benchmarks/gpu_sync.py``
(``--quick`` for fewer steps, ``--repeats N`` for N interleaved timing runs,
``--profile`` for cProfile's view of one run, ``--precision bf16`` or ``fp16`` to
check mixed precision too: fp16's GradScaler unscales, skips and rescales on the
device). Exit status 1 when a sync was caught
or a logged value did not arrive.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import tempfile
import traceback
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    StepTimer,
    TinyModel,
    log_every_step_args,
    make_dataset,
    median_min_max,
    quiet_stdout,
    say,
    train_transformers,
    transformers_trainer_status,
)

BATCH = 256
DIM = 256
HIDDEN = 2048


class SyncGuard:
    """Turns CUDA's sync debug mode to "error" when the first step begins and back off
    after the last step's logs were handed to the bus (before the loop's one
    intended sync, the final mean loss). It reads nothing in ``logs``: it takes the
    loop's tensors as they are (``accepts_tensor_logs``), so its ``on_log`` costs no
    read (a device sync) of them."""

    accepts_tensor_logs = True

    def __init__(self, max_steps: int, mode: str = "error") -> None:
        self.max_steps = max_steps
        self.mode = mode
        self.armed_steps = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Arm (once)."""
        if state.global_step == 0:
            torch.cuda.set_sync_debug_mode(self.mode)
        self.armed_steps += 1

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Disarm after the last step's log (the handler published it already)."""
        if state.global_step >= self.max_steps:
            torch.cuda.set_sync_debug_mode(0)


def _sinks(workdir: str) -> list[Any]:
    from sinks.jsonl import JSONLSink

    out: list[Any] = [JSONLSink(dir=os.path.join(workdir, "jsonl"))]
    if importlib.util.find_spec("tensorboard") is not None:
        from sinks.tensorboard import TensorBoardSink

        out.append(TensorBoardSink(log_dir=os.path.join(workdir, "tb")))
    return out


def logged_values_problems(workdir: str, steps: int, scaled: bool = False) -> list[str]:
    """What is wrong with the values the jsonl sink wrote: every step 1..steps must
    have logged a finite ``loss`` and ``grad_norm`` (device tensors, resolved by the
    bus off the step path). ``scaled`` (fp16): a step whose gradients overflowed (the
    loss scaler skips it) logs an infinite or NaN ``grad_norm``; it must still be a
    float, and some step must have a finite one."""
    import glob
    import math

    from eventbus.events import Log
    from sinks.jsonl import read_jsonl

    files = glob.glob(os.path.join(workdir, "jsonl", "*.jsonl"))
    if len(files) != 1:
        return [f"expected one jsonl file under {workdir}/jsonl, found {files}"]
    seen: dict[int, dict[str, Any]] = {}
    for event in read_jsonl(files[0]):
        if isinstance(event, Log) and "loss" in event.values:
            seen[event.step] = dict(event.values)
    problems = []
    missing = sorted(set(range(1, steps + 1)) - set(seen))
    if missing:
        problems.append(f"{len(missing)} logged steps missing from the jsonl file (first: {missing[:5]})")
    for step, logs in sorted(seen.items()):
        for key in ("loss", "grad_norm"):
            value = logs.get(key)
            if not isinstance(value, float) or not (math.isfinite(value) or (scaled and key == "grad_norm")):
                problems.append(f"step {step}: {key} = {value!r}, not a finite float")
                break
    norms = [logs.get("grad_norm") for logs in seen.values()]
    if scaled and seen and not any(isinstance(v, float) and math.isfinite(v) for v in norms):
        problems.append(f"no step of {len(seen)} logged a finite grad_norm: the loss scale never settled")
    return problems[:10]


def sync_sites(workdir: str, steps: int, precision: str = "fp32") -> list[str]:
    """After a failure: train again with the debug mode at "warn" and return each
    distinct Python stack (innermost frames last) that synchronised, so the report
    says where, not only that."""
    import warnings

    sites: dict[str, int] = {}
    original = warnings.showwarning

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message):
            original(message, category, filename, lineno, file, line)
            return
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        stack = "".join(traceback.format_list(frames[-6:]))
        sites[stack] = sites.get(stack, 0) + 1

    with warnings.catch_warnings():  # restores showwarning and the filters
        warnings.simplefilter("always")
        warnings.showwarning = record
        run_ours(workdir, steps, guard=True, mode="warn", precision=precision)
    return [f"{count} times:\n{stack}" for stack, count in sorted(sites.items(), key=lambda kv: -kv[1])]


PRECISIONS = ("fp32", "bf16", "fp16")


def run_ours(
    workdir: str, steps: int, guard: bool, mode: str = "error", sinks: bool = True, precision: str = "fp32"
) -> tuple[float, Any]:
    """Train on CUDA through our Trainer (``precision``: one of :data:`PRECISIONS`);
    (steps/s, bus stats)."""
    from trainer import PrinterCallback, ProgressCallback, Trainer

    torch.manual_seed(0)
    data = make_dataset(steps * BATCH, dim=DIM)
    args = log_every_step_args(workdir, steps, BATCH, **({precision: True} if precision != "fp32" else {}))
    timer = StepTimer()
    callbacks: list[Any] = [timer]
    if guard:
        callbacks.append(SyncGuard(steps, mode))
    trainer = Trainer(TinyModel(DIM, HIDDEN).cuda(), args, train_dataset=data, callbacks=callbacks, sinks=_sinks(workdir) if sinks else [])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    try:
        with quiet_stdout():
            trainer.train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return timer.steps_per_second(), trainer.bus.stats()


def run_transformers(workdir: str, steps: int) -> float:
    """The same model and data through transformers' Trainer on CUDA; steps/s."""
    torch.manual_seed(0)
    data = make_dataset(steps * BATCH, dim=DIM)
    return train_transformers(TinyModel(DIM, HIDDEN), data, workdir, steps, BATCH, "tensorboard", use_cpu=False)


NO_SINKS = "ours, no sinks, logging every step"
SINKS = "ours, jsonl + tensorboard sinks, logging every step"
TRANSFORMERS = "transformers Trainer, report_to=tensorboard, logging every step"


def time_runs(root: str, steps: int, repeats: int) -> dict[str, list[float]]:
    """steps/s of each configuration, interleaved ``repeats`` times (a machine's
    drift then touches every configuration alike)."""
    with_transformers = transformers_trainer_status() is None
    out: dict[str, list[float]] = {NO_SINKS: [], SINKS: []}
    if with_transformers:
        out[TRANSFORMERS] = []
    for r in range(repeats):
        out[NO_SINKS].append(run_ours(os.path.join(root, f"bare{r}"), steps, guard=False, sinks=False)[0])
        out[SINKS].append(run_ours(os.path.join(root, f"timed{r}"), steps, guard=False)[0])
        if with_transformers:
            out[TRANSFORMERS].append(run_transformers(os.path.join(root, f"transformers{r}"), steps))
    return out


def profile_run(workdir: str, steps: int) -> None:
    """Where the training thread's time goes in one run with sinks: cProfile's top
    functions by cumulative and by own time (the bus thread is not profiled)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        run_ours(workdir, steps, guard=False)
    finally:
        profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout).strip_dirs()
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 2000; --quick: 200)")
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timing repeats; median [min-max] (default 1)")
    parser.add_argument("--profile", action="store_true", help="also profile the training thread of one run with sinks")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="the precision of the checked run (bf16/fp16: mixed, as TrainingArguments(bf16/fp16=True)); "
                        "the timings stay in fp32")
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_sync.py: no CUDA device here (torch.cuda.is_available() is False); this check needs one. Nothing to do.")
        return 0
    steps = opts.steps or (200 if opts.quick else 2000)
    for name in ("trainer", "eventbus", "sinks", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    root = tempfile.mkdtemp(prefix="eventbus-gpu-sync-")
    try:
        say(f"training {steps} steps ({opts.precision}) on {torch.cuda.get_device_name()} with "
            "torch.cuda.set_sync_debug_mode('error')")
        try:
            _, stats = run_ours(os.path.join(root, "guarded"), steps, guard=True, precision=opts.precision)
        except RuntimeError as exc:
            print(f"FAILED: the step path synchronised the GPU: {exc}")
            traceback.print_exc(file=sys.stdout)
            print("where it synchronises (a second run with the debug mode at 'warn'):")
            for site in sync_sites(os.path.join(root, "diagnose"), min(steps, 50), opts.precision)[:5]:
                print(site)
            return 1
        problems = {n: (s.failed, s.errors) for n, s in stats.sinks.items() if s.failed or s.errors}
        delivered = {n: s.delivered for n, s in stats.sinks.items()}
        print(f"no GPU sync on the step path over {steps} steps ({opts.precision}), logging every step "
              "(sync debug mode 'error')")
        print(f"events delivered per sink: {delivered}")
        if problems:
            print(f"FAILED: sinks reported (failed, errors): {problems}")
            return 1
        wrong = logged_values_problems(os.path.join(root, "guarded"), steps, scaled=opts.precision == "fp16")
        if wrong:
            print("FAILED: the logged values did not arrive intact: " + "; ".join(wrong))
            return 1
        norm = "grad_norm (non-finite only where fp16 skipped an overflowed step)" if opts.precision == "fp16" else "grad_norm"
        print(f"read back: a finite loss and a {norm} for each of the {steps} steps in the jsonl file")
        say(f"timing (debug mode off), {opts.repeats} interleaved repeat(s)")
        timings = time_runs(root, steps, opts.repeats)
        for label, values in timings.items():
            print(f"{label:<64} {median_min_max(values)} steps/s")
        bare, ours = timings[NO_SINKS], timings[SINKS]
        paired = [o / b for o, b in zip(ours, bare)]
        print(f"sinks / no sinks: {statistics.median(ours) / statistics.median(bare):.2f}x "
              f"(paired within repeats: {median_min_max(paired, '.2f')})")
        if TRANSFORMERS in timings:
            theirs = timings[TRANSFORMERS]
            print(f"ours with sinks / transformers: {statistics.median(ours) / statistics.median(theirs):.2f}x")
        else:
            print(f"transformers' Trainer: skipped: {transformers_trainer_status()}")
        if opts.profile:
            say("profiling one run with sinks (cProfile, the training thread)")
            profile_run(os.path.join(root, "profiled"), steps)
    finally:
        with contextlib.suppress(Exception):
            torch.cuda.set_sync_debug_mode(0)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
