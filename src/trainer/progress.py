"""Progress bars and printed logs, with transformers' behaviour.

Logged losses may still be tensors (the loop never resolves them on the step path).
Tensors on the CPU are turned into numbers when printed (no device is involved).
Tensors on an accelerator are never waited for on the training thread: their values
are copied to the host asynchronously and a small daemon thread writes the line once
they have arrived (flushed, and the thread stopped, at the end of training), so a
progress bar costs no device sync. The ``console`` and ``progress`` sinks print from
the bus thread instead.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from typing import Any, Callable, Mapping

from tqdm.auto import tqdm

from eventbus.values import is_tensor, plain_array, resolve, snapshot_mapping
from trainer.callbacks import TrainerCallback
from trainer.state import TrainerControl, TrainerState

__all__ = ["ProgressCallback", "PrinterCallback"]

logger = logging.getLogger("trainer")


def _has_length(obj: Any) -> bool:
    try:
        return obj is not None and len(obj) is not None
    except (TypeError, AttributeError, NotImplementedError):
        return False


def _format(value: Any) -> Any:
    """Floats (and one-element tensors) as ``{:.4g}``, the rest as is."""
    if is_tensor(value):
        if value.numel() != 1:
            return value
        value = value.detach().reshape(()).item()  # CPU tensors only reach here
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


def _on_accelerator(value: Any) -> bool:
    return is_tensor(value) and not value.is_cpu


_STOP = object()
"""Tells a writer thread to exit once the lines before it are written."""

_Job = Any  # (write, logs) | threading.Event (a flush) | _STOP


class _DeferredWriter:
    """Writes log lines whose values are still on an accelerator once the values have
    reached the host, on a daemon thread, in submission order.

    The thread is started on first use and stopped by :meth:`close` (at the end of
    training; a later use starts another one), or when the writer is dropped with its
    callback: the thread holds only its own queue, never the writer."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[_Job] | None = None
        self._thread: threading.Thread | None = None
        self._stop: weakref.finalize | None = None

    def submit(self, write: Callable[[str], Any], logs: Mapping[str, Any]) -> None:
        jobs = self._jobs
        if jobs is None or self._thread is None:
            # A queue per thread: a thread told to stop (still writing a slow line)
            # never takes the lines of the next one.
            jobs = self._jobs = queue.Queue()
            thread = threading.Thread(target=_write_loop, args=(jobs,), name="trainer-log-writer", daemon=True)
            thread.start()
            self._thread = thread
            self._stop = weakref.finalize(self, jobs.put, _STOP)  # dropped writer: thread exits
        jobs.put((write, snapshot_mapping(logs)))  # asynchronous copies, no sync

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (at most ``timeout``) until every submitted line is written."""
        jobs = self._jobs
        if jobs is None or self._thread is None:
            return
        done = threading.Event()
        jobs.put(done)
        done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write every submitted line (waiting at most ``timeout``), then stop the
        thread. A line still blocked at the deadline is written by the thread, which
        exits after it."""
        thread, stop = self._thread, self._stop
        self._thread = self._jobs = self._stop = None
        if thread is None:
            return
        if stop is not None:
            stop()  # the sentinel, after every submitted line
        if thread is not threading.current_thread():
            thread.join(timeout)


def _write_loop(jobs: queue.Queue[_Job]) -> None:
    while True:
        job = jobs.get()
        if job is _STOP:
            return
        if isinstance(job, threading.Event):
            job.set()
            continue
        write, logs = job
        job = None  # the line's values are not kept until the next one
        try:
            write(str({k: _format(plain_array(resolve(v))) for k, v in logs.items()}))
        except Exception:  # a printing failure must not end the writer
            logger.exception("trainer: could not print a log line")
        del write, logs


class _DeferredLogs:
    """Gives a callback its :class:`_DeferredWriter`, created on first use (so that
    subclasses with an ``__init__`` of their own keep working). Such a callback reads
    logged tensors off the training thread: it takes them in ``logs`` as they are."""

    accepts_tensor_logs = True

    @property
    def _deferred(self) -> _DeferredWriter:
        writer = self.__dict__.get("_deferred_writer")
        if writer is None:
            writer = self.__dict__["_deferred_writer"] = _DeferredWriter()
        return writer


class ProgressCallback(_DeferredLogs, TrainerCallback):
    """tqdm bars for training (one tick per optimizer step), evaluation and prediction
    (one tick per batch), on the world process zero only; logs are written above the
    bar. Strings longer than ``max_str_len`` are replaced by a note saying so."""

    def __init__(self, max_str_len: int = 100) -> None:
        self.training_bar: Any = None
        self.prediction_bar: Any = None
        self.max_str_len = max_str_len
        self.current_step = 0

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Open the training bar."""
        if state.is_world_process_zero:
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True)
        self.current_step = 0

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Advance the training bar to the current step."""
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.update(state.global_step - self.current_step)
            self.current_step = state.global_step

    def on_prediction_step(
        self, args: Any, state: TrainerState, control: TrainerControl, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        """Open the evaluation bar on the first batch, then tick once per batch."""
        if state.is_world_process_zero and _has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = tqdm(
                    total=len(eval_dataloader), leave=self.training_bar is None, dynamic_ncols=True
                )
            self.prediction_bar.update(1)

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Close the evaluation bar."""
        if state.is_world_process_zero:
            if self.prediction_bar is not None:
                self.prediction_bar.close()
            self.prediction_bar = None

    def on_predict(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Close the prediction bar."""
        if state.is_world_process_zero:
            if self.prediction_bar is not None:
                self.prediction_bar.close()
            self.prediction_bar = None

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any) -> None:
        """Write the logs above the training bar (``total_flos`` left out)."""
        if state.is_world_process_zero and self.training_bar is not None:
            # A shallow copy: the caller's dict is left as it was.
            shallow_logs = {}
            for k, v in (logs or {}).items():
                if isinstance(v, str) and len(v) > self.max_str_len:
                    shallow_logs[k] = (
                        f"[String too long to display, length: {len(v)} > {self.max_str_len}. "
                        "Consider increasing `max_str_len` if needed.]"
                    )
                else:
                    shallow_logs[k] = v
            shallow_logs.pop("total_flos", None)
            if any(_on_accelerator(v) for v in shallow_logs.values()):
                self._deferred.submit(self.training_bar.write, shallow_logs)
            else:
                self.training_bar.write(str({k: _format(v) for k, v in shallow_logs.items()}))

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Close the training bar (after the last deferred log line is written; the
        writer thread, if any, is stopped)."""
        if state.is_world_process_zero and self.training_bar is not None:
            self._deferred.close()
            self.training_bar.close()
            self.training_bar = None


class PrinterCallback(_DeferredLogs, TrainerCallback):
    """Prints the logs (on the local process zero), ``total_flos`` left out: what the
    trainer uses instead of bars when ``disable_tqdm=True``."""

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any) -> None:
        """Print the logs, floats as ``{:.4g}``."""
        if logs is None:
            return
        # As transformers, the key is removed from the caller's dict (after the bus has
        # taken its own copy of the logs).
        logs.pop("total_flos", None)
        if state.is_local_process_zero:
            if any(_on_accelerator(v) for v in logs.values()):
                self._deferred.submit(print, logs)
            else:
                print({k: _format(v) for k, v in logs.items()})

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Wait for the last deferred log line, then stop the writer thread (if any;
        a later deferred line starts another)."""
        self._deferred.close()

