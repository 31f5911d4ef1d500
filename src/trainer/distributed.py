"""Where this process sits in a (possibly) distributed run, and the few collectives the
training loop needs.

A run launched by ``torchrun`` is detected from the environment variables it sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``):
:func:`init_process_group` then starts ``torch.distributed`` (NCCL when CUDA is
available, gloo otherwise, always with a timeout so that no rank waits forever for
a peer that died). Without those variables everything here is a no-op and the
trainer runs as a single process.

The collectives are kept few and small on purpose:

- :func:`broadcast_flags`: one small integer tensor on the host, OR-reduced over
  gloo (a gloo side group when training runs on NCCL, so the GPU is never
  synchronised), once per optimizer step, so that a control decision taken on any
  rank applies on all of them at the same global step.
- :func:`all_reduce_mean_`: the logged loss, averaged in place on the device; with
  NCCL it is enqueued on the communication stream and never blocks the host.
- :func:`gather_objects` / :func:`broadcast_object`: evaluation results and the run
  id, at points that already wait for the host (evaluation, start-up).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "DEFAULT_TIMEOUT",
    "DistributedInfo",
    "get_info",
    "is_world_process_zero",
    "is_local_process_zero",
    "launched_by_torchrun",
    "is_initialized",
    "init_process_group",
    "default_backend",
    "device_for_rank",
    "barrier",
    "broadcast_flags",
    "broadcast_object",
    "gather_objects",
    "all_reduce_sum_",
    "destroy_process_group",
    "all_reduce_mean_",
    "shard_indices",
]

logger = logging.getLogger("trainer")

DEFAULT_TIMEOUT: float = 1800.0
"""Seconds a collective may wait for the other ranks before it fails (transformers'
``ddp_timeout`` default): a rank that died or hangs makes the others fail with a
timeout error instead of waiting forever."""


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class DistributedInfo:
    """This process's place in the run: ``rank`` (world rank), ``local_rank`` (rank on
    this machine) and ``world_size`` (number of processes)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_world_process_zero(self) -> bool:
        """True on the one process that writes checkpoints and runs the sinks."""
        return self.rank == 0

    @property
    def is_local_process_zero(self) -> bool:
        """True on the first process of each machine."""
        return self.local_rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def get_info() -> DistributedInfo:
    """Rank, world size and local rank of this process, from ``torch.distributed`` when a
    process group is initialised, else from the environment (``RANK``/``WORLD_SIZE``/
    ``LOCAL_RANK``), else a single process."""
    dist = _dist()
    if dist is not None:
        return DistributedInfo(
            rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0)
        )
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"inconsistent distributed environment: RANK={rank} WORLD_SIZE={world_size}; "
            "RANK must be in [0, WORLD_SIZE) (launch with torchrun, or unset both)"
        )
    return DistributedInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def is_world_process_zero() -> bool:
    """True on world rank 0."""
    return get_info().is_world_process_zero


def is_local_process_zero() -> bool:
    """True on local rank 0."""
    return get_info().is_local_process_zero


def _dist():  # type: ignore[no-untyped-def]
    """``torch.distributed`` when a process group is up, else ``None``."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch without distributed support
        return None
    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process run (``WORLD_SIZE`` > 1, as
    ``torchrun --nproc_per_node=N`` with N > 1 sets it)."""
    return _env_int("WORLD_SIZE", 1) > 1


def default_backend() -> str:
    """``"nccl"`` when CUDA is available, else ``"gloo"``."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for_rank(backend: str | None = None) -> Any:
    """The device this rank trains on: ``cuda:<LOCAL_RANK>`` with NCCL, else the CPU."""
    import torch

    backend = backend or (_dist().get_backend() if _dist() is not None else default_backend())
    if str(backend) == "nccl":
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return torch.device("cpu")


def init_process_group(timeout: float | None = None, backend: str | None = None) -> bool:
    """Start ``torch.distributed`` for a torchrun launch; returns whether a process
    group is up afterwards.

    A no-op returning ``False`` in a single process (``WORLD_SIZE`` unset or 1), and
    returning ``True`` when the group is already initialised (by the user's script,
    say). ``RANK``/``WORLD_SIZE`` without ``MASTER_ADDR``/``MASTER_PORT`` (not a
    torchrun launch) only tag the process with its rank: a warning, and no group. ``backend`` defaults to NCCL on CUDA and gloo on the CPU; ``timeout``
    (seconds, default :data:`DEFAULT_TIMEOUT`) bounds every collective, so that a rank
    whose peer died fails instead of hanging. With NCCL the CUDA device is set to
    ``LOCAL_RANK`` first, so that every rank owns one GPU.
    """
    if _dist() is not None:
        return True
    if not launched_by_torchrun():
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(
            "WORLD_SIZE > 1 asks for a distributed run, but this torch build has no torch.distributed; "
            "install a torch build with distributed support or launch a single process"
        )
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        # RANK/WORLD_SIZE without a rendezvous address: not a torchrun launch (a test,
        # or a launcher that only tags processes). Keep the ranks, skip the group.
        logger.warning(
            "WORLD_SIZE=%s but %s is not set: no process group is started, so ranks do not communicate "
            "(no DDP, no agreement); launch with `torchrun --nproc_per_node=N your_script.py` to train "
            "distributed",
            os.environ.get("WORLD_SIZE"),
            " and ".join(missing),
        )
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs CUDA, and no GPU is visible; use backend 'gloo' on the CPU")
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    seconds = DEFAULT_TIMEOUT if timeout is None else float(timeout)
    if seconds <= 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout!r}")
    global _timeout_s
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
    _timeout_s = seconds
    logger.info(
        "initialised torch.distributed: backend=%s rank=%d world_size=%d local_rank=%d",
        backend,
        dist.get_rank(),
        dist.get_world_size(),
        _env_int("LOCAL_RANK", 0),
    )
    return True


def destroy_process_group() -> None:
    """End the process group (and the host side group), when one is up: the last
    collective of a distributed script. A no-op in a single process."""
    global _control_group, _control_group_of
    dist = _dist()
    if dist is None:
        return
    dist.destroy_process_group()
    _control_group = _control_group_of = None


def barrier() -> None:
    """Wait for every process (a no-op in a single process). Bounded by the process
    group's timeout."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is up."""
    return _dist() is not None


