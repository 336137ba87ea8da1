"""User ids never reach the logs at INFO: paths such as /users/42/history are logged with a hash instead."""

from __future__ import annotations

import hashlib
import logging
import re

USER_PATH = re.compile(r"/users/([^/?#\s]+)")  # integer ids and a shop's own (string) ids


def hashed_id(user_id: int | str) -> str:
    """What logs say instead of a user id: enough to tell users apart, not to name them."""
    return hashlib.sha256(f"mmrec-user:{user_id}".encode()).hexdigest()[:12]


class HashUserIds(logging.Filter):
    """For uvicorn's access log, whose record args hold the request path."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(USER_PATH.sub(lambda m: f"/users/#{hashed_id(m[1])}", a) if isinstance(a, str)
                                else a for a in record.args)
        return True


def install() -> None:
    logging.getLogger("uvicorn.access").addFilter(HashUserIds())
