"""Modules imported when first used instead of when ``eventbus`` is imported.

The event loop's modules (``asyncio`` and ``anyio``: about 120 ms of the 2-core
development VM's import time, more than everything else ``import eventbus`` loads)
are needed only once a bus runs, and then on its thread. A script that imports the
library to build arguments, a CLI that prints help, a sink module imported by the
registry: none of them should pay for an event loop.

A :class:`LazyModule` stands in a module's globals under the name of the module it
replaces; the first attribute read imports the real module and puts it in its place,
so every later read in that module is a plain global lookup.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["LazyModule"]


class LazyModule:
    """``name`` (a module), imported on first attribute access; ``home`` is the
    module (``__name__``) whose global ``alias`` (default: ``name``) holds this
    stand-in and is rebound to the real module then."""

    __slots__ = ("_name", "_home", "_alias")

    def __init__(self, name: str, home: str, alias: str | None = None) -> None:
        self._name = name
        self._home = home
        self._alias = alias or name

    def load(self) -> types.ModuleType:
        """Import the module (once; the import system makes it thread-safe) and
        rebind the home module's global to it."""
        module = importlib.import_module(self._name)
        home = sys.modules.get(self._home)
        if home is not None and getattr(home, self._alias, None) is self:
            setattr(home, self._alias, module)
        return module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use by {self._home}>"
