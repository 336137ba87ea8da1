"""Torch datasets over a `Split`: training windows and per-user evaluation rows."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from multimodal_rec.data.splits import Split

IGNORE_TARGET = -100
MAX_BEFORE = 1000  # items before a training window that a batch carries (for mask_seen)
SECONDS_PER_HOUR = 3600


def hour_of_day(timestamps: np.ndarray) -> np.ndarray:
    """The context feature: hour of day (UTC) of an event, 0..23."""
    return (np.asarray(timestamps, dtype=np.int64) // SECONDS_PER_HOUR) % 24


def _left_pad(values: np.ndarray, length: int, fill: int) -> np.ndarray:
    out = np.full(length, fill, dtype=np.int64)
    if len(values):
        out[length - len(values) :] = values[-length:]
    return out


class TrainWindows(Dataset):
    """Each user's training sequence cut into windows of `max_len` next-item targets.

    A sample predicts every item of the window from the items before it (teacher forcing), so
    each training interaction but the first of a user is a target exactly once per epoch.
    With `stride` < max_len the windows overlap: each still holds max_len items, but only its last
    `stride` are targets and the ones before are context, so a target sees at least max_len - stride
    earlier items (all it has, near the start), as evaluation sees the last max_len. Still once a target.
    """

    def __init__(self, split: Split, max_len: int, stride: int | None = None):
        stride = max_len if stride is None else stride
        if not 1 <= stride <= max_len:
            raise ValueError(f"window stride must be in [1, max_len={max_len}], got {stride}")
        self.max_len, self.stride = max_len, stride
        self.pad = split.n_items
        mask = split.train_mask
        user_of = np.repeat(np.arange(split.n_users), split.lengths())
        self.user_items = {}
        self.user_times = {}
        self.before_len = 1  # the longest `before`
        self.carry_before = False  # set by build_model for a model with mask_seen: only it reads `before`
        windows = []
        for user in np.unique(user_of[mask]):
            lo, hi = split.offsets[user], split.offsets[user + 1]
            keep = mask[lo:hi]
            items, times = split.items[lo:hi][keep], split.timestamps[lo:hi][keep]
            if len(items) < 2:
                continue
            self.user_items[user], self.user_times[user] = items, times
            self.before_len = max(self.before_len, min(len(items) - 2, MAX_BEFORE))
            for end in range(len(items), 1, -stride):  # inputs from items[start - 1], targets items[first:end]
                windows.append((user, max(end - max_len, 1), max(end - stride, 1), end))
        self.windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        user, start, first, end = (int(v) for v in self.windows[index])
        items, times = self.user_items[user], self.user_times[user]
        history = _left_pad(items[start - 1 : end - 1], self.max_len, self.pad)  # (L,)
        targets = items[start:end].copy()
        targets[: first - start] = IGNORE_TARGET  # context only: an earlier window trains these
        targets = _left_pad(targets, self.max_len, IGNORE_TARGET)  # (L,)
        hours = _left_pad(hour_of_day(times[start:end]), self.max_len, 0)  # (L,)
        sample = {
            "user": torch.tensor(user),
            "history": torch.from_numpy(history),
            "targets": torch.from_numpy(targets),
            "context_hour": torch.from_numpy(hours),
        }
        if self.carry_before:  # the user's items before the window (the most recent MAX_BEFORE)
            earlier = items[max(0, start - 1 - MAX_BEFORE): start - 1]
            sample["before"] = torch.from_numpy(_left_pad(earlier, self.before_len, self.pad))
        return sample


class EvalRows(Dataset):
    """One row per user with a target in `stage`: the history before it and the items to exclude."""

    def __init__(self, split: Split, stage: str, max_len: int):
        self.split, self.stage, self.max_len = split, stage, max_len
        self.users, positions = split.target_positions(stage)
        self.targets = split.items[positions]
        self.hours = hour_of_day(split.timestamps[positions])

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> dict:
        user = int(self.users[index])
        history = self.split.history(user, self.stage, self.max_len)
        return {
            "user": torch.tensor(user),
            "history": torch.from_numpy(_left_pad(history, self.max_len, self.split.n_items)),
            "target": torch.tensor(int(self.targets[index])),
            "context_hour": torch.tensor(int(self.hours[index])),
            "seen": torch.from_numpy(self.split.seen(user, self.stage)),
        }


def collate_eval(rows: list[dict]) -> dict:
    """Stacks rows; the ragged `seen` lists become (row, item) pairs to exclude from ranking."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0] if key != "seen"}
    seen = [row["seen"] for row in rows]
    batch["exclude_rows"] = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(s) for s in seen]))
    batch["exclude_cols"] = torch.cat(seen) if seen else torch.empty(0, dtype=torch.long)
    return batch
