"""Baselines on tiny hand-made data (seconds), and popularity/item-KNN on the real data (slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from multimodal_rec.baselines import (
    BASELINES,
    BPRMF,
    ContentBased,
    DNNRecommender,
    ItemKNN,
    Popularity,
    Recommender,
    SASRec,
    UserKNN,
)
from multimodal_rec.config import CONF_DIR
from multimodal_rec.data.splits import Split, build_split
from multimodal_rec.evaluation.protocol import eval_loader, evaluate

from .test_splits import tiny_dataset


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run far faster on one thread, above all when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_split(sequences: list[list[int]], n_items: int, cold_items=()) -> Split:
    """A Split straight from per-user item sequences (already in time order)."""
    lengths = [len(s) for s in sequences]
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    return Split(
        n_users=len(sequences),
        n_items=n_items,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        items=items,
        timestamps=np.arange(len(items), dtype=np.int64) * 3600,
        cold_items=np.asarray(sorted(cold_items), dtype=np.int64),
    )


def cycle_split(n_items: int = 40, n_users: int = 120, length: int = 12, seed: int = 0) -> Split:
    """Every user walks the cycle 0 -> 1 -> ... -> n_items-1 -> 0 from a random start (no repeats):
    the next item is the last item + 1, so a sequential model can be perfect; popularity is near random."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_items, size=n_users)
    return make_split([list((s + np.arange(length)) % n_items) for s in starts], n_items)


FAST = {
    "popularity": {},
    "user_knn": {"k": 10},
    "item_knn": {"k": 10},
    "bpr_mf": {"dim": 16, "epochs": 30, "lr": 0.05, "eval_every": 0},
    "content": {},
    "dnn": {"dim": 16, "epochs": 20, "lr": 0.01, "batch_size": 256, "eval_every": 0},
    "sasrec": {"dim": 32, "layers": 1, "heads": 1, "dropout": 0.0, "max_len": 12, "epochs": 60, "lr": 0.01,
               "batch_size": 32, "eval_every": 0, "progress": False, "device": "cpu"},
}


def fit(name: str, split: Split) -> Recommender:
    vectors = torch.eye(split.n_items) if name == "content" else None
    return BASELINES[name](**FAST[name]).fit(split, vectors)


def test_registry_covers_every_baseline():
    assert set(BASELINES) == set(FAST)
    assert {cls.name for cls in (Popularity, UserKNN, ItemKNN, BPRMF, ContentBased, DNNRecommender, SASRec)} == set(
        BASELINES
    )


@pytest.mark.parametrize("name", sorted(FAST))
def test_each_baseline_scores_every_user_and_item(name):
    split = build_split(tiny_dataset())  # users with 5, 2 and 1 interactions; the last has no training data
    model = fit(name, split)
    batch = next(iter(eval_loader(split, "test", max_len=4)))
    scores = model.score(batch)
    assert scores.shape == (3, split.n_items) and scores.dtype.is_floating_point
    assert torch.isfinite(scores).all()
    # user 2 has no training interaction and an empty history: popularity fallback ordering
    order = torch.argsort(scores[2].cpu(), descending=True, stable=True)
    counts = torch.from_numpy(np.bincount(split.items[split.train_mask], minlength=split.n_items))
    assert torch.all(counts[order][:-1] >= counts[order][1:])
    metrics = model.evaluate(split, "test", max_len=4)
    assert metrics["n_users"] == 3 and 0.0 <= metrics["hr@10"] <= 1.0


