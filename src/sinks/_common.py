"""Helpers the backend sinks share: metric naming, scalar filtering, flattening."""

from __future__ import annotations

import collections.abc
import hashlib
import importlib
import logging
import os
import re
import types
import typing
from typing import Any, Callable, Iterator, Mapping

from eventbus.errors import MissingDependencyError, SinkConfigError
from eventbus.redact import is_secret_key

__all__ = [
    "BATCH_SIZE", "import_sdk", "rewrite_name", "rewrite_logs", "prefixed_name", "evaluation_names", "ScalarFilter",
    "flatten", "is_number", "check_option_types", "distinct_name",
]

logger = logging.getLogger("sinks")

BATCH_SIZE = 4096
"""``max_batch_size`` of the sinks that write every ``Log`` (tensorboard, jsonl,
neptune, comet_ml): a batch costs a hand-off to the sink's thread or child process
(thread wakes, ~0.5 ms of CPU on a busy VM) whatever its size, and at a thousand
logged steps a second the default 512 meant two a second; with this, batches go out
every ``max_delay``."""


def import_sdk(module: str, extra: str, sink: str) -> Any:
    """Import a backend SDK, or raise a clear error naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {sink} sink needs the {module!r} package, which is not installed: "
            f"pip install 'eventbus-telemetry[{extra}]' ({exc})"
        ) from exc


def rewrite_name(name: str) -> str:
    """transformers' naming for scalar backends, one name: ``eval_loss`` ->
    ``eval/loss``, ``test_acc`` -> ``test/acc``, anything else ``loss`` -> ``train/loss``."""
    if name.startswith("eval_"):
        return "eval/" + name[5:]
    if name.startswith("test_"):
        return "test/" + name[5:]
    return "train/" + name


def rewrite_logs(values: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`rewrite_name` applied to every key of ``values``."""
    return {rewrite_name(k): v for k, v in values.items()}


def prefixed_name(name: str, prefix: str) -> str:
    """An evaluation's metric under its prefix: ``eval_loss`` -> ``eval/loss`` (a name
    without the prefix -> ``eval/<name>``)."""
    head = prefix + "_"
    return f"{prefix}/{name[len(head):]}" if name.startswith(head) else f"{prefix}/{name}"


def evaluation_names(metrics: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """An ``Evaluate``/``Predict``'s metrics under the names transformers' Comet and
    Neptune callbacks give them (they log them through ``on_log``, named by
    :func:`rewrite_logs`), so the same evaluation arriving as ``Log`` and as
    ``Evaluate`` is one series: ``eval_loss`` -> ``eval/loss``, ``test_acc`` ->
    ``test/acc``, ``epoch`` -> ``train/epoch`` (no ``eval/epoch``), a custom
    ``metric_key_prefix``'s ``val_loss`` -> ``train/val_loss``; a name without the
    prefix gets it (``loss`` -> ``eval/loss``)."""
    head = prefix + "_"
    return {
        rewrite_name(k) if k == "epoch" or k.startswith(head) else prefixed_name(k, prefix): v
        for k, v in metrics.items()
    }


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
            kind = type(v)
            if kind is float:  # nearly every value: one type() and no call
                yield k, v
            elif kind is bool or kind is int or is_number(v):
                try:
                    f = float(v)
                except OverflowError:
                    # An int beyond a double (10**400): not a number a backend can store.
                    # Skipped like text, which is what it arrives as in an isolated
                    # sink's child process (eventbus.events.encode_lenient); raising
                    # here would fail every other event of the batch.
                    if k not in self._warned:
                        self._warned.add(k)
                        logger.warning(
                            "%s sink: %r is an int too large for a float; it is not logged as a metric "
                            "(this warning is shown once per key)",
                            self.sink_name,
                            k,
                        )
                    continue
                yield k, f
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



def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp``, for the shapes sink options use;
    what cannot be checked at run time (protocols, type variables) passes."""
    if tp is Any or tp is object:
        return True
    if tp is None or tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a fine float (``flush_secs=5``)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is os.PathLike or tp is os.PathLike:
        return isinstance(value, os.PathLike)
    if origin in (collections.abc.Sequence, list, tuple, collections.abc.Iterable):
        if isinstance(value, (str, bytes)) or not isinstance(value, origin):
            return False
        item = args[0] if args else Any
        return all(_matches(v, item) for v in value)
    if origin in (collections.abc.Mapping, dict):
        return isinstance(value, collections.abc.Mapping)
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return callable(value)
    if isinstance(tp, type) and tp.__module__ != "typing":
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is None or tp is type(None):
        return "None"
    if origin is os.PathLike:
        return "a path"
    if tp is float:
        return "a number"
    if origin is collections.abc.Callable:
        return "a callable"
    if origin is not None:
        return f"a {getattr(origin, '__name__', str(origin))}"
    return f"a {getattr(tp, '__name__', str(tp))}"


_URL_USERINFO = re.compile(r"(://)[^/@\s'\"]+@")


def check_option_types(sink: str, func: Callable[..., Any], values: Mapping[str, Any]) -> None:
    """Check each of ``values`` (a constructor's ``locals()``) against the annotation
    of that parameter of ``func``; a mismatch is a :class:`SinkConfigError` naming the
    sink, the option, what it must be and what it got (never the value of a secret)."""
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an annotation that does not resolve here: nothing to check
        return
    for name, value in values.items():
        tp = hints.get(name)
        if tp is None or name == "self":
            continue
        if not _matches(value, tp):
            # Credentials in a URL (a tracking URI's user:password@) never show.
            shown = "***" if is_secret_key(name) else _URL_USERINFO.sub(r"\1***@", repr(value))
            if len(shown) > 80:
                shown = shown[:77] + "..."
            raise SinkConfigError(
                f"{sink} sink: option {name!r} must be {_describe(tp)}, got {type(value).__name__} {shown}"
            )


def distinct_name(base: str, original: str, taken: Callable[[str], bool], limit: int | None = None,
                  fix: Callable[[str], str] = lambda n: n) -> str:
    """A name for ``original`` when ``base`` (what a backend's renaming made of it) is
    another metric's: ``base`` plus ``_`` and 6 hex characters of a hash of
    ``original`` (the same in every process), within ``limit`` characters and passed
    through ``fix`` (the backend's own rule), the first that is not ``taken``."""
    digest = hashlib.sha1(original.encode("utf-8", "surrogatepass")).hexdigest()
    head = base if limit is None else base[: limit - 7]
    for i in range(0, len(digest) - 6, 6):
        name = fix(f"{head}_{digest[i : i + 6]}")
        if not taken(name):
            return name
    n = 2
    head = base if limit is None else base[: limit - 12]
    while taken(name := fix(f"{head}_{n}")):
        n += 1
    return name
