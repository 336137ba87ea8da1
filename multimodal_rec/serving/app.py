"""The HTTP app (FastAPI): recommend, rank, similar items, new and withdrawn items, health, metrics, reload.

Every error a client can cause is a 4xx with a message that says what was wrong; OpenAPI docs at /docs (served
from this server, nothing fetched elsewhere). Writes need the write token; reads need the read token only where
one is configured (auth.py). Security headers, load shedding and the body limit: middleware.py.
"""

from __future__ import annotations

import gc
import logging
import time

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from multimodal_rec.embeddings import EmbeddingsError
from multimodal_rec.serving import engine
from multimodal_rec.serving.auth import Tokens, read_guard, token_holder, write_guard
from multimodal_rec.serving.batching import Arrivals, QueryBatcher
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.middleware import BodyLimit, LoadShedding, SecurityHeaders
from multimodal_rec.serving.page import add_docs, add_page
from multimodal_rec.serving.schemas import (
    MAX_K,
    MAX_SHOP_ID,
    ErrorBody,
    EventBatch,
    NewItem,
    RankRequest,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    epoch_seconds,
)
from multimodal_rec.serving.service import RecommenderService
from multimodal_rec.serving.shop_ids import path_id


def path_id_param():
    """An id in a path (a new FieldInfo each time: FastAPI binds one to its parameter's name)."""
    return Path(min_length=1, max_length=MAX_SHOP_ID, description="an int id, or the shop's own id (data=tabular)")

