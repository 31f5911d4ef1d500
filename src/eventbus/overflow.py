"""What a sink's bounded queue does when it is full."""

from __future__ import annotations

import enum

__all__ = ["Overflow"]


class Overflow(str, enum.Enum):
    """Policy of a sink's bounded queue when an event arrives and the queue is full.

    - ``DROP_OLDEST``: evict the oldest queued event (counted as dropped) and keep the
      newest; right for "latest value wins" telemetry.
    - ``DROP_NEWEST``: refuse the arriving event (counted as dropped); keeps history.
    - ``SPOOL``: append what does not fit to the sink's disk spool instead of dropping,
      to be delivered in order once the sink catches up.
    """

    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"
    SPOOL = "spool"
