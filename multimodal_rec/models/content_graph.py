"""Content neighbours: for every item, the k warm items most similar to it in the frozen image/text
feature space. The item tower adds the weighted mean of their ID embeddings to the item's own, so an
item's ID-space vector is pulled towards the items that look and read alike. It adds no parameters (no
capacity to memorise items, unlike a learned 1280-d projection), and a cold item gets an ID-space vector
from the warm items it resembles.

Reference: Zhang et al., "Mining Latent Structures for Multimedia Recommendation" (LATTICE), MM 2021;
Zhou & Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for Multimodal
Recommendation" (FREEDOM), MM 2023: a frozen item-item kNN graph built from modality features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit_features(features: list[torch.Tensor], present: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per modality (N, F_m) -> L2-normalised float rows, zero where the item lacks the modality."""
    return [F.normalize(f.float(), dim=1) * p.unsqueeze(1).float() for f, p in zip(features, present)]


def nearest(queries: list[torch.Tensor], pool_units: list[torch.Tensor], pool: torch.Tensor, k: int,
            exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """queries: per modality (R, F_m) unit rows; pool_units: (P, F_m) rows of the items in `pool` (P,).
    Similarity = mean over modalities of the cosine (0 where either item lacks the modality).
    exclude: (R,) the item each query row is (never its own neighbour), or None.
    -> (index (R, k) item indices, weight (R, k): the positive similarities, normalised to sum to 1)."""
    similarity = sum(q @ u.T for q, u in zip(queries, pool_units)) / len(queries)  # (R, P)
    if exclude is not None:
        similarity[exclude.unsqueeze(1) == pool.unsqueeze(0)] = float("-inf")
    top, position = similarity.topk(k, dim=1)  # (R, k)
    top = top.clamp_min(0.0)
    return pool[position], top / top.sum(1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def content_neighbours(features: list[torch.Tensor], present: list[torch.Tensor], candidates: torch.Tensor,
                       k: int, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """features: per modality (N, F_m); present: per modality (N,) bool; candidates: (N,) bool, the items
    that may be neighbours (the warm ones). -> (index (N, k), weight (N, k)), see `nearest`. An item with
    no content, or whose best matches are not similar at all, gets zero weights there."""
    if not features:
        raise ValueError("content neighbours need at least one frozen image or text feature table")
    pool = torch.nonzero(candidates).squeeze(1)  # (P,)
    if len(pool) < 2:
        raise ValueError(f"content neighbours need at least 2 warm items, got {len(pool)}")
    k = min(k, len(pool) - 1)
    units = unit_features(features, present)
    pool_units = [u[pool] for u in units]
    n = features[0].shape[0]
    index, weight = torch.empty(n, k, dtype=torch.long), torch.empty(n, k)
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        index[rows], weight[rows] = nearest([u[rows] for u in units], pool_units, pool, k, exclude=rows)
    return index, weight

