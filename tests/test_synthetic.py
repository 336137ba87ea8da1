"""The generated shop: determinism, the dataset contract, and real signal in every modality."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from multimodal_rec.data import schema
from multimodal_rec.data.sources.synthetic import generate_synthetic, read_synthetic
from multimodal_rec.data.synthetic_images import is_synthetic_ref, make_ref, render_synthetic_image

SMALL = {"n_items": 300, "n_users": 200}


@pytest.fixture(scope="module")
def shop():
    return generate_synthetic(**SMALL, seed=3)


@pytest.fixture(scope="module")
def rendered(shop):
    """(item index, 32x32 RGB pixels as float) for every item with an image."""
    raw, _ = shop
    refs = raw.items["image"]
    idx = np.flatnonzero(refs.notna().to_numpy())
    pixels = [np.asarray(render_synthetic_image(refs.iloc[i], size=32), dtype=np.float64) for i in idx]
    return idx, np.stack(pixels)


def _nearest_centroid_accuracy(x: np.ndarray, y: np.ndarray, n_classes: int, cosine: bool = False) -> float:
    """Fits class centroids on the first half of the rows, returns accuracy on the second half."""
    half = len(x) // 2
    train_x, train_y, test_x, test_y = x[:half], y[:half], x[half:], y[half:]
    centroids = np.stack([
        train_x[train_y == c].mean(0) if (train_y == c).any() else np.full(x.shape[1], np.inf)
        for c in range(n_classes)
    ])  # fmt: skip
    if cosine:
        centroids = np.nan_to_num(centroids / np.linalg.norm(centroids, axis=1, keepdims=True), posinf=0.0)
        pred = (test_x @ centroids.T).argmax(1)
    else:
        pred = ((test_x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((pred == test_y).mean())


def _majority_share(labels) -> float:
    return Counter(labels).most_common(1)[0][1] / len(labels)


# determinism and the contract


def test_same_seed_same_data_other_seed_other_data():
    a, b = read_synthetic(**SMALL, seed=1), read_synthetic(**SMALL, seed=1)
    c = read_synthetic(**SMALL, seed=2)
    for name in ("items", "users", "interactions"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
        assert not getattr(a, name).equals(getattr(c, name))
    assert a.extra == b.extra and a.extra["generator"]["seed"] == 1


def test_images_render_identically(shop):
    refs = shop[0].items["image"].dropna().iloc[:20]
    for ref in refs:
        first, second = render_synthetic_image(ref), render_synthetic_image(ref)
        assert first.mode == "RGB" and first.size == (64, 64)
        assert first.tobytes() == second.tobytes()
    assert render_synthetic_image(refs.iloc[0]).tobytes() != render_synthetic_image(refs.iloc[1]).tobytes()


def test_contract(shop):
    raw, _ = shop
    schema.validate(raw)
    assert raw.source == "synthetic" and raw.inputs == {} and not raw.issues.counts
    assert raw.items["item_id"].tolist() == list(range(1, SMALL["n_items"] + 1))
    assert raw.interactions["timestamp"].dtype == np.int64 and raw.interactions["value"].dtype == np.float32
    assert (raw.interactions["event"] == "purchase").all()
    assert raw.interactions.groupby("user_id").size().min() >= 3
    assert set(raw.interactions["user_id"]) == set(raw.users["user_id"])
    assert (raw.interactions.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    for kind, columns in raw.attributes.items():
        table = raw.items if kind.startswith("item") else raw.users
        assert set(columns) <= set(table.columns)
    assert "color" not in raw.items.columns and "material" not in raw.items.columns
    assert all(is_synthetic_ref(r) for r in raw.items["image"].dropna())


def test_missing_fractions_and_feature_only_mode():
    raw = read_synthetic(n_items=2000, n_users=50, missing_image_fraction=0.2, missing_text_fraction=0.3)
    assert abs(raw.items["image"].isna().mean() - 0.2) < 0.04
    assert abs((raw.items["text"].str.len() == 0).mean() - 0.3) < 0.04
    assert (raw.items["title"].str.len() > 0).all()
    no_images = read_synthetic(n_items=200, n_users=50, images=False)
    assert no_images.items["image"].isna().all()
    schema.validate(no_images)


@pytest.mark.parametrize(
    "ref",
    [
        "synthetic:",
        "synthetic:v2;shape=1;layout=0;color=ff0000;pattern=0;seed=1",
        "synthetic:v1;shape=1;layout=0;color=ff0000;pattern=0",
        "synthetic:v1;shape=99;layout=0;color=ff0000;pattern=0;seed=1",
        "synthetic:v1;shape=1;layout=0;color=zz0000;pattern=0;seed=1",
        "synthetic:v1;shape=x;layout=0;color=ff0000;pattern=0;seed=1",
        "images/1.jpg",
    ],
)
def test_malformed_ref_raises(ref):
    with pytest.raises(ValueError, match="malformed synthetic image ref"):
        render_synthetic_image(ref)


def test_is_synthetic_ref():
    assert is_synthetic_ref(make_ref(0, 0, "ff0000", 0, 1))
    assert not is_synthetic_ref(None) and not is_synthetic_ref("images/1.jpg")


# signal, one trivial predictor per modality; train on half the items or users, test on the rest


def test_image_shows_category(shop, rendered):
    _, latents = shop
    idx, pixels = rendered
    background = pixels[:, :1, :1, :]  # the corner pixel
    foreground = (np.abs(pixels - background).sum(-1) > 60).astype(np.float64)
    x = foreground.reshape(len(idx), 16, 2, 16, 2).mean((2, 4)).reshape(len(idx), -1)
    k = len(latents.category_names)
    accuracy = _nearest_centroid_accuracy(x, latents.item_category[idx], k)
    assert accuracy > 0.7 > 3 / k


def test_image_shows_color(shop, rendered):
    _, latents = shop
    idx, pixels = rendered
    y = latents.item_color[idx]
    accuracy = _nearest_centroid_accuracy(pixels.mean((1, 2)), y, len(latents.color_names))
    assert accuracy > max(0.5, 2 * _majority_share(y))


def test_text_shows_material(shop):
    raw, latents = shop
    texts = raw.items["text"]
    idx = np.flatnonzero((texts.str.len() > 0).to_numpy())
    docs = [texts.iloc[i].lower().replace(",", " ").replace(".", " ").split() for i in idx]
    vocab = {w: j for j, w in enumerate(sorted({w for d in docs for w in d}))}
    x = np.zeros((len(docs), len(vocab)))
    for row, doc in enumerate(docs):
        for w in doc:
            x[row, vocab[w]] += 1
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = latents.item_material[idx]
    accuracy = _nearest_centroid_accuracy(x, y, len(latents.material_names), cosine=True)
    assert accuracy > max(0.5, 2 * _majority_share(y))


def test_sequence_follows_complements(shop):
    raw, latents = shop
    inter = raw.interactions.sort_values(["user_id", "timestamp", "item_id"])
    cat = latents.item_category[inter["item_id"].to_numpy() - 1]
    same_user = inter["user_id"].to_numpy()[1:] == inter["user_id"].to_numpy()[:-1]
    prev, nxt, user = cat[:-1][same_user], cat[1:][same_user], inter["user_id"].to_numpy()[1:][same_user]
    train = user % 2 == 0
    k = len(latents.category_names)
    counts = np.zeros((k, k))
    np.add.at(counts, (prev[train], nxt[train]), 1)
    transition_pred = counts.argmax(1)[prev[~train]]
    popular_pred = np.bincount(nxt[train], minlength=k).argmax()
    transition_acc = (transition_pred == nxt[~train]).mean()
    popular_acc = (popular_pred == nxt[~train]).mean()
    assert transition_acc > popular_acc + 0.1


def test_hour_of_day_shifts_categories(shop):
    raw, latents = shop
    inter = raw.interactions
    hour = (inter["timestamp"].to_numpy() // 3600) % 24
    cat = latents.item_category[inter["item_id"].to_numpy() - 1]
    k = len(latents.category_names)
    morning = np.bincount(cat[(hour >= 6) & (hour < 12)], minlength=k)
    evening = np.bincount(cat[hour >= 18], minlength=k)
    total_variation = 0.5 * np.abs(morning / morning.sum() - evening / evening.sum()).sum()
    assert total_variation > 0.1


def test_profile_shifts_categories(shop):
    raw, latents = shop
    inter = raw.interactions.merge(raw.users, on="user_id")
    cat = latents.item_category[inter["item_id"].to_numpy() - 1]
    k = len(latents.category_names)
    young = np.bincount(cat[(inter["age"] < 30).to_numpy()], minlength=k)
    old = np.bincount(cat[(inter["age"] >= 60).to_numpy()], minlength=k)
    assert 0.5 * np.abs(young / young.sum() - old / old.sum()).sum() > 0.1


def test_popular_items_sell_more(shop):
    raw, _ = shop
    bought = raw.interactions["item_id"].value_counts().reindex(raw.items["item_id"], fill_value=0).to_numpy()
    sales = raw.items["sales"].to_numpy()
    top = sales >= np.quantile(sales, 0.9)
    assert bought[top].mean() > 3 * bought[~top].mean()


@pytest.mark.slow
def test_moderate_scale():
    start = time.perf_counter()
    raw = read_synthetic(n_items=200_000, n_users=100_000, seed=0)
    seconds = time.perf_counter() - start
    print(f"synthetic: {len(raw.items)} items, {len(raw.interactions)} interactions in {seconds:.1f}s")
    assert len(raw.interactions) > 1_800_000
    schema.validate(raw)
    assert seconds < 60
