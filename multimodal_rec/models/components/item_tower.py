"""Item tower: any subset of {ID, image, text, attributes} -> one d-dim item vector.

Works for items never seen in training: their ID part is the learned "unknown" vector, so the vector
comes from content alone (item cold start). Missing modalities get their own learned vectors.
Reference: Wei et al., "MMGCN" (MM 2019) / He & McAuley, "VBPR" (AAAI 2016) for content-based item
representations; ID dropout as in Volkovs et al., "DropoutNet", NeurIPS 2017.
"""

from __future__ import annotations

import torch
from torch import nn

from multimodal_rec.models.components.attributes import AttributeEncoder
from multimodal_rec.models.components.fusion import ConcatFusion, GatedFusion, ResidualFusion
from multimodal_rec.models.components.whitening import FeatureWhitening
from multimodal_rec.safe_modules import rebuildable

MODALITIES = ("id", "image", "text", "attributes")


ID_INIT_STD = 0.02


def _projection(in_dim: int, dim: int, dropout: float, whiten_eps: float | None = None) -> nn.Module:
    """Frozen features -> d. The output starts at the scale of the ID embedding (std ID_INIT_STD per
    coordinate): with PyTorch's default init a projected 1280-d feature is ~30x larger, so content would
    drown the ID vectors of warm items until they grow, which costs warm accuracy in a fixed epoch budget.
    With `whiten_eps`, the features are whitened (fitted by `ItemTower.fit_whitening`) instead of layer-normed."""
    linear = nn.Linear(in_dim, dim)
    nn.init.normal_(linear.weight, std=ID_INIT_STD / in_dim**0.5)
    nn.init.zeros_(linear.bias)
    first = nn.LayerNorm(in_dim) if whiten_eps is None else FeatureWhitening(in_dim, whiten_eps)
    return nn.Sequential(first, nn.Dropout(dropout), linear)


