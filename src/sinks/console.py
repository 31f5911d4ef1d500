"""Console observers: printed logs (``"console"``) and a training progress bar
(``"progress"``), as transformers' ``PrinterCallback`` and ``ProgressCallback``.

Both only observe: they run as sinks on their own threads, so a slow terminal or a
full pipe never stalls the training loop, and they cannot steer training. Printing
goes through ``tqdm.write``, so printed lines and a live progress bar do not garble
each other.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence, TextIO

from eventbus.errors import SinkConfigError
from eventbus.events import BaseEvent, Evaluate, Log, StepEnd, TrainBegin, TrainEnd
from eventbus.sink import RunInfo, ThreadedSink

from sinks._common import check_option_types

__all__ = ["ConsoleSink", "ProgressSink", "format_logs"]


def format_logs(values: Mapping[str, Any], *, max_str_len: int = 100) -> dict[str, Any]:
    """What transformers prints for a log: floats as ``f"{v:.4g}"``, long strings
    elided, ``total_flos`` left out."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k == "total_flos":
            continue
        if isinstance(v, float):
            out[k] = f"{v:.4g}"
        elif isinstance(v, str) and len(v) > max_str_len:
            out[k] = f"[String too long to display, length: {len(v)} > {max_str_len}. Consider increasing `max_str_len` if needed.]"
        else:
            out[k] = v
    return out


def _same_metrics(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    skip = ("epoch", "step")
    return {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


class ConsoleSink(ThreadedSink):
    """Prints each log and evaluation as transformers' ``PrinterCallback`` does
    (report_to name ``"console"``), e.g. ``{'loss': '0.6931', 'epoch': 0.5}``.

    Options: ``file`` (a text stream; default ``sys.stdout`` at the time of
    printing) and ``max_str_len`` (longer strings are elided).

    Not part of ``report_to="all"``: printing is an observer the trainer adds, not a
    backend.
    """

    name = "console"
    events = (Log, Evaluate)
    max_delay = 0.2  # printed lines follow training closely (the default is 1 s)

    def __init__(self, *, file: TextIO | None = None, max_str_len: int = 100) -> None:
        check_option_types(self.name, ConsoleSink.__init__, locals())
        if file is not None and not hasattr(file, "write"):
            raise SinkConfigError(f"console sink: file must be a writable text stream, got {type(file).__name__}")
        self.file = file
        self.max_str_len = int(max_str_len)
        self._last_printed: tuple[int, Mapping[str, Any]] | None = None

    @classmethod
    def available(cls) -> bool:
        """Never picked by ``report_to="all"`` (printing is not a logging backend)."""
        return False

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        """Print the logs in this batch."""
        from tqdm import tqdm

        out = self.file or sys.stdout
        for ev in batch:
            if isinstance(ev, Evaluate):
                values = dict(ev.metrics)
                if "epoch" not in values and ev.epoch is not None:
                    values["epoch"] = ev.epoch  # as Trainer.log adds it
            elif isinstance(ev, Log):
                values = ev.values
            else:
                continue
            # A trainer that reports an evaluation both through on_log and as an
            # Evaluate (as transformers' Trainer.evaluate does, log first) prints once.
            last = self._last_printed
            if last is not None and last[0] == ev.step and _same_metrics(values, last[1]):
                continue
            self._last_printed = (ev.step, values)
            tqdm.write(str(format_logs(values, max_str_len=self.max_str_len)), file=out)
        out.flush()


class ProgressSink(ThreadedSink):
    """A tqdm progress bar over the training steps (report_to name ``"progress"``),
    as transformers' ``ProgressCallback``.

    The bar opens at ``TrainBegin`` (total ``max_steps``, starting at the resume step),
    advances to the latest step of each batch the bus delivers (from ``StepEnd`` and
    ``Log``; one redraw per batch at most, not one per step), shows the latest
    training loss, and closes at ``TrainEnd``. It samples ``StepEnd``
    (:attr:`~eventbus.Sink.sampled`): the trainer publishes one per ``max_delay`` at
    most when no other sink needs each, so a fast loop builds no event per step for it.

    Options: ``file`` (default ``sys.stderr``), ``disable`` (``None`` disables the bar
    when the stream is not a terminal, as tqdm does), ``desc``, ``leave``.
    Not part of ``report_to="all"``.
    """

    name = "progress"
    events = (TrainBegin, StepEnd, Log, TrainEnd)
    sampled = (StepEnd,)
    max_delay = 0.2  # the bar moves five times a second (the default is 1 s)

    def __init__(self, *, file: TextIO | None = None, disable: bool | None = False, desc: str | None = None, leave: bool = True) -> None:
        check_option_types(self.name, ProgressSink.__init__, locals())
        if file is not None and not hasattr(file, "write"):
            raise SinkConfigError(f"progress sink: file must be a writable text stream, got {type(file).__name__}")
        self.file = file
        self.disable = disable
        self.desc = desc
        self.leave = leave
        self.bar: Any = None
        """The live ``tqdm`` bar between ``TrainBegin`` and ``TrainEnd``."""
        self.last_step = 0

    @classmethod
    def available(cls) -> bool:
        """Never picked by ``report_to="all"`` (a progress bar is not a logging backend)."""
        return False

    def open_sync(self, run: RunInfo) -> None:
        """Nothing to open: the bar starts at ``TrainBegin``."""

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        """Advance the bar for this batch (one redraw at most per batch), showing the
        batch's latest training loss (formatted once per batch, not once per Log)."""
        from tqdm import tqdm

        step = None
        loss = None
        for ev in batch:
            if isinstance(ev, StepEnd):
                step = ev.step
            elif isinstance(ev, Log):
                if step is None or ev.step > step:
                    step = ev.step  # StepEnd is sampled: a Log may be the latest step seen
                value = ev.values.get("loss")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    loss = value
            elif isinstance(ev, TrainBegin):
                self._close_bar()
                loss = None
                self.last_step = ev.step
                self.bar = tqdm(
                    total=ev.max_steps or None,
                    initial=ev.step,
                    file=self.file,
                    disable=self.disable,
                    desc=self.desc,
                    leave=self.leave,
                    dynamic_ncols=True,
                )
            elif isinstance(ev, TrainEnd):
                self._advance(step if step is not None else ev.step, loss)
                step = loss = None
                self._close_bar()
        if step is not None or loss is not None:
            self._advance(step, loss)

    def _advance(self, step: int | None, loss: float | None = None) -> None:
        bar = self.bar
        if bar is None:
            return
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
        if step is not None and step > self.last_step:
            bar.update(step - self.last_step)
            self.last_step = step

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close_sync(self) -> None:
        """Close a bar left open (training ended without ``TrainEnd``)."""
        self._close_bar()
