"""Query tower: an RNN (or causal self-attention) over the fused vectors of the user's history, plus
profile and context.

Works for users never seen in training: it needs only a history (or only a profile: user cold start).
Reference: Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks" (GRU4Rec),
ICLR 2016; Kang & McAuley, "Self-Attentive Sequential Recommendation" (SASRec), ICDM 2018, for the
`transformer` option; Covington et al. (RecSys 2016) for profile and context features in the query tower.
"""

from __future__ import annotations

import torch
from torch import nn

from multimodal_rec.models.components.attributes import AttributeEncoder
from multimodal_rec.safe_modules import rebuildable

N_HOURS = 24
SEQUENCE_MODELS = ("gru", "lstm", "transformer")


class CausalSelfAttention(nn.Module):
    """SASRec's encoder over given item vectors: (B, L, d) left-padded -> (B, L, d), position i sees
    positions <= i. Positions count back from the most recent item, so any length up to max_len works."""

    def __init__(self, dim: int, num_layers: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.position = nn.Embedding(max_len, dim)  # row max_len - 1: the most recent item
        nn.init.normal_(self.position.weight, std=0.02)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, num_layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = items.shape[1]
        if length > self.max_len:
            raise ValueError(f"history of {length} items is longer than the encoder's max_len {self.max_len}")
        positions = torch.arange(self.max_len - length, self.max_len, device=items.device)
        x = (items + self.position(positions)) * mask.unsqueeze(-1)  # (B, L, d)
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=items.device)
        allowed = causal & (mask[:, None, :] | eye)  # (B, L, L); a position always sees itself (no NaN rows)
        blocked = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        return self.encoder(x, mask=blocked.repeat_interleave(self.heads, dim=0))


@rebuildable
class HistoryEncoder(nn.Module):
    def __init__(self, dim: int, hidden: int | None = None, rnn: str = "gru", num_layers: int = 1,
                 dropout: float = 0.1, user_categorical_sizes: tuple = (), n_user_numeric: int = 0,
                 use_profile: bool = True, use_context: bool = True, heads: int = 2, max_len: int = 200,
                 item_dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= item_dropout < 1.0:
            raise ValueError(f"item_dropout must be in [0, 1), got {item_dropout}")
        self.item_dropout = item_dropout
        if rnn not in SEQUENCE_MODELS:
            raise ValueError(f"rnn must be one of {SEQUENCE_MODELS}, got {rnn!r}")
        hidden = hidden or dim
        if rnn == "transformer":
            hidden = dim  # attention keeps the width of the item vectors
            self.attention = CausalSelfAttention(dim, num_layers, heads, dropout, max_len)
        else:
            rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[rnn]
            self.rnn = rnn_cls(dim, hidden, num_layers=num_layers, batch_first=True,
                               dropout=dropout if num_layers > 1 else 0.0)
        self.input_dropout = nn.Dropout(dropout)
        self.empty_history = nn.Parameter(torch.zeros(hidden))
        self.profile = AttributeEncoder(dim, list(user_categorical_sizes), 0, n_user_numeric) if use_profile else None
        self.context = nn.Embedding(N_HOURS, dim) if use_context else None
        extra = dim * ((self.profile is not None) + (self.context is not None))
        self.out = nn.Sequential(nn.Linear(hidden + extra, 2 * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(2 * dim, dim))

    def _run_sequence_model(self, items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """RNN or attention over left-padded histories (B, L, d) -> states (B, L, h), aligned with the input;
        the learned empty-history state where a row has no item."""
        batch, length, _ = items.shape
        lengths = mask.sum(1)  # (B,)
        if hasattr(self, "attention"):
            states = self.attention(items, mask)
            return torch.where((lengths == 0).view(batch, 1, 1), self.empty_history.to(states.dtype), states)
        shift = (length - lengths).unsqueeze(1)  # left padding per row
        positions = torch.arange(length, device=items.device).unsqueeze(0)
        to_left = ((positions + shift) % length).unsqueeze(-1)
        # Real items first, padding after: a unidirectional RNN's states at real positions are then exactly
        # those of the unpadded history (no packing needed, which is twice as slow on CPU).
        states, _ = self.rnn(items.gather(1, to_left.expand_as(items)))
        back = ((positions - shift) % length).unsqueeze(-1)
        states = states.gather(1, back.expand_as(states))  # (B, L, h), right-aligned again
        empty = (lengths == 0).view(batch, 1, 1)
        return torch.where(empty, self.empty_history.to(states.dtype), states)

    def forward(self, items: torch.Tensor, mask: torch.Tensor, profile: dict | None = None,
                context_hour: torch.Tensor | None = None) -> torch.Tensor:
        """items (B, L, d) item vectors, mask (B, L) real positions, profile {"categorical": (B, c),
        "numeric": (B, n)}, context_hour (B, L) or (B,) -> queries (B, L, d) at every position."""
        if self.training and self.item_dropout > 0:  # whole items out of the history, so that it cannot be memorised
            keep = torch.rand(items.shape[:2], device=items.device) >= self.item_dropout
            items = items * keep.unsqueeze(-1).to(items.dtype)
        states = self._run_sequence_model(self.input_dropout(items), mask)  # (B, L, h)
        parts = [states]
        if self.profile is not None:
            vector = self.profile(profile["categorical"], numeric=profile["numeric"])  # (B, d)
            parts.append(vector.unsqueeze(1).expand(-1, states.shape[1], -1))
        if self.context is not None:
            hours = context_hour if context_hour.dim() == 2 else context_hour.unsqueeze(1).expand(-1, states.shape[1])
            parts.append(self.context(hours))  # (B, L, d)
        return self.out(torch.cat(parts, dim=-1))  # (B, L, d)
