"""NEFTune (noisy embeddings for fine-tuning), as transformers'
``TrainingArguments.neftune_noise_alpha``: while the model trains, uniform noise of
magnitude ``alpha / sqrt(sequence length * embedding size)`` is added to the output
of its input embedding layer (https://huggingface.co/papers/2310.05914)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["activate_neftune", "deactivate_neftune", "neftune_post_forward_hook"]


def neftune_post_forward_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """The embedding layer's forward hook (``module.neftune_noise_alpha`` set):
    noise in training mode only, the output as it is in evaluation."""
    if module.training:
        magnitude = module.neftune_noise_alpha / math.sqrt(output.size(1) * output.size(2))
        output = output + torch.zeros_like(output).uniform_(-magnitude, magnitude)
    return output


def activate_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Hook ``model.get_input_embeddings()``; returns the handle for
    :func:`deactivate_neftune`."""
    embeddings = model.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha
    return embeddings.register_forward_hook(neftune_post_forward_hook)


def deactivate_neftune(model: nn.Module, handle: torch.utils.hooks.RemovableHandle) -> None:
    """Remove the hook and the layer's ``neftune_noise_alpha``."""
    handle.remove()
    embeddings = model.get_input_embeddings()
    if hasattr(embeddings, "neftune_noise_alpha"):
        del embeddings.neftune_noise_alpha