@rebuildable
class ItemTower(nn.Module):
    def __init__(self, dim: int, n_items: int, image_dim: int = 0, text_dim: int = 0,
                 categorical_sizes: tuple = (), n_multi: int = 0, n_numeric: int = 0,
                 modalities: tuple = MODALITIES, id_dropout: float = 0.2, fusion: str = "gated",
                 dropout: float = 0.1, feature_dropout: float | None = None, neighbours: int = 0,
                 content_shrinkage: float = 0.0, image_encoder: nn.Module | None = None,
                 text_encoder: nn.Module | None = None, whiten: bool = False, whiten_eps: float = 0.1):
        super().__init__()
        unknown = sorted(set(modalities) - set(MODALITIES))
        if unknown or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.dim, self.id_dropout, self.content_shrinkage = dim, id_dropout, content_shrinkage
        feature_dropout = dropout if feature_dropout is None else feature_dropout
        frozen_whitening = whiten_eps if whiten else None  # frozen features only: an encoder's output moves
        if "id" in self.modalities:
            self.id_embedding = nn.Embedding(n_items + 1, dim)
            nn.init.normal_(self.id_embedding.weight, std=ID_INIT_STD)
            self.unknown_id = nn.Parameter(torch.zeros(dim))
        if "image" in self.modalities:
            self.image_encoder = image_encoder
            self.image_proj = _projection(image_encoder.out_dim if image_encoder else image_dim, dim, feature_dropout,
                                          None if image_encoder else frozen_whitening)
            self.missing_image = nn.Parameter(torch.zeros(dim))
        if "text" in self.modalities:
            self.text_encoder = text_encoder
            self.text_proj = _projection(text_encoder.out_dim if text_encoder else text_dim, dim, feature_dropout,
                                         None if text_encoder else frozen_whitening)
            self.missing_text = nn.Parameter(torch.zeros(dim))
        if "attributes" in self.modalities:
            self.attributes = AttributeEncoder(dim, list(categorical_sizes), n_multi, n_numeric, init_std=ID_INIT_STD)
        # the mean ID embedding of the item's content neighbours (content_graph.py): needs IDs and content
        self.neighbours = neighbours if "id" in self.modalities and {"image", "text"} & set(self.modalities) else 0
        self.part_names = self.modalities + (("neighbours",) if self.neighbours else ())
        fusion_cls = {"gated": GatedFusion, "concat": ConcatFusion, "residual": ResidualFusion}[fusion]
        self.fusion = fusion_cls(dim, len(self.part_names), dropout=dropout)

    def fit_whitening(self, inputs: nn.Module) -> None:
        """Fits the whitening of each frozen modality (`whiten=true`) on the catalogue's features (ItemInputs'
        tables), over the items that have that modality; fine-tuned encoders' outputs are not whitened."""
        for kind in ("image", "text"):
            projection = getattr(self, f"{kind}_proj", None)
            if projection is not None and isinstance(projection[0], FeatureWhitening):
                projection[0].fit(getattr(inputs, kind)[getattr(inputs, f"has_{kind}")])

    @staticmethod
    def _fill(vectors: torch.Tensor, present: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        return torch.where(present.unsqueeze(-1), vectors, fallback.to(vectors.dtype))

    def forward(self, inputs: dict) -> torch.Tensor:
        """inputs: "item" (B,), "known" (B,) bool, then per modality the features ("image" (B, F) or
        "pixels" (B, 3, H, W) with an image encoder; "text" (B, F) or "text_ids"/"text_mask"), "has_image",
        "has_text", and "categorical", "multi_hot", "numeric", "numeric_missing"; "neighbours" and
        "neighbour_weights" (B, k) with content neighbours; "popularity" (B,) training counts with
        content_shrinkage (absent: 0)."""
        parts = []
        if "id" in self.modalities:
            known = inputs["known"]
            if self.training and self.id_dropout > 0:
                known = known & (torch.rand(known.shape, device=known.device) >= self.id_dropout)
            parts.append(self._fill(self.id_embedding(inputs["item"]), known, self.unknown_id))
        if "image" in self.modalities:
            features = self.image_encoder(inputs["pixels"]) if self.image_encoder else inputs["image"]
            parts.append(self._fill(self.image_proj(features.float()), inputs["has_image"], self.missing_image))
        if "text" in self.modalities:
            if self.text_encoder:
                features = self.text_encoder(inputs["text_ids"], inputs["text_mask"])
            else:
                features = inputs["text"]
            parts.append(self._fill(self.text_proj(features.float()), inputs["has_text"], self.missing_text))
        if "attributes" in self.modalities:
            parts.append(self.attributes(inputs["categorical"], inputs.get("multi_hot"), inputs.get("numeric"),
                                         inputs.get("numeric_missing")))
        if self.neighbours:
            weights = inputs["neighbour_weights"].unsqueeze(-1)  # (B, k, 1)
            parts.append((weights * self.id_embedding(inputs["neighbours"])).sum(-2))  # (B, d)
        parts = torch.stack(parts, dim=-2)  # (B, M, d)
        if self.content_shrinkage > 0 and "id" in self.modalities and parts.shape[1] > 1:
            parts = parts * self._content_weights(inputs, known).unsqueeze(-1)
        return self.fusion(parts)  # (B, d)

    def _content_weights(self, inputs: dict, known: torch.Tensor) -> torch.Tensor:
        """(B, M): 1 for the ID part; c / (c + n) for the content parts of an item whose ID is used and that
        has n training interactions (a prior's weight against the evidence: popular items lean on their
        IDs, rare ones on content); 1 when the ID is not used (cold, new, or dropped in training)."""
        popularity = inputs.get("popularity")
        popularity = torch.zeros_like(known, dtype=torch.float) if popularity is None else popularity.float()
        shrink = self.content_shrinkage / (self.content_shrinkage + popularity)  # (B,)
        weights = torch.ones(len(known), len(self.part_names), device=known.device)
        weights[:, 1:] = torch.where(known, shrink, 1.0).unsqueeze(1)  # the ID part comes first
        return weights
