"""trainer: a PyTorch training loop with transformers' ``Trainer`` and
``TrainerCallback`` API, publishing every hook to an event bus.

Control callbacks (early stopping, the default flow) run inline and steer the loop;
loggers are sinks on the bus (``report_to`` / ``sinks=[...]``) and never stall a step.
No backend SDK is imported here.
"""

from trainer.arguments import IntervalStrategy, TrainingArguments
from trainer.callbacks import CallbackHandler, TrainerCallback
from trainer.flow import DefaultFlowCallback, EarlyStoppingCallback
from trainer.progress import PrinterCallback, ProgressCallback
from trainer.state import ExportableState, TrainerControl, TrainerState
from trainer.trainer import Trainer, TrainingInterrupted

__all__ = [
    "Trainer",
    "TrainingInterrupted",
    "TrainingArguments",
    "TrainerCallback",
    "CallbackHandler",
    "TrainerState",
    "TrainerControl",
    "ExportableState",
    "IntervalStrategy",
    "DefaultFlowCallback",
    "EarlyStoppingCallback",
    "PrinterCallback",
    "ProgressCallback",
]
