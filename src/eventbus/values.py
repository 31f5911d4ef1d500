"""Tensor values: snapshot on the publishing thread, resolve on the bus thread.

The publishing thread must never synchronise a device: no ``.item()``, ``.cpu()``,
``float(t)`` or ``if t:``. :func:`snapshot` therefore only *enqueues* a copy
(``clone()`` on the CPU; on CUDA an asynchronous device-to-host copy into pinned
memory plus a recorded CUDA event) so that later in-place changes by the loop do
not leak into what was published. :func:`resolve` runs on the bus thread, waits for
the copy if it has to, and returns plain Python numbers.

torch is never imported here: a tensor can only exist if the caller imported it.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Mapping

__all__ = ["Deferred", "handoff", "has_tensor", "is_tensor", "snapshot", "snapshot_mapping", "snapshot_if_tensors", "resolve", "resolve_mapping"]


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


def snapshot(value: Any) -> Any:
    """Capture ``value`` as published. Non-tensors are returned unchanged.

    Each torch call from Python releases the GIL and must take it back, which waits
    while sink threads run: the CPU path makes one call (``clone``), two only for a
    tensor that requires grad.
    """
    if not is_tensor(value):
        return value
    t = value.detach() if value.requires_grad else value
    if t.is_cuda:
        torch = _torch()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return Deferred(host, ready)
    # CPU: a copy the loop cannot modify. Other devices (mps, xla, ...): an
    # on-device clone is asynchronous there too, and resolve() moves it to the host.
    return Deferred(t.clone())


def handoff(value: Any) -> Any:
    """Like :func:`snapshot`, for a tensor whose owner will never modify it in place
    (a fresh result, such as ``loss_sum / steps``): on the CPU it is kept as it is,
    with no torch call on the publishing thread at all (each one releases the GIL and
    waits to get it back while sink threads run). Accelerator tensors still get their
    asynchronous copy; tensors that require grad are detached by :func:`snapshot`."""
    # ``is_cpu`` rather than ``device.type == "cpu"``: the latter builds a device
    # object and a string (0.6 µs, against 0.08).
    if is_tensor(value) and value.is_cpu and not value.requires_grad:
        return Deferred(value)
    return snapshot(value)


def snapshot_mapping(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``mapping`` with every tensor replaced by its :class:`Deferred`."""
    return {k: snapshot(v) for k, v in mapping.items()}


def _to_python(t: Any) -> Any:
    if t.device.type != "cpu":
        t = t.cpu()
    if t.numel() == 1:
        return t.reshape(()).item()
    return t.tolist()


def resolve(value: Any) -> Any:
    """Turn a snapshot (or a live tensor) into plain Python data. Runs off the hot path."""
    if isinstance(value, Deferred):
        return value.resolve()
    if is_tensor(value):
        return _to_python(value.detach())
    return value


def resolve_mapping(mapping: Mapping[str, Any]) -> dict[str, Any] | None:
    """A resolved copy of ``mapping``, or ``None`` when nothing in it needed resolving."""
    torch = _torch()
    kinds = Deferred if torch is None else (Deferred, torch.Tensor)
    for v in mapping.values():
        if isinstance(v, kinds):
            return {k: resolve(v) for k, v in mapping.items()}
    return None


def is_finite_number(value: Any) -> bool:
    """True for ints and finite floats (bools excluded)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)
