"""Helpers the backend sinks share: metric naming, scalar filtering, flattening."""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Iterator, Mapping

from eventbus.errors import MissingDependencyError

__all__ = ["import_sdk", "rewrite_logs", "ScalarFilter", "flatten", "is_number"]

logger = logging.getLogger("sinks")


def import_sdk(module: str, extra: str, sink: str) -> Any:
    """Import a backend SDK, or raise a clear error naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {sink} sink needs the {module!r} package, which is not installed: "
            f"pip install 'eventbus-telemetry[{extra}]' ({exc})"
        ) from exc


def rewrite_logs(values: Mapping[str, Any]) -> dict[str, Any]:
    """transformers' naming for scalar backends: ``eval_loss`` -> ``eval/loss``,
    ``test_acc`` -> ``test/acc``, anything else ``loss`` -> ``train/loss``."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k.startswith("eval_"):
            out["eval/" + k[5:]] = v
        elif k.startswith("test_"):
            out["test/" + k[5:]] = v
        else:
            out["train/" + k] = v
    return out


def is_number(value: Any) -> bool:
    """Ints and floats (NaN and inf included), not bools."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ScalarFilter:
    """Keeps the values a scalar-only backend can take, warning once per key (not per
    step) about the ones it skips."""

    def __init__(self, sink_name: str) -> None:
        self.sink_name = sink_name
        self._warned: set[str] = set()

    def scalars(self, values: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
        for k, v in values.items():
            if isinstance(v, bool):
                yield k, float(v)
            elif is_number(v):
                yield k, float(v)
            elif k not in self._warned:
                self._warned.add(k)
                logger.warning(
                    "%s sink: %r is a %s, not a scalar; it is not logged as a metric (this warning is shown once per key)",
                    self.sink_name,
                    k,
                    type(v).__name__,
                )


def flatten(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings to one level: ``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, key))
        else:
            out[key] = v
    return out


def finite_or_none(value: float) -> float | None:
    """``value`` if finite, else ``None`` (for backends that reject NaN/inf)."""
    return value if math.isfinite(value) else None
