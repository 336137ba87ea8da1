"""Item-based collaborative filtering: an item's score is the summed cosine similarity to the items in
the user's history, counting only the k most similar items of each candidate item.

Reference: Sarwar, Karypis, Konstan & Riedl, "Item-Based Collaborative Filtering Recommendation
Algorithms", WWW 2001 (and Deshpande & Karypis, "Item-based top-N recommendation algorithms", TOIS 2004).
"""

from __future__ import annotations

import torch
from torch import Tensor

from multimodal_rec.baselines.base import (
    TIE_BREAK,
    Recommender,
    cosine_similarity,
    history_matrix,
    sparse_to_torch,
    train_matrix,
)
from multimodal_rec.data.splits import Split


class ItemKNN(Recommender):
    """score(u, i) = sum over h in history(u) of sim(i, h), sim kept for the top-k neighbours of i.

    Item-item cosine on the binary training matrix; `shrink` damps similarities of rare pairs
    (sim = co / (|i| |j| + shrink)). The history is the protocol batch's (it includes the validation
    item at test time); the whole history is read unless `max_len` is set.
    """

    name = "item_knn"

    def __init__(self, k: int = 100, shrink: float = 0.0, max_len: int | None = None):
        self.k, self.shrink, self.eval_max_len = k, shrink, max_len

    def fit(self, split: Split, item_vectors: Tensor | None = None) -> ItemKNN:
        self.fit_popularity(split)
        items = train_matrix(split).T.tocsr()  # (N, U) binary
        self.sim = sparse_to_torch(cosine_similarity(items, self.k, self.shrink))  # (N, N): row i = i's top-k
        return self

    def score(self, batch: dict) -> Tensor:
        history = history_matrix(batch["history"].cpu(), self.n_items)  # (B, N) binary
        scores = torch.sparse.mm(self.sim, history.t()).t()  # (B, N): sum_h sim[i, h]
        scores = scores + TIE_BREAK * self.popularity
        return self.with_fallback(scores, history.sum(dim=1) > 0)

    def __repr__(self) -> str:
        return f"ItemKNN(k={self.k}, shrink={self.shrink})"
