"""An append-only JSON Lines journal of the catalogue changes made through the API (items added or
withdrawn, users forgotten), fsynced before the client gets its answer, replayed on start and after every
reload.

An acknowledged entry is never lost:
- a crash can leave a torn last line (written in part): it was never acknowledged, so it is dropped with a
  warning, and the file is cut back to its last whole line before anything is appended after it;
- an append that fails part-way (a full disk) cuts the file back to its last whole entry before the error
  reaches the client, so the next entry never lands on a fragment; if even that cut fails the journal stops
  taking writes (each answered 503 with the reason) until the server is restarted on a healthy disk;
- a journal that cannot be written at all (a read-only folder, a path that is a folder) is found at start:
  `unavailable` says why, and writes answer 503 instead of failing one by one.

Pictures of added items are not in the journal: each is a file named by its sha256 in `<journal>.pictures/`,
written and fsynced before the entry that names it, so the journal stays small, a replay reads it quickly,
and the server holds paths, not pictures, in memory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
PICTURE_NAME = re.compile(r"[0-9a-f]{64}\.img")  # what store_picture names; anything else is never opened


class JournalError(OSError):
    """The journal cannot take an entry now (disk full, read-only, broken); nothing was acknowledged."""


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.pictures = self.path.with_name(self.path.name + ".pictures")
        self._lock = threading.Lock()
        self.unavailable: str | None = None  # why writes cannot be journaled; None: they can
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._cut_torn_tail()
            self._probe()
        except OSError as error:
            self.unavailable = f"the journal {self.path} cannot be written ({error.strerror or error})"
            log.error("%s: writes are refused (503) until this is fixed and the server restarted", self.unavailable)

    def _probe(self) -> None:
        """Opens the file for appending (creating it): a path that cannot take entries fails here, at start."""
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.close(handle)

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            keep = _end_of_last_line(handle, size)
        log.warning("%s: its last line is torn (%d bytes, from an interrupted write); it is dropped",
                    self.path, size - keep)
        _truncate(self.path, keep)

    def append(self, entry: dict) -> None:
        """Writes one entry durably: when this returns, a crash cannot lose it. Raises JournalError (and leaves
        the file as it was) when it cannot."""
        line = (json.dumps({**entry, "at": round(time.time(), 3)}, ensure_ascii=False, allow_nan=False)
                + "\n").encode("utf-8")
        with self._lock:
            if self.unavailable:
                raise JournalError(errno.EROFS, self.unavailable)
            created = not self.path.exists()
            size = self.path.stat().st_size if not created else 0
            try:
                handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    view = memoryview(line)
                    while view:  # os.write may write part of it
                        view = view[os.write(handle, view):]
                    os.fsync(handle)
                finally:
                    os.close(handle)
                if created:  # the new file's name must be durable too
                    _fsync_directory(self.path.parent)
            except OSError as error:
                self._undo(size, error)
                raise JournalError(error.errno, f"the journal {self.path} could not take the entry "
                                                f"({error.strerror or error}); nothing was changed") from error

    def _undo(self, size: int, error: OSError) -> None:
        """Cuts a failed append back to the file's last whole entry, or stops writes if even that fails."""
        try:
            if self.path.exists() and self.path.stat().st_size != size:
                _truncate(self.path, size)
        except OSError as second:
            self.unavailable = (f"the journal {self.path} holds a partial entry that could not be removed "
                                f"({second.strerror or second}, after {error.strerror or error}); restart on a "
                                "writable disk (the partial line is dropped at start)")
            log.error("%s", self.unavailable)

    def store_picture(self, data: bytes) -> str:
        """Keeps a picture durably (written, fsynced, renamed into place) and returns its name; the same bytes
        are stored once. Raises JournalError when it cannot."""
        name = hashlib.sha256(data).hexdigest() + ".img"
        target = self.pictures / name
        if self.unavailable:
            raise JournalError(errno.EROFS, self.unavailable)
        try:
            if target.is_file() and target.stat().st_size == len(data):
                return name
            self.pictures.mkdir(exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.pictures, prefix=".part-")
            try:
                with os.fdopen(handle, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.replace(temporary, target)
            finally:
                if os.path.exists(temporary):
                    os.unlink(temporary)
            _fsync_directory(self.pictures)
        except OSError as error:
            raise JournalError(error.errno, f"the picture could not be stored in {self.pictures} "
                                            f"({error.strerror or error}); nothing was changed") from error
        return name

    def picture(self, name) -> Path | None:
        """The stored picture `name` names, or None for a name store_picture never gives or a missing file."""
        if not isinstance(name, str) or not PICTURE_NAME.fullmatch(name):
            return None
        path = self.pictures / name
        return path if path.is_file() else None

    def entries(self) -> Iterator[dict]:
        """Every readable entry, oldest first, read line by line; an unreadable line is skipped with a warning
        naming it."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
                    log.warning("%s line %d is not a journal entry (%s); skipped", self.path, number,
                                type(error).__name__)
                    continue
                if not isinstance(entry, dict) or "op" not in entry:
                    log.warning("%s line %d has no 'op'; skipped", self.path, number)
                    continue
                yield entry


def _end_of_last_line(handle, size: int, block: int = 1 << 16) -> int:
    """The offset just after the last newline of a file open for reading (0 if none), read from the end."""
    end = size
    while end > 0:
        start = max(0, end - block)
        handle.seek(start)
        found = handle.read(end - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        end = start
    return 0


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(folder: Path) -> None:
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
