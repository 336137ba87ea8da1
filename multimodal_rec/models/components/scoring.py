"""How retrieval scores an item for a query, shared by training, export and serving (no Lightning here)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORES = ("cosine", "dot")


def retrieval_vectors(raw: torch.Tensor, score: str) -> torch.Tensor:
    """Tower outputs (..., d) -> the vectors retrieval multiplies: unit vectors for cosine (scaled by
    1 / temperature in the loss), the raw vectors for dot (their norms carry popularity and confidence)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return F.normalize(raw, dim=-1) if score == "cosine" else raw
