"""Find sinks by name: the ``eventbus.sinks`` entry-point group, plus in-process
registrations. The project's own sinks register there as a third party would."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from eventbus.errors import MissingDependencyError, SinkConfigError, UnknownSinkError
from eventbus.sink import Sink

if TYPE_CHECKING:
    import importlib.metadata

__all__ = ["ENTRY_POINT_GROUP", "register_sink", "unregister_sink", "available_sinks", "load_sink_factory", "create_sink", "sinks_from_report_to"]

ENTRY_POINT_GROUP = "eventbus.sinks"

SinkFactory = Callable[..., Sink]

# report_to names (transformers' spelling) whose extra is spelled differently.
_EXTRA_FOR = {"comet_ml": "comet"}
_local: dict[str, SinkFactory] = {}


def register_sink(name: str, factory: SinkFactory) -> None:
    """Register a sink factory (usually a Sink subclass) under ``name`` in this process."""
    if not name or not isinstance(name, str):
        raise SinkConfigError(f"a sink name must be a non-empty string, got {name!r}")
    _local[name] = factory


def unregister_sink(name: str) -> None:
    """Remove a registration made with :func:`register_sink`."""
    _local.pop(name, None)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    # Imported here: importlib.metadata (with email, zipfile, pathlib) is the largest
    # import of the package otherwise, and is only needed to look a sink up by name.
    import importlib.metadata

    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_sinks() -> list[str]:
    """Every registered sink name, sorted."""
    return sorted(set(_entry_points()) | set(_local))


def load_sink_factory(name: str) -> SinkFactory:
    """The factory registered under ``name``.

    Raises :class:`UnknownSinkError` listing the known names, or
    :class:`MissingDependencyError` naming the extra to install when the sink's module
    cannot import its SDK.
    """
    if name in _local:
        return _local[name]
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(available_sinks()) or "(none installed)"
        raise UnknownSinkError(f"unknown sink {name!r}; known sinks: {known}")
    try:
        return eps[name].load()
    except MissingDependencyError:
        raise
    except ImportError as exc:
        raise MissingDependencyError(
            f"sink {name!r} could not be imported ({exc}); install its extra: pip install 'eventbus-telemetry[{_EXTRA_FOR.get(name, name)}]'"
        ) from exc


def create_sink(name: str, /, **options: Any) -> Sink:
    """Build the sink registered under ``name`` with ``options``.

    A wrong option is a :class:`SinkConfigError` that names the sink and the option.
    A sink class whose ``requires`` names its SDK (``(module, extra)``) is checked
    first: a missing SDK is a :class:`MissingDependencyError` naming the extra to
    install, now rather than when the bus opens the sink (hours of training with
    nothing logged).
    """
    factory = load_sink_factory(name)
    requires = getattr(factory, "requires", None)
    if isinstance(requires, tuple) and len(requires) == 2 and not _installed(requires[0]):
        module, extra = requires
        raise MissingDependencyError(
            f"sink {name!r} needs the {module!r} package, which is not installed: pip install 'eventbus-telemetry[{extra}]'"
        )
    try:
        sink = factory(**options)
    except TypeError as exc:
        raise SinkConfigError(f"sink {name!r}: bad options {sorted(options)}: {exc}") from exc
    if not isinstance(sink, Sink):
        raise SinkConfigError(f"the factory registered as sink {name!r} returned {type(sink).__name__}, not a Sink")
    return sink


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing; sys.modules[module] = None
        return False


def sinks_from_report_to(report_to: str | Sequence[str] | None, **options: Any) -> list[Sink]:
    """Turn transformers-style ``report_to`` into sinks.

    ``"none"``/``None``/``[]``: none. ``"all"``: every registered sink whose
    ``available()`` says its SDK is installed and configured. A name or list of names:
    those, each an error if unknown or its SDK is missing. ``options`` maps a sink name
    to the keyword arguments for that sink.
    """
    names = normalize_report_to(report_to)
    if names == ["all"]:
        names = []
        for name in available_sinks():
            try:
                factory = load_sink_factory(name)
            except SinkConfigError:
                continue
            if getattr(factory, "available", lambda: True)():
                names.append(name)
    return [create_sink(name, **dict(options.get(name, {}))) for name in names]


def normalize_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """``"a,b"``, ``["a", "b"]``, ``"none"``, ``"all"`` or ``None`` -> a list of names."""
    if report_to is None:
        return []
    if isinstance(report_to, str):
        items = [p.strip() for p in report_to.split(",")]
    else:
        items = [str(p).strip() for p in report_to]
    items = [p for p in items if p]
    if not items or items == ["none"]:
        return []
    if "all" in items:
        if len(items) > 1:
            raise SinkConfigError(f"report_to: 'all' cannot be combined with other names, got {items}")
        return ["all"]
    if "none" in items:
        raise SinkConfigError(f"report_to: 'none' cannot be combined with other names, got {items}")
    seen: list[str] = []
    for p in items:
        if p not in seen:
            seen.append(p)
    return seen
