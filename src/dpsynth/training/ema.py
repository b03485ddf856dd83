"""Exponential moving average of weights; sampling uses the averaged weights."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """Shadow copy of a model's trainable parameters, updated after each optimiser step.

    The decay warms up as min(decay, (1 + step) / (10 + step)) so early, noisy weights fade
    fast. Averaging is post-processing of released parameters: it costs no privacy.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.shadow[name].lerp_(param.detach(), 1.0 - decay)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state with the averaged parameters in place."""
        state = dict(model.state_dict())
        state.update(self.shadow)
        return state

    def load_shadow(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.shadow:
            self.shadow[name].copy_(tensors[name])
