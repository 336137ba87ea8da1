"""The frozen-feature store: an item whose picture or text is unchanged is never encoded twice."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch

from multimodal_rec.data.datamodule import RecDataModule
from multimodal_rec.data.features import build_item_features
from multimodal_rec.data.schema import load_dataset, write_dataset
from multimodal_rec.data.sources.synthetic import read_synthetic
from multimodal_rec.data.synthetic_images import make_ref, render_synthetic_image
from multimodal_rec.models import feature_cache
from multimodal_rec.models.encoders_setup import build_bundle


def counting_encoders() -> tuple[dict, dict]:
    """Tiny random encoders (fixed weights) whose forward counts the rows it encodes, per kind."""
    from multimodal_rec.models.components.image_encoder import ImageEncoder
    from multimodal_rec.models.components.text_encoder import TextEncoder

    torch.manual_seed(0)
    encoders = {"image": ImageEncoder("tiny", pretrained=False), "text": TextEncoder(pretrained=False, tiny_hidden=32)}
    counts = {"image": 0, "text": 0}
    for kind, encoder in encoders.items():
        def forward(first, *rest, _real=encoder.forward, _kind=kind):
            counts[_kind] += len(first)
            return _real(first, *rest)
        encoder.forward = forward
    return {f"{kind}_encoder": (lambda e=encoder: e) for kind, encoder in encoders.items()}, counts


def build(root: Path, factories: dict, cache: Path, name: str = "tiny_shop"):
    datamodule = RecDataModule(name, str(root), max_len=10, batch_size=32, eval_batch_size=64, image_size=32)
    return build_bundle(datamodule, ("id", "image", "text"), cache_dir=str(cache), **factories)


def write(raw, path: Path) -> Path:
    write_dataset(raw, path)
    return path


def item_features(root: Path):
    return build_item_features(load_dataset(root))


@pytest.fixture(scope="module")
def shop():
    return read_synthetic(n_items=300, n_users=150, seed=1)


def test_only_new_or_changed_items_are_encoded(shop, tmp_path, caplog):
    factories, counts = counting_encoders()
    cache = tmp_path / "cache"
    first = build(write(shop, tmp_path / "a"), factories, cache)
    items = item_features(tmp_path / "a")
    n_images = int(items.has_image.sum())
    assert counts["image"] == n_images  # each picture once
    tokens = torch.cat([items.text_ids, items.text_mask], 1)
    assert counts["text"] == len(torch.unique(tokens, dim=0)) < len(tokens)  # each distinct text once (+ padding)

    # (b) the same catalogue with fewer events (another dataset fingerprint): nothing encoded
    fewer = write(type(shop)(**{**vars(shop), "interactions": shop.interactions.iloc[: len(shop.interactions) // 2]}),
                  tmp_path / "b")
    assert load_dataset(fewer).content_fingerprint != load_dataset(tmp_path / "a").content_fingerprint
    counts.update(image=0, text=0)
    with caplog.at_level(logging.INFO, logger=feature_cache.__name__):
        second = build(fewer, factories, cache)
    assert counts == {"image": 0, "text": 0}
    assert f"image features: 0 of {n_images} items encoded, the rest from the cache" in caplog.text
    for kind in ("image", "text", "has_image", "has_text"):
        assert torch.equal(getattr(first.item_inputs, kind), getattr(second.item_inputs, kind)), kind

    # (c) one item changed (picture and text), one new: exactly those two encoded, the rest bitwise equal
    items = shop.items.copy()
    changed = int(items.index[items["image"].notna() & (items["text"].fillna("") != "")][3])
    items.loc[changed, "image"] = make_ref(1, 0, "123456", 2, 987654)
    items.loc[changed, "text"] = "a freshly rewritten description"
    new = items.iloc[[0]].assign(item_id=int(items["item_id"].max()) + 1, text="a brand new gadget",
                                 image=make_ref(2, 1, "654321", 1, 123123))
    third_raw = type(shop)(**{**vars(shop), "items": pd.concat([items, new], ignore_index=True)})
    counts.update(image=0, text=0)
    third = build(write(third_raw, tmp_path / "c"), factories, cache)
    assert counts == {"image": 2, "text": 2}
    same = torch.ones(301, dtype=torch.bool)
    same[changed] = False
    for kind in ("image", "text"):
        old, now = getattr(first.item_inputs, kind), getattr(third.item_inputs, kind)
        assert torch.equal(old[:300][same[:300]], now[:300][same[:300]]), kind
        assert torch.equal(old[-1], now[-1])  # the padding row
        assert not torch.equal(old[changed], now[changed])


def test_the_same_pictures_under_other_ids_and_names_are_hits(shop, tmp_path):
    factories, counts = counting_encoders()
    cache = tmp_path / "cache"
    first = build(write(shop, tmp_path / "a"), factories, cache)
    shifted = type(shop)(**{**vars(shop), "items": shop.items.assign(item_id=shop.items["item_id"] + 1000),
                            "interactions": shop.interactions.assign(item_id=shop.interactions["item_id"] + 1000)})
    counts.update(image=0, text=0)
    other = build(write(shifted, tmp_path / "b"), factories, cache, name="another_shop")
    assert counts == {"image": 0, "text": 0}
    assert torch.equal(first.item_inputs.image, other.item_inputs.image)


def test_pictures_are_keyed_by_their_bytes_not_their_paths(shop, tmp_path):
    factories, counts = counting_encoders()
    encoder = factories["image_encoder"]()
    items = item_features(write(shop, tmp_path / "a"))
    refs = [ref for ref in items.image_refs if ref is not None][:6]
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        for i, ref in enumerate(refs):
            render_synthetic_image(ref, 40).save(tmp_path / folder / f"{folder}-{i}.png")
    items.image_refs = [f"one-{i}.png" for i in range(6)] + ["missing.png", None]
    items.root, items.has_image = tmp_path / "one", torch.tensor([True] * 7 + [False])
    first = feature_cache.cached_image_features(encoder, items, 32, tmp_path / "cache")
    assert counts["image"] == 7 and first["ok"].tolist() == [True] * 6 + [False, False]
    items.image_refs = [f"two-{i}.png" for i in (5, 4, 3, 2, 1, 0)] + ["gone.png", None]
    items.root = tmp_path / "two"
    counts.update(image=0)
    second = feature_cache.cached_image_features(encoder, items, 32, tmp_path / "cache")
    assert counts["image"] == 0 and second["ok"].tolist() == first["ok"].tolist()
    assert torch.equal(second["features"][:6], first["features"][:6].flip(0))
    assert torch.equal(second["features"][6:], first["features"][6:])  # unreadable: as encoded, ok=False


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong shape"])
def test_a_damaged_shard_is_recomputed_with_a_warning(shop, tmp_path, caplog, damage):
    factories, counts = counting_encoders()
    cache = tmp_path / "cache"
    root = write(shop, tmp_path / "a")
    first = build(root, factories, cache)
    [shard] = (cache / "features").glob("image-*.pt")
    if damage == "garbage":
        shard.write_bytes(b"not a torch file")
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:200])
    else:
        value = torch.load(shard, weights_only=True)
        torch.save({**value, "features": value["features"][:, :3]}, shard)
    counts.update(image=0, text=0)
    with caplog.at_level(logging.WARNING, logger=feature_cache.__name__):
        again = build(root, factories, cache)
    assert "unreadable" in caplog.text and shard.name in caplog.text
    assert counts == {"image": int(shop.items["image"].notna().sum()), "text": 0}
    assert torch.equal(first.item_inputs.image, again.item_inputs.image)
    counts.update(image=0)
    build(root, factories, cache)
    assert counts["image"] == 0  # the recomputed shard was stored again


def test_shards_are_merged_past_the_limit(shop, tmp_path, monkeypatch):
    monkeypatch.setattr(feature_cache, "COMPACT_AT", 2)
    factories, counts = counting_encoders()
    encoder = factories["text_encoder"]()
    items = item_features(write(shop, tmp_path / "a"))
    full = items.text_ids.clone()
    shards = []
    for n in (50, 100, 150, 301):  # each run meets new texts: one more shard, merged once past two
        items.text_ids = torch.where(torch.arange(301)[:, None] < n, full, 0)
        out = feature_cache.cached_text_features(encoder, items, tmp_path / "cache")
        shards.append(len(list((tmp_path / "cache" / "features").glob("text-*.pt"))))
    assert shards == [1, 2, 1, 2]
    counts.update(text=0)
    again = feature_cache.cached_text_features(encoder, items, tmp_path / "cache")
    assert counts["text"] == 0 and torch.equal(again["features"], out["features"])
