"""User-based collaborative filtering: a user's score for an item is the summed cosine similarity of
their k most similar users who interacted with it.

Reference: Herlocker, Konstan, Borchers & Riedl, "An Algorithmic Framework for Performing
Collaborative Filtering", SIGIR 1999 (Resnick et al., GroupLens, CSCW 1994).
"""

from __future__ import annotations

import torch
from torch import Tensor

from multimodal_rec.baselines.base import TIE_BREAK, Recommender, cosine_similarity, train_matrix
from multimodal_rec.data.splits import Split


class UserKNN(Recommender):
    """score(u, i) = sum over the top-k neighbours v of u of cos(u, v) * R[v, i]; R binary (train)."""

    name = "user_knn"

    def __init__(self, k: int = 100, shrink: float = 0.0):
        self.k, self.shrink = k, shrink

    def fit(self, split: Split, item_vectors: Tensor | None = None) -> UserKNN:
        self.fit_popularity(split)
        matrix = train_matrix(split)  # (U, N) binary
        self.sim = cosine_similarity(matrix, self.k, self.shrink)  # (U, U), top-k per row
        self.matrix = matrix
        self.known = torch.from_numpy(matrix.getnnz(axis=1) > 0)  # (U,) users with training items
        return self

    def score(self, batch: dict) -> Tensor:
        users = batch["user"].cpu().numpy()
        scores = torch.from_numpy((self.sim[users] @ self.matrix).toarray()).float()  # (B, N)
        scores = scores + TIE_BREAK * self.popularity
        return self.with_fallback(scores, self.known[users])

    def __repr__(self) -> str:
        return f"UserKNN(k={self.k}, shrink={self.shrink})"
