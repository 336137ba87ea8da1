"""The time cut of the DataModule (data.before_quantile / data.before_time): the shop as it was at T."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from multimodal_rec.data.datamodule import RecDataModule, cut_time_of
from multimodal_rec.data.schema import DataIssues, RawDataset, write_dataset

# user 10: events at 100, 200, 300, 400; user 20: 150, 400 (at T: dropped); user 30 only after T;
# user 40 has no event at all. Items 11..16: 15 only after T, 16 never (both stay, as new arrivals)
ROWS = [(10, 11, 100), (10, 12, 200), (10, 13, 300), (10, 14, 400), (20, 12, 150), (20, 15, 400), (30, 11, 500)]
T = 400


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    inter = pd.DataFrame(ROWS, columns=["user_id", "item_id", "timestamp"])
    inter["value"], inter["event"] = np.float32(1.0), "click"
    items = pd.DataFrame({"item_id": [11, 12, 13, 14, 15, 16], "title": list("abcdef"), "text": list("abcdef")})
    items["image"] = None
    users = pd.DataFrame({"user_id": [10, 20, 30, 40], "age": [20, 30, 40, 50]})
    raw = RawDataset("tiny", items, users, inter, {"user_numeric": ["age"]}, {}, DataIssues())
    out = tmp_path_factory.mktemp("cut") / "tiny"
    write_dataset(raw, out)
    return out


def datamodule(root, **cut) -> RecDataModule:
    dm = RecDataModule("tiny", str(root), max_len=4, text_tokenizer="hash", max_text_len=8, **cut)
    dm.setup()
    return dm


def test_the_quantile_names_the_time_by_which_that_fraction_had_happened():
    times = np.array([5, 1, 3, 3, 2, 4, 9, 8, 7, 6])
    assert cut_time_of(times, before_quantile=0.5) == 5  # 5 of 10 events before 5
    assert cut_time_of(times, before_quantile=0.3) == 3  # the tie at 3 falls after the cut: 2 events before it
    assert cut_time_of(times, before_time=4.0) == 4
    assert cut_time_of(times, before_time=3.5) == 4  # events at 3 come before 3.5, those at 4 do not
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            cut_time_of(times, before_quantile=bad)
    with pytest.raises(ValueError):
        cut_time_of(times, before_quantile=0.5, before_time=4)


def test_the_cut_drops_the_events_at_and_after_t_and_the_users_without_an_earlier_event(dataset_dir):
    full, cut = datamodule(dataset_dir), datamodule(dataset_dir, before_time=T)
    kept = cut.dataset.interactions
    assert (kept["timestamp"] < T).all()
    assert sorted(map(tuple, kept[["user_id", "item_id", "timestamp"]].to_numpy())) == sorted(
        r for r in ROWS if r[2] < T)
    assert cut.dataset.items["item_id"].tolist() == full.dataset.items["item_id"].tolist()  # every item stays
    assert cut.split.n_items == full.split.n_items == 6
    assert cut.dataset.users["user_id"].tolist() == [10, 20]  # 30 (only after T) and 40 (no event) unknown
    assert cut.split.n_users == 2 and len(cut.user_features.numeric) == 2
    # dense indices still follow the tables: user 20 (index 1) has item 12 (index 1)
    np.testing.assert_array_equal(cut.split.sequence(1), [1])
    np.testing.assert_array_equal(cut.split.sequence(0), [0, 1, 2])
    assert cut.cut_time["time"] == T and cut.cut_time["iso"].startswith("1970-01-01T00:06:40")
    assert cut.cut_time["events_dropped"] == 3 and cut.cut_time["users_dropped"] == 2
    assert cut.cut_time["items_without_events"] == 3  # 14, 15 and 16
    np.testing.assert_array_equal(cut.split.cold_items, [3, 4, 5])  # never trained on: cold, as the export says
    assert len(full.split.cold_items) == 0
    assert full.cut_time is None


def test_the_cut_is_part_of_the_fingerprint(dataset_dir):
    full = datamodule(dataset_dir)
    by_time, by_quantile = datamodule(dataset_dir, before_time=T), datamodule(dataset_dir, before_quantile=0.6)
    assert by_quantile.cut_time["time"] == T  # floor(0.6 * 7) = 4 of the 7 events happened before 400
    assert by_time.fingerprint != full.fingerprint and by_time.fingerprint.startswith(full.fingerprint)
    assert by_quantile.fingerprint == by_time.fingerprint  # the same T is the same data
    assert datamodule(dataset_dir, before_time=T - 1).fingerprint != by_time.fingerprint
    with pytest.raises(ValueError):
        RecDataModule("tiny", str(dataset_dir), before_quantile=0.5, before_time=T)
