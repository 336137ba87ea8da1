"""User ids never reach the logs at INFO: paths such as /users/42/history are logged with a keyed hash instead.

The hash is HMAC-SHA256 under a secret key, so that nobody reading the logs can recover an id by hashing
every candidate (an unkeyed hash of a small integer id is reversed in well under a second). The key comes
from the environment (MMREC_LOG_KEY) or a file (conf/serve.yaml `log_key_env`, `log_key_file`); with
neither, each process draws a random key: hashes then tell users apart within one run of the server but
cannot be linked across restarts, which is the private default. Set a key only where logs must be joined
across restarts, and keep it as secret as the logs' users.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets

from multimodal_rec.serving.auth import secret

USER_PATH = re.compile(r"/users/([^/?#\s]+)")  # integer ids and a shop's own (string) ids
_key = secrets.token_bytes(32)  # until install() sets one: per process


def hashed_id(user_id: int | str, key: bytes | None = None) -> str:
    """What logs say instead of a user id: enough to tell users apart, not to name them (key: the process's)."""
    return hmac.new(key or _key, f"mmrec-user:{user_id}".encode(), hashlib.sha256).hexdigest()[:12]


def load_key(env: str | None = "MMREC_LOG_KEY", file: str | None = None) -> bytes | None:
    """The configured key (a file wins over the environment variable), or None: then a random one is used."""
    value = secret(env, file, "log key")
    return value.encode() if value else None


class HashUserIds(logging.Filter):
    """For uvicorn's access log, whose record args hold the request path."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(USER_PATH.sub(lambda m: f"/users/#{hashed_id(m[1])}", a) if isinstance(a, str)
                                else a for a in record.args)
        return True


def install(key: bytes | None = None) -> None:
    """Hashes user ids in uvicorn's access log (and in hashed_id's other callers) under `key`, or a random one."""
    global _key
    _key = key or secrets.token_bytes(32)
    logging.getLogger("uvicorn.access").addFilter(HashUserIds())
