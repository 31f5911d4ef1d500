"""transformers' learning-rate schedules, by name (``lr_scheduler_type``) with their
options (``lr_scheduler_kwargs``), written here so that the trainer does not need
transformers: the same multipliers of the optimizer's learning rate, step by step.
``reduce_lr_on_plateau`` is torch's ``ReduceLROnPlateau``, stepped by the trainer
after each evaluation with ``metric_for_best_model`` instead of after each step."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping

import torch

__all__ = ["SCHEDULES", "get_scheduler"]


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, warmup: int) -> float:
    return _warmup(step, warmup) if step < warmup else 1.0


def _linear(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine(step: int, *, warmup: int, total: int, num_cycles: float = 0.5, min_lr_rate: float = 0.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _cosine_with_restarts(step: int, *, warmup: int, total: int, num_cycles: int = 1) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial(step: int, *, warmup: int, total: int, lr_end: float, power: float, lr_init: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr_init
    remaining = 1 - (step - warmup) / (total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _inverse_sqrt(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _cosine_warmup_with_min_lr(
    step: int, *, warmup: int, total: int, num_cycles: float, min_lr_rate: float, warmup_lr_rate: float | None
) -> float:
    if step < warmup:
        if warmup_lr_rate is None:
            return (step + 1.0) / max(1.0, float(warmup))
        return warmup_lr_rate + (1.0 - warmup_lr_rate) * step / max(1, warmup - 1)
    progress = (step - warmup + 1.0) / max(1.0, float(total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


_SHAPES = ("linear", "cosine", "1-sqrt")


def _wsd(
    step: int, *, warmup: int, stable: int, decay: int, warmup_type: str, decay_type: str, min_lr_ratio: float,
    num_cycles: float,
) -> float:
    if step < warmup:
        progress = float(step) / float(max(1, warmup))
        factor = {"linear": progress, "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)),
                  "1-sqrt": 1.0 - math.sqrt(1.0 - progress)}[warmup_type]
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = float(step - warmup - stable) / float(max(1, decay))
        factor = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)),
                  "1-sqrt": 1.0 - math.sqrt(progress)}[decay_type]
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def _min_lr_rate(optimizer: torch.optim.Optimizer, min_lr: float | None, min_lr_rate: float | None) -> float:
    if min_lr is not None and min_lr_rate is not None:
        raise ValueError("set one of min_lr and min_lr_rate in lr_scheduler_kwargs, not both")
    if min_lr is not None:
        return float(min_lr) / optimizer.defaults["lr"]
    if min_lr_rate is None:
        raise ValueError("this schedule needs min_lr or min_lr_rate in lr_scheduler_kwargs, e.g. {'min_lr_rate': 0.1}")
    return float(min_lr_rate)


def _build(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int, kw: dict[str, Any]) -> Any:
    if name == "constant":
        return _constant
    if name == "constant_with_warmup":
        return partial(_constant_with_warmup, warmup=warmup)
    if name == "linear":
        return partial(_linear, warmup=warmup, total=total)
    if name == "cosine":
        return partial(_cosine, warmup=warmup, total=total, num_cycles=kw.pop("num_cycles", 0.5))
    if name == "cosine_with_restarts":
        return partial(_cosine_with_restarts, warmup=warmup, total=total, num_cycles=kw.pop("num_cycles", 1))
    if name == "polynomial":
        lr_init = optimizer.defaults["lr"]
        lr_end = kw.pop("lr_end", 1e-7)
        if not lr_init > lr_end:
            raise ValueError(f"lr_end ({lr_end}) must be smaller than the initial learning rate ({lr_init})")
        return partial(_polynomial, warmup=warmup, total=total, lr_end=lr_end, power=kw.pop("power", 1.0), lr_init=lr_init)
    if name == "inverse_sqrt":
        timescale = kw.pop("timescale", None)
        return partial(_inverse_sqrt, warmup=warmup, timescale=timescale if timescale is not None else (warmup or 10_000))
    if name == "cosine_with_min_lr":
        rate = _min_lr_rate(optimizer, kw.pop("min_lr", None), kw.pop("min_lr_rate", None))
        return partial(_cosine, warmup=warmup, total=total, num_cycles=kw.pop("num_cycles", 0.5), min_lr_rate=rate)
    if name == "cosine_warmup_with_min_lr":
        rate = _min_lr_rate(optimizer, kw.pop("min_lr", None), kw.pop("min_lr_rate", None))
        return partial(_cosine_warmup_with_min_lr, warmup=warmup, total=total, num_cycles=kw.pop("num_cycles", 0.5),
                       min_lr_rate=rate, warmup_lr_rate=kw.pop("warmup_lr_rate", None))
    if name == "warmup_stable_decay":
        if "num_decay_steps" not in kw:
            raise ValueError("warmup_stable_decay needs num_decay_steps in lr_scheduler_kwargs, e.g. {'num_decay_steps': 100}")
        decay = int(kw.pop("num_decay_steps"))
        stable = kw.pop("num_stable_steps", None)
        stable = total - warmup - decay if stable is None else int(stable)
        shapes = {k: kw.pop(k, d) for k, d in (("warmup_type", "linear"), ("decay_type", "cosine"))}
        for k, v in shapes.items():
            if v not in _SHAPES:
                raise ValueError(f"{k}={v!r} is not a shape; choose one of {', '.join(_SHAPES)}")
        return partial(_wsd, warmup=warmup, stable=stable, decay=decay, min_lr_ratio=kw.pop("min_lr_ratio", 0.0),
                       num_cycles=kw.pop("num_cycles", 0.5), **shapes)
    raise ValueError(f"lr_scheduler_type={name!r} is not supported; use one of: {', '.join(SCHEDULES)}")


SCHEDULES: tuple[str, ...] = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt",
    "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
)
"""The schedules :func:`get_scheduler` builds (transformers' names)."""


def get_scheduler(
    name: Any,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    scheduler_specific_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """The schedule ``name`` for ``optimizer``: a ``LambdaLR`` (``ReduceLROnPlateau``
    for ``reduce_lr_on_plateau``), as transformers' function of the same name builds
    it. ``scheduler_specific_kwargs`` (``lr_scheduler_kwargs``): the schedule's
    options (``num_cycles``, ``lr_end``/``power``, ``timescale``, ``min_lr``/
    ``min_lr_rate``, ``warmup_lr_rate``, ``num_decay_steps``...; torch's for
    ``reduce_lr_on_plateau``); an option the schedule does not take is an error."""
    name = str(getattr(name, "value", name))
    kw = dict(scheduler_specific_kwargs or {})
    if name == "reduce_lr_on_plateau":
        try:
            return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kw)
        except TypeError as exc:
            raise ValueError(f"lr_scheduler_kwargs for reduce_lr_on_plateau: {exc}") from None
    fn: Callable[[int], float] = _build(name, optimizer, max(0, int(num_warmup_steps)), max(1, int(num_training_steps)), kw)
    if kw:
        raise ValueError(
            f"lr_scheduler_kwargs {sorted(kw)} are not options of the {name!r} schedule; remove them (or choose the "
            "schedule they belong to)"
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
