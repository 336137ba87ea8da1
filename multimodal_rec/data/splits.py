"""Time-ordered leave-one-out splits, exactly as the evaluation protocol says (docs/evaluation.md).

Per user, interactions are ordered by timestamp, ties broken by item id. The last one is the test
target, the second-to-last the validation target, the rest the training history. A user with two
interactions has no validation target; a user with one has only a test target.

With `train_on_validation` the validation targets join the training split (only the test target is held
out): the refit of a model whose epochs were chosen on validation, as a shop trains on all it has.

With `validation_gap=g` the g interactions before the validation target are held out of training too (they
stay in the validation and test histories). The validation history then ends with items the model never
trained on for that user, as the test history ends with the validation item: a tuning signal in the test
target's situation. Its test figures are not the benchmark's (the test history ends with g + 1 such items).

Optionally a seeded fraction of items is held out as cold-start items: they are removed from every
training sequence (so no model sees them in training) and validation/test targets that hit them
are reported apart (`stage="test_cold"`), as docs/evaluation.md asks.

Users and items are addressed by dense indices (0..n-1) in the order of the canonical tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from multimodal_rec.data.schema import CanonicalDataset

STAGES = ("val", "test", "val_cold", "test_cold")


@dataclass
class Split:
    """All sequences of a dataset, split per user. Arrays are numpy int64."""

    n_users: int
    n_items: int
    offsets: np.ndarray  # (n_users + 1,) CSR offsets into `items` / `timestamps`
    items: np.ndarray  # (n_interactions,) item index, per user in time order
    timestamps: np.ndarray  # (n_interactions,) int64 seconds, aligned with `items`
    cold_items: np.ndarray  # (n_cold,) sorted item indices never seen in training
    train_on_validation: bool = False  # the validation targets are training interactions too (refit)
    validation_gap: int = 0  # interactions before the validation target held out of training too

    def sequence(self, user: int) -> np.ndarray:
        return self.items[self.offsets[user] : self.offsets[user + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def is_cold(self, items: np.ndarray) -> np.ndarray:
        return np.isin(items, self.cold_items)

    def train_sequence(self, user: int) -> np.ndarray:
        """Training history of a user: all but the validation (unless trained on) and test targets, cold
        items removed."""
        lo, hi = self.offsets[user], self.offsets[user + 1]
        return self.items[lo:hi][self.train_mask[lo:hi]]

    @cached_property
    def train_mask(self) -> np.ndarray:
        """(n_interactions,) True where an interaction belongs to the training split."""
        lengths = self.lengths()
        held = np.minimum(lengths, 1)  # the test target
        if not self.train_on_validation:
            held = np.where(lengths >= 3, 2, held)  # and the validation target
            # and the validation_gap before it, leaving at least one training interaction
            held = np.where(lengths >= 4, np.minimum(lengths - 1, 2 + self.validation_gap), held)
        user_of = np.repeat(np.arange(self.n_users), lengths)
        position = np.arange(len(self.items)) - self.offsets[user_of]
        mask = position < (lengths - held)[user_of]
        return mask & ~self.is_cold(self.items) if len(self.cold_items) else mask

    def target_positions(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, positions) of the targets of a stage; position indexes `items` (CSR)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        lengths = self.lengths()
        back = 1 if stage.startswith("test") else 2
        min_len = 1 if back == 1 else 3
        users = np.flatnonzero(lengths >= min_len)
        positions = self.offsets[users + 1] - back
        cold = self.is_cold(self.items[positions])
        keep = cold if stage.endswith("_cold") else ~cold
        return users[keep], positions[keep]

    def targets(self, stage: str) -> tuple[np.ndarray, np.ndarray]:
        """(users, target items) of a stage."""
        users, positions = self.target_positions(stage)
        return users, self.items[positions]

    def history(self, user: int, stage: str, max_len: int | None = None) -> np.ndarray:
        """Items before the stage's target (training history for val, + val item for test).

        Cold items stay out of the history: it is what the model may know when it ranks.
        """
        seq = self.sequence(user)
        back = 1 if stage.startswith("test") else 2
        hist = seq[: max(len(seq) - back, 0)]
        if len(self.cold_items):
            hist = hist[~self.is_cold(hist)]
        return hist[-max_len:] if max_len else hist

    def seen(self, user: int, stage: str) -> np.ndarray:
        """Items the user interacted with before the stage's target: excluded from ranking. A repeat
        purchase of the target itself stays rankable (the protocol never excludes the target)."""
        seq = self.sequence(user)
        back = 1 if stage.startswith("test") else 2
        earlier = np.unique(seq[: max(len(seq) - back, 0)])
        if len(seq) >= back:
            earlier = earlier[earlier != seq[len(seq) - back]]
        return earlier

    def train_interactions(self) -> pd.DataFrame:
        """The training split as a table (user, item, timestamp), cold items removed."""
        mask = self.train_mask
        user_of = np.repeat(np.arange(self.n_users), self.lengths())
        return pd.DataFrame(
            {"user": user_of[mask], "item": self.items[mask], "timestamp": self.timestamps[mask]}
        )


def build_split(data: CanonicalDataset, cold_item_fraction: float = 0.0, seed: int = 0,
                train_on_validation: bool = False, validation_gap: int = 0) -> Split:
    """Orders each user's interactions by (timestamp, item id) and indexes them densely."""
    if not 0.0 <= cold_item_fraction < 1.0:
        raise ValueError(f"cold_item_fraction must be in [0, 1), got {cold_item_fraction}")
    if validation_gap < 0:
        raise ValueError(f"validation_gap must be >= 0, got {validation_gap}")
    if validation_gap and train_on_validation:
        raise ValueError("validation_gap holds interactions out for validation; a refit (train_on_validation) "
                         "trains on them, so the two do not go together")
    item_index = pd.Index(data.items["item_id"].to_numpy())
    user_index = pd.Index(data.users["user_id"].to_numpy())
    inter = data.interactions
    frame = pd.DataFrame(
        {
            "user": user_index.get_indexer(inter["user_id"].to_numpy()),
            "item": item_index.get_indexer(inter["item_id"].to_numpy()),
            "item_id": inter["item_id"].to_numpy(),
            "timestamp": inter["timestamp"].to_numpy(dtype=np.int64),
        }
    )
    if (frame["user"] < 0).any() or (frame["item"] < 0).any():
        raise ValueError("interactions refer to users or items missing from the tables")
    frame = frame.sort_values(["user", "timestamp", "item_id"], kind="stable")
    counts = np.bincount(frame["user"].to_numpy(), minlength=len(user_index))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n_items = len(item_index)
    rng = np.random.default_rng(seed)
    n_cold = int(round(cold_item_fraction * n_items))
    cold = np.sort(rng.choice(n_items, size=n_cold, replace=False)) if n_cold else np.empty(0, np.int64)
    return Split(
        n_users=len(user_index),
        n_items=n_items,
        offsets=offsets,
        items=frame["item"].to_numpy(dtype=np.int64),
        timestamps=frame["timestamp"].to_numpy(dtype=np.int64),
        cold_items=cold.astype(np.int64),
        train_on_validation=train_on_validation,
        validation_gap=int(validation_gap),
    )
