"""Ranking network: re-scores (query, candidate) pairs that retrieval found.

Reference: Covington et al., "Deep Neural Networks for YouTube Recommendations", RecSys 2016
(candidate generation followed by a ranking network).
"""

from __future__ import annotations

import torch
from torch import nn

from multimodal_rec.safe_modules import rebuildable


@rebuildable
class Ranker(nn.Module):
    """MLP over [q, v, q*v, retrieval score]; the retrieval score is also added as a skip connection,
    so an untrained ranker keeps the retrieval order."""

    def __init__(self, dim: int, hidden: int = 128, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(3 * dim + 1, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2), nn.GELU(), nn.Linear(hidden // 2, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, query: torch.Tensor, items: torch.Tensor, retrieval: torch.Tensor) -> torch.Tensor:
        """query (B, d), items (B, C, d), retrieval scores (B, C) -> scores (B, C)."""
        q = query.unsqueeze(1).expand_as(items)  # (B, C, d)
        features = torch.cat([q, items, q * items, retrieval.unsqueeze(-1)], dim=-1)  # (B, C, 3d+1)
        return retrieval + self.mlp(features).squeeze(-1)
