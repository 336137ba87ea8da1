"""The HTTP surface: keyed user-id hashes in logs, security headers on every answer, docs without a CDN, private
pictures behind a read token, /readyz without paths for strangers, load shedding that keeps /healthz fast, the
page with a read token (in Chromium), and a pickled checkpoint refused by name."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import threading
import time
from html.parser import HTMLParser

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from multimodal_rec.models.loading import CheckpointError, read_checkpoint
from multimodal_rec.serving import access_log
from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.service import RecommenderService
from tests.browser import DESKTOP, browser_page, card_ids, find_chromium
from tests.conftest import serving_in_thread

WRITE, READ = "surface-write-token", "surface-read-token"
HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")
needs_browser = pytest.mark.skipif(
    find_chromium() is None or importlib.util.find_spec("playwright") is None,
    reason="no headless browser: needs Debian's chromium (apt-get install -y chromium) and the playwright package")


@pytest.fixture(scope="module")
def service(tiny_artifacts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("surface") / "artifacts"
    shutil.copytree(tiny_artifacts, folder)
    return RecommenderService(folder)


def _item_with_image(service) -> int:
    catalog = service.artifacts.catalog
    return int(catalog.loc[catalog["has_image"], "item_id"].iloc[0])


def test_user_ids_in_logs_are_hashed_with_a_key(tmp_path, monkeypatch):
    unkeyed = hashlib.sha256(b"mmrec-user:42").hexdigest()[:12]  # what an attacker can enumerate
    assert access_log.hashed_id(42, b"key one") != access_log.hashed_id(42, b"key two")
    assert access_log.hashed_id(42, b"key one") == access_log.hashed_id("42", b"key one")  # path and body alike
    assert unkeyed not in {access_log.hashed_id(42), access_log.hashed_id(42, b"key one")}
    monkeypatch.setenv("MMREC_LOG_KEY", "from the environment")
    assert access_log.load_key("MMREC_LOG_KEY") == b"from the environment"
    (tmp_path / "log.key").write_text("from a file\n")
    assert access_log.load_key("MMREC_LOG_KEY", str(tmp_path / "log.key")) == b"from a file"  # a file wins
    monkeypatch.delenv("MMREC_LOG_KEY")
    assert access_log.load_key("MMREC_LOG_KEY") is None  # then install() draws a random key per process
    with pytest.raises(ValueError, match="empty"):
        (tmp_path / "empty.key").write_text("")
        access_log.load_key(None, str(tmp_path / "empty.key"))


def test_every_answer_carries_the_security_headers(service):
    client = TestClient(create_app(service, tokens=Tokens(write=WRITE)))
    user, item = int(service.artifacts.user_ids[0]), _item_with_image(service)
    answers = {"page": client.get("/"), "static file": client.get("/static/app.js"),
               "JSON": client.post("/recommend", json={"user_id": user, "k": 3}),
               "image": client.get(f"/items/{item}/image", params={"size": 32}),
               "error": client.get("/items/x/similar"),
               "docs": client.get("/docs"), "schema": client.get("/openapi.json"), "probe": client.get("/healthz")}
    for what, answer in answers.items():
        assert all(name in answer.headers for name in HEADERS), (what, answer.status_code, dict(answer.headers))
        csp = answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp, what
        assert answer.headers["x-content-type-options"] == "nosniff" and answer.headers["x-frame-options"] == "DENY"
    assert answers["image"].status_code == 200 and answers["error"].status_code == 422


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.inline_scripts, self._in_script = [], 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self._in_script = "src" not in attrs
        for name in ("src", "href"):
            if tag in ("script", "link", "img") and attrs.get(name):
                self.sources.append(attrs[name])

    def handle_data(self, data):
        self.inline_scripts += bool(self._in_script and data.strip())

    def handle_endtag(self, tag):
        self._in_script = False if tag == "script" else self._in_script


def test_docs_are_served_without_any_external_asset(service):
    client = TestClient(create_app(service))
    docs = client.get("/docs")
    assert docs.status_code == 200
    parsed = _Sources()
    parsed.feed(docs.text)
    assert parsed.sources and parsed.inline_scripts == 0  # the CSP refuses inline scripts: none is needed
    for source in parsed.sources:
        assert not re.match(r"(?i)(https?:)?//", source), source  # nothing from another host
        if not source.startswith("data:"):
            assert client.get(source).status_code == 200, source
    assert client.get("/redoc").status_code == 404  # FastAPI's ReDoc page would load from a CDN too
    assert client.get("/openapi.json").json()["paths"]["/recommend"]


def test_pictures_behind_a_read_token_are_private(service):
    item = _item_with_image(service)
    guarded = TestClient(create_app(service, tokens=Tokens(write=WRITE, read=READ)))
    assert guarded.get(f"/items/{item}/image").status_code == 401
    answer = guarded.get(f"/items/{item}/image", params={"size": 32}, headers={"Authorization": f"Bearer {READ}"})
    assert answer.status_code == 200 and answer.headers["cache-control"].startswith("private")
    open_reads = TestClient(create_app(service)).get(f"/items/{item}/image", params={"size": 32})
    assert open_reads.headers["cache-control"].startswith("public")


def test_readyz_shows_no_paths_without_a_token(service):
    client = TestClient(create_app(service, tokens=Tokens(write=WRITE, read=READ)))
    stranger = client.get("/readyz")
    assert stranger.status_code == 200 and stranger.json()["status"] == "ready"
    assert stranger.json()["items"] == len(service.artifacts.item_ids)
    assert str(service.artifacts.root) not in stranger.text and '"/' not in stranger.text, stranger.text
    assert set(stranger.json()) <= {"status", "items", "users", "withdrawn_items", "forgotten_users", "writes"}
    for token in (READ, WRITE):
        holder = client.get("/readyz", headers={"Authorization": f"Bearer {token}"}).json()
        assert holder["artifacts"] == str(service.artifacts.root)
    wrong = client.get("/readyz", headers={"Authorization": "Bearer not-the-token"})
    assert '"/' not in wrong.text


def test_heavy_requests_past_the_bound_are_shed_while_healthz_answers(service, monkeypatch):
    """One heavy request in flight (a withdrawal held on an Event: it runs in the thread pool), max_in_flight=1:
    the next heavy request is refused at once with 503 + Retry-After; the probes still answer at once."""
    entered, release = threading.Event(), threading.Event()

    def slow_withdrawal(item_id):
        entered.set()
        assert release.wait(30)
        return {"item_id": item_id, "withdrawn": False}

    monkeypatch.setattr(service, "withdraw_item", slow_withdrawal)
    auth = {"Authorization": f"Bearer {WRITE}"}
    app = create_app(service, tokens=Tokens(write=WRITE), max_in_flight=1)
    user, item = int(service.artifacts.user_ids[0]), int(service.artifacts.item_ids[0])
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        held = {}
        slow = threading.Thread(target=lambda: held.update(answer=client.delete(f"/items/{item}", headers=auth)))
        slow.start()
        try:
            assert entered.wait(30)
            refused = client.post("/recommend", json={"user_id": user, "k": 3})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            assert "content-security-policy" in refused.headers
            assert client.get(f"/items/{item}/similar").status_code == 503
            started = time.perf_counter()
            assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
            assert time.perf_counter() - started < 1.0
            assert client.get("/static/app.js").status_code == 200  # the page's files are never shed
        finally:
            release.set()
            slow.join(30)
        assert held["answer"].status_code == 200
        assert client.post("/recommend", json={"user_id": user, "k": 3}).status_code == 200  # room again
        metrics = client.get("/metrics").text
        assert re.search(r"^mmrec_shed_requests_total 2\.0$", metrics, re.MULTILINE), metrics


class RunsACommand:
    """A pickle payload whose callable lies in a module torch blocks outright (its error then says "GLOBAL")."""

    def __reduce__(self):
        import os

        return os.system, ("true",)


def test_a_pickled_checkpoint_is_refused_naming_what_it_holds(tmp_path):
    torch.save({"multimodal_rec": {}, "state_dict": {}, "payload": RunsACommand()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"objects other than tensors .*\(posix\.system\)"):
        read_checkpoint(tmp_path / "evil.ckpt")


def _wait_settled(page) -> None:
    """As tests/browser.py's wait_settled, with function predicates: Playwright compiles those once, where it would
    eval() a bare expression on every poll, which the page's CSP (no 'unsafe-eval') refuses."""
    page.wait_for_function("() => document.body.dataset.busy === '0'")
    page.wait_for_function("() => [...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                           ".every(i => i.complete)")


@pytest.fixture(scope="module")
def guarded_server(service):
    with serving_in_thread(create_app(service, tokens=Tokens(write=WRITE, read=READ))) as url:
        yield url


@pytest.mark.slow
@needs_browser
def test_the_page_asks_for_the_read_token_then_works_in_chromium(guarded_server, service):
    user = int(service.artifacts.user_ids[4])
    with browser_page(DESKTOP) as (page, errors):
        page.goto(guarded_server)
        page.wait_for_selector("#token-form:not([hidden])")
        page.fill("#token", READ)
        page.click("#token-form button[type=submit]")
        page.wait_for_selector("#filter-form select", state="attached")  # facets came with the token
        page.fill("#user-id", str(user))
        page.click("#user-form button[type=submit]")
        page.wait_for_selector("#grid article.card")
        _wait_settled(page)
        assert len(card_ids(page)) == 12 and page.is_hidden("#token-form") and page.is_hidden("#error")
        page.wait_for_function("() => [...document.querySelectorAll('#grid img')].slice(0, 4).every("
                               "i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)")
        page.reload()  # the token is kept for the tab
        page.wait_for_selector("#filter-form select", state="attached")
        assert page.is_hidden("#token-form")
    # the only errors: the browser's log of the first, tokenless 401; nothing refused by the CSP
    assert all("401" in error for error in errors), errors


@pytest.mark.slow
@needs_browser
def test_the_docs_render_offline_under_the_csp_in_chromium(guarded_server):
    with browser_page(DESKTOP) as (page, errors):
        requested = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(f"{guarded_server}/docs")
        page.wait_for_selector(".opblock-summary-path")
        assert "/recommend" in page.text_content("#swagger-ui")
    assert errors == [] and all(url.startswith(guarded_server) or url.startswith("data:") for url in requested), (
        errors, requested)
