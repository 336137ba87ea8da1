"""The baseline interface and the helpers every baseline shares.

A `Recommender` is fitted on the training split only and scores every item for a batch of the
evaluation protocol (`multimodal_rec.evaluation.protocol`): `score(batch) -> (B, n_items)`, higher
is better. Users the model knows nothing about (no training interactions, empty history) get
training-popularity scores, so every user is ranked.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor
from tqdm.auto import tqdm

from multimodal_rec.data.splits import Split
from multimodal_rec.evaluation.protocol import evaluate

log = logging.getLogger(__name__)

# Added to scores of models whose scores tie a lot (neighbourhood models): popularity breaks the ties.
TIE_BREAK = 1e-6


def train_counts(split: Split) -> np.ndarray:
    """(n_items,) number of training interactions of each item (every one counted)."""
    return np.bincount(split.items[split.train_mask], minlength=split.n_items).astype(np.float64)


def train_matrix(split: Split) -> sp.csr_matrix:
    """(n_users, n_items) binary user-item matrix of the training split (repeats count once)."""
    inter = split.train_interactions()
    values = np.ones(len(inter), dtype=np.float32)
    matrix = sp.csr_matrix((values, (inter["user"], inter["item"])), shape=(split.n_users, split.n_items))
    matrix.data[:] = 1.0  # duplicates were summed
    return matrix


def history_matrix(history: Tensor, n_items: int) -> Tensor:
    """(B, L) left-padded item indices (pad = n_items) -> (B, n_items) binary float matrix."""
    out = torch.zeros(history.shape[0], n_items + 1, device=history.device)  # (B, N+1), last col = pad
    out.scatter_(1, history.long().clamp(0, n_items), 1.0)
    return out[:, :n_items]


def top_k_rows(sim: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keeps the k largest entries of each row of a sparse similarity matrix (ties: any)."""
    sim = sim.tocsr()
    keep = np.ones(sim.nnz, dtype=bool)  # (nnz,)
    for r in np.flatnonzero(np.diff(sim.indptr) > k):
        lo, hi = sim.indptr[r], sim.indptr[r + 1]
        keep[lo:hi] = False
        keep[lo + np.argpartition(-sim.data[lo:hi], k - 1)[:k]] = True
    rows = np.repeat(np.arange(sim.shape[0]), np.diff(sim.indptr))  # (nnz,)
    return sp.csr_matrix((sim.data[keep], (rows[keep], sim.indices[keep])), shape=sim.shape)


def cosine_similarity(matrix: sp.csr_matrix, k: int, shrink: float = 0.0) -> sp.csr_matrix:
    """(R, R) cosine similarity of the rows of a sparse (R, C) matrix, self excluded, top-k per row.

    sim(a, b) = <a, b> / (|a| |b| + shrink); `shrink` > 0 damps pairs with little support.
    """
    norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(axis=1)).ravel())  # (R,)
    sim = (matrix @ matrix.T).tocsr().astype(np.float64)  # (R, R) dot products
    sim = (sim - sp.diags(sim.diagonal())).tocsr()  # no self-similarity
    sim.eliminate_zeros()
    rows = np.repeat(np.arange(sim.shape[0]), np.diff(sim.indptr))
    sim.data /= norms[rows] * norms[sim.indices] + shrink
    return top_k_rows(sim, k)


def sparse_to_torch(matrix: sp.spmatrix) -> Tensor:
    coo = matrix.tocoo()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(coo.data.astype(np.float32)), coo.shape,
                                   check_invariants=True).coalesce()


