"""A warning, once, when control callbacks eat a noticeable share of the step time.

Control callbacks run inline on the training thread, so a slow one (a logger written
as a callback, a metric computed on every step) slows every step. The watch measures
that without costing the loop anything between samples: every ``every`` optimizer
steps it turns the handler's profiler on for ``window`` steps, compares the time the
callbacks took with the wall time of those steps, and turns it off again. The
library's own callbacks (classes defined in the ``trainer`` package) are not counted. When the
share is above ``share`` it logs one warning naming the costliest (callback, hook)
pairs, and stops sampling.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from trainer.callbacks import is_library_class

__all__ = ["CallbackTimeWatch"]

logger = logging.getLogger("trainer")


class CallbackTimeWatch:
    """Samples the share of step time spent in ``handler``'s control callbacks.

    The loop calls :meth:`start` when training starts and :meth:`tick` after each
    optimizer step once ``global_step >= watch.due`` (a plain comparison: between
    samples the watch costs nothing else). ``share`` of ``None`` or ``0`` disables it.
    """

    def __init__(self, handler: Any, share: float | None, *, window: int = 10, every: int = 1000) -> None:
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1):
            raise ValueError(
                f"callback_time_warning_share must be a fraction of the step time in [0, 1] (or None to turn the "
                f"warning off), got {share!r}"
            )
        if window < 1 or every < window:
            raise ValueError(f"window must be >= 1 and every >= window, got window={window}, every={every}")
        self.handler = handler
        self.share = float(share) if share else 0.0
        self.window = window
        self.every = every
        self.warned = False
        self.due: float = math.inf
        """The global step at which the loop should call :meth:`tick` next."""
        self.last_share: float | None = None
        """The share measured by the last complete sample (for tests and curious users)."""
        self._t0: float | None = None
        self._begin_step = 0
        self._saved: dict[tuple[str, str], list[float]] | None = None
        self._before: dict[tuple[str, str], float] = {}

    @property
    def enabled(self) -> bool:
        """Whether this watch samples at all."""
        return self.share > 0 and not self.warned

    def start(self, global_step: int) -> None:
        """Training (re)starts at ``global_step``: the first sample begins after the
        next step (the first step of a run pays one-off costs)."""
        self._abort()
        self.due = global_step + 1 if self.enabled else math.inf

    def tick(self, global_step: int) -> None:
        """Called after the optimizer step ``global_step`` once it reaches :attr:`due`."""
        if self._t0 is None:
            self._begin(global_step)
        else:
            self._finish(global_step)

    def _begin(self, global_step: int) -> None:
        handler = self.handler
        timings = handler._timings
        if handler.profile:
            self._saved = None  # the user's own profiling: read it, leave it on
        else:
            # Put the user's profile report back as it was once the sample is over.
            self._saved = {k: list(v) for k, v in timings.items()}
            handler.profile = True
        self._before = {k: v[1] for k, v in timings.items()}
        self._begin_step = global_step
        self.due = global_step + self.window
        self._t0 = time.perf_counter()

    def _finish(self, global_step: int) -> None:
        assert self._t0 is not None
        elapsed = time.perf_counter() - self._t0
        steps = max(1, global_step - self._begin_step)
        timings = self.handler._timings
        # The library's own callbacks (the flow, the progress bar, the printer: classes
        # defined in the trainer package) are left out: on sub-millisecond steps
        # their few microseconds are a share the user can do nothing about.
        ours = self._library_classes()
        spent = {k: v[1] - self._before.get(k, 0.0) for k, v in timings.items() if k[0] not in ours}
        self._restore()
        total = sum(spent.values())
        self.last_share = total / elapsed if elapsed > 0 else 0.0
        if self.last_share > self.share:
            self.warned = True
            self.due = math.inf
            top = sorted(((t, k) for k, t in spent.items() if t > 0), reverse=True)[:3]
            detail = ", ".join(f"{cls}.{hook} {t * 1000 / steps:.2f} ms/step" for t, (cls, hook) in top)
            logger.warning(
                "control callbacks took %.0f%% of the step time over steps %d-%d (more than "
                "callback_time_warning_share=%.0f%%): %s. Callbacks run inline on the training thread: move what only "
                "observes to an event-bus sink, or make it cheaper (measure with `eventbus bench --callbacks "
                "module:Class`). This warning is shown once.",
                100 * self.last_share,
                self._begin_step + 1,
                global_step,
                100 * self.share,
                detail,
            )
        else:
            self.due = self._begin_step + self.every

    def _library_classes(self) -> set[str]:
        """Names of the handler's callback classes defined in the trainer package and
        of no user class of the same name (the profile report keys by class name)."""
        ours, theirs = set(), set()
        for cb in self.handler.callbacks:
            cls = type(cb)
            (ours if is_library_class(cls) else theirs).add(cls.__name__)
        return ours - theirs

    def _restore(self) -> None:
        self._t0 = None
        if self._saved is not None:
            handler = self.handler
            handler.profile = False
            handler._timings.clear()
            handler._timings.update(self._saved)
            self._saved = None

    def stop(self) -> None:
        """Training ended: close a sample left open (the handler's profiler goes back
        to how it was) and sample nothing until the next :meth:`start`."""
        self._abort()
        self.due = math.inf

    def _abort(self) -> None:
        if self._t0 is not None:
            self._restore()
