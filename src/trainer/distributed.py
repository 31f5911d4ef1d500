"""Where this process sits in a (possibly) distributed run.

Single-process for now: rank, world size and local rank come from the environment
variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), so that a run
launched by it already tags its events and checkpoints with the right rank. The
collective operations (:func:`barrier`, :func:`broadcast_flags`) are the seams where
``torch.distributed`` plugs in; today they are no-ops unless a process group is
initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "DistributedInfo",
    "get_info",
    "is_world_process_zero",
    "is_local_process_zero",
    "barrier",
    "broadcast_flags",
]


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


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast_flags(flags: Sequence[bool]) -> list[bool]:
    """Make control decisions agree across ranks: a flag set on any rank is set on all
    (a logical OR). In a single process this returns ``flags`` unchanged.

    This is a collective: every rank must call it at the same point. It is the one
    place a distributed run would synchronise per decision, so the loop calls it only
    where a decision (stop, save) is taken, never per micro-step.
    """
    dist = _dist()
    if dist is None:
        return list(flags)
    import torch

    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
