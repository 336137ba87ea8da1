"""Model construction from config + data (the sizes of a model depend on the dataset)."""

from __future__ import annotations

from collections.abc import Callable

from multimodal_rec.data.datamodule import RecDataModule
from multimodal_rec.models.components.item_tower import MODALITIES
from multimodal_rec.models.encoders_setup import build_bundle
from multimodal_rec.models.recommender import MultimodalRecommender


def build_model(datamodule: RecDataModule, recommender: Callable, modalities=MODALITIES,
                image_encoder: Callable | None = None, text_encoder: Callable | None = None,
                cache_dir: str | None = None, content_neighbours: int = 0) -> MultimodalRecommender:
    """`recommender` is a partial MultimodalRecommender (Hydra `_partial_: true`) lacking its data bundle."""
    bundle = build_bundle(datamodule, tuple(modalities), image_encoder, text_encoder, cache_dir,
                          neighbours=content_neighbours)
    model = recommender(bundle=bundle)
    model.item_tower.fit_whitening(bundle.item_inputs)  # with whiten=true: the catalogue's own statistics
    datamodule.train_set.carry_before = bool(model.hparams.get("mask_seen"))  # the windows' earlier items
    model.test_stages = datamodule.test_stages()
    model.frozen_encoders = bundle.frozen_encoders  # a plain dict, not submodules: not trained, not checkpointed
    return model
