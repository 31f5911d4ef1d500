"""``label_smoothing_factor``: transformers' ``LabelSmoother``, applied to the logits a
model returns, in training and in evaluation (the evaluation loss is smoothed too,
as there)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["LabelSmoother", "is_causal_lm"]


@dataclass
class LabelSmoother:
    """Label smoothing on a model's output (``output["logits"]`` or ``output[0]``):
    ``(1 - epsilon) * nll + epsilon * mean(-log_softmax)`` over the positions whose
    label is not ``ignore_index``, as transformers' class of the same name.
    ``shift_labels``: position ``i`` predicts label ``i + 1`` (causal language models)."""

    epsilon: float = 0.1
    ignore_index: int = -100

    def __call__(self, model_output: Any, labels: torch.Tensor, shift_labels: bool = False) -> torch.Tensor:
        logits = model_output["logits"] if isinstance(model_output, Mapping) else model_output[0]
        if shift_labels:
            logits = logits[..., :-1, :].contiguous()
            labels = labels[..., 1:].contiguous()
        log_probs = -nn.functional.log_softmax(logits, dim=-1)
        if labels.dim() == log_probs.dim() - 1:
            labels = labels.unsqueeze(-1)
        padding_mask = labels.eq(self.ignore_index)
        # gather cannot take -100; those positions are masked out below anyway.
        nll_loss = log_probs.gather(dim=-1, index=torch.clamp(labels, min=0))
        # float32 sums, whatever the logits' precision
        smoothed_loss = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32)
        nll_loss = nll_loss.masked_fill(padding_mask, 0.0)
        smoothed_loss = smoothed_loss.masked_fill(padding_mask, 0.0)
        active = padding_mask.numel() - padding_mask.long().sum()
        nll = nll_loss.sum() / active
        smoothed = smoothed_loss.sum() / (active * log_probs.shape[-1])
        return (1 - self.epsilon) * nll + self.epsilon * smoothed


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal language models (their
    labels are the inputs, shifted by the loss): as transformers decides it, by the
    class name, for a model of a class transformers defines."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "base_model"):
        model = getattr(model.base_model, "model", model)  # a PEFT wrapper: the model it adapts
    if not type(model).__module__.startswith("transformers.") or "transformers" not in sys.modules:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - an older or trimmed transformers
        return False
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
