"""eventbus: typed training-loop events on a bounded asynchronous bus.

The training thread publishes frozen event snapshots in O(1); sinks (TensorBoard,
MLflow, JSON lines, ...) consume them from bounded queues on a background anyio event
loop, with drop counting, failure isolation, retries, a disk spool and a shutdown
deadline.
"""

from eventbus.bus import DEFAULT_URGENT, EventBus
from eventbus.errors import (
    BusStateError,
    EventBusError,
    MissingDependencyError,
    SinkConfigError,
    SinkError,
    SpoolError,
    TransientSinkError,
    UnknownSinkError,
)
from eventbus.events import (
    EVENT_TYPES,
    HOOK_EVENTS,
    BaseEvent,
    EpochBegin,
    EpochEnd,
    Evaluate,
    Event,
    InitEnd,
    Log,
    OptimizerStep,
    Predict,
    PredictionStep,
    PreOptimizerStep,
    PushBegin,
    Save,
    StepBegin,
    StepEnd,
    SubstepEnd,
    TrainBegin,
    TrainEnd,
)
from eventbus.overflow import Overflow
from eventbus.registry import available_sinks, create_sink, register_sink, sinks_from_report_to
from eventbus.sink import RunInfo, Sink, ThreadedSink
from eventbus.stats import BusStats, SinkStats

__version__ = "0.1.0"

__all__ = [
    "EventBus",
    "DEFAULT_URGENT",
    "Sink",
    "ThreadedSink",
    "RunInfo",
    "Overflow",
    "BusStats",
    "SinkStats",
    "available_sinks",
    "create_sink",
    "register_sink",
    "sinks_from_report_to",
    "EventBusError",
    "BusStateError",
    "SinkError",
    "TransientSinkError",
    "SinkConfigError",
    "UnknownSinkError",
    "MissingDependencyError",
    "SpoolError",
    "BaseEvent",
    "Event",
    "EVENT_TYPES",
    "HOOK_EVENTS",
    "InitEnd",
    "TrainBegin",
    "TrainEnd",
    "EpochBegin",
    "EpochEnd",
    "StepBegin",
    "SubstepEnd",
    "PreOptimizerStep",
    "OptimizerStep",
    "StepEnd",
    "Evaluate",
    "Predict",
    "PredictionStep",
    "Save",
    "Log",
    "PushBegin",
]
