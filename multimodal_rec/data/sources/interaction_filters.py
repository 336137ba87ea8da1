"""Filters over an event table (columns user, item, timestamp, value, event, _line): duplicates and repeats
of a (user, item) pair, and the k-core that researchers expect."""

from __future__ import annotations

import numpy as np
import pandas as pd

from multimodal_rec.data.schema import DataIssues
from multimodal_rec.data.sources.table_files import LINE


def merge_repeats(events: pd.DataFrame, name: str, issues: DataIssues) -> tuple[pd.DataFrame, int]:
    """One interaction per (user, item): a row equal to an earlier one (same user, item, time and event) is a
    duplicate, reported with its line; other repeats (a view, then a purchase) merge into one interaction at
    the first time, carrying the highest weight and its event. -> (events, rows merged away)."""
    events = events.sort_values(["user", "item", "timestamp", LINE], kind="stable")
    duplicate = events.duplicated(["user", "item", "timestamp", "event"]).to_numpy()
    dup_lines = events.loc[duplicate, LINE]
    issues.add_many("duplicate_interaction", len(dup_lines),
                    (f"{name}:{line}: repeats an earlier row" for line in dup_lines))
    events = events.loc[~duplicate]
    pair = events[["user", "item"]].to_numpy()
    first = np.ones(len(events), dtype=bool)
    first[1:] = (pair[1:] != pair[:-1]).any(axis=1)
    if first.all():
        return events.reset_index(drop=True), 0
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    values = events["value"].to_numpy()
    # the highest weight of each pair, the earliest row among ties
    best = pd.Series(values).groupby(group).idxmax().to_numpy()
    merged = events.iloc[starts].copy()
    merged["value"] = values[best]
    merged["event"] = events["event"].to_numpy()[best]
    return merged.reset_index(drop=True), int(len(events) - len(merged))


def k_core_filter(events: pd.DataFrame, k: int) -> tuple[pd.DataFrame, dict]:
    """Keeps users and items with at least `k` interactions, repeated until none falls below it.
    -> (events, what was removed)."""
    if k <= 1:
        return events, {}
    before = (len(events), events["user"].nunique(), events["item"].nunique())
    rounds = 0
    while True:
        rounds += 1
        users = events["user"].map(events["user"].value_counts()) >= k
        items = events["item"].map(events["item"].value_counts()) >= k
        keep = (users & items).to_numpy()
        if keep.all():
            break
        events = events.loc[keep]
    removed = {"k_core_removed_interactions": before[0] - len(events),
               "k_core_removed_users": before[1] - events["user"].nunique(),
               "k_core_removed_items": before[2] - events["item"].nunique(), "k_core_rounds": rounds}
    return events.reset_index(drop=True), removed
