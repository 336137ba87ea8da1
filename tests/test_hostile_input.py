"""Hostile request bodies and uploads, each sent as the attack was, over real HTTP: none is a 5xx, each is a 422
that says what was wrong, and an uploaded picture cannot make the server decode more than once per size."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageFile

from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.service import RecommenderService
from tests.conftest import serving_in_thread

TOKEN = "hostile-write-token"
SURROGATE = "\ud800"


@pytest.fixture(scope="module")
def live(tiny_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(tiny_artifacts, root / "artifacts")
    service = RecommenderService(root / "artifacts", artifacts_root=root, journal=root / "journal.jsonl")
    app = create_app(service, tokens=Tokens(write=TOKEN))
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=60,
                                                     headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client, service


def _post(client: httpx.Client, path: str, body) -> httpx.Response:
    """`body` as JSON text (json.dumps writes a lone surrogate as the escape \\ud800, as an attacker sends it)."""
    text = body if isinstance(body, str) else json.dumps(body)
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


def _png(size: tuple[int, int], mode: str = "RGB", color=0) -> str:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _says(answer: httpx.Response, *words: str) -> str:
    assert answer.status_code == 422, (answer.status_code, answer.text[:300])
    text = answer.text
    assert all(word in text for word in words), text[:300]
    return text


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/recommend", {"history": [1], "filters": {"category": SURROGATE}}, "filters.category"),
    ("/recommend", {"history": [1], "filters": {"category": ["ok", SURROGATE]}}, "filters.category.1"),
    ("/recommend", {"history": [1], "filters": {f"a{SURROGATE}": "x"}}, "filters.a\\\\ud800"),
    ("/recommend", {"history": [1], "filters": {SURROGATE: {"min": "x"}}}, "filters.\\\\ud800"),
    ("/recommend", {"history": [1], "profile": {SURROGATE: 1}}, "profile.\\\\ud800"),
    ("/recommend", {"history": [1], "profile": {"age": SURROGATE}}, "profile.age"),
    ("/recommend", {"user_id": SURROGATE}, "user_id"),
    ("/rank", {"history": [1], "items": [1, SURROGATE]}, "items.1"),
    ("/items", {"item_id": 7_000_001, "title": "x", "attributes": {"category": SURROGATE}}, "attributes.category"),
    ("/items", {"item_id": 7_000_002, "title": "x", "attributes": {SURROGATE: "x"}}, "attributes.\\\\ud800"),
    ("/items", {"item_id": 7_000_003, "title": f"x{SURROGATE}"}, "title"),
    ("/items", {"item_id": 7_000_004, "title": "x", "text": SURROGATE}, "text"),
    ("/items", {"item_id": SURROGATE, "title": "x"}, "item_id"),
    ("/admin/reload", {"artifacts": SURROGATE}, "artifacts"),
])
def test_a_lone_surrogate_in_any_string_is_a_422_naming_the_field(live, path, body, field):
    client, _ = live
    _says(_post(client, path, body), field, "lone surrogate")


def test_attributes_nested_961_deep_are_a_422_saying_the_limit(live):
    client, _ = live
    body = '{"item_id": 7000010, "title": "deep", "attributes": {"category": ' + "[" * 961 + "]" * 961 + "}}"
    _says(_post(client, "/items", body), "nested deeper than 8 levels")
    _says(_post(client, "/items", {"item_id": 7_000_011, "title": "many", "attributes": {
        f"a{i}": i for i in range(101)}}), "at most 100")
    _says(_post(client, "/items", {"item_id": 7_000_012, "title": "long", "attributes": {
        "category": ["x"] * 1001}}), "at most 1000")
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("spelled", ["nan", "NaN", "inf", "-Infinity", "1e999"])
def test_non_finite_numbers_spelled_as_strings_are_a_422(live, spelled):
    client, service = live
    before = len(service.artifacts.item_ids)
    _says(_post(client, "/items", {"item_id": 7_000_020, "title": "x", "attributes": {"price": spelled}}),
          "'price' must be a finite number")
    _says(_post(client, "/recommend", {"history": [1], "profile": {"age": spelled}}), "'age' must be a finite number")
    assert len(service.artifacts.item_ids) == before  # nothing stored


def test_huge_numbers_are_a_422_not_an_overflow(live):
    client, _ = live
    _says(_post(client, "/recommend", f'{{"history": [1], "profile": {{"age": {10**400}}}}}'), "profile.age",
          "beyond 64 bits")
    _says(_post(client, "/items", f'{{"item_id": 7000030, "title": "x", "attributes": {{"price": {10**400}}}}}'),
          "attributes.price", "beyond 64 bits")


@pytest.mark.parametrize("value", [{"a": 1}, [["nested"]], [{"a": 1}]])
def test_attributes_are_flat_an_object_is_a_422(live, value):
    client, service = live
    _says(_post(client, "/items", {"item_id": 7_000_040, "title": "x", "attributes": {"category": value}}),
          "attribute 'category' holds", "attributes are flat")
    assert 7_000_040 not in service.artifacts.item_row


def test_a_list_for_a_single_valued_attribute_is_a_422(live):
    client, _ = live
    _says(_post(client, "/items", {"item_id": 7_000_041, "title": "x", "attributes": {"category": ["a", "b"]}}),
          "take one value each")


def test_a_6324_square_png_is_refused_from_its_header(live, monkeypatch):
    """40 megapixels in 132 kB of base64 were accepted and decoded again at every picture request."""
    client, _ = live
    upload = _png((6324, 6324), mode="1")
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    started = time.perf_counter()
    answer = _post(client, "/items", {"item_id": 7_000_050, "title": "huge", "image_base64": upload})
    _says(answer, "image too large: 6324x6324 pixels, at most 4096x4096")
    assert loads == [] and time.perf_counter() - started < 2.0  # refused from the header, no pixel decoded


def test_a_3000x2000_upload_is_accepted_and_kept_bounded(live):
    client, service = live
    answer = _post(client, "/items", {"item_id": 7_000_060, "title": "big photo",
                                      "image_base64": _png((3000, 2000), color=(200, 40, 40))})
    assert answer.status_code == 201, answer.text
    kept = service.artifacts.uploaded_images[7_000_060]  # a file beside the journal, or inline without one
    kept = kept.read_bytes() if isinstance(kept, Path) else base64.b64decode(kept)
    with Image.open(io.BytesIO(kept)) as image:
        assert image.size == (1024, 683)
    picture = client.get("/items/7000060/image", params={"size": 512})
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"


def test_normalized_image_keeps_small_uploads_and_downscales_large_ones():
    from multimodal_rec.serving.errors import RequestError
    from multimodal_rec.serving.new_items import normalized_image

    small = _png((64, 48))
    assert normalized_image(small) == small and normalized_image(None) is None
    with Image.open(io.BytesIO(base64.b64decode(normalized_image(_png((2000, 3000)))))) as master:
        assert master.format == "JPEG" and master.size == (683, 1024)
    with pytest.raises(RequestError, match="image too large"):
        normalized_image(_png((5000, 10), mode="1"))


def test_a_picture_is_decoded_once_per_size(live, monkeypatch):
    client, _ = live
    answer = _post(client, "/items", {"item_id": 7_000_070, "title": "pictured",
                                      "image_base64": _png((300, 200), color=(7, 70, 170))})
    assert answer.status_code == 201, answer.text
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: opened.append(1) or real_open(*args, **kwargs))
    first = client.get("/items/7000070/image", params={"size": 128})
    again = client.get("/items/7000070/image", params={"size": 128})
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert len(opened) == 1
    assert client.get("/items/7000070/image", params={"size": 64}).status_code == 200
    assert len(opened) == 2  # another size is another rendering


def test_the_thumbnail_cache_is_bounded_by_bytes():
    from multimodal_rec.serving.thumbnails import ThumbnailCache

    cache = ThumbnailCache(max_bytes=100)
    for i in range(5):
        cache.put(i, f"picture {i}", 30)
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == "picture 4"
    cache.get(2)  # used: kept over 3
    cache.put(5, "picture 5", 30)
    assert cache.get(2) is not None and cache.get(3) is None
    cache.put(6, "too big", 101)
    assert cache.get(6) is None
