"""The shopping-guide page, in a real browser (headless Chromium) against a server on exported artifacts of the
synthetic shop, and the picture endpoint it uses."""

from __future__ import annotations

import importlib.util
import shutil

import httpx
import pytest
from fastapi.testclient import TestClient

from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.service import RecommenderService
from tests.browser import (
    DESKTOP,
    PHONE,
    browser_page,
    card_attributes,
    card_ids,
    find_chromium,
    open_user,
    screenshots,
    wait_settled,
)
from tests.conftest import serving_in_thread

NO_BROWSER = ("no headless browser: needs Debian's chromium (apt-get install -y chromium; .ci/run installs it) and "
              "the playwright package")
needs_browser = pytest.mark.skipif(find_chromium() is None or importlib.util.find_spec("playwright") is None,
                                   reason=NO_BROWSER)


@pytest.fixture(scope="module")
def service(tiny_artifacts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("page") / "artifacts"
    shutil.copytree(tiny_artifacts, folder)
    return RecommenderService(folder)


@pytest.fixture(scope="module")
def server(service):
    with serving_in_thread(create_app(service, tokens=Tokens(write="page-token"))) as url:
        yield url


def test_item_pictures_with_caching_placeholders_and_404(service):
    client = TestClient(create_app(service, tokens=Tokens(write="page-token")))
    catalog = service.artifacts.catalog
    with_image = int(catalog.loc[catalog["has_image"], "item_id"].iloc[0])
    answer = client.get(f"/items/{with_image}/image", params={"size": 64})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.content[:3] == b"\xff\xd8\xff" and "max-age" in answer.headers["cache-control"]
    again = client.get(f"/items/{with_image}/image", params={"size": 64},
                       headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304
    assert client.get("/items/987654321/image").status_code == 404
    added = client.post("/items", json={"item_id": 5_500_001, "title": "no picture"},
                        headers={"Authorization": "Bearer page-token"})
    assert added.status_code == 201
    placeholder = client.get("/items/5500001/image")
    assert placeholder.status_code == 200 and placeholder.headers["content-type"] == "image/svg+xml"
    assert b"<svg" in placeholder.content
    details = client.get(f"/items/{with_image}").json()
    row = catalog.index[catalog["item_id"] == with_image][0]
    assert details["has_image"] and details["attributes"]["category"] == catalog["category"].iat[row]


def test_the_page_and_its_files_are_served(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and "Shopping guide" in page.text and "https://" not in page.text
    for name in ("app.js", "style.css"):
        asset = httpx.get(f"{server}/static/{name}")
        assert asset.status_code == 200 and "http://" not in asset.text and "https://" not in asset.text
    facets = httpx.get(f"{server}/catalog/facets").json()
    assert "category" in facets["categorical"] and "price" in facets["numeric"] and facets["example_user_ids"]


@pytest.mark.slow
@needs_browser
def test_a_person_clicks_filters_and_browses_in_chromium(server, service, tmp_path):
    user = int(service.artifacts.user_ids[4])
    with browser_page(DESKTOP) as (page, errors):
        before = open_user(page, server, user)
        assert len(before) == 12
        clicked = before[0]
        page.click(f"#grid article.card[data-item='{clicked}'] button.pick")
        page.wait_for_selector(f"#session-items .chip[data-item='{clicked}']")
        page.wait_for_function(f"() => !document.querySelector(\"#grid article.card[data-item='{clicked}']\")")
        wait_settled(page)
        after = card_ids(page)
        assert clicked not in after and after != before  # it joined the session; the recommendations followed
        page.focus(f"#grid article.card[data-item='{after[1]}'] button.pick")  # the keyboard works too
        page.keyboard.press("Enter")
        page.wait_for_selector(f"#session-items .chip[data-item='{after[1]}']")
        wait_settled(page)

        category = page.locator("#filter-category option").nth(1).get_attribute("value")
        page.select_option("#filter-category", category)
        page.wait_for_function(f"() => [...document.querySelectorAll('#grid article.card')].every("
                               f"c => JSON.parse(c.dataset.attributes).category === {category!r})")
        wait_settled(page)
        assert card_ids(page) and all(a["category"] == category for a in card_attributes(page))
        page.check("#new-arrivals")
        page.wait_for_function("() => [...document.querySelectorAll('#grid article.card')].every("
                               "c => JSON.parse(c.dataset.attributes).cold === true)")
        assert all(a.get("cold") is True for a in card_attributes(page))
        page.uncheck("#new-arrivals")
        page.select_option("#filter-category", "")
        wait_settled(page)

        first = card_ids(page)[0]
        page.click(f"#grid article.card[data-item='{first}'] button.more")
        page.wait_for_selector("#similar article.card")
        assert not page.is_hidden("#detail")
        page.click(f"#session-items .chip[data-item='{clicked}'] button.remove")
        page.wait_for_function(f"() => !document.querySelector(\"#session-items .chip[data-item='{clicked}']\")")
        wait_settled(page)
        assert all(alt for alt in page.locator("img").evaluate_all("images => images.map(i => i.alt)"))
        assert errors == []
    shots = screenshots(server, user, tmp_path, "synthetic")
    assert [p.stat().st_size > 10_000 for p in shots] == [True, True]


@pytest.mark.slow
@needs_browser
def test_endpoint_errors_are_shown_in_words(server):
    with browser_page(PHONE) as (page, _):  # the 404 itself is logged by the browser: not counted here
        page.goto(server)
        page.wait_for_selector("#filter-form select", state="attached")
        page.fill("#user-id", "987654321")
        page.click("#user-form button[type=submit]")
        page.wait_for_selector("#error:not([hidden])")
        assert "unknown user id 987654321" in page.text_content("#error")
