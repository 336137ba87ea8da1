"""Most-popular baseline: every user gets the items ranked by their number of training interactions.

Reference: Cremonesi, Koren & Turrin, "Performance of Recommender Algorithms on Top-N Recommendation
Tasks", RecSys 2010 (the "MostPopular" non-personalised baseline).
"""

from __future__ import annotations

import torch
from torch import Tensor

from multimodal_rec.baselines.base import Recommender, train_counts
from multimodal_rec.data.splits import Split


class Popularity(Recommender):
    """score(u, i) = number of training interactions of item i (all of them, not per batch)."""

    name = "popularity"

    def fit(self, split: Split, item_vectors: Tensor | None = None) -> Popularity:
        self.fit_popularity(split)
        self.counts = torch.from_numpy(train_counts(split)).float()  # (N,)
        return self

    def score(self, batch: dict) -> Tensor:
        batch_size = batch["user"].shape[0]
        return self.counts[None, :].expand(batch_size, -1).clone()  # (B, N)
