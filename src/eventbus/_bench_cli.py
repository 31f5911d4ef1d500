"""``eventbus bench``: the per-step cost of callbacks and observers, ours beside
transformers' handler; with ``--callbacks module:Class``, the cost of your own
callbacks, per hook.

Examples::

    eventbus bench                                  # the overhead table (a few minutes)
    eventbus bench --quick                          # a smoke run (seconds)
    eventbus bench --callbacks mypkg.cb:MyCallback  # time your callbacks per hook
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any, Callable, Sequence

__all__ = ["add_parser", "run", "main"]

QUICK = {"steps": 100, "repeats": 2, "gap": 0.0, "max_block_s": 0.2}
# eventbus._bench.GAP_KINDS, described (that module is imported only to run).
_GAP_WORDS = {"compute": "CPU compute (a matrix product, GIL released)", "sleep": "sleep"}


def add_parser(subparsers: Any) -> Callable[[argparse.Namespace], int]:
    """Register ``bench`` on the ``eventbus`` command line; returns its handler."""
    p = subparsers.add_parser(
        "bench",
        help="measure the per-step cost of callbacks and sinks (or of your own callbacks)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options shared by ``eventbus bench`` and ``benchmarks/overhead.py``."""
    p.add_argument(
        "--callbacks",
        action="append",
        metavar="MODULE:CLASS",
        help="profile these control callbacks (built with no arguments) per hook instead of the overhead table; repeatable",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per block (default 2000; --quick: 100)")
    p.add_argument("--repeats", type=int, default=None, help="blocks per side and configuration (default 5; --quick: 2)")
    p.add_argument(
        "--logging-steps",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="logging intervals to measure (default: 1 50; the profiler uses the first)",
    )
    p.add_argument(
        "--configs",
        default="a,b,c,d",
        help="configurations, comma-separated: a (no callbacks), b (flow + early stopping), c (b + six sinks), "
        "d (c + a 20 ms sink); default a,b,c,d",
    )
    p.add_argument(
        "--gap-us",
        type=float,
        default=None,
        help="microseconds between steps, GIL released, standing in for the forward/backward pass (default 200; "
        "--quick: 0)",
    )
    p.add_argument(
        "--gap-kind",
        choices=tuple(_GAP_WORDS),
        default="compute",
        help="what fills the gap: one CPU matrix product on one torch thread (compute, the default) or a sleep "
        "(sleep: on a virtual machine the idle vCPU makes every step start with cold caches)",
    )
    p.add_argument("--no-transformers", action="store_true", help="do not run transformers' handler beside ours")
    p.add_argument(
        "--log-floats",
        action="store_true",
        help="our side logs a plain dict of Python floats (as transformers' loop does after .item()) instead of what "
        "our trainer logs on the CPU (its loss and grad norm tensors in a Snapshot, handed over without a look at "
        "its values); the difference is what copying and checking each value costs",
    )
    p.add_argument(
        "--isolate",
        metavar="NAMES",
        default=None,
        help="comma-separated sinks of (c)/(d) to run in a child process each (Sink.isolate), exactly these, or "
        "'none'; default: each sink's own (tensorboard, mlflow, neptune and comet_ml isolated, progress and jsonl in-process)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--no-imports", action="store_true", help="skip the import-time and import-hygiene checks")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="also draw the results as a PNG bar chart (needs matplotlib)")


class _BadOption(ValueError):
    """A bad value of a ``bench`` option: exit status 2."""


def _sizes(args: argparse.Namespace) -> dict[str, Any]:
    steps = args.steps if args.steps is not None else (QUICK["steps"] if args.quick else 2000)
    repeats = args.repeats if args.repeats is not None else (QUICK["repeats"] if args.quick else 5)
    gap_us = args.gap_us if args.gap_us is not None else (0.0 if args.quick else 200.0)
    if steps < 1:
        raise _BadOption(f"--steps must be >= 1, got {steps}")
    if repeats < 1:
        raise _BadOption(f"--repeats must be >= 1, got {repeats}")
    if gap_us < 0:
        raise _BadOption(f"--gap-us must be >= 0, got {gap_us}")
    ls = args.logging_steps or [1, 50]
    if any(n < 1 for n in ls):
        raise _BadOption(f"--logging-steps must be >= 1, got {ls}")
    return {
        "steps": steps,
        "repeats": repeats,
        "gap": gap_us / 1e6,
        "gap_kind": args.gap_kind,
        "logging_steps": ls,
        "max_block_s": QUICK["max_block_s"] if args.quick else 1.0,
    }


def _isolate_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    return [] if names == ["none"] else names