log = logging.getLogger(__name__)
ERROR_MEANING = {400: "the body is not JSON", 401: "no token sent",
                 403: "a wrong token, writes disabled, or a path outside the artifacts root",
                 404: "an unknown user or item id", 409: "the item id exists already", 410: "a withdrawn item",
                 413: "the body is too large", 422: "an invalid request, named field by field",
                 503: "no artifacts are loaded, writes unavailable (the journal cannot be written: the reason is "
                      "given), or too many requests in flight (retry after Retry-After seconds)"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# what /readyz tells anyone; a token holder also gets the folders, fingerprints and the rest of describe()
PUBLIC_READINESS = ("items", "users", "withdrawn_items", "forgotten_users")


class Measured:
    """Counts answers by route and status and times them (Prometheus), as plain ASGI: no task group or stream
    per request, which Starlette's @app.middleware("http") costs every request (healthz included). Not a frame
    on the stack either (the answer is timed when its last part is sent): a body's JSON nesting may go as deep
    as before (json.loads shares the interpreter's recursion limit with the frames above it)."""

    def __init__(self, app, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                route = scope.get("route")
                name = route.path if route is not None else "unmatched"
                self.latency.labels(name).observe(time.perf_counter() - started)
                self.requests.labels(name, str(status[0])).inc()
            await send(message)

        return self.app(scope, receive, sending)


def create_app(service: RecommenderService, max_body_bytes: int = 10 * 1024 * 1024,
               tokens: Tokens | None = None, image_root: str | None = None, *, max_in_flight: int = 0,
               batch_wait_ms: float = 0.0, batch_max: int = 32) -> FastAPI:
    """tokens: none configured means writes answer 403 (saying how to enable them) and reads are open.
    image_root: where catalogue pictures are read from (default: the data folder the export names).
    max_in_flight: heavy requests (queries, pictures, writes) past this many in flight get 503 + Retry-After at
    once (0: none refused).
    batch_wait_ms: > 0 answers /recommend and /rank requests that arrive together in one batch (batching.py): as
    soon as every one the server has started on has joined it, at most this long after its first, at once when
    batch_max are queued; 0: each on its own."""
    # docs_url/redoc_url None: FastAPI's own pages load Swagger UI and ReDoc from a CDN (add_docs serves them here)
    app = FastAPI(title="multimodal_rec", description="Multimodal recommendations with reasons", version="1",
                  docs_url=None, redoc_url=None)
    tokens = tokens or Tokens()
    # the schema (/docs, clients, fuzzers) shows a bearer requirement on reads only where one is in force
    reads, writes = [Depends(read_guard(tokens))] if tokens.read else [], [Depends(write_guard(tokens))]
    registry = CollectorRegistry()
    requests = Counter("mmrec_requests", "requests by route and status", ["route", "status"], registry=registry)
    latency = Histogram("mmrec_request_seconds", "request latency by route", ["route"], buckets=LATENCY_BUCKETS,
                        registry=registry)
    shed = Counter("mmrec_shed_requests", "heavy requests refused with 503 past max_in_flight", registry=registry)

    app.add_middleware(Measured, requests=requests, latency=latency)  # added first: innermost, as before
    batcher = QueryBatcher(service.answer, batch_wait_ms, batch_max) if batch_wait_ms > 0 else None
    app.state.batcher = batcher
    if batcher is not None:  # which batched requests the server has started on (a batch need not wait for more)
        app.add_middleware(Arrivals, batcher=batcher, paths=("/recommend", "/rank"))

    async def answered(pending) -> JSONResponse:
        """A checked request's answer: with those that arrived with it (batching on, and work to share) or at once."""
        if batcher is None or not engine.shares_work(*pending):
            return JSONResponse(service.answer_one(pending))
        return JSONResponse(await batcher.submit(pending))

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse({"detail": str(error), **error.details}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = [{"where": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]} for e in error.errors()]
        return JSONResponse({"detail": "invalid request", "errors": problems}, status_code=422)

    # Answers are built as plain dicts by the engine and sent as they are: the schema documents them
    # (/docs) without a second validation pass on every response. The read endpoints are `async`: about a
    # millisecond of compute each, run in turn on the event loop (in batches with batch_wait_ms), which beats
    # threads contending for the GIL (p99 at 8 clients 27 ms instead of 42 ms in bench/serve_load.py); slow work
    # (new items, reloads) stays in the thread pool.
    ANSWER = {200: {"model": RecommendResponse, "description": "items, best first, each with its reason"}}
    guarded_reads = (401, 403) if tokens.read else ()

    def errors(*codes: int) -> dict:
        """The error answers a route can give, documented so that clients (and the fuzzer) know them."""
        return {code: {"model": ErrorBody, "description": ERROR_MEANING[code]} for code in codes}

    busy = (503,) if max_in_flight else ()  # shed past max_in_flight
    QUERY_ERRORS = errors(400, *guarded_reads, 404, 413, 422, *busy)

    def query_args(body) -> tuple:
        hour = body.context.hour if body.context else None
        return body.user_id, body.history, body.profile, hour

    @app.post("/recommend", response_model=None, responses={**ANSWER, **QUERY_ERRORS}, dependencies=reads)
    async def recommend(body: RecommendRequest):
        filters = {k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in (body.filters or {}).items()}
        at = epoch_seconds(body.context.time, time.time()) if body.context else None
        return await answered(service.recommend_ask(*query_args(body), body.k, filters, body.exclude_seen, at))

    @app.post("/rank", response_model=None, responses={**ANSWER, **QUERY_ERRORS}, dependencies=reads)
    async def rank(body: RankRequest):
        return await answered(service.rank_ask(*query_args(body), body.items))

    @app.get("/items/{item_id}/similar", response_model=None, dependencies=reads,
             responses={**ANSWER, **errors(*guarded_reads, 404, 410, 422, *busy)})
    async def similar(item_id: str = path_id_param(), k: int = Query(10, ge=1, le=MAX_K)):
        return JSONResponse(service.similar(path_id(service.artifacts.shop_ids, item_id, "item"), k))

    @app.post("/events", dependencies=writes, responses=errors(400, 401, 403, 404, 413, 422, 503))
    def post_events(body: EventBatch):
        """The shop's events (views, purchases...), committed before the answer and used at once: histories
        grow, a new customer is known from their first event, items' online counts move (trending, new
        arrivals). A retried `event_id` is stored once."""
        now = time.time()
        events = [{"user_id": e.user_id, "item_id": e.item_id, "event": e.event, "event_id": e.event_id,
                   "time": epoch_seconds(e.time, now)} for e in body.events]
        return service.post_events(events)

    @app.post("/items", status_code=201, dependencies=writes, responses=errors(400, 401, 403, 409, 413, 422, 503))
    def add_item(body: NewItem):
        return service.add_item(body.item_id, body.title, body.text, body.image_base64, body.attributes)

    @app.delete("/items/{item_id}", dependencies=writes, responses=errors(401, 403, 404, 422, 503))
    def withdraw_item(item_id: str = path_id_param()):
        return service.withdraw_item(path_id(service.artifacts.shop_ids, item_id, "item"))

    @app.delete("/users/{user_id}", dependencies=writes, responses=errors(401, 403, 404, 422, 503))
    def forget_user(user_id: str = path_id_param()):
        """Removes the user's stored history and profile at once (journaled: a restart keeps them gone)."""
        return service.forget_user(path_id(service.artifacts.shop_ids, user_id, "user"))

    @app.post("/admin/reload", dependencies=writes, responses=errors(400, 401, 403, 413, 422, *busy))
    def reload(body: ReloadRequest):
        target = service.reload_target(body.artifacts)  # 403 outside the artifacts root, before any read
        try:
            described = service.load(target)
        except (EmbeddingsError, OSError) as error:
            raise RequestError(422, f"artifacts refused, the old ones stay in service: {error}") from error
        if gc.get_freeze_count():  # serve.py froze what it loaded: the old artifacts may go, the new ones stay
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        return described

    @app.get("/healthz")
    async def healthz():
        """Liveness: no work, on the event loop (not behind the thread pool's queue), never shed."""
        return {"status": "ok"}

    @app.get("/readyz", responses=errors(503))
    def readyz(holder: bool = Depends(token_holder(tokens))):
        """Readiness and counts; with the read or write token, also the folders in use and the model's fingerprints."""
        try:
            described = service.describe()
        except RequestError as error:
            return JSONResponse({"status": "not ready", "detail": str(error)}, status_code=503)
        if holder:
            return {"status": "ready", **described}
        public = {key: described[key] for key in PUBLIC_READINESS if key in described}
        writes = described.get("writes")
        if isinstance(writes, dict) and "available" in writes:
            public["writes"] = {"available": writes["available"]}  # not the reason: it may name the journal's path
        return {"status": "ready", **public}

    @app.get("/metrics", dependencies=reads, response_class=PlainTextResponse, responses=errors(*guarded_reads))
    def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    add_page(app, service, reads, errors, path_id_param, image_root)
    add_docs(app)
    # added last = outermost: the body limit before anything reads the body, shedding before any work,
    # the security headers on every answer, the 413 and 503 above included
    if max_body_bytes:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if max_in_flight:
        app.add_middleware(LoadShedding, max_in_flight=max_in_flight, shed=shed)
    app.add_middleware(SecurityHeaders)
    return app

