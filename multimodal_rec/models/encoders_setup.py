"""Builds what the model needs from the data: encoders (frozen ones replaced by cached features),
item/user input tables, the sizes of their vocabularies and the training popularity of items."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from multimodal_rec.models import feature_cache
from multimodal_rec.models.components.item_tower import MODALITIES
from multimodal_rec.models.item_inputs import ItemInputs, UserInputs

if TYPE_CHECKING:
    from multimodal_rec.data.datamodule import RecDataModule

log = logging.getLogger(__name__)


@dataclass
class EncoderBundle:
    n_items: int
    item_inputs: ItemInputs
    user_inputs: UserInputs
    image_encoder: nn.Module | None  # only when fine-tuned; frozen encoders live in the cache
    text_encoder: nn.Module | None
    tower_sizes: dict
    user_sizes: dict
    popularity: torch.Tensor  # (N,) training interaction counts
    data_fingerprint: str = ""
    frozen_encoders: dict = field(default_factory=dict)  # kind -> the encoder its cached features came from


def build_bundle(datamodule: RecDataModule, modalities=MODALITIES, image_encoder: Callable | None = None,
                 text_encoder: Callable | None = None, cache_dir: str | None = None,
                 feature_device: str = "auto", neighbours: int = 0) -> EncoderBundle:
    datamodule.prepare_data()
    datamodule.setup()
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; choose from {MODALITIES}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if feature_device == "auto" else feature_device
    items, split = datamodule.item_features, datamodule.split
    image_size = datamodule.image_size
    image = text = None
    image_module = text_module = None
    tower_sizes = {"modalities": tuple(modalities)}
    frozen: dict = {}

    def encode(kind: str, factory: Callable | None, compute: Callable):
        """(frozen features or None, fine-tuned encoder or None) for one modality."""
        if factory is None:
            raise ValueError(f"the {kind} modality needs a {kind}_encoder config")
        encoder = factory()
        if encoder.trainable:
            return None, encoder
        frozen[kind] = encoder.cpu().eval()
        features = compute(encoder)  # per item content: new events or other data reuse the cached features
        tower_sizes[f"{kind}_dim"] = features["features"].shape[1]
        return features, None

    if "image" in modalities:
        image, image_module = encode("image", image_encoder, lambda encoder: feature_cache.cached_image_features(
            encoder, items, image_size, cache_dir, device=device))
    if "text" in modalities:
        text, text_module = encode("text", text_encoder, lambda encoder: feature_cache.cached_text_features(
            encoder, items, cache_dir, device=device))

    train = split.train_interactions()
    popularity = torch.from_numpy(np.bincount(train["item"].to_numpy(), minlength=split.n_items))
    item_inputs = ItemInputs(items, known=popularity > 0, image=image, text=text, image_size=image_size,
                             raw_images=image_module is not None, raw_text=text_module is not None,
                             neighbours=neighbours if "id" in modalities else 0, popularity=popularity)
    tower_sizes["neighbours"] = item_inputs.n_neighbours
    tower_sizes.update(categorical_sizes=tuple(items.categorical_sizes), n_multi=items.multi_hot.shape[1],
                       n_numeric=items.numeric.shape[1])
    users = datamodule.user_features
    user_sizes = {"user_categorical_sizes": tuple(users.categorical_sizes), "n_user_numeric": users.numeric.shape[1]}
    return EncoderBundle(split.n_items, item_inputs, UserInputs(users), image_module, text_module, tower_sizes,
                         user_sizes, popularity, datamodule.fingerprint, frozen)
