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

__all__ = ["LabelSmoother", "accepts_loss_kwargs", "is_causal_lm", "loss_shifts_labels", "transformers_model"]


@dataclass
class LabelSmoother:
    """Label smoothing on a model's output (``output["logits"]`` or ``output[0]``):
    ``(1 - epsilon) * nll + epsilon * mean(-log_softmax)`` over the positions whose
    label is not ``ignore_index``, as transformers' class of the same name.
    ``shift_labels``: position ``i`` predicts label ``i + 1`` (causal language models).
    ``num_items_in_batch``: the number of labelled positions to divide by (the
    trainer's count over a whole accumulated batch), instead of this batch's."""

    epsilon: float = 0.1
    ignore_index: int = -100

    def __call__(
        self, model_output: Any, labels: torch.Tensor, shift_labels: bool = False, num_items_in_batch: Any = None
    ) -> torch.Tensor:
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
        if num_items_in_batch is None:  # this batch's labelled positions
            active = padding_mask.numel() - padding_mask.long().sum()
        else:  # the trainer's count over the whole accumulated batch
            active = num_items_in_batch.to(nll_loss.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        nll = nll_loss.sum() / active
        smoothed = smoothed_loss.sum() / (active * log_probs.shape[-1])
        return (1 - self.epsilon) * nll + self.epsilon * smoothed


def transformers_model(model: nn.Module) -> nn.Module | None:
    """``model`` when it is of a class transformers defines (the model a PEFT
    wrapper adapts, for one), else ``None``; transformers is never imported here."""
    if type(model).__module__.startswith("peft.") and hasattr(model, "base_model"):
        model = getattr(model.base_model, "model", model)  # a PEFT wrapper: the model it adapts
    if not type(model).__module__.startswith("transformers.") or "transformers" not in sys.modules:
        return None
    return model


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is one of transformers' causal language models (their
    labels are the inputs, shifted by the loss): as transformers decides it, by the
    class name, for a model of a class transformers defines."""
    model = transformers_model(model)
    if model is None:
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover - an older or trimmed transformers
        return False
    return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether the trainer hands ``num_items_in_batch`` to ``model``'s forward, as
    transformers decides it: the model's ``accepts_loss_kwargs`` when it has one,
    else whether its ``forward`` takes ``**kwargs``."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def loss_shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s loss shifts its labels (a decoder-only causal language
    model's), so that the labelled positions are counted over ``labels[..., 1:]``: as
    transformers' Trainer decides it, from the model's ``loss_type``; ``False`` for a
    model transformers does not define."""
    model = transformers_model(model)
    if model is None:
        return False
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover - an older or trimmed transformers
        return False
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not encoder_decoder
