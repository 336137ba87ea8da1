"""Reference recommenders, all fitted on the training split and evaluated through the one protocol."""

from multimodal_rec.baselines.base import Recommender
from multimodal_rec.baselines.bpr_mf import BPRMF
from multimodal_rec.baselines.content import ContentBased, item_vectors_from_features
from multimodal_rec.baselines.dnn import DNNRecommender
from multimodal_rec.baselines.item_knn import ItemKNN
from multimodal_rec.baselines.popularity import Popularity
from multimodal_rec.baselines.sasrec import SASRec
from multimodal_rec.baselines.user_knn import UserKNN

BASELINES: dict[str, type[Recommender]] = {
    cls.name: cls for cls in (Popularity, UserKNN, ItemKNN, BPRMF, ContentBased, DNNRecommender, SASRec)
}


def make_baseline(name: str, **kwargs) -> Recommender:
    """A baseline by its registry name (`popularity`, `item_knn`, ...) with constructor arguments."""
    if name not in BASELINES:
        raise KeyError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    return BASELINES[name](**kwargs)


__all__ = [
    "BASELINES",
    "BPRMF",
    "ContentBased",
    "DNNRecommender",
    "ItemKNN",
    "Popularity",
    "Recommender",
    "SASRec",
    "UserKNN",
    "item_vectors_from_features",
    "make_baseline",
]