_control_group: Any = None
_control_group_of: Any = None
_timeout_s: float | None = None  # what init_process_group was given, for the side group


def _host_group() -> Any:
    """The process group for host values (control flags, pickled objects): the
    default group when it is gloo; with NCCL a gloo group over the same ranks, created
    once (a collective: every rank reaches it at the same call), so that agreeing on
    a flag never touches a CUDA stream nor waits for the device."""
    global _control_group, _control_group_of
    dist = _dist()
    assert dist is not None
    default = dist.group.WORLD
    if str(dist.get_backend()) == "gloo":
        return None
    if _control_group is None or _control_group_of is not default:
        timeout = datetime.timedelta(seconds=_timeout_s) if _timeout_s is not None else None
        _control_group = dist.new_group(backend="gloo", timeout=timeout)
        _control_group_of = default
    return _control_group


def broadcast_flags(flags: Sequence[bool]) -> list[bool]:
    """Make control decisions agree across ranks: a flag set on any rank is set on all
    (a logical OR). In a single process this returns ``flags`` unchanged.

    This is a collective: every rank must call it at the same point. The flags travel
    in one small int tensor on the host, over gloo (a gloo side group when training
    uses NCCL), so it never synchronises the GPU; its cost is one small message round
    trip, which is why the loop calls it once per optimizer step (never per
    micro-batch). It also lines the ranks up at each step, which DDP's gradient
    all-reduce does anyway.
    """
    dist = _dist()
    if dist is None:
        return list(flags)
    import torch

    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return [bool(v) for v in t.tolist()]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it, on every rank (``obj`` itself in a single process).
    Pickled: for small values (a run id), at start-up."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_host_group())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single
    process). Pickled through the host: used after evaluation, which is a host sync
    anyway."""
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_host_group())
    return out


class _Pending:
    """An in-flight all-reduce: :meth:`wait` before the tensor is read."""

    __slots__ = ("work", "tensor", "divisor")

    def __init__(self, work: Any, tensor: Any, divisor: int) -> None:
        self.work, self.tensor, self.divisor = work, tensor, divisor

    def wait(self) -> Any:
        """Wait for the reduction (with NCCL: make the current stream wait, the host
        does not) and return the reduced tensor."""
        if self.work is not None:
            self.work.wait()
            self.work = None
            if self.divisor > 1:
                self.tensor.div_(self.divisor)  # on the device, no host sync
        return self.tensor


def all_reduce_mean_(tensor: Any) -> _Pending:
    """Start averaging ``tensor`` across ranks, in place, asynchronously; call
    ``.wait()`` on the result before reading the tensor. A no-op in a single process.

    No host synchronisation: with NCCL the reduction is enqueued on the communication
    stream and ``wait()`` only orders the current stream after it; with gloo the
    tensor is on the host already.
    """
    pending = all_reduce_sum_(tensor)
    if pending.work is not None:
        pending.divisor = _dist().get_world_size()
    return pending


def all_reduce_sum_(tensor: Any) -> _Pending:
    """Start summing ``tensor`` across ranks, in place, asynchronously (as
    :func:`all_reduce_mean_`, without the division); ``.wait()`` before reading it."""
    dist = _dist()
    if dist is None:
        return _Pending(None, tensor, 1)
    work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
    return _Pending(work, tensor, 1)


def shard_indices(indices: Sequence[int], rank: int, world_size: int, pad: bool = True) -> list[int]:
    """This rank's share of ``indices``, as ``torch.utils.data.DistributedSampler``
    cuts it: padded (by repeating from the start) to a multiple of ``world_size`` when
    ``pad``, then every ``world_size``-th index starting at ``rank``. Every rank gets
    the same number of indices when padded, so that every rank takes the same number
    of steps; without padding the shares may differ by one (evaluation)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank} world_size={world_size}")
    order = list(indices)
    if world_size == 1:
        return order
    if pad and order:
        total = -(-len(order) // world_size) * world_size
        while len(order) < total:
            order += order[: total - len(order)]
    return order[rank::world_size]