def test_popularity_counts_every_training_interaction():
    split = build_split(tiny_dataset())  # training: user 10 -> items 4, 1, 0; user 20 -> item 1
    model = Popularity().fit(split)
    assert model.counts.tolist() == [1.0, 2.0, 0.0, 0.0, 1.0]
    batch = {"user": torch.tensor([0, 2]), "history": torch.full((2, 3), split.n_items)}
    assert torch.equal(model.score(batch), model.counts.expand(2, -1))
    # test targets 3, 0, 4; ties are pessimistic. User 0 has seen {4, 1, 0, 2}: target 3 is the only
    # candidate (rank 0); user 1 has seen {1}: target 0 ties with 4 (rank 1); user 2 has seen nothing:
    # target 4 ties with 0, behind 1 (rank 2)
    metrics = evaluate(model.score, split, "test", max_len=3, ks=(1, 5))
    assert metrics["hr@1"] == pytest.approx(1 / 3)
    assert metrics["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_item_knn_ranks_the_co_occurring_item_first():
    # items 0 and 1 always go together; 2 and 3 together; item 4 is alone
    split = make_split([[0, 1, 9, 9], [1, 0, 9, 9], [0, 1, 9, 9], [2, 3, 9, 9], [3, 2, 4, 9]], n_items=10)
    model = ItemKNN(k=5).fit(split)
    pad = split.n_items
    scores = model.score({"user": torch.tensor([0, 1]), "history": torch.tensor([[pad, 0], [pad, 2]])})
    scores[0, 0] = scores[1, 2] = -float("inf")  # the history itself
    assert scores.argmax(dim=1).tolist() == [1, 3]
    user = UserKNN(k=2).fit(split)  # user 3's one neighbour (user 4) has exactly its items
    assert set(torch.topk(user.score({"user": torch.tensor([3])})[0], 2).indices.tolist()) == {2, 3}


def test_content_based_ranks_identical_vector_first_and_handles_cold_items():
    vectors = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [2.0, 0, 0], [0, 0, 1.0]])
    # item 3 is cold (never in training) and is user 0's test target; its vector is item 0's, scaled
    split = make_split([[1, 0, 3], [2, 1, 4]], n_items=5, cold_items=[3])
    model = ContentBased().fit(split, vectors)
    pad = split.n_items
    scores = model.score({"user": torch.tensor([0]), "history": torch.tensor([[pad, pad, 0]])})
    assert scores[0, 3] == pytest.approx(1.0)
    scores[0, 0] = -float("inf")  # the history itself
    assert int(scores.argmax()) == 3
    metrics = evaluate(model.score, split, "test_cold", max_len=3, ks=(1,))  # history [1, 0] -> cold item 3
    assert metrics["n_users"] == 1 and metrics["hr@1"] == 1.0
    with pytest.raises(ValueError, match="item_vectors"):
        ContentBased().fit(split)


def _hit_rates(model: Recommender, split: Split, ks=(1, 5)) -> dict[str, float]:
    return evaluate(model.score, split, "test", max_len=12, ks=ks)


def test_learned_models_beat_popularity_on_a_sequential_cycle():
    split = cycle_split()
    pop = _hit_rates(Popularity().fit(split), split)
    # 40 items, 11 seen: 29 candidates; a random ranking gets hr@5 ~ 5/29 = 0.17
    assert pop["hr@5"] < 0.35
    sasrec = _hit_rates(fit("sasrec", split), split)
    assert sasrec["hr@1"] > 0.9
    bpr = _hit_rates(fit("bpr_mf", split), split)
    assert bpr["hr@5"] > max(pop["hr@5"], 5 / 29) + 0.1
    dnn = _hit_rates(fit("dnn", split), split)
    assert dnn["hr@5"] > max(pop["hr@5"], 5 / 29) + 0.1


def test_sasrec_early_stopping_keeps_the_best_validation_state():
    split = cycle_split(n_users=60)
    model = SASRec(**{**FAST["sasrec"], "epochs": 12, "eval_every": 3, "patience": 2}).fit(split)
    checked = [h for h in model.history if "val_ndcg@10" in h]
    assert checked and model.best_epoch == max(checked, key=lambda h: h["val_ndcg@10"])["epoch"]
    rows = next(iter(eval_loader(split, "val", max_len=30)))  # longer histories than max_len are cut
    assert model.score(rows).shape == (60, split.n_items)


@pytest.mark.parametrize("path", sorted((CONF_DIR / "baseline").glob("*.yaml")), ids=lambda p: p.stem)
def test_hydra_configs_instantiate(path: Path):
    model = instantiate(OmegaConf.load(path))
    assert isinstance(model, Recommender)
    assert model.name == path.stem


def test_every_baseline_has_a_config():
    assert {p.stem for p in (CONF_DIR / "baseline").glob("*.yaml")} == set(BASELINES)


@pytest.mark.slow
def test_popularity_and_item_knn_match_other_libraries_on_ml100k(ml100k_mm_dir):
    from multimodal_rec.data.schema import load_dataset

    split = build_split(load_dataset(ml100k_mm_dir))
    pop = Popularity().fit(split).evaluate(split, "test")
    # RecBole's popularity on the same protocol: HR@10 0.050, NDCG@10 0.025 (docs/benchmarks.md, library peers)
    assert pop["n_users"] == 943
    assert pop["hr@10"] == pytest.approx(0.050, abs=0.005)
    assert pop["ndcg@10"] == pytest.approx(0.025, abs=0.005)
    knn = ItemKNN().fit(split).evaluate(split, "test")
    assert knn["hr@10"] > 0.05 and knn["hr@10"] > pop["hr@10"]