class Recommender(ABC):
    """Fit on the training split, score all items for a protocol batch, evaluate through the protocol."""

    name: str = "recommender"
    eval_max_len: int | None = None  # history length the model reads; None = the whole history

    popularity: Tensor  # (n_items,) training counts / max, in [0, 1]: the fallback scores

    @abstractmethod
    def fit(self, split: Split, item_vectors: Tensor | None = None) -> Recommender:
        """Learns from the training split only; `item_vectors` (n_items, F) are used by content models."""

    @abstractmethod
    def score(self, batch: dict) -> Tensor:
        """(B, n_items) scores for a batch of `collate_eval` (uses `user` and/or `history`)."""

    def start_pairwise_fit(self, split: Split) -> tuple[np.ndarray, np.ndarray, NegativeSampler]:
        """Seeds torch, fits the popularity fallback, marks known users; returns the training (user, item)
        pairs (M,), (M,) and a sampler of negatives for them (BPR-MF and the DNN train on these)."""
        torch.manual_seed(self.seed)
        self.fit_popularity(split)
        inter = split.train_interactions()
        users, items = inter["user"].to_numpy(), inter["item"].to_numpy()
        self.known = torch.from_numpy(np.bincount(users, minlength=split.n_users) > 0)  # (U,)
        return users, items, NegativeSampler(users, items, split.n_items, seed=self.seed)

    def fit_popularity(self, split: Split) -> None:
        counts = torch.from_numpy(train_counts(split)).float()
        self.n_items = split.n_items
        self.popularity = counts / counts.max().clamp(min=1.0)

    def with_fallback(self, scores: Tensor, known: Tensor) -> Tensor:
        """Rows where `known` (B,) is False get popularity scores instead."""
        pop = self.popularity.to(scores.device).expand_as(scores)
        return torch.where(known.to(scores.device)[:, None], scores, pop)

    def evaluate(self, split: Split, stage: str = "test", max_len: int | None = None, batch_size: int = 256,
                 progress: bool = False) -> dict[str, float]:
        """Protocol metrics (hr@10, ndcg@10, ...) on `stage`; max_len defaults to what the model reads."""
        if max_len is None:
            max_len = self.eval_max_len or max(int(split.lengths().max()), 1)
        return evaluate(self.score, split, stage, max_len=max_len, batch_size=batch_size, progress=progress)

    def run_epochs(self, split: Split, module: torch.nn.Module, run_epoch: Callable[[], float],
                   can_validate: bool = True) -> None:
        """Up to `self.epochs` calls of `run_epoch` (one epoch, returns its mean loss). Every `eval_every`
        epochs and at the last, validation ndcg@10 is checked; the best state of `module` is kept and
        training stops after `patience` checks without improvement. Fills `history` and `best_epoch`."""
        validate = can_validate and self.eval_every > 0 and len(split.targets("val")[0]) > 0
        stopper = EarlyStopping(self.patience)
        start = time.perf_counter()
        bar = tqdm(range(1, self.epochs + 1), desc=self.name, disable=not self.progress)
        for epoch in bar:
            record = {"epoch": epoch, "loss": run_epoch(), "seconds": time.perf_counter() - start}
            stop = False
            if validate and (epoch % self.eval_every == 0 or epoch == self.epochs):
                record["val_ndcg@10"] = self.evaluate(split, "val")["ndcg@10"]
                stop = stopper.step(record["val_ndcg@10"], module, epoch)
                bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{record['val_ndcg@10']:.4f}",
                                best=stopper.best_epoch)
                log.info("%s epoch %d loss %.4f val ndcg@10 %.4f (best %.4f @ %d) %.0fs", self.name, epoch,
                         record["loss"], record["val_ndcg@10"], stopper.best, stopper.best_epoch, record["seconds"])
            else:
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            self.history.append(record)
            if stop:
                break
        stopper.restore(module)
        self.best_epoch = stopper.best_epoch

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def pick_device(device: str | None = None) -> torch.device:
    """`device` if given, else cuda when available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class EarlyStopping:
    """Keeps the best state of a module by a validation metric; says when `patience` checks brought nothing."""

    def __init__(self, patience: int | None):
        self.patience = patience
        self.best = -float("inf")
        self.best_epoch = -1
        self.best_state: dict | None = None
        self.bad_checks = 0

    def step(self, metric: float, module: torch.nn.Module, epoch: int) -> bool:
        """Records a check; returns True when training should stop."""
        if metric > self.best:
            self.best, self.best_epoch, self.bad_checks = metric, epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            self.bad_checks += 1
        return self.patience is not None and self.bad_checks >= self.patience

    def restore(self, module: torch.nn.Module) -> None:
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


class NegativeSampler:
    """Uniform negative items for (user, positive) pairs, avoiding the user's training items
    (resampled a few times; a rare leftover collision is kept)."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int, seed: int = 0, tries: int = 5):
        self.n_items, self.tries = n_items, tries
        self.keys = np.unique(users.astype(np.int64) * n_items + items)  # sorted (user, item) keys
        self.rng = np.random.default_rng(seed)

    def _is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        return self.keys[pos] == keys

    def __call__(self, users: np.ndarray, n: int = 1) -> np.ndarray:
        """(len(users), n) negatives."""
        users = np.repeat(users.astype(np.int64)[:, None], n, axis=1)  # (B, n)
        negs = self.rng.integers(0, self.n_items, size=users.shape)
        for _ in range(self.tries):
            clash = self._is_positive(users, negs)
            if not clash.any():
                break
            negs[clash] = self.rng.integers(0, self.n_items, size=int(clash.sum()))
        return negs
