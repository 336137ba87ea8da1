"""Recall of an approximate index against exact inner-product search, computed in bounded memory."""

from __future__ import annotations

import faiss
import numpy as np

# Scores closer than this to the k-th exact score count as ties (duplicate vectors, float rounding).
TIE_TOLERANCE = 1e-6


def exact_top_k(queries: np.ndarray, ids: np.ndarray, vectors: np.ndarray, k: int,
                chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force (scores (B, k), ids (B, k)) over `vectors` (an array or memmap), a chunk at a time."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(ids), chunk):
        block = np.ascontiguousarray(vectors[start:start + chunk], dtype=np.float32)
        scores, rows = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        found = np.where(rows >= 0, ids[start:start + chunk][np.maximum(rows, 0)], -1)
        heap.add_result(np.ascontiguousarray(scores), np.ascontiguousarray(found, dtype=np.int64))
    heap.finalize()
    return heap.D, heap.I


def scores_of(queries: np.ndarray, found_ids: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact score of each found id for its query (B, k); -inf for -1 padding."""
    order = np.argsort(ids, kind="stable")
    flat = found_ids.reshape(-1)
    where = np.minimum(np.searchsorted(ids, flat, sorter=order), len(ids) - 1)
    rows = order[where]
    if np.any((flat >= 0) & (ids[rows] != flat)):
        raise ValueError("the index returned ids that are not among the vectors")
    found_vectors = np.asarray(vectors[rows], dtype=np.float32).reshape(*found_ids.shape, -1)  # (B, k, d)
    scores = np.einsum("bkd,bd->bk", found_vectors, queries)
    return np.where(found_ids >= 0, scores, -np.inf)


def recall_at_k(found_scores_exact: np.ndarray, exact_scores: np.ndarray) -> float:
    """Mean fraction of the exact top-k that was found, ties counted as found.

    found_scores_exact: the exact scores of the ids the index returned (B, k), -inf for padding;
    exact_scores: the exact top-k scores (B, k). A returned id is a hit when its exact score reaches
    the k-th exact score, so a different item with an identical vector is not counted as a miss.
    """
    valid = np.isfinite(exact_scores)  # fewer than k vectors: only that many can be found
    kth = np.where(valid, exact_scores, np.inf).min(axis=1, keepdims=True)
    hits = (found_scores_exact >= kth - TIE_TOLERANCE).sum(axis=1)
    return float(np.mean(np.minimum(hits, valid.sum(axis=1)) / np.maximum(valid.sum(axis=1), 1)))
