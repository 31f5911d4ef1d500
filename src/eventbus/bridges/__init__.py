"""Bridges: give a trainer you already use (transformers' ``Trainer``, Lightning's
``Trainer``) the bus, its sinks, spool and stats, without switching trainers.

Each bridge lives in its own module and imports its framework only when that module
is imported, so ``import eventbus.bridges`` stays cheap::

    from eventbus.bridges.transformers import EventBusCallback   # pip install 'eventbus-telemetry[transformers]'
    from eventbus.bridges.lightning import EventBusLogger        # pip install 'eventbus-telemetry[lightning]'

The names are also reachable from this package (``eventbus.bridges.EventBusCallback``);
the framework is imported on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EventBusCallback", "EventBusLogger", "EventBusLightningCallback"]

# Attribute -> the submodule that defines it; imported on first access (PEP 562) so
# that importing this package never imports transformers or lightning.
_LAZY = {
    "EventBusCallback": "eventbus.bridges.transformers",
    "EventBusLogger": "eventbus.bridges.lightning",
    "EventBusLightningCallback": "eventbus.bridges.lightning",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'eventbus.bridges' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
