"""Per-step cost of callbacks and observers on the step path, ours beside
transformers' ``CallbackHandler``: the same benchmark as ``eventbus bench``.

Fires the hooks of one optimizer step (step_begin, pre_optimizer_step,
optimizer_step, step_end, and log when the flow asks for it) and reports microseconds
per step spent in the handler for (a) no callbacks, (b) DefaultFlow + EarlyStopping,
(c) (b) plus the progress, tensorboard, jsonl, neptune (offline), comet (offline) and
mlflow sinks, (d) (c) plus a sink taking 20 ms per event; each at logging_steps 1 and
50. With transformers installed, its handler runs the same configurations with its
own callbacks (DefaultFlow, EarlyStopping, Progress, TensorBoard, a callback sleeping
20 ms in on_log), interleaved in the same process, with the ratio. See
``eventbus/_bench.py`` for how the time is counted.

Run: ``python benchmarks/overhead.py`` (a few minutes on 2 cores; ``--quick`` for a
smoke run). ``--plot docs/overhead.png --json results.json`` keep the figures. The
mlflow sink talks to a loopback server that accepts everything, or to a real
``mlflow server`` when EVENTBUS_MLFLOW_BIN names its executable; the step path does
not wait for either. Targets are printed beside the figures, not asserted.
"""

from __future__ import annotations

import sys

from eventbus._bench_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python benchmarks/overhead.py"))
