"""The shopping-guide page at `/` (static HTML, CSS and JavaScript shipped in the package; no build step,
nothing fetched from the internet), the read endpoints it uses besides /recommend and /similar, and the API
docs at /docs (Swagger UI from the fastapi-offline package, served from here)."""

from __future__ import annotations

from pathlib import Path as FilePath

import fastapi_offline
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from multimodal_rec.serving import catalog_api
from multimodal_rec.serving.service import RecommenderService
from multimodal_rec.serving.shop_ids import path_id

STATIC = FilePath(__file__).parent / "static"
IMAGE_CACHE = "public, max-age=86400"
IMAGE_CACHE_PRIVATE = "private, max-age=86400"  # behind the read token: browsers may keep it, shared caches not
SWAGGER_UI = FilePath(fastapi_offline.__file__).parent / "static"


def add_page(app: FastAPI, service: RecommenderService, reads: list, errors, path_param, image_root: str | None = None
             ) -> None:
    """`errors(*codes)` documents error answers as the app's other routes do; `path_param()` makes the app's id in a
    path (an int, or the shop's own id)."""
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    image_cache = IMAGE_CACHE_PRIVATE if reads else IMAGE_CACHE  # `reads` holds a guard iff a read token is set

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/items/{item_id}", dependencies=reads, responses=errors(404, 422))
    def item(item_id: str = path_param()):
        """An item's title, catalogue attributes, and whether it has a picture or was withdrawn."""
        artifacts = service.artifacts
        return JSONResponse(catalog_api.item_details(artifacts, path_id(artifacts.shop_ids, item_id, "item")))

    @app.get("/items/{item_id}/image", dependencies=reads, response_class=Response, responses={
        200: {"content": {"image/jpeg": {}, "image/svg+xml": {}}, "description": "the picture, or a placeholder"},
        **errors(404, 422)})
    def image(request: Request, item_id: str = path_param(), size: int = Query(256, ge=16, le=1024)):
        """The item's picture (JPEG, at most `size` wide), or a neutral SVG placeholder when it has none."""
        artifacts = service.artifacts
        root = image_root or artifacts.parts.get("image_root")
        wanted = path_id(artifacts.shop_ids, item_id, "item")
        kind, source, tag = catalog_api.image_source(artifacts, wanted, size, FilePath(root) if root else None)
        headers = {"Cache-Control": image_cache, "ETag": f'"{tag}"'}
        if request.headers.get("if-none-match") == headers["ETag"]:  # before any decoding
            return Response(status_code=304, headers=headers)
        body, media_type = catalog_api.render_image(kind, source, size)
        return Response(body, media_type=media_type, headers=headers)

    @app.get("/users/{user_id}/history", dependencies=reads, responses=errors(404, 422))
    def history(user_id: str = path_param(), limit: int = Query(20, ge=1, le=1000)):
        """A known user's most recent items, oldest first."""
        artifacts = service.artifacts
        return JSONResponse(catalog_api.user_history(artifacts, path_id(artifacts.shop_ids, user_id, "user"), limit))

    @app.get("/catalog/facets", dependencies=reads, responses=errors())
    def facets():
        """What /recommend can filter on: frequent values of categorical attributes, ranges of numeric ones."""
        return JSONResponse(catalog_api.facets(service.artifacts))


def add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs with every file from this server: FastAPI's own page loads it from a CDN (which fails
    offline and tells a third party who reads the docs) and starts it with an inline script, which the
    Content-Security-Policy refuses; here static/docs.js starts it. The schema itself: /openapi.json."""
    app.mount("/docs-assets", StaticFiles(directory=SWAGGER_UI), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return FileResponse(STATIC / "docs.html", headers={"Cache-Control": "no-cache"})
