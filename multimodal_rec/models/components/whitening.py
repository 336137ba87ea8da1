"""Whitening of frozen content features before their projection.

Frozen text (and image) vectors are anisotropic: a few directions carry most of the variance, so items look
alike to a linear projection. ZCA whitening (decorrelate, equalise the variances) spreads them out before the
item tower projects them (Zhang et al., "Are ID Embeddings Necessary? Whitening Pre-trained Text Embeddings for
Sequential Recommendation" (WhitenRec), 2024). The statistics come from the catalogue's own features (content,
no interactions, so nothing of the test data) and are saved with the model: a new item is whitened as the
catalogue was.
"""

from __future__ import annotations

import torch
from torch import nn


class FeatureWhitening(nn.Module):
    """x -> (x - mean) @ W with W = U (L + eps * mean(L))^-1/2 U^T from the features' covariance U L U^T;
    `eps` (relative to the mean eigenvalue) keeps the noise directions from being blown up."""

    def __init__(self, dim: int, eps: float = 0.1):
        super().__init__()
        if eps <= 0:
            raise ValueError(f"whitening eps must be > 0, got {eps}")
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))  # identity until fitted (or loaded from a checkpoint)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        """features (M, dim): the catalogue's items that have this modality (at least two)."""
        if features.ndim != 2 or features.shape[1] != len(self.mean) or len(features) < 2:
            raise ValueError(f"whitening needs (M >= 2, {len(self.mean)}) features, got {tuple(features.shape)}")
        x = features.double()
        mean = x.mean(0)
        centred = x - mean
        covariance = centred.T @ centred / (len(x) - 1)
        values, vectors = torch.linalg.eigh(covariance)
        values = values.clamp_min(0.0)
        scale = (values + self.eps * values.mean()).rsqrt()
        self.mean.copy_(mean.float())
        self.matrix.copy_(((vectors * scale) @ vectors.T).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix
