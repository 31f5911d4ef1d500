"""The optimizer ``TrainingArguments.optim`` names, as transformers builds it: torch's
AdamW (``adamw_torch_fused``, the default: its fused kernel; ``adamw_torch``:
torch's default kernel), SGD, Adagrad and RMSprop, with ``optim_args``
(``"momentum=0.9,nesterov=true"``) for the last three."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["OPTIMIZERS", "optimizer_cls_and_kwargs", "parse_optim_args"]

_TRUE = ("true", "1", "yes")

# optim -> (torch class, the optim_args it takes: name -> converter)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adamw_torch_fused": (torch.optim.AdamW, {}),
    "adamw_torch": (torch.optim.AdamW, {}),
    "sgd": (torch.optim.SGD, {"momentum": float, "dampening": float, "weight_decay": float,
                              "nesterov": lambda v: v.lower() in _TRUE}),
    "adagrad": (torch.optim.Adagrad, {"lr_decay": float, "weight_decay": float, "eps": float}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": float, "alpha": float, "eps": float, "weight_decay": float,
                                      "centered": lambda v: v.lower() in _TRUE}),
}


def parse_optim_args(text: str | None) -> dict[str, str]:
    """``"a=1,b=true"`` -> ``{"a": "1", "b": "true"}`` (transformers' format); a
    ``ValueError`` naming the entry that is not ``key=value``."""
    if not text:
        return {}
    out: dict[str, str] = {}
    for entry in text.replace(" ", "").split(","):
        key, sep, value = entry.partition("=")
        if not sep or not key or "=" in value:
            raise ValueError(f"optim_args={text!r}: {entry!r} is not key=value; write e.g. 'momentum=0.9,nesterov=true'")
        out[key] = value
    return out


def optimizer_cls_and_kwargs(args: Any) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """(optimizer class, keyword arguments besides the parameter groups) for
    ``args.optim``, ``args.learning_rate``, the Adam settings and ``args.optim_args``;
    a ``ValueError`` for an optimizer or an ``optim_args`` key it does not take."""
    name = str(getattr(args.optim, "value", args.optim))
    if name not in OPTIMIZERS:
        raise ValueError(f"optim={name!r} is not implemented by this trainer; choose one of {', '.join(OPTIMIZERS)}")
    cls, accepted = OPTIMIZERS[name]
    kwargs: dict[str, Any] = {"lr": args.learning_rate}
    if cls is torch.optim.AdamW:
        kwargs.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        if name == "adamw_torch_fused":
            kwargs["fused"] = True
    given = parse_optim_args(getattr(args, "optim_args", None))
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) if accepted else "none (set adam_beta1, adam_beta2, adam_epsilon instead)"
        raise ValueError(f"optim_args {unknown} are not options of optim={name!r}; it takes: {takes}")
    for key, value in given.items():
        try:
            kwargs[key] = accepted[key](value)
        except ValueError:
            raise ValueError(f"optim_args: {key}={value!r} is not a number") from None
    return cls, kwargs
