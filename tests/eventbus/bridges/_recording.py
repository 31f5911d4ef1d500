"""A recording sink shared by the bridge tests."""

from __future__ import annotations

from typing import Sequence

from eventbus import BaseEvent, RunInfo, Sink


class RecordingSink(Sink):
    """Keeps every event it is given, in order, and what it was opened with."""

    name = "recording"

    def __init__(self, name: str = "recording") -> None:
        self.name = name  # type: ignore[misc]
        self.received: list[BaseEvent] = []
        self.runs: list[RunInfo] = []
        self.closed = 0

    async def open(self, run: RunInfo) -> None:
        self.runs.append(run)

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        self.received.extend(batch)

    async def close(self) -> None:
        self.closed += 1

    def of(self, event_type: type[BaseEvent]) -> list:
        """The recorded events of one type, in order."""
        return [e for e in self.received if type(e) is event_type]
