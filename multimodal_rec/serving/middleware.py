"""ASGI middlewares of the app (app.py): security headers on every answer, load shedding, the body size limit.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: no task group or stream per request, which matters for
the shedding answer, meant to cost next to nothing when the server is at its limit.
"""

from __future__ import annotations

import json
import re

# What the page (static/), the API docs (/docs) and the JSON and image answers need, nothing more: scripts,
# styles and fetches from this origin only (no inline script anywhere), pictures also as data: (CSS icons)
# and blob: URLs (the page shows pictures that need the read token through blob URLs); no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]
# heavy: the routes that compute (queries, pictures) or write; never the probes, /metrics, the page or its files
HEAVY_GET = re.compile(r"^/items/[^/]+/(similar|image)$")
RETRY_AFTER_S = 1


def is_heavy(method: str, path: str) -> bool:
    """Every POST and DELETE (queries, writes, reloads) and the GETs that compute: similar items and pictures."""
    return method not in ("GET", "HEAD", "OPTIONS") or HEAVY_GET.match(path) is not None


async def _send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    content = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": content})


class SecurityHeaders:
    """Adds the security headers to every HTTP answer (page, static files, docs, JSON, pictures, errors)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class LoadShedding:
    """Answers 503 with Retry-After at once past `max_in_flight` heavy requests in flight, instead of queueing
    them: latency stays bounded and the probes (/healthz, /readyz), which are never shed, stay fast.
    `shed`: a Prometheus counter, incremented per refusal. The counter needs no lock: ASGI calls run on one
    event loop, and nothing awaits between the check and the increment."""

    def __init__(self, app, max_in_flight: int, shed):
        self.app, self.max_in_flight, self.shed, self.in_flight = app, max_in_flight, shed, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_heavy(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            self.shed.inc()
            return await _send_json(send, 503, {"detail": f"over {self.max_in_flight} requests in flight: "
                                                f"retry after {RETRY_AFTER_S} s"},
                                    [(b"retry-after", str(RETRY_AFTER_S).encode())])
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyLimit:
    """Refuses bodies over `max_bytes` (413), declared or streamed, before they are parsed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _TooLarge:
            await self._too_large(send)

    async def _too_large(self, send):
        await _send_json(send, 413, {"detail": f"request body over {self.max_bytes} bytes"})


class _TooLarge(Exception):
    pass
