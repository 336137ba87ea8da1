"""Categorical, multi-valued and numeric attributes -> one vector (items or user profiles)."""

from __future__ import annotations

import torch
from torch import nn


class AttributeEncoder(nn.Module):
    """Sum of per-column categorical embeddings (code 0 = missing), a linear map of multi-hot
    columns (genres) and of numeric columns with their missing flags; None when there is nothing."""

    def __init__(self, dim: int, categorical_sizes: list[int], n_multi: int = 0, n_numeric: int = 0,
                 init_std: float | None = None):
        """init_std: the output's starting scale per coordinate (None: PyTorch's default init)."""
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(size, dim, padding_idx=0) for size in categorical_sizes)
        self.multi = nn.Linear(n_multi, dim, bias=False) if n_multi else None
        self.numeric = nn.Linear(2 * n_numeric, dim) if n_numeric else None
        if init_std is not None:
            with torch.no_grad():
                for embedding in self.embeddings:
                    nn.init.normal_(embedding.weight, std=init_std)
                    embedding.weight[0].zero_()
                for linear in (self.multi, self.numeric):
                    if linear is not None:
                        nn.init.normal_(linear.weight, std=init_std)
                if self.numeric is not None:
                    nn.init.zeros_(self.numeric.bias)
        self.dim = dim
        self.empty = not (categorical_sizes or n_multi or n_numeric)

    def forward(self, categorical: torch.Tensor, multi_hot: torch.Tensor | None = None,
                numeric: torch.Tensor | None = None, numeric_missing: torch.Tensor | None = None) -> torch.Tensor:
        out = categorical.new_zeros((*categorical.shape[:-1], self.dim), dtype=torch.float)  # (..., d)
        for column, embedding in enumerate(self.embeddings):
            out = out + embedding(categorical[..., column])
        if self.multi is not None:
            counts = multi_hot.sum(-1, keepdim=True).clamp_min(1.0)
            out = out + self.multi(multi_hot / counts)
        if self.numeric is not None:
            missing = numeric_missing.float() if numeric_missing is not None else torch.zeros_like(numeric)
            out = out + self.numeric(torch.cat([numeric, missing], dim=-1))
        return out
