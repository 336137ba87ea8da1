"""Content-based recommender: a user profile is the mean of the (L2-normalised) content vectors of the
items in their history; items are ranked by cosine similarity to it. It needs no interactions, so it
ranks cold items (never seen in training) like any other.

Reference: Pazzani & Billsus, "Content-Based Recommendation Systems", The Adaptive Web, LNCS 4321, 2007
(Lops, de Gemmis & Semeraro, "Content-based Recommender Systems: State of the Art and Trends", 2011).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from multimodal_rec.baselines.base import Recommender
from multimodal_rec.data.features import ItemFeatures
from multimodal_rec.data.splits import Split


def item_vectors_from_features(features: ItemFeatures) -> Tensor:
    """(n_items, F) content vectors from the feature tables: multi-hot attributes, numeric values and
    one-hot categorical codes (padding row dropped)."""
    n = features.n_items
    parts = [features.multi_hot[:n], features.numeric[:n]]
    for column, size in enumerate(features.categorical_sizes):
        parts.append(F.one_hot(features.categorical[:n, column], size)[:, 1:].float())  # code 0 = missing
    return torch.cat(parts, dim=1)


class ContentBased(Recommender):
    """score(u, i) = cos(mean_h normalise(x_h), x_i) over the user's history h; x = item_vectors."""

    name = "content"

    def __init__(self, max_len: int | None = None):
        self.eval_max_len = max_len

    def fit(self, split: Split, item_vectors: Tensor | None = None) -> ContentBased:
        if item_vectors is None:
            raise ValueError("ContentBased needs item_vectors (n_items, F)")
        vectors = torch.as_tensor(item_vectors, dtype=torch.float32)
        if vectors.shape[0] == split.n_items + 1:  # feature tables carry a padding row last
            vectors = vectors[: split.n_items]
        if vectors.dim() != 2 or vectors.shape[0] != split.n_items:
            raise ValueError(f"item_vectors must be (n_items={split.n_items}, F), got {tuple(vectors.shape)}")
        self.fit_popularity(split)
        normed = F.normalize(vectors, dim=1)  # (N, F); all-zero rows stay zero
        self.vectors = torch.cat([normed, torch.zeros(1, normed.shape[1])])  # (N+1, F), pad row = 0
        return self

    def score(self, batch: dict) -> Tensor:
        history = batch["history"].cpu().long().clamp(0, self.n_items)  # (B, L), pad = N
        valid = (history < self.n_items).float()  # (B, L)
        profile = self.vectors[history].sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, F)
        scores = F.normalize(profile, dim=1) @ self.vectors[: self.n_items].T  # (B, N) cosine
        return self.with_fallback(scores, valid.sum(dim=1) > 0)
