"""The MovieLens-100k reader on the real files, and on a copy with planted faults."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from multimodal_rec.data.schema import DatasetError, load_dataset
from multimodal_rec.data.sources.movielens import read_movielens
from multimodal_rec.data.splits import build_split


def test_real_counts(ml100k_mm_dir):
    data = load_dataset(ml100k_mm_dir)
    counts = data.manifest["counts"]
    assert (counts["users"], counts["items"], counts["interactions"]) == (943, 1682, 100_000)
    assert counts["items_with_image"] == 1640
    assert data.manifest["items_with_plot"] == 1591
    assert data.manifest["issues"]["counts"] == {}
    assert set(data.manifest["inputs"]) >= {"ml-100k/u.data", "posters/", "movielens100k_details.json"}
    assert data.manifest["inputs"]["ml-100k/u.data"].startswith("06416e597f82")
    with_image = data.items.dropna(subset=["image"])
    assert all((ml100k_mm_dir / path).is_file() for path in with_image["image"])
    toy_story = data.items.set_index("item_id").loc[1]
    assert toy_story["year"] == 1995 and "Animation" in toy_story["text"]


def test_test_item_is_last_by_time(ml100k_mm_raw, ml100k_mm_dir):
    ratings = pd.read_csv(ml100k_mm_raw / "ml-100k" / "u.data", sep="\t", names=["user", "item", "r", "ts"])
    last = ratings.sort_values(["user", "ts", "item"]).groupby("user").tail(1).set_index("user")["item"]
    second = ratings.sort_values(["user", "ts", "item"]).groupby("user").nth(-2).set_index("user")["item"]
    data = load_dataset(ml100k_mm_dir)
    split = build_split(data)
    users, targets = split.targets("test")
    assert len(users) == 943
    user_ids = data.users["user_id"].to_numpy()[users]
    item_ids = data.items["item_id"].to_numpy()[targets]
    np.testing.assert_array_equal(item_ids, last.loc[user_ids].to_numpy())
    users, targets = split.targets("val")
    np.testing.assert_array_equal(data.items["item_id"].to_numpy()[targets], second.loc[user_ids].to_numpy())


@pytest.fixture
def faulty_copy(ml100k_mm_raw, tmp_path):
    """A copy with a corrupt JPEG, a non-image poster, a truncated line, an unknown id and a duplicate."""
    root = tmp_path / "ml-100k"
    shutil.copytree(ml100k_mm_raw / "ml-100k", root)
    posters = tmp_path / "posters"
    posters.mkdir()
    for item_id in range(1, 11):
        shutil.copy(ml100k_mm_raw / "posters" / f"{item_id}.jpg", posters)
    jpeg = (posters / "3.jpg").read_bytes()
    (posters / "3.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # truncated JPEG
    (posters / "4.jpg").write_bytes(b"not an image at all")
    with open(root / "u.data", "a") as handle:
        handle.write("196\t242\n")  # truncated line
        handle.write("1\t99999\t3\t881250949\n")  # unknown item
        handle.write("196\t242\t3\t881250949\n")  # duplicate of the first rating
    return tmp_path


def test_planted_faults_are_counted_and_handled(faulty_copy):
    raw = read_movielens(faulty_copy / "ml-100k", posters=faulty_copy / "posters")
    counts = raw.issues.counts
    assert counts["corrupt_image"] == 2
    assert counts["malformed_line"] == 1 and counts["unknown_id"] == 1 and counts["duplicate_interaction"] == 1
    assert any("u.data:100001" in example for example in raw.issues.examples["malformed_line"])
    assert sorted(raw.image_files) == [1, 2, 5, 6, 7, 8, 9, 10]
    assert len(raw.interactions) == 100_000
    assert "corrupt_image: 2" in raw.issues.report()


def test_faults_are_recorded_in_manifest(faulty_copy, tmp_path):
    from multimodal_rec.data.schema import write_dataset

    raw = read_movielens(faulty_copy / "ml-100k", posters=faulty_copy / "posters")
    manifest = write_dataset(raw, tmp_path / "out")
    assert manifest["issues"]["counts"]["corrupt_image"] == 2
    items = load_dataset(tmp_path / "out").items.set_index("item_id")
    assert pd.isna(items.loc[3, "image"]) and items.loc[5, "image"] == "images/5.jpg"


def test_missing_files_give_one_clear_error(tmp_path):
    (tmp_path / "ml-100k").mkdir()
    (tmp_path / "ml-100k" / "u.genre").write_text("unknown|0\n")
    with pytest.raises(DatasetError) as error:
        read_movielens(tmp_path / "ml-100k", posters=tmp_path / "nowhere")
    message = str(error.value)
    for name in ("u.data", "u.item", "u.user", "nowhere"):
        assert name in message
    assert "u.genre" not in message


def test_load_dataset_names_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="items.parquet.*prepare"):
        load_dataset(tmp_path)


def test_imdb_details_become_attributes(ml100k_mm_raw, tmp_path):
    from multimodal_rec.data.schema import write_dataset

    details = ml100k_mm_raw / "movielens100k_details.json"
    names = ["imdb_rating", "imdb_votes", "minutes", "age_rating", "director"]
    raw = read_movielens(ml100k_mm_raw / "ml-100k", details=details, detail_attributes=names)
    assert raw.attributes["item_numeric"] == ["year", "imdb_rating", "imdb_votes", "minutes"]
    assert raw.attributes["item_categorical"] == ["age_rating"]
    assert raw.attributes["item_multi"] == ["genres", "director"]
    items = raw.items.set_index("item_id")
    lawrence = items.loc[511]  # "280K" reviews, "3h 48min"
    assert (lawrence["imdb_rating"], lawrence["imdb_votes"], lawrence["minutes"]) == (8.3, 280_000.0, 228.0)
    assert lawrence["age_rating"] == "Approved" and lawrence["director"] == ["David Lean"]
    # a director of one film only would name that film again: dropped
    films = pd.Series([d for ds in items["director"] for d in ds]).value_counts()
    assert films.min() >= 2 and items.loc[1, "director"] == []
    assert items["imdb_votes"].notna().sum() == 1543 and pd.isna(items.loc[858, "minutes"])  # "None" there
    plain = read_movielens(ml100k_mm_raw / "ml-100k", details=details)  # none chosen: the schema as before
    assert plain.attributes["item_numeric"] == ["year"] and plain.attributes["item_multi"] == ["genres"]
    assert "imdb_votes" not in plain.items
    write_dataset(raw, tmp_path / "details")
    write_dataset(plain, tmp_path / "plain")
    written = [load_dataset(tmp_path / name) for name in ("details", "plain")]
    assert written[0].fingerprint != written[1].fingerprint  # checkpoints tell the two apart
    assert written[0].content_fingerprint == written[1].content_fingerprint  # cached image/text features do not
    told = read_movielens(ml100k_mm_raw / "ml-100k", details=details, detail_text=True)
    assert told.items.set_index("item_id").loc[1, "text"] == plain.items.set_index("item_id").loc[1, "text"] + (
        " Directed by John Lasseter. Starring Tom Hanks, Tim Allen, Don Rickles.")
    write_dataset(told, tmp_path / "told")
    assert load_dataset(tmp_path / "told").fingerprint != written[1].fingerprint  # other texts
    with pytest.raises(DatasetError, match="unknown detail_attributes.*box_office"):
        read_movielens(ml100k_mm_raw / "ml-100k", details=details, detail_attributes=["box_office"])
