"""One hierarchy for everything the bus raises."""

from __future__ import annotations

__all__ = [
    "EventBusError",
    "BusStateError",
    "SinkError",
    "TransientSinkError",
    "SinkConfigError",
    "UnknownSinkError",
    "MissingDependencyError",
    "SpoolError",
]


class EventBusError(Exception):
    """Base class of every error this library raises on purpose."""


class BusStateError(EventBusError):
    """The bus was used in a state that does not allow it (e.g. a sink added after start)."""


class SinkError(EventBusError):
    """A sink failed. Raised by sinks; the bus isolates it (counted, logged, maybe retried)."""


class TransientSinkError(SinkError):
    """A failure worth retrying (a timeout, a 429 or 5xx, a reset connection).

    ``retry_after`` (seconds: a non-negative number, or a string of one as an HTTP
    ``Retry-After`` header gives it), when the backend said how long to wait, overrides
    the computed backoff for the next attempt; any other value is ignored.
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SinkConfigError(SinkError, ValueError):
    """A sink was configured wrongly: the message says which option and how to fix it."""


class UnknownSinkError(SinkConfigError, KeyError):
    """No sink is registered under that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(SinkConfigError, ImportError):
    """A sink's backend SDK is not installed; the message names the extra to install."""


class SpoolError(EventBusError):
    """The disk spool could not be written or read."""
