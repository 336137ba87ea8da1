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
        with self.lock:
            out = np.zeros(n)
            m = min(n, len(self.counts))
            age = np.maximum(time - self.last[:m], 0.0)  # a query before the last event does not grow it
            out[:m] = self.counts[:m] * np.exp2(-age / (3600.0 * self.settings.half_life_hours))
            return out

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


def trending_rows(live: LiveState, n_items: int, time: float, want: int, allowed: np.ndarray | None,
                  excluded: set) -> np.ndarray:
    """The `want` rows picked up most at `time` (decayed counts > 0) that pass the filters, most first."""
    counts = live.decayed_counts(n_items, time)
    if allowed is not None:
        counts = np.where(allowed, counts, 0.0)
    if excluded:
        counts[np.fromiter(excluded, dtype=np.int64)] = 0.0
    top = np.argsort(-counts, kind="stable")[:want]
    return top[counts[top] > 0]


def blended(live: LiveState, cold: np.ndarray, rows: np.ndarray, scores: np.ndarray, time: float) -> np.ndarray:
    """The model's scores, standardised over the candidates, + the online signals: trending_weight x log(1 +
    decayed count) for every item, new_arrival_weight x the same for items the model never trained on."""
    spread = scores.std()
    standard = (scores - scores.mean()) / (spread if spread > 0 else 1.0)
    settings = live.settings
    signal = np.log1p(live.decayed_counts(int(rows.max(initial=-1)) + 1, time)[rows])
    return standard + signal * (settings.trending_weight + settings.new_arrival_weight * cold[rows])
