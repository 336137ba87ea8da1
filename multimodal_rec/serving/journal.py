"""An append-only JSON Lines journal of the catalogue changes made through the API (items added or
withdrawn), fsynced before the client gets its answer, replayed on start and after every reload.

A crash can leave a torn last line (written in part): it was never acknowledged, so it is dropped with a
warning, and the file is cut back to its last whole line before anything is appended after it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s: its last line is torn (%d bytes, from an interrupted write); it is dropped",
                    self.path, len(data) - keep)
        with open(self.path, "r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, entry: dict) -> None:
        """Writes one entry durably: when this returns, a crash cannot lose it."""
        line = json.dumps({**entry, "at": round(time.time(), 3)}, ensure_ascii=False, allow_nan=False) + "\n"
        with self._lock:
            created = not self.path.exists()
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            if created:  # the new file's name must be durable too
                directory = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(directory)
                finally:
                    os.close(directory)

    def entries(self) -> list[dict]:
        """Every readable entry, oldest first; an unreadable line is skipped with a warning naming it."""
        if not self.path.is_file():
            return []
        with self._lock:
            lines = self.path.read_bytes().split(b"\n")
        out = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                log.warning("%s line %d is not a journal entry (%s); skipped", self.path, number, error)
                continue
            if not isinstance(entry, dict) or "op" not in entry:
                log.warning("%s line %d has no 'op'; skipped", self.path, number)
                continue
            out.append(entry)
        return out
