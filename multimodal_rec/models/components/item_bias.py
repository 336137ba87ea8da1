"""The per-item retrieval bias: read off the item tower's vector before normalisation, scaled by the
softmax temperature so that it adds to the cosine on the same scale (score = cos + temperature * b)."""

from __future__ import annotations

import torch
from torch import nn

from multimodal_rec.safe_modules import rebuildable


@rebuildable
class ItemBias(nn.Linear):
    """(B, d) unnormalised item vectors -> (B,) retrieval biases. Starts at zero: plain cosine retrieval.
    A Linear itself (not holding one), so checkpoints keep the parameter names `weight` and `bias`."""

    def __init__(self, dim: int, temperature: float):
        super().__init__(dim, 1)
        self.temperature = temperature
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.temperature * super().forward(raw).squeeze(-1)
