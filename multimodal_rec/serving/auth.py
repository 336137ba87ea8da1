"""Bearer tokens for the endpoint: writes (new or withdrawn items, admin) always need the write token;
reads need the read token only when one is configured. Tokens come from an environment variable or a
file (conf/serve.yaml `auth`), never from the command line, where `ps` would show them."""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from multimodal_rec.serving.errors import RequestError

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


@dataclass(frozen=True)
class Tokens:
    write: str | None = None
    read: str | None = None


def secret(env: str | None, file: str | None, what: str) -> str | None:
    """A secret from a file (its first line; a file wins) or an environment variable; None when neither is set."""
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the {what} file {path} does not exist")
        lines = path.read_text().splitlines()
        value = lines[0].strip() if lines else ""
        if not value:
            raise ValueError(f"the {what} file {path} is empty")
        return value
    value = os.environ.get(env, "").strip() if env else ""
    return value or None


def load_tokens(auth: dict | None) -> Tokens:
    auth = auth or {}
    return Tokens(write=secret(auth.get("write_token_env"), auth.get("write_token_file"), "write token"),
                  read=secret(auth.get("read_token_env"), auth.get("read_token_file"), "read token"))


def _same(given: str, expected: str) -> bool:
    """Constant time whatever the lengths: both sides hashed to 32 bytes first."""
    return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest())


def _check(credentials: HTTPAuthorizationCredentials | None, accepted: list[str]) -> None:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise RequestError(401, "this endpoint needs a token: send 'Authorization: Bearer <token>'",
                           headers={"WWW-Authenticate": "Bearer"})
    if not any(_same(credentials.credentials, token) for token in accepted):  # any(): every token is compared
        raise RequestError(403, "the token is not valid for this endpoint")


def write_guard(tokens: Tokens):
    """A FastAPI dependency for the write endpoints."""

    async def guard(credentials: Credentials) -> None:
        if tokens.write is None:
            raise RequestError(403, "writes are disabled: no write token is configured; set the environment "
                               "variable named by auth.write_token_env in conf/serve.yaml (MMREC_WRITE_TOKEN) or "
                               "auth.write_token_file, and restart the server")
        _check(credentials, [tokens.write])

    return guard


def read_guard(tokens: Tokens):
    """A FastAPI dependency for the read endpoints once a read token is configured (the write token works too)."""

    async def guard(credentials: Credentials) -> None:
        _check(credentials, [tokens.read, *([tokens.write] if tokens.write else [])])

    return guard


def token_holder(tokens: Tokens):
    """A FastAPI dependency that refuses nothing: whether the request carries the read or the write token (for
    answers that say more to a token holder, such as /readyz). It reads the header itself rather than through
    `bearer`, which would mark the route as needing a token in the schema."""

    async def holder(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        accepted = [token for token in (tokens.read, tokens.write) if token]
        return scheme.lower() == "bearer" and any(_same(given.strip(), token) for token in accepted)

    return holder
