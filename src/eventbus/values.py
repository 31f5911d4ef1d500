"""Tensor values: snapshot on the publishing thread, resolve on the bus thread.

The publishing thread must never synchronise a device: no ``.item()``, ``.cpu()``,
``float(t)`` or ``if t:`` on an accelerator tensor. :func:`snapshot` therefore only
*enqueues* a copy of one (on CUDA an asynchronous device-to-host copy into pinned
memory plus a recorded CUDA event), so that later in-place changes by the loop do not
leak into what was published; a CPU tensor involves no device, and a small one is
read at once with ``tolist()``, the one torch call that keeps the GIL (see
:func:`snapshot`). :func:`resolve` runs on the bus thread, waits for the copy if it
has to, and returns plain Python numbers, again with ``tolist()``.

torch is never imported here: a tensor can only exist if the caller imported it.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

__all__ = ["Deferred", "Snapshot", "handoff", "has_tensor", "is_tensor", "number", "snapshot", "snapshot_mapping", "snapshot_if_tensors", "resolve", "resolve_mapping"]


def _torch() -> Any:
    return sys.modules.get("torch")


def is_tensor(value: Any) -> bool:
    """True when ``value`` is a ``torch.Tensor`` (without importing torch)."""
    torch = _torch()
    return torch is not None and isinstance(value, torch.Tensor)


def has_tensor(mapping: Mapping[str, Any]) -> bool:
    """True when any value of ``mapping`` is a tensor."""
    torch = _torch()
    if torch is None:
        return False
    tensor = torch.Tensor
    for v in mapping.values():
        if isinstance(v, tensor):
            return True
    return False


def snapshot_if_tensors(mapping: Mapping[str, Any]) -> dict[str, Any] | None:
    """:func:`snapshot_mapping` of ``mapping`` if it holds a tensor, else ``None``
    (no copy for the common case of plain numbers)."""
    return snapshot_mapping(mapping) if has_tensor(mapping) else None


class Deferred:
    """A tensor value captured without a device sync, resolved later on the bus thread."""

    __slots__ = ("tensor", "ready")

    def __init__(self, tensor: Any, ready: Any = None) -> None:
        self.tensor = tensor
        self.ready = ready  # a torch.cuda.Event when the copy is asynchronous

    def resolve(self) -> Any:
        """Wait for the copy if needed and return a Python number (or a list)."""
        if self.ready is not None:
            self.ready.synchronize()
        return _to_python(self.tensor)

    def __repr__(self) -> str:
        return f"Deferred({type(self.tensor).__name__}{tuple(self.tensor.shape)})"


SMALL_CPU_TENSOR = 64
"""CPU tensors up to this many elements are read into Python values at once when
published (``tolist()``), larger ones are copied (``clone()``)."""


def snapshot(value: Any) -> Any:
    """Capture ``value`` as published. Non-tensors are returned unchanged.

    Most torch calls release the GIL and must take it back, which, while another
    thread runs Python (the bus, a sink), waits up to the interpreter's switch
    interval (5 ms): ``clone()``, ``detach()`` and ``item()`` all do. ``tolist()``
    and tensor attributes (``is_cpu``, ``requires_grad``, ``numel()``) do not. So a
    small CPU tensor is read into Python values right here with ``tolist()`` (a CPU
    read, no device involved, and the value as it was when published), a larger one
    is cloned, and an accelerator tensor gets an asynchronous copy to pinned host
    memory (never a device sync).
    """
    if not is_tensor(value):
        return value
    if value.is_cpu:
        n = value.numel()
        if n <= SMALL_CPU_TENSOR:
            return _python_value(value, n)
        return Deferred((value.detach() if value.requires_grad else value).clone())
    t = value.detach() if value.requires_grad else value
    if t.is_cuda:
        torch = _torch()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Deferred(host, ready)
    # Other devices (mps, xla, ...): an on-device clone is asynchronous there too,
    # and resolve() moves it to the host.
    return Deferred(t.clone())


def handoff(value: Any) -> Any:
    """Like :func:`snapshot`, for a tensor whose owner will never modify it in place
    (a fresh result, such as ``loss_sum / steps``): on the CPU it is kept as it is,
    with no torch call on the publishing thread at all (each one releases the GIL and
    waits to get it back while sink threads run). Accelerator tensors still get their
    asynchronous copy, and tensors that require grad are captured by :func:`snapshot`."""
    # ``is_cpu`` rather than ``device.type == "cpu"`` (which builds a device object
    # and a string: 0.6 µs against 0.08); the bus thread reads it with tolist(). One
    # that requires grad is read now: kept, it would hold its autograd graph alive.
    if is_tensor(value) and value.is_cpu and not value.requires_grad:
        return Deferred(value)
    return snapshot(value)


class Snapshot(dict):  # type: ignore[type-arg]
    """A mapping whose tensors were already captured (:func:`snapshot` or
    :func:`handoff`): an event given one keeps it as it is instead of scanning it
    again. Encodes as a plain dict."""

    __slots__ = ()


def snapshot_mapping(mapping: Mapping[str, Any]) -> Snapshot:
    """A copy of ``mapping`` with every tensor replaced by its :class:`Deferred`."""
    out = Snapshot()
    for k, v in mapping.items():
        out[k] = snapshot(v)
    return out


def number(value: Any) -> Any:
    """``value`` as the plain Python number it stands for when it is a numpy scalar
    (``np.float32(0.5)``, ``np.int64(3)``, ``np.bool_``; also a 0-d array) or an
    instance of a ``float``/``int`` subclass; anything else is returned unchanged.
    Sinks and encoders only know the plain types: a numpy scalar would otherwise be
    written as its text."""
    kind = type(value)
    if kind is float or kind is int or kind is bool:
        return value
    if kind.__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        try:
            return value.item()
        except Exception:
            return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return value


def _python_value(t: Any, numel: int | None = None) -> Any:
    """A CPU tensor's value as Python data, with ``tolist()`` alone: it keeps the GIL
    (``item()`` and ``reshape()`` release it) and needs no ``detach()``. One element,
    whatever the shape, is a number. ``numel``: ``t.numel()`` when the caller has it."""
    out = t.tolist()
    # A 0-d tensor (a loss, a norm) gives its number at once: no numel() call.
    if type(out) is list and (t.numel() if numel is None else numel) == 1:
        while type(out) is list:
            out = out[0]
    return out


def _to_python(t: Any) -> Any:
    if not t.is_cpu:
        t = t.detach().cpu()
    return _python_value(t)


def wide_int_text(value: int) -> str | None:
    """The text an int too large for a float (``10**400``) is written as: its digits,
    or ``<int of N bits>`` past Python's digit limit (``sys.get_int_max_str_digits``);
    ``None`` for an int a float holds. What an isolated sink's pipe and a sink in the
    training process both write, so that the two agree."""
    try:
        float(value)
        return None
    except OverflowError:
        pass
    try:
        return str(value)
    except ValueError:
        return f"<int of {value.bit_length()} bits>"


def plain_array(value: Any) -> Any:
    """For an event's values (what sinks write): a numpy scalar or array, or an
    instance of a float/int subclass, as Python data, as a tensor of the same values
    becomes: its number (a scalar, or an array
    of one element whatever its shape), else its list; anything else unchanged,
    rather than written as the array's repr. (Callbacks get arrays as they were
    logged, as in transformers: :func:`resolve` leaves them.)"""
    n = number(value)  # a numpy scalar, a float/int subclass: its plain number
    if n is not value:
        return n
    if type(value).__module__ == "numpy":
        try:
            if getattr(value, "size", None) == 1:
                return value.item()
            if getattr(value, "ndim", 0):
                return value.tolist()
        except Exception:
            return value
    return value


def resolve(value: Any) -> Any:
    """Turn a snapshot (or a live tensor, or a numpy scalar) into plain Python data.
    Runs off the hot path."""
    if isinstance(value, Deferred):
        return value.resolve()
    if is_tensor(value):
        return _to_python(value)
    return number(value)


def resolve_mapping(mapping: Mapping[str, Any]) -> Snapshot | None:
    """A resolved copy of ``mapping`` (a :class:`Snapshot`: it holds no tensor, and an
    event given it does not scan it again), or ``None`` when nothing in it needed
    resolving."""
    torch = _torch()
    tensor = torch.Tensor if torch is not None else ()
    out: Snapshot | None = None
    # Once per value of every Log on the bus thread, whose Python time the training
    # thread waits for: numbers (most values) are passed over on one type() each, and
    # the checks are written out rather than calling resolve().
    for k, v in mapping.items():
        kind = type(v)
        if kind is float or kind is int:
            continue
        if isinstance(v, tensor):
            v = _to_python(v)
        elif isinstance(v, Deferred):
            v = v.resolve()
        else:
            n = plain_array(v)  # a numpy scalar or array: its Python number or list
            if n is v:
                continue
            v = n
        if out is None:
            out = Snapshot(mapping)
        out[k] = v
    return out


def is_finite_number(value: Any) -> bool:
    """True for ints and finite floats (bools excluded)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)
