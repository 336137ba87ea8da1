"""Offline evaluation metrics for leave-one-out, full-ranking recommendation.

Protocol: every user has one held-out target item. All catalogue items are scored; the user's earlier
items are excluded from the candidates (the target itself is never excluded). With the target's 0-based
rank r among the remaining candidates:

* HR@K = [r < K];  NDCG@K = 1 / log2(r + 2) if r < K;  MRR@K = 1 / (r + 1) if r < K (else 0);
* coverage@K = fraction of the catalogue appearing in at least one user's top-K list (after exclusion);

all averaged over users. Ties are pessimistic: r = number of non-excluded other items whose score is
>= the target's, so a constant scorer gets the worst rank. NaN scores of other items count as -inf; a
NaN target score is an error. Top-K lists break ties by lower item index (deterministic coverage).
Results do not depend on how users are batched: ranks are accumulated as an integer histogram, so the
states of evaluators that saw disjoint users (the ranks of a distributed run) add up exactly
(`merge`, `all_reduce_evaluators`).

For click-style predictions of the ranking network: :func:`auc` (Mann-Whitney, ties count 1/2),
:func:`log_loss` (probabilities) and :func:`log_loss_with_logits`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .ranking import (
    _ranks,
    check_exclusions,
    check_scores,
    check_target_scores,
    check_targets,
    chunked_ranks_topk,
    target_ranks,
    topk_masks,
)

__all__ = ["DEFAULT_KS", "RankingEvaluator", "all_reduce_evaluators", "auc", "evaluate_scores", "log_loss",
           "log_loss_with_logits", "target_ranks"]

DEFAULT_KS: tuple[int, ...] = (10, 20)


class RankingEvaluator:
    """Accumulates HR/NDCG/MRR/coverage@K over batches of users; `compute()` returns the averages."""

    def __init__(self, n_items: int, ks: Sequence[int] = DEFAULT_KS) -> None:
        if int(n_items) < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        ks = tuple(sorted({int(k) for k in ks}))
        if not ks or ks[0] < 1:
            raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks}")
        self.n_items = int(n_items)
        self.ks = ks
        self.kmax = ks[-1]
        self.reset()

    def reset(self) -> None:
        self.n_users = 0
        self.rank_counts = torch.zeros(self.kmax, dtype=torch.long)  # (Kmax,) users with rank r < Kmax
        self.covered = {k: torch.zeros(self.n_items, dtype=torch.bool) for k in self.ks}  # (N,) per K

    def _add_ranks(self, ranks: Tensor) -> None:
        ranks = ranks.cpu()
        self.rank_counts += torch.bincount(ranks[ranks < self.kmax], minlength=self.kmax)
        self.n_users += int(ranks.numel())

    def add_ranks(self, ranks: Tensor) -> None:
        """0-based target ranks (B,) computed elsewhere (an endpoint's answer, a heuristic); a rank >= the
        largest K is a miss. Coverage is not tracked this way (no top-K lists are seen)."""
        if ranks.dtype.is_floating_point or bool((ranks < 0).any()):
            raise ValueError("ranks must be non-negative integers")
        self._add_ranks(ranks)

    def update(self, scores: Tensor, targets: Tensor, exclude_rows: Tensor | None = None,
               exclude_cols: Tensor | None = None) -> None:
        """scores (B, N) over all items, targets (B,), exclusions as (E,) (row, item) pairs."""
        targets = check_scores(scores, targets)
        if scores.shape[1] != self.n_items:
            raise ValueError(f"scores has {scores.shape[1]} items, evaluator expects {self.n_items} "
                             f"(scores shape {tuple(scores.shape)})")
        pairs = check_exclusions(exclude_rows, exclude_cols, targets, self.n_items)
        if scores.shape[0] == 0:
            return
        ranks = _ranks(scores, targets, pairs)  # (B,)
        masks = topk_masks(scores, pairs, self.ks)
        self._add_ranks(ranks)
        for k, mask in masks.items():
            self.covered[k] |= mask.any(dim=0).cpu()

    def update_chunked(self, score_chunk: Callable[[int, int], Tensor], target_scores: Tensor,
                       targets: Tensor, exclude_rows: Tensor | None = None,
                       exclude_cols: Tensor | None = None, chunk_size: int = 65536) -> None:
        """Like `update`, but scores come from `score_chunk(start, end) -> (B, end - start)`.

        target_scores (B,) must be the targets' scores (as `score_chunk` would give them). Memory is
        bounded by B * (chunk_size + max(K)); the result equals `update` on the concatenated scores.
        """
        target_scores = torch.as_tensor(target_scores)
        if target_scores.dim() != 1:
            raise ValueError(f"target_scores must be 1-D (B,), got shape {tuple(target_scores.shape)}")
        targets = check_targets(targets, target_scores.shape[0], self.n_items).to(target_scores.device)
        pairs = check_exclusions(exclude_rows, exclude_cols, targets, self.n_items)
        if targets.numel() == 0:
            return
        check_target_scores(target_scores)
        ranks, top_idx, top_valid = chunked_ranks_topk(score_chunk, target_scores, targets, pairs,
                                                       self.n_items, self.kmax, chunk_size)
        self._add_ranks(ranks)
        for k in self.ks:
            items = top_idx[:, :k][top_valid[:, :k]].cpu()
            self.covered[k][items] = True

    def compute(self) -> dict[str, float]:
        """Averages over all users seen; with no users, rate metrics are NaN and coverage is 0."""
        out: dict[str, float] = {}
        n = self.n_users
        counts = self.rank_counts.double()  # (Kmax,)
        r = torch.arange(self.kmax, dtype=torch.float64)
        for k in self.ks:
            c = counts[:k]
            out[f"hr@{k}"] = float(c.sum()) / n if n else math.nan
            out[f"ndcg@{k}"] = float((c / torch.log2(r[:k] + 2)).sum()) / n if n else math.nan
            out[f"mrr@{k}"] = float((c / (r[:k] + 1)).sum()) / n if n else math.nan
            out[f"coverage@{k}"] = float(self.covered[k].sum()) / self.n_items
        out["n_users"] = float(n)
        return out

    # ---- combining shards: users split over processes (or batches of work) -------------------------------
    def state(self) -> Tensor:
        """The whole state as one int64 vector: [n_users, rank histogram (Kmax,), coverage flags (len(ks) * N,)].

        States of evaluators that saw disjoint sets of users add up to the state of one that saw them all
        (coverage flags become counts; any count > 0 means covered)."""
        covered = torch.cat([self.covered[k].long() for k in self.ks])
        return torch.cat([torch.tensor([self.n_users]), self.rank_counts, covered])

    def load_state(self, state: Tensor) -> None:
        """Inverse of `state()`; accepts summed states."""
        state = torch.as_tensor(state).to("cpu", torch.long)
        if state.shape != (self._state_size(),):
            raise ValueError(f"state has shape {tuple(state.shape)}, expected ({self._state_size()},) for "
                             f"n_items={self.n_items}, ks={self.ks}")
        self.n_users = int(state[0])
        self.rank_counts = state[1:1 + self.kmax].clone()
        flags = state[1 + self.kmax:].view(len(self.ks), self.n_items) > 0
        self.covered = {k: flags[i].clone() for i, k in enumerate(self.ks)}

    def _state_size(self) -> int:
        return 1 + self.kmax + len(self.ks) * self.n_items

    def merge(self, other: RankingEvaluator) -> RankingEvaluator:
        """Adds the users another evaluator (same n_items and ks) has seen; returns self."""
        if (other.n_items, other.ks) != (self.n_items, self.ks):
            raise ValueError(f"cannot merge an evaluator of n_items={other.n_items}, ks={other.ks} into one of "
                             f"n_items={self.n_items}, ks={self.ks}")
        self.load_state(self.state() + other.state())
        return self


def all_reduce_evaluators(evaluators: Sequence[RankingEvaluator], device: torch.device | str | None = None,
                          group: Any = None) -> bool:
    """Sums the evaluators' states over all processes of torch.distributed, in one collective call.

    Every process must call it with evaluators of the same n_items/ks, in the same order; afterwards each
    process holds the states of all users of all processes, so `compute()` gives the same global metrics
    everywhere. `device` must suit the backend (CUDA for NCCL). Returns False (and does nothing) when
    torch.distributed is not initialised or has a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1 or not evaluators:
        return False
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend(group) == "nccl" else "cpu"
    states = [e.state() for e in evaluators]
    flat = torch.cat(states).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for evaluator, state in zip(evaluators, flat.cpu().split([len(s) for s in states])):
        evaluator.load_state(state)
    return True


def evaluate_scores(scores: Tensor, targets: Tensor, exclude_rows: Tensor | None = None,
                    exclude_cols: Tensor | None = None, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """One-shot: metrics for (B, N) scores of B users over all N items."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (B, N), got shape {tuple(scores.shape)}")
    evaluator = RankingEvaluator(scores.shape[1], ks)
    evaluator.update(scores, targets, exclude_rows, exclude_cols)
    return evaluator.compute()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy().ravel()
    return np.asarray(x, dtype=np.float64).ravel()


def _pairs(labels: Any, values: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    y, v = _to_numpy(labels), _to_numpy(values)
    if y.shape != v.shape:
        raise ValueError(f"labels and {name} must have the same number of elements, "
                         f"got {y.shape} and {v.shape}")
    if y.size == 0:
        raise ValueError("labels are empty")
    if np.isnan(v).any():
        raise ValueError(f"{name} contain {int(np.isnan(v).sum())} NaN value(s)")
    if np.isnan(y).any() or (y < 0).any() or (y > 1).any():
        raise ValueError("labels must lie in [0, 1]")
    return y, v


def auc(labels: Any, scores: Any) -> float:
    """ROC AUC of binary labels vs scores (probabilities or logits); tied scores count 1/2."""
    y, s = _pairs(labels, scores, "scores")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("auc needs binary 0/1 labels")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auc is undefined with a single class ({n_pos} positives, {n_neg} negatives)")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mid-ranks of each distinct score
    rank_sum = float(avg_rank[inverse.ravel()][y == 1].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(labels: Any, probabilities: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps]."""
    y, p = _pairs(labels, probabilities, "probabilities")
    if (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must lie in [0, 1] (use log_loss_with_logits for logits)")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())


def log_loss_with_logits(labels: Any, logits: Any) -> float:
    """Mean binary cross-entropy from logits, computed stably (softplus form)."""
    y, z = _pairs(labels, logits, "logits")
    return float((np.maximum(z, 0.0) - y * z + np.log1p(np.exp(-np.abs(z)))).mean())
