"""The simple deep recommender of the classic e-commerce example: user and item embeddings,
concatenated, through Dense 128 -> Dense 64 -> a sigmoid unit that predicts "the user interacts
with the item", trained with binary cross-entropy on training interactions and sampled negatives.

Reference: He, Liao, Zhang, Nie, Hu & Chua, "Neural Collaborative Filtering", WWW 2017 (the MLP
variant; Covington, Adams & Sargin, "Deep Neural Networks for YouTube Recommendations", RecSys 2016).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal_rec.baselines.base import Recommender, pick_device
from multimodal_rec.data.splits import Split


class _Net(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int, hidden: tuple[int, ...], dropout: float):
        super().__init__()
        self.user = nn.Embedding(n_users, dim)  # (U, d)
        self.item = nn.Embedding(n_items, dim)  # (N, d)
        layers, width = [], 2 * dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))  # logit; the sigmoid is in the loss

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        """users, items (...,) -> logits (...,)."""
        return self.mlp(torch.cat([self.user(users), self.item(items)], dim=-1)).squeeze(-1)


class DNNRecommender(Recommender):
    """logit(u, i) = MLP([e_u; e_i]) with hidden layers (128, 64); `negatives` sampled items per positive."""

    name = "dnn"

    def __init__(self, dim: int = 64, hidden: tuple[int, ...] = (128, 64), negatives: int = 4, epochs: int = 60,
                 lr: float = 3e-3, weight_decay: float = 0.0, dropout: float = 0.2, batch_size: int = 1024,
                 eval_every: int = 2, patience: int | None = 6, seed: int = 0, device: str | None = None,
                 progress: bool = False):
        self.dim, self.hidden, self.negatives, self.epochs = dim, tuple(hidden), negatives, epochs
        self.lr, self.weight_decay, self.dropout, self.batch_size = lr, weight_decay, dropout, batch_size
        self.eval_every, self.patience, self.seed, self.progress = eval_every, patience, seed, progress
        self.device = pick_device(device)
        self.history: list[dict] = []

    def fit(self, split: Split, item_vectors: Tensor | None = None) -> DNNRecommender:
        users, items, sampler = self.start_pairwise_fit(split)  # (M,), (M,)
        self.net = _Net(split.n_users, split.n_items, self.dim, self.hidden, self.dropout).to(self.device)
        optim = torch.optim.Adam(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        rng = np.random.default_rng(self.seed)
        labels = torch.zeros(1 + self.negatives, device=self.device)
        labels[0] = 1.0  # column 0 = the positive, then the negatives

        def run_epoch() -> float:
            self.net.train()
            order = rng.permutation(len(users))
            total = 0.0
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo : lo + self.batch_size]
                cand = np.concatenate([items[idx, None], sampler(users[idx], self.negatives)], axis=1)  # (B, 1+n)
                u = torch.from_numpy(users[idx]).to(self.device)[:, None].expand(-1, cand.shape[1])  # (B, 1+n)
                logits = self.net(u, torch.from_numpy(cand).to(self.device))  # (B, 1+n)
                loss = F.binary_cross_entropy_with_logits(logits, labels.expand_as(logits))
                optim.zero_grad()
                loss.backward()
                optim.step()
                total += float(loss.detach()) * len(idx)
            return total / len(users)

        self.run_epochs(split, self.net, run_epoch)
        return self

    @torch.no_grad()
    def score(self, batch: dict) -> Tensor:
        self.net.eval()
        users = batch["user"].to(self.device)  # (B,)
        n_items = self.net.item.num_embeddings
        chunk = max(1, 2**22 // max(1, len(users) * self.hidden[0]))  # bounds the (B, chunk, 128) activations
        parts = []
        for lo in range(0, n_items, chunk):
            items = torch.arange(lo, min(lo + chunk, n_items), device=self.device)  # (C,)
            grid_u = users[:, None].expand(-1, len(items))  # (B, C)
            parts.append(self.net(grid_u, items[None, :].expand(len(users), -1)))  # (B, C) logits
        return self.with_fallback(torch.cat(parts, dim=1), self.known[users.cpu()])
