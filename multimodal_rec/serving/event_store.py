"""The shop's live events (POST /events), kept in SQLite: acknowledged means committed.

WAL mode with `synchronous=FULL`: a committed batch survives kill -9 and power loss; concurrent writers take
turns (one connection, one lock, `BEGIN IMMEDIATE`). An optional `event_id` is unique, so a retried batch
is stored once. A disk that is full or read-only fails the transaction, which rolls back whole: the client gets
503 with the reason and nothing of the batch was stored. `delete_user` removes a person's events (forgetting).
A shop's next `prepare` reads the file as more interactions (`interactions.also` in conf/data/tabular.yaml).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT UNIQUE,
    user_id TEXT NOT NULL,
    item_id INTEGER NOT NULL,
    item_key TEXT NOT NULL,
    event TEXT NOT NULL,
    weight REAL NOT NULL,
    time REAL NOT NULL,
    received REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id);
CREATE INDEX IF NOT EXISTS events_by_time ON events (time, seq);
"""


class EventStoreError(OSError):
    """The store cannot take the batch now (disk full, read-only, corrupt); nothing of it was stored."""


@dataclass(frozen=True)
class Event:
    user_id: str  # as the shop sent it (a new customer is simply a new id)
    item_id: int  # the catalogue's canonical id
    item_key: str  # the item id as the shop sent it: what a retrain reads (data/sources/tabular.py `also`)
    event: str
    weight: float
    time: float  # epoch seconds, the event's own time
    event_id: str | None = None


class EventStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)  # ":memory:": SQLite's in-memory database (tests, a server without a file)
        self._lock = threading.Lock()
        self.unavailable: str | None = None
        try:
            if str(path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as error:
            self._db = None
            self.unavailable = f"the event store {self.path} cannot be written ({error})"
            log.error("%s: POST /events answers 503 until this is fixed and the server restarted", self.unavailable)

    def add(self, events: list[Event], received: float) -> list[bool]:
        """Stores the batch in one transaction; returns, per event, whether it was new (False: its event_id was
        stored before). Raises EventStoreError, with nothing stored, when the store cannot take it."""
        if self._db is None:
            raise EventStoreError(self.unavailable)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                new = []
                for e in events:
                    cursor = self._db.execute(
                        "INSERT OR IGNORE INTO events (event_id, user_id, item_id, item_key, event, weight, time, "
                        "received) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (e.event_id, e.user_id, e.item_id, e.item_key, e.event, e.weight, e.time, received))
                    new.append(cursor.rowcount == 1)
                self._db.execute("COMMIT")
            except sqlite3.Error as error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise EventStoreError(f"the event store {self.path} could not take the batch ({error}); nothing of "
                                      "it was stored") from error
        return new

    def events(self, after: float = float("-inf")) -> Iterator[Event]:
        """Every stored event with a time after `after`, in time order (then arrival order)."""
        if self._db is None:
            return
        with self._lock:
            rows = self._db.execute("SELECT user_id, item_id, item_key, event, weight, time, event_id FROM events "
                                    "WHERE time > ? ORDER BY time, seq", (after,)).fetchall()
        for user_id, item_id, item_key, event, weight, time, event_id in rows:
            yield Event(user_id, int(item_id), item_key, event, float(weight), float(time), event_id)

    def delete_user(self, user_id: str) -> int:
        """Removes a person's events; returns how many."""
        if self._db is None:
            raise EventStoreError(self.unavailable)
        with self._lock:
            try:
                return self._db.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            except sqlite3.Error as error:
                raise EventStoreError(f"the event store {self.path} could not delete ({error})") from error

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.close()
                self._db = None
                self.unavailable = "the event store was closed"

    def count(self) -> int:
        if self._db is None:
            return 0
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0])
