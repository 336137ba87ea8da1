"""What the server learned from the shop's live events since the export, without retraining: each person's
items since then (their history grows at once; a new customer is known from their first event) and, per item,
time-decayed counts of pick-ups (what is trending; which new arrivals are being picked up now).

Decay is measured in event time, so that a replay of past events runs as it did then: an item's count at time t
is the sum of its events' weights times 2^(-(t - event time) / half_life); a query before an event's time does
not see that event. Rebuilt from the event store on every load (rows change with the artifacts).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LiveSettings:
    """How much the online signals weigh (conf/serve.yaml `live`; chosen on the replay's first half)."""

    half_life_hours: float = 24.0
    trending_weight: float = 0.1  # + w * log(1 + decayed count) on every candidate's standardised score
    new_arrival_weight: float = 1.5  # + w * log(1 + decayed count) on items the model never trained on
    candidates: int = 20  # the most picked-up items now, added to the model's candidates when a weight is on

    @property
    def blends(self) -> bool:
        return self.trending_weight > 0 or self.new_arrival_weight > 0


@dataclass
class LiveState:
    settings: LiveSettings
    histories: dict[str, list[int]] = field(default_factory=dict)  # user key -> canonical item ids, in order
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (rows,) decayed to `last`
    last: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (rows,) time of the last update
    pickers: dict[int, set] = field(default_factory=dict)  # row -> user keys who picked it up
    events: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, user_key: str, item_id: int, row: int, weight: float, time: float) -> None:
        with self.lock:
            self.histories.setdefault(user_key, []).append(item_id)
            self._grow(row + 1)
            self.counts[row] = self._decayed(row, time) + weight
            self.last[row] = max(self.last[row], time)
            self.pickers.setdefault(row, set()).add(user_key)
            self.events += 1

    def forget(self, user_key: str) -> None:
        with self.lock:
            self.histories.pop(user_key, None)
            for users in self.pickers.values():
                users.discard(user_key)

    def history(self, user_key: str) -> list[int]:
        with self.lock:
            return list(self.histories.get(user_key, ()))

    def decayed_counts(self, n: int, time: float) -> np.ndarray:
        """(n,) every row's count at `time` (0 for rows without events)."""
        return self.counts_at(np.arange(n), time)

    def counts_at(self, rows: np.ndarray, time: float) -> np.ndarray:
        """The rows' decayed counts at `time` (0 for rows without events)."""
        out = np.zeros(len(rows))
        with self.lock:
            inside = rows < len(self.counts)
            known = rows[inside]
            age = np.maximum(time - self.last[known], 0.0)  # a query before the last event does not grow it
            out[inside] = self.counts[known] * np.exp2(-age / (3600.0 * self.settings.half_life_hours))
        return out

    def picked_rows(self, n: int) -> np.ndarray:
        """The rows below n that have had live events (ascending): the only ones with a count."""
        with self.lock:
            rows = np.fromiter(self.pickers, dtype=np.int64, count=len(self.pickers))
        rows.sort()
        return rows[rows < n]

    def picked_by(self, row: int) -> int:
        with self.lock:
            return len(self.pickers.get(row, ()))

    def _decayed(self, row: int, time: float) -> float:
        age = max(time - self.last[row], 0.0)
        return float(self.counts[row] * 2.0 ** (-age / (3600.0 * self.settings.half_life_hours)))

    def _grow(self, n: int) -> None:
        if n > len(self.counts):
            size = max(n, 2 * len(self.counts))
            self.counts = np.concatenate([self.counts, np.zeros(size - len(self.counts))])
            self.last = np.concatenate([self.last, np.zeros(size - len(self.last))])


# ---- the signals, over the rows that had events only (per request: never a pass over the catalogue) ----------
def among(rows: np.ndarray, sorted_rows: np.ndarray) -> np.ndarray:
    """(R,) bool: which of `rows` are in `sorted_rows` (ascending, distinct)."""
    if not len(sorted_rows):
        return np.zeros(len(rows), dtype=bool)
    where = np.minimum(np.searchsorted(sorted_rows, rows), len(sorted_rows) - 1)
    return sorted_rows[where] == rows


def trending_rows(live: LiveState, n: int, time: float, want: int, allowed: np.ndarray | None,
                  excluded) -> np.ndarray:
    """The `want` rows picked up most at `time` (decayed counts > 0) that pass the filters and are not
    `excluded` (an object whose hit(rows) says which are), most first, ties by row."""
    rows = live.picked_rows(n)
    counts = live.counts_at(rows, time)
    keep = (counts > 0) & ~excluded.hit(rows)
    if allowed is not None:
        keep &= allowed[rows]
    rows, counts = rows[keep], counts[keep]
    return rows[np.argsort(-counts, kind="stable")[:want]]


def blended(live: LiveState, cold: np.ndarray, rows: np.ndarray, scores: np.ndarray, time: float) -> np.ndarray:
    """The model's scores, standardised over the candidates, + trending_weight x log(1 + decayed count) for
    every item, + new_arrival_weight x the same for items the model never trained on."""
    spread = scores.std()
    standard = (scores - scores.mean()) / (spread if spread > 0 else 1.0)
    settings = live.settings
    signal = np.log1p(live.counts_at(rows, time))
    return standard + signal * (settings.trending_weight + settings.new_arrival_weight * cold[rows])


def say_picked_up(live: LiveState, cold: np.ndarray, rows: np.ndarray, items: list[dict]) -> None:
    """A new arrival (never trained on) that shoppers are picking up says so in its reason."""
    for row, item in zip(rows.tolist(), items):
        shoppers = live.picked_by(row) if cold[row] else 0
        if shoppers:
            item["reason"] = {**item["reason"], "kind": "new_arrival",
                              "text": f"new, and picked up by {shoppers} shopper{'s' if shoppers > 1 else ''} "
                                      f"recently; {item['reason']['text']}"}
