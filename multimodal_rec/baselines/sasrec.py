"""SASRec: a causal self-attentive model over the item-ID history; the next item is scored as the dot
product of the last hidden state with every item embedding. ID-only: the strong sequential bar.

Reference: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.

Trained on every position of the training windows (`TrainWindows`) with full softmax cross-entropy
over all items (it beats the paper's sampled binary loss by a wide margin on MovieLens), validation
ndcg@10 checked every few epochs through the protocol, best state kept.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from multimodal_rec.baselines.base import Recommender, pick_device
from multimodal_rec.data.sequences import IGNORE_TARGET, TrainWindows
from multimodal_rec.data.splits import Split


class SASRecNet(nn.Module):
    """(B, L) left-padded item indices (pad = n_items) -> (B, L, d) hidden states, causal."""

    def __init__(self, n_items: int, dim: int, layers: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        self.n_items, self.dim, self.heads, self.max_len = n_items, dim, heads, max_len
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # (N+1, d), last row = pad
        self.pos = nn.Embedding(max_len, dim)  # (L, d): position L-1 = most recent item
        self.drop = nn.Dropout(dropout)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        nn.init.normal_(self.item.weight, std=dim**-0.5)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[n_items].zero_()

    def attention_mask(self, pad: Tensor) -> Tensor:
        """(B*heads, L, L) additive mask: causal, padded keys hidden; a position always sees itself
        (so fully padded rows stay finite; their outputs are never used)."""
        length = pad.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=pad.device).tril()  # (L, L)
        eye = torch.eye(length, dtype=torch.bool, device=pad.device)
        allowed = causal[None] & (~pad[:, None, :] | eye[None])  # (B, L, L)
        mask = torch.zeros(allowed.shape, device=pad.device).masked_fill(~allowed, float("-inf"))
        return mask.repeat_interleave(self.heads, dim=0)  # (B*heads, L, L)

    def forward(self, history: Tensor) -> Tensor:
        length = history.shape[1]
        pad = history == self.n_items  # (B, L)
        positions = torch.arange(self.max_len - length, self.max_len, device=history.device)  # (L,)
        x = self.item(history) * math.sqrt(self.dim) + self.pos(positions)[None]  # (B, L, d)
        x = self.drop(x) * (~pad)[..., None]
        return self.encoder(x, mask=self.attention_mask(pad))  # (B, L, d)

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., d) -> (..., N) scores over all real items."""
        return hidden @ self.item.weight[: self.n_items].T


class SASRec(Recommender):
    """ID-only SASRec trained with full cross-entropy; see the module docstring."""

    name = "sasrec"

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 2, dropout: float = 0.2, max_len: int = 50,
                 epochs: int = 100, lr: float = 2e-3, weight_decay: float = 0.0, batch_size: int = 64,
                 eval_every: int = 5, patience: int | None = 4, seed: int = 0, device: str | None = None,
                 progress: bool = True, window_stride: int | None = None):
        self.window_stride = window_stride
        self.dim, self.layers, self.heads, self.dropout, self.max_len = dim, layers, heads, dropout, max_len
        self.epochs, self.lr, self.weight_decay, self.batch_size = epochs, lr, weight_decay, batch_size
        self.eval_every, self.patience, self.seed, self.progress = eval_every, patience, seed, progress
        self.eval_max_len = max_len
        self.device = pick_device(device)
        self.history: list[dict] = []

    def fit(self, split: Split, item_vectors: Tensor | None = None) -> SASRec:
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        self.fit_popularity(split)
        self.net = SASRecNet(split.n_items, self.dim, self.layers, self.heads, self.dropout, self.max_len)
        self.net.to(self.device)
        windows = TrainWindows(split, self.max_len, self.window_stride)
        loader = DataLoader(windows, batch_size=self.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed))
        optim = torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=(0.9, 0.98), weight_decay=self.weight_decay)

        def run_epoch() -> float:
            self.net.train()
            total, count = 0.0, 0
            for batch in loader:
                history = batch["history"].to(self.device)  # (B, L)
                targets = batch["targets"].to(self.device)  # (B, L), IGNORE_TARGET where padded
                keep = targets != IGNORE_TARGET
                hidden = self.net(history)[keep]  # (M, d): every real position
                loss = F.cross_entropy(self.net.logits(hidden), targets[keep])  # over all N items
                optim.zero_grad()
                loss.backward()
                optim.step()
                total, count = total + float(loss.detach()) * int(keep.sum()), count + int(keep.sum())
            return total / max(count, 1)

        self.run_epochs(split, self.net, run_epoch, can_validate=len(windows) > 0)
        return self

    @torch.no_grad()
    def score(self, batch: dict) -> Tensor:
        self.net.eval()
        history = batch["history"][:, -self.max_len :].to(self.device)  # (B, <=L)
        hidden = self.net(history)[:, -1]  # (B, d): state after the most recent item
        known = (history != self.net.n_items).any(dim=1)  # (B,) users with any history
        return self.with_fallback(self.net.logits(hidden), known)
