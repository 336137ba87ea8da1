"""Per-item inputs of the item tower, held as (non-persistent) buffers and gathered by item index."""

from __future__ import annotations

import torch
from torch import nn

from multimodal_rec.data.features import ItemFeatures, UserFeatures
from multimodal_rec.data.images import ItemImages
from multimodal_rec.models.content_graph import content_neighbours


class ItemInputs(nn.Module):
    """Feature tables (N+1 rows, padding last). Image/text enter either as frozen features or as raw
    pixels/token ids when their encoder is fine-tuned. Buffers are not saved in checkpoints: they are
    rebuilt from the data, which the checkpoint names by fingerprint."""

    def __init__(self, items: ItemFeatures, known: torch.Tensor, image: dict | None = None,
                 text: dict | None = None, image_size: int = 224, raw_images: bool = False,
                 raw_text: bool = False, neighbours: int = 0, popularity: torch.Tensor | None = None):
        super().__init__()
        self.n_items = items.n_items

        def buffer(name: str, value: torch.Tensor) -> None:
            self.register_buffer(name, value, persistent=False)

        buffer("known", torch.cat([known, torch.zeros(1, dtype=torch.bool)]))  # (N+1,)
        if popularity is not None:  # (N+1,) training interaction counts
            buffer("popularity", torch.cat([popularity, torch.zeros(1, dtype=popularity.dtype)]))
        buffer("categorical", items.categorical)
        buffer("multi_hot", items.multi_hot)
        buffer("numeric", items.numeric)
        buffer("numeric_missing", items.numeric_missing)
        buffer("has_text", items.has_text)
        has_image = items.has_image.clone()
        if image is not None:
            has_image &= image["ok"]
        buffer("has_image", has_image)
        self.raw_images, self.raw_text = raw_images, raw_text
        if image is not None and not raw_images:
            buffer("image", image["features"])
        if raw_images:
            buffer("pixels", _load_all_pixels(items, image_size, has_image))
        if text is not None and not raw_text:
            buffer("text", text["features"])
        if raw_text:
            buffer("text_ids", items.text_ids)
            buffer("text_mask", items.text_mask)
        self.n_neighbours = 0  # k of the content-neighbour tables; 0: none (no k asked, or no frozen content)
        kinds, features, present = self.frozen_content()
        if neighbours and kinds:  # (N+1, k) each; the padding row has no neighbours
            index, weight = content_neighbours(features, present, known, neighbours)
            self.n_neighbours = index.shape[1]
            buffer("neighbours", torch.cat([index, torch.full((1, self.n_neighbours), self.n_items)]))
            buffer("neighbour_weights", torch.cat([weight, torch.zeros(1, self.n_neighbours)]))

    def frozen_content(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
        """(kinds, (N, F) frozen feature tables, (N,) presence flags) of the image/text features held here,
        padding row left out: what content neighbours are found by."""
        kinds = [kind for kind in ("image", "text") if kind in self._buffers]
        return (kinds, [self._buffers[kind][:-1] for kind in kinds],
                [self._buffers[f"has_{kind}"][:-1] for kind in kinds])

    def forward(self, index: torch.Tensor) -> dict:
        """index (B,) item indices (n_items = padding) -> the tower's inputs for those items."""
        out = {"item": index}
        for name, _ in self.named_buffers():
            out[name] = getattr(self, name)[index]
        if self.raw_text:  # trim to the longest text in the batch
            length = max(int(out["text_mask"].sum(1).max()), 1)
            out["text_ids"], out["text_mask"] = out["text_ids"][:, :length], out["text_mask"][:, :length]
        return out


def _load_all_pixels(items: ItemFeatures, size: int, has_image: torch.Tensor) -> torch.Tensor:
    """(N+1, 3, S, S) uint8 of every image, for fine-tuning the CNN on catalogues that fit in memory."""
    pixels = torch.zeros(len(items.image_refs), 3, size, size, dtype=torch.uint8)
    images = ItemImages(items.image_refs, items.root, size)
    for position in range(len(images)):
        row = images[position]
        pixels[row["index"]] = row["pixels"]
        has_image[row["index"]] &= row["ok"]
    return pixels


class UserInputs(nn.Module):
    def __init__(self, users: UserFeatures):
        super().__init__()
        self.register_buffer("categorical", users.categorical, persistent=False)
        self.register_buffer("numeric", users.numeric, persistent=False)

    def forward(self, user: torch.Tensor) -> dict:
        return {"categorical": self.categorical[user], "numeric": self.numeric[user]}
