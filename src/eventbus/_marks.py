"""High-water marks that know what a sink got at their step.

A sink's mark is ``(step, names)``: the highest step of a metric event (``Log``,
``Evaluate``, ``Predict``) it was delivered, and the names of the metric events it was
delivered at that step, one per value key: ``"Log/loss"``, ``"Evaluate/eval_loss"``,
``"Log/eval_loss"`` (the event type alone, ``"Log"``, for an event with no values).
A resumed run or a replay skips, for that sink, metric events below ``step``, and
those at ``step`` whose names it already got all of: a crash during the evaluation at
step 15, after the training ``Log`` of step 15 was delivered, leaves
``(15, {"Log/loss", ...})``, and the resumed run's ``Evaluate`` at 15 still goes out.

``names`` is ``None`` when they are not known (a mark saved before names were kept, a
bare int passed as ``resume_marks``): every metric event at ``step`` then counts as
delivered, the rule of a plain step.

Where a mark is saved, its step stays where it always was (``marks``: sink -> int, so
that older readers still find it), and the names go alongside (``mark_names``: sink ->
``{"step": int, "names": [str, ...]}``, with the step they belong to; an entry whose step
is not the mark's is read as described in :func:`from_saved`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

from eventbus.events import BaseEvent, Evaluate, Log, Predict

Mark = Tuple[int, Optional[frozenset]]
"""``(step, names)``; ``names`` None: not known, all of them at ``step``."""

_PREFIX: dict[type, str] = {t: t.__name__ + "/" for t in (Log, Evaluate, Predict)}


def names_of(ev: BaseEvent) -> set[str] | None:
    """The names of a metric event: ``"Log/loss"`` per value key; its type alone for one
    with no values (or values that cannot be read: msgspec does not check types when an
    event is built). None for an event of another type."""
    t = type(ev)
    prefix = _PREFIX.get(t)
    if prefix is None:
        return None
    try:
        names = {prefix + str(k) for k in getattr(ev, t._value_field)}  # type: ignore[attr-defined]
    except Exception:
        names = set()
    return names or {t.__name__}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_names_entry(entry: Any) -> Mark | None:
    """``{"step": int, "names": [str, ...]}`` as a mark; None when malformed."""
    if not isinstance(entry, Mapping):
        return None
    step, names = entry.get("step"), entry.get("names")
    if not _is_int(step) or not isinstance(names, (list, tuple, set, frozenset)):
        return None
    if not all(isinstance(n, str) for n in names):
        return None
    return (int(step), frozenset(names))


def parse(value: Any) -> Mark | None:
    """A mark from an int step or a ``{"step", "names"}`` entry; None when neither."""
    if _is_int(value):
        return (int(value), None)
    return parse_names_entry(value)


def combine(step: Mark | None, named: Mark | None) -> Mark | None:
    """One source's int step and its names entry, read together: the entry refines
    the step it belongs to; a later entry (read after the step moved on) is a mark of
    its own, and the higher one wins; an older entry says nothing about ``step``."""
    if named is None:
        return step
    if step is None or named[0] >= step[0]:
        return named
    return step


def from_saved(marks: Any, names: Any) -> dict[str, Mark]:
    """Per sink, the mark of one saved ``marks`` map (sink -> int) and its
    ``mark_names`` map (sink -> ``{"step", "names"}``); malformed entries are ignored."""
    out: dict[str, Mark] = {}
    if isinstance(marks, Mapping):
        for k, v in marks.items():
            if _is_int(v):
                out[str(k)] = (int(v), None)
    if isinstance(names, Mapping):
        for k, v in names.items():
            m = combine(out.get(str(k)), parse_names_entry(v))
            if m is not None:
                out[str(k)] = m
    return out


def merge(a: Mark | None, b: Mark | None) -> Mark | None:
    """Two sources' marks for one sink: the higher step wins, with its names; at the
    same step the names are united (unknown names, ``None``, stand for all of them)."""
    if a is None:
        return b
    if b is None or a[0] > b[0]:
        return a
    if b[0] > a[0]:
        return b
    if a[1] is None or b[1] is None:
        return (a[0], None)
    return (a[0], a[1] | b[1])


def names_entry(mark: Mark | None) -> dict[str, Any] | None:
    """The ``{"step", "names"}`` entry saved for ``mark`` (None when its names are not known)."""
    if mark is None or mark[1] is None:
        return None
    return {"step": mark[0], "names": sorted(mark[1])}


def to_value(mark: Mark) -> int | dict[str, Any]:
    """What ``EventBus(resume_marks=...)`` takes for ``mark``: its entry, or the bare step."""
    return names_entry(mark) or mark[0]
