"""Leave-one-out splits on a tiny hand-built dataset: ties, short users, cold items, windows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from multimodal_rec.data.schema import CanonicalDataset
from multimodal_rec.data.sequences import IGNORE_TARGET, EvalRows, TrainWindows, collate_eval
from multimodal_rec.data.splits import build_split


def tiny_dataset() -> CanonicalDataset:
    # user 10: five items, the last two share a timestamp (tie broken by item id: 13 before 14)
    # user 20: two items (no validation target); user 30: one item (only a test target)
    rows = [
        (10, 15, 100), (10, 12, 200), (10, 11, 300), (10, 14, 400), (10, 13, 400),
        (20, 12, 50), (20, 11, 60),
        (30, 15, 70),
    ]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["value"], inter["event"] = 1.0, "click"
    items = pd.DataFrame({"item_id": [11, 12, 13, 14, 15], "title": list("abcde"), "text": list("abcde")})
    items["image"] = None
    users = pd.DataFrame({"user_id": [10, 20, 30]})
    return CanonicalDataset(None, items, users, inter.sample(frac=1, random_state=0), {"fingerprint": "x"})


def test_leave_one_out_with_ties_and_short_users():
    split = build_split(tiny_dataset())
    # item index = position among ids 11..15
    np.testing.assert_array_equal(split.sequence(0), [4, 1, 0, 2, 3])
    users, targets = split.targets("test")
    np.testing.assert_array_equal(users, [0, 1, 2])
    np.testing.assert_array_equal(targets, [3, 0, 4])  # item 14, 11, 15
    users, targets = split.targets("val")
    np.testing.assert_array_equal(users, [0])
    np.testing.assert_array_equal(targets, [2])  # item 13: tie broken by id
    np.testing.assert_array_equal(split.train_sequence(0), [4, 1, 0])
    np.testing.assert_array_equal(split.train_sequence(1), [1])
    assert len(split.train_sequence(2)) == 0
    np.testing.assert_array_equal(split.history(0, "test"), [4, 1, 0, 2])
    np.testing.assert_array_equal(split.seen(0, "val"), [0, 1, 4])
    assert split.train_interactions()["user"].tolist() == [0, 0, 0, 1]


def test_train_on_validation_trains_the_validation_target_and_never_the_test_target():
    split = build_split(tiny_dataset(), train_on_validation=True)
    np.testing.assert_array_equal(split.train_sequence(0), [4, 1, 0, 2])  # + item 13, the validation target
    np.testing.assert_array_equal(split.train_sequence(1), [1])  # two items: no validation target, as before
    _, tests = split.targets("test")
    for user, target in enumerate(tests):  # each user's last interaction stays out of training
        trained = split.train_mask[split.offsets[user] : split.offsets[user + 1]]
        assert not trained[-1] and split.sequence(user)[-1] == target
    np.testing.assert_array_equal(split.history(0, "test"), [4, 1, 0, 2])  # what evaluation reads is unchanged


def test_validation_gap_holds_the_steps_before_validation_out_of_training_only():
    split = build_split(tiny_dataset(), validation_gap=1)
    np.testing.assert_array_equal(split.train_sequence(0), [4, 1])  # item 11 (index 0) is the gap
    np.testing.assert_array_equal(split.history(0, "val"), [4, 1, 0])  # ... and validation reads it
    np.testing.assert_array_equal(split.targets("val")[1], [2])  # the targets do not move
    np.testing.assert_array_equal(split.train_sequence(1), [1])  # too short for a gap: as before
    wide = build_split(tiny_dataset(), validation_gap=5)
    np.testing.assert_array_equal(wide.train_sequence(0), [4])  # at least one interaction stays trained
    with pytest.raises(ValueError, match="refit"):
        build_split(tiny_dataset(), validation_gap=1, train_on_validation=True)


def test_cold_items_leave_training_and_are_reported_apart():
    data = tiny_dataset()
    split = build_split(data, cold_item_fraction=0.2, seed=3)
    assert len(split.cold_items) == 1
    cold = int(split.cold_items[0])
    train = split.train_interactions()
    assert cold not in set(train["item"])
    for stage in ("val", "test"):
        _, warm_targets = split.targets(stage)
        _, cold_targets = split.targets(f"{stage}_cold")
        assert cold not in set(warm_targets) and set(cold_targets) <= {cold}
    hot_users, _ = split.targets("test")
    cold_users, _ = split.targets("test_cold")
    assert len(hot_users) + len(cold_users) == 3
    with pytest.raises(ValueError, match="cold_item_fraction"):
        build_split(data, cold_item_fraction=1.0)


def test_training_windows_cover_each_target_once():
    split = build_split(tiny_dataset())
    windows = TrainWindows(split, max_len=2)
    targets = [t for i in range(len(windows)) for t in windows[i]["targets"].tolist() if t != IGNORE_TARGET]
    assert sorted(targets) == [0, 1]  # user 10's train items after the first: 12 (idx 1), 11 (idx 0)
    sample = windows[0]
    assert sample["history"].tolist() == [4, 1] and sample["targets"].tolist() == [1, 0]


def test_overlapping_windows_give_every_target_context_and_train_it_once():
    # one user, 14 items: 12 in training (idx 0..11), the last two validation and test
    inter = pd.DataFrame({"user_id": 1, "item_id": np.arange(14) + 100, "timestamp": np.arange(14) * 10})
    inter["value"], inter["event"] = 1.0, "click"
    items = pd.DataFrame({"item_id": np.arange(14) + 100, "title": "t", "text": "t"})
    items["image"] = None
    data = CanonicalDataset(None, items, pd.DataFrame({"user_id": [1]}), inter, {"fingerprint": "x"})
    split = build_split(data)
    plain, strided = TrainWindows(split, max_len=4), TrainWindows(split, max_len=4, stride=2)
    assert len(strided) == 6 and len(plain) == 3
    seen = {}
    for windows in (plain, strided):
        targets, contexts = [], []
        for i in range(len(windows)):
            sample = windows[i]
            history, window_targets = sample["history"].tolist(), sample["targets"].tolist()
            for position, target in enumerate(window_targets):
                if target != IGNORE_TARGET:  # the item before the target is its input
                    assert history[position] == target - 1
                    targets.append(target)
                    contexts.append(sum(h != split.n_items for h in history[: position + 1]))
        assert sorted(targets) == list(range(1, 12))  # every training item but the first, once
        seen[windows.stride] = contexts
    # without overlap each window starts afresh (targets at a window's start see 1 item); with stride 2 a
    # target sees at least max_len - stride + 1 = 3 items, except the user's first two
    assert sum(c < 3 for c in seen[4]) == 6
    assert sorted(seen[2])[:3] == [1, 2, 3]
    with pytest.raises(ValueError, match="stride"):
        TrainWindows(split, max_len=4, stride=5)


def test_eval_rows_exclude_earlier_items():
    split = build_split(tiny_dataset())
    rows = EvalRows(split, "test", max_len=3)
    batch = collate_eval([rows[i] for i in range(len(rows))])
    assert batch["history"][0].tolist() == [1, 0, 2]  # last 3 of the history [4, 1, 0, 2]
    assert batch["target"].tolist() == [3, 0, 4]
    assert batch["history"][2].tolist() == [5, 5, 5]  # user with one item: all padding
    pairs = set(zip(batch["exclude_rows"].tolist(), batch["exclude_cols"].tolist()))
    assert pairs == {(0, 0), (0, 1), (0, 2), (0, 4), (1, 1)}
