"""Mixed precision for the trainer: ``bf16=True`` / ``fp16=True`` as transformers'
Trainer gives them, with torch's own ``torch.autocast`` and ``torch.amp.GradScaler``.

- The model keeps its float32 weights (the optimizer updates those); its forward, in
  training and in evaluation, runs under ``torch.autocast`` in the chosen dtype.
- ``fp16`` also scales the loss with a ``GradScaler``, unscales the gradients before
  clipping (the grad norm logged and clipped is the true one) and skips the
  optimizer step whose gradients are not finite. With the default optimizer (fused
  AdamW, ``optim="adamw_torch_fused"``) the skip happens on the device: no host sync
  per step. An optimizer without fused scaling support (``adamw_torch``, ``sgd``...)
  makes ``GradScaler.step`` read the overflow flag on the host each step (torch's
  behaviour).
- Evaluation outputs in half precision are returned as float32 (as accelerate's
  ``convert_outputs_to_fp32``): numpy, hence ``compute_metrics``, has no bfloat16.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

__all__ = ["SCALER_NAME", "amp_dtype", "autocast", "check_precision", "make_scaler", "outputs_to_fp32"]

SCALER_NAME = "scaler.pt"
"""The GradScaler's state in a checkpoint (fp16 only), as transformers names it."""

_HALF = (torch.float16, torch.bfloat16)


def amp_dtype(args: Any) -> torch.dtype | None:
    """The autocast dtype ``args`` ask for: bfloat16, float16, or ``None`` (none)."""
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def check_precision(args: Any, model: nn.Module, device: torch.device) -> None:
    """Raise a ``ValueError`` (``TrainingArgumentsError`` from the caller's view)
    when ``args``' mixed precision cannot run with ``model`` on ``device``; the
    message says what to change."""
    dtype = amp_dtype(args)
    if dtype is None:
        return
    flag = "bf16" if dtype is torch.bfloat16 else "fp16"
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ValueError(
            f"{flag}=True: torch has no autocast for the model's device ({device.type}); train in the model's dtype "
            f"({flag}=False)"
        )
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise ValueError(
            "bf16=True: this GPU has no native bfloat16 (it needs an Ampere or newer GPU); use fp16=True instead"
        )
    if dtype is torch.float16:
        half = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype in _HALF})
        if half:
            raise ValueError(
                f"fp16=True trains a float32 model under autocast with a gradient scaler, but the model's trainable "
                f"parameters are {', '.join(half)} (their gradients cannot be unscaled); keep the model in float32, "
                f"or train bfloat16 weights with fp16=False"
            )


_NO_AUTOCAST = contextlib.nullcontext()  # reusable: full precision allocates nothing per step


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the first one's device; the CPU without any)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def autocast(args: Any, model: nn.Module, cache_enabled: bool | None = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``args``' dtype on ``model``'s device (looked up only
    then); a shared null context without one: full precision allocates nothing."""
    dtype = amp_dtype(args)
    if dtype is None:
        return _NO_AUTOCAST
    return torch.autocast(model_device(model).type, dtype=dtype, cache_enabled=cache_enabled)


def make_scaler(args: Any, device: torch.device) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for ``fp16`` (``None`` otherwise): it keeps its scale on
    ``device`` and updates it there."""
    if amp_dtype(args) is not torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def outputs_to_fp32(value: Any) -> Any:
    """``value`` with every float16/bfloat16 tensor in it (in tuples, lists and
    mappings) cast to float32; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF else value
    if isinstance(value, tuple):
        items = [outputs_to_fp32(v) for v in value]
        # A named tuple keeps its type; a ModelOutput-like tuple subclass too.
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [outputs_to_fp32(v) for v in value]
    return value