def _say(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the overhead benchmark or, with ``--callbacks``, the profiler; print tables."""
    from eventbus import _bench

    try:
        sizes = _sizes(args)
    except _BadOption as exc:
        print(f"eventbus bench: {exc}", file=sys.stderr)
        return 2
    if args.callbacks:
        try:
            callbacks = [_bench.load_callback(spec) for spec in args.callbacks]
        except ValueError as exc:
            print(f"eventbus bench: {exc}", file=sys.stderr)
            return 2
        try:
            result = _bench.profile_callbacks(
                callbacks,
                steps=sizes["steps"],
                logging_steps=sizes["logging_steps"][0],
                gap=sizes["gap"],
                gap_kind=sizes["gap_kind"],
            )
        except _bench.ProfileError as exc:
            print(f"eventbus bench: --callbacks: {exc}", file=sys.stderr)
            return 2
        print(result.format_table())
        return 0

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        # Said before minutes of measuring, not after.
        print("eventbus bench: --plot needs matplotlib: pip install 'eventbus-telemetry[bench]'", file=sys.stderr)
        return 2
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in _bench.CONFIGS]
    if unknown or not configs:
        print(f"eventbus bench: --configs {args.configs!r}: choose among {', '.join(_bench.CONFIGS)}", file=sys.stderr)
        return 2
    isolate = _isolate_names(args.isolate)
    bad = [n for n in isolate or () if n not in _bench.BENCH_SINK_NAMES]
    if bad or (args.isolate is not None and not args.isolate.strip(" ,")):
        # Said before minutes of measuring, not as a traceback once (c) is set up.
        what = f"{', '.join(bad)}: not a sink of (c) or (d)" if bad else "no names given"
        print(
            f"eventbus bench: --isolate {args.isolate!r}: {what}; "
            f"give 'none' or comma-separated names among {', '.join(_bench.BENCH_SINK_NAMES)}",
            file=sys.stderr,
        )
        return 2
    result = _bench.run_overhead(
        configs=configs,
        logging_steps=sizes["logging_steps"],
        steps=sizes["steps"],
        repeats=sizes["repeats"],
        gap=sizes["gap"],
        gap_kind=sizes["gap_kind"],
        max_block_s=sizes["max_block_s"],
        with_transformers=not args.no_transformers,
        log_floats=args.log_floats,
        isolate=isolate,
        progress=_say,
    )
    argv = getattr(args, "_argv", None)
    command = f"{args._prog} {' '.join(argv)}" if argv is not None else "eventbus " + " ".join(sys.argv[1:])
    print(f"# {command.strip()}")
    print(
        f"# microseconds per optimizer step spent in the callback handler (step_begin, pre_optimizer_step, "
        f"optimizer_step, step_end, and log when due); {sizes['steps']} steps per block at most, "
        f"{sizes['repeats']} blocks per side, {sizes['gap'] * 1e6:.0f} us of {_GAP_WORDS[sizes['gap_kind']]} between steps; "
        f"clock reads ({result.timer_overhead_us[0]:.2f} us wall, {result.timer_overhead_us[1]:.2f} us cpu per step) "
        "subtracted"
    )
    print(f"# transformers: {result.transformers}")
    print(
        "# ours logs "
        + (
            "a plain dict of Python floats (--log-floats)"
            if result.log_floats
            else "loss and grad_norm as tensors in a Snapshot, as our trainer does on the CPU"
        )
        + "; transformers' side logs floats, as its loop does"
    )
    if result.mlflow:
        print(f"# mlflow sink -> {result.mlflow}")
    if any(c in configs for c in ("c", "d")):
        print(f"# sinks in a child process each (Sink.isolate): {', '.join(result.isolated) or 'none'}")
    print(result.format_table())
    targets = result.targets()
    if not args.no_imports:
        ms, leaked = _bench.import_checks(runs=2 if args.quick else 5)
        targets.append(("import eventbus (ms, best of runs, fresh interpreter, bytecode cached)", f"{ms:.0f}", "< 150", ms < 150))
        targets.append(("backend SDKs imported by `import trainer`", ", ".join(leaked) or "none", "none", not leaked))
    print()
    print(_bench.format_targets(targets))
    for note in result.pairing_notes() + result.notes:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result.to_dict(), "targets": targets}, f, indent=2)
    if args.plot:
        plot(result, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def plot(result: Any, path: str) -> None:
    """A log-scale bar chart of µs per step: ours beside transformers' handler, per
    configuration and logging interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"({r.config}) ls={r.logging_steps}" for r in result.rows]
    ours = [max(r.ours.median, 1e-3) for r in result.rows]
    theirs = [max(r.theirs.median, 1e-3) if r.theirs is not None else 0 for r in result.rows]
    x = range(len(labels))
    width = 0.4
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=90)
    ax.bar([i - width / 2 for i in x], ours, width, label="eventbus (ours)", color="#2a9d8f")
    if any(theirs):
        ax.bar([i + width / 2 for i in x], theirs, width, label="transformers' CallbackHandler", color="#e76f51")
    ax.set_yscale("log")
    ax.set_ylabel("µs per step on the step path")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, rotation=0, fontsize=8)
    ax.set_title("Callback + observer cost per optimizer step (median; lower is better)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    for i, (o, t) in enumerate(zip(ours, theirs)):
        ax.annotate(f"{o:.2g}", (i - width / 2, o), ha="center", va="bottom", fontsize=7)
        if t:
            ax.annotate(f"{t:.3g}", (i + width / 2, t), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: Sequence[str] | None = None, prog: str = "python -m eventbus._bench_cli") -> int:
    """``python -m eventbus._bench_cli`` / ``benchmarks/overhead.py``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args._argv = argv
    args._prog = prog
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
