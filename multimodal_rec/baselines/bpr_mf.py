"""Matrix factorisation trained with Bayesian Personalised Ranking: score(u, i) = <p_u, q_i>, learnt so
that a user's training items score above uniformly sampled other items.

Reference: Rendle, Freudenthaler, Gantner & Schmidt-Thieme, "BPR: Bayesian Personalized Ranking from
Implicit Feedback", UAI 2009.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multimodal_rec.baselines.base import Recommender, pick_device
from multimodal_rec.data.splits import Split


class BPRMF(Recommender):
    """R ~ P Q^T with P (U, d), Q (N, d); loss -log sigmoid(s_ui - s_uj) + reg * (|p_u|^2 + |q_i|^2 + |q_j|^2).

    With `eval_every` > 0, validation ndcg@10 is checked every `eval_every` epochs and the best
    state is kept (training stops after `patience` checks without improvement).
    """

    name = "bpr_mf"

    def __init__(self, dim: int = 64, epochs: int = 100, lr: float = 1e-3, reg: float = 1e-4,
                 batch_size: int = 1024, eval_every: int = 5, patience: int | None = 4, seed: int = 0,
                 device: str | None = None, progress: bool = False):
        self.dim, self.epochs, self.lr, self.reg, self.batch_size = dim, epochs, lr, reg, batch_size
        self.eval_every, self.patience, self.seed, self.progress = eval_every, patience, seed, progress
        self.device = pick_device(device)
        self.history: list[dict] = []

    def fit(self, split: Split, item_vectors: Tensor | None = None) -> BPRMF:
        users, items, sampler = self.start_pairwise_fit(split)  # (M,), (M,)
        self.user_emb = nn.Embedding(split.n_users, self.dim).to(self.device)  # (U, d)
        self.item_emb = nn.Embedding(split.n_items, self.dim).to(self.device)  # (N, d)
        for emb in (self.user_emb, self.item_emb):
            nn.init.normal_(emb.weight, std=0.1)
        module = nn.ModuleDict({"user": self.user_emb, "item": self.item_emb})
        optim = torch.optim.Adam(module.parameters(), lr=self.lr)
        rng = np.random.default_rng(self.seed)

        def run_epoch() -> float:
            order = rng.permutation(len(users))
            total = 0.0
            for lo in range(0, len(order), self.batch_size):
                idx = order[lo : lo + self.batch_size]
                u = torch.from_numpy(users[idx]).to(self.device)  # (B,)
                i = torch.from_numpy(items[idx]).to(self.device)  # (B,)
                j = torch.from_numpy(sampler(users[idx])[:, 0]).to(self.device)  # (B,)
                pu, qi, qj = self.user_emb(u), self.item_emb(i), self.item_emb(j)  # (B, d) each
                diff = (pu * qi).sum(-1) - (pu * qj).sum(-1)  # (B,)
                loss = -F.logsigmoid(diff).mean() + self.reg * (pu.pow(2) + qi.pow(2) + qj.pow(2)).sum(-1).mean()
                optim.zero_grad()
                loss.backward()
                optim.step()
                total += float(loss.detach()) * len(idx)
            return total / len(users)

        self.run_epochs(split, module, run_epoch)
        return self

    @torch.no_grad()
    def score(self, batch: dict) -> Tensor:
        users = batch["user"].to(self.device)  # (B,)
        scores = self.user_emb(users) @ self.item_emb.weight.T  # (B, N)
        return self.with_fallback(scores, self.known[users.cpu()])
