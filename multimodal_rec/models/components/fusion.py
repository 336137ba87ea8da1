"""Fusion of per-modality vectors into one item vector.

Reference: concat+MLP as in Covington et al., "Deep Neural Networks for YouTube Recommendations",
RecSys 2016; gated attention over modalities as in Arevalo et al., "Gated Multimodal Units", 2017;
residual (additive) fusion as in VBPR (He & McAuley, AAAI 2016), where content adds to the ID factors.
"""

from __future__ import annotations

import torch
from torch import nn


class ConcatFusion(nn.Module):
    """concat(modalities) -> MLP -> d."""

    def __init__(self, dim: int, n_modalities: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or 2 * dim
        self.mlp = nn.Sequential(
            nn.Linear(n_modalities * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.last_weights: torch.Tensor | None = None

    def forward(self, parts: torch.Tensor) -> torch.Tensor:  # parts (B, M, d)
        return self.mlp(parts.flatten(-2))  # (B, d)


class GatedFusion(nn.Module):
    """Softmax attention over modalities (weights say which modality drove an item) plus a residual MLP."""

    def __init__(self, dim: int, n_modalities: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or dim
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))
        self.last_weights: torch.Tensor | None = None

    def forward(self, parts: torch.Tensor) -> torch.Tensor:  # parts (B, M, d)
        weights = torch.softmax(self.score(parts).squeeze(-1), dim=-1)  # (B, M)
        self.last_weights = weights.detach()
        fused = (weights.unsqueeze(-1) * parts).sum(-2)  # (B, d)
        return fused + self.mlp(fused)


class ResidualFusion(nn.Module):
    """Sum of the modality vectors plus a residual MLP: the ID embedding keeps its full weight for warm
    items (content adds to it instead of diluting it, as in VBPR) and items without an ID (cold start,
    ID dropout) are the sum of their content vectors. Per-modality scales start at 1."""

    def __init__(self, dim: int, n_modalities: int, hidden: int | None = None, dropout: float = 0.1):
        super().__init__()
        hidden = hidden or 2 * dim
        self.scale = nn.Parameter(torch.ones(n_modalities))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))
        self.last_weights: torch.Tensor | None = None

    def forward(self, parts: torch.Tensor) -> torch.Tensor:  # parts (B, M, d)
        fused = (self.scale.unsqueeze(-1) * parts).sum(-2)  # (B, d)
        return fused + self.mlp(fused)
