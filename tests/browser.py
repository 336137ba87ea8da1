"""Drives the shopping-guide page in headless Chromium (Debian's `chromium`, through Playwright's
`executable_path`: Playwright's own browser download is not needed). Used by tests/test_page.py and by
bench/page_screenshots.py."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DESKTOP, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


@contextmanager
def browser_page(viewport: dict):
    """(page, console errors seen) in a fresh headless Chromium."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise RuntimeError("no Chromium found: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=viewport)
            errors: list[str] = []
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            yield page, errors
        finally:
            browser.close()


def card_ids(page) -> list[int]:
    return [int(x) for x in page.locator("#grid article.card").evaluate_all("cards => cards.map(c => c.dataset.item)")]


def wait_settled(page) -> None:
    """Until no /recommend is in flight and every picture in view has loaded (lazy ones below wait)."""
    page.wait_for_function("() => document.body.dataset.busy === '0'")
    page.wait_for_function("() => [...document.images].filter(i => i.getBoundingClientRect().top < innerHeight)"
                           ".every(i => i.complete)")


def open_user(page, url: str, user_id: int) -> list[int]:
    page.goto(url)
    page.wait_for_selector("#filter-form select, #filter-form input", state="attached")  # filled, still hidden
    page.fill("#user-id", str(user_id))
    page.click("#user-form button[type=submit]")
    page.wait_for_selector("#grid article.card")
    wait_settled(page)
    return card_ids(page)


def card_attributes(page) -> list[dict]:
    raw = page.locator("#grid article.card").evaluate_all("cards => cards.map(c => c.dataset.attributes)")
    return [json.loads(a) for a in raw]


def screenshots(url: str, user_id: int, out: Path, name: str) -> list[Path]:
    """The page for a user after one click, at desktop and at phone width."""
    paths = []
    for label, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        with browser_page(viewport) as (page, _):
            shown = open_user(page, url, user_id)
            page.click(f"#grid article.card[data-item='{shown[0]}'] button.pick")
            page.wait_for_function(f"() => !document.querySelector(\"#grid article.card[data-item='{shown[0]}']\")")
            wait_settled(page)
            page.evaluate("window.scrollTo(0, 0)")
            path = out / f"{name}-{label}.png"
            page.screenshot(path=str(path), full_page=label == "phone")
            paths.append(path)
    return paths
