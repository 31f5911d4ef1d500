"""Progress bars and printed logs, with transformers' behaviour.

Logged losses may still be tensors (the loop never resolves them on the step path).
These callbacks turn them into numbers only when they print them: that is a host sync,
paid only on logging steps and only because the user asked for printed output. Use the
``console`` sink instead to print from the bus thread with no sync on the training
thread at all.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from eventbus.values import is_tensor
from trainer.callbacks import TrainerCallback
from trainer.state import TrainerControl, TrainerState

__all__ = ["ProgressCallback", "PrinterCallback"]


def _has_length(obj: Any) -> bool:
    try:
        return obj is not None and len(obj) is not None
    except (TypeError, AttributeError, NotImplementedError):
        return False


def _format(value: Any) -> Any:
    """Floats (and one-element tensors, resolved here) as ``{:.4g}``, the rest as is."""
    if is_tensor(value):
        if value.numel() != 1:
            return value
        value = value.detach().reshape(()).item()  # the host sync documented above
    if isinstance(value, float):
        return f"{value:.4g}"
    return value


class ProgressCallback(TrainerCallback):
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
                    shallow_logs[k] = _format(v)
            shallow_logs.pop("total_flos", None)
            self.training_bar.write(str(shallow_logs))

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Close the training bar."""
        if state.is_world_process_zero and self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class PrinterCallback(TrainerCallback):
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
            print({k: _format(v) for k, v in logs.items()})
