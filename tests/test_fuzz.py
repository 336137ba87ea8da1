"""The endpoint against inputs nobody would write by hand: schemathesis generates requests from the app's own
OpenAPI schema (every operation, the write token given) and checks that none is a 5xx and every answer
matches the schema; then valid bodies with one place made hostile (what schemathesis never generates: lone
surrogates, deep nesting, numbers past 64 bits), and hostile bodies written by hand.

Left out: schemathesis's "a schema-valid request must be accepted" check. A request can be valid JSON for the
schema and still name a folder that does not exist, an image that is not base64, or an id near 2**63 that
JSON rounds past int64; those are 4xx by design."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import FailureGroup, positive_data_acceptance

from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.service import RecommenderService

TOKEN = "fuzz-write-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
EXAMPLES = 30  # per operation: about a minute in all on two CPU cores


@pytest.fixture(scope="module")
def fuzz_app(tiny_artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_artifacts, root / "artifacts")
    service = RecommenderService(root / "artifacts", artifacts_root=root, journal=root / "journal.jsonl")
    return create_app(service, max_body_bytes=2_000_000, tokens=Tokens(write=TOKEN))


def _fuzz(operation, mode: GenerationMode, generated: list) -> None:
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,  # the same cases in CI
              suppress_health_check=list(HealthCheck))
    def run(case):
        generated.append(operation.label)
        case.call_and_validate(headers=HEADERS, excluded_checks=[positive_data_acceptance])

    run()


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_get_no_5xx_and_answers_match_the_schema(fuzz_app, mode, record_property):
    """Each operation of the schema, valid (positive) and invalid (negative) requests; hypothesis shrinks
    any failure to a minimal request, which the assertion shows."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9  # recommend, rank, similar, add, withdraw, reload, healthz, readyz, metrics
    generated, failures = [], {}
    for operation in operations:
        try:
            _fuzz(operation, mode, generated)
        except Unsatisfiable:  # nothing to get wrong: no parameters, no body (GET /healthz)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except (Exception, FailureGroup) as error:  # failed checks: kept, the other operations still run
            failures[operation.label] = f"{type(error).__name__}: {str(error)[:1500]}"
    print(f"schemathesis {mode.value}: {len(generated)} requests over {len(operations)} operations")
    record_property("generated_requests", len(generated))
    assert not failures, json.dumps(failures, indent=1)


@pytest.fixture(scope="module")
def client(fuzz_app):
    with TestClient(fuzz_app, headers=HEADERS, raise_server_exceptions=False) as test_client:
        yield test_client


def _nested(depth: int) -> str:
    return '{"user_id": 1, "profile": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("body", [
    _nested(10_000),  # deep nesting
    '{"user_id": 123456789012345678901234567890}',  # beyond int64
    '{"history": [1, 2, -99999999999999999999999]}',
    '{"user_id": NaN}', '{"k": Infinity, "history": [1]}', '{"filters": {"price": {"min": NaN}}, "history": [1]}',
    '{"history": [1], "profile": {"age": "\\ud800"}}',  # a lone surrogate
    '{"history": [1], "profile": {"zip": "名前 ✓ \\u0000 👍"}}',
    "[" * 50_000,  # not even JSON
])
def test_hostile_bodies_are_4xx(client, body):
    answer = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text[:300]
    assert "detail" in answer.json()


def test_a_history_of_100k_items_is_refused_or_answered(client):
    answer = client.post("/recommend", json={"history": [1] * 100_000, "k": 5})
    assert answer.status_code in (413, 422), answer.text[:200]


def test_unicode_titles_and_texts_are_kept(client, tiny_artifacts):
    answer = client.post("/items", json={"item_id": 991001, "title": "Café 東京 👟 \u202e", "text": "ünïcödé " * 50})
    assert answer.status_code == 201, answer.text
    similar = client.get("/items/991001/similar", params={"k": 3})
    assert similar.status_code == 200
    listed = client.post("/rank", json={"history": [991001], "items": [991001]}).json()
    assert listed["items"][0]["title"] == "Café 東京 👟 \u202e"


@pytest.mark.parametrize("size", [(50_000, 50_000), (8_000, 8_000)])
def test_a_decompression_bomb_is_refused(client, size):
    """A PNG of 50k x 50k pixels: a few kB on the wire, 2.5 G pixels once decoded; refused from its header
    (by Pillow's bomb guard, or by our own cap on pixels below it)."""
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 2_000_000
    answer = client.post("/items", json={"item_id": 991002, "title": "bomb",
                                         "image_base64": base64.b64encode(buffer.getvalue()).decode()})
    assert answer.status_code == 422 and ("decompression bomb" in answer.text or "too large" in answer.text)
    assert client.get("/healthz").status_code == 200


def test_huge_ids_in_paths_and_bodies_are_4xx(client):
    assert client.get(f"/items/{2**70}/similar").status_code == 422
    assert client.delete(f"/items/{2**64}").status_code == 422
    body = json.dumps({"item_id": 2**63, "title": "x"})
    assert client.post("/items", content=body, headers={"content-type": "application/json"}).status_code == 422


# valid bodies whose every place (a value, a key, a list item) the tests below make hostile in turn
SEEDS = {
    "/recommend": {"user_id": 1, "history": [1, 2], "k": 5, "profile": {"age": 30},
                   "filters": {"category": "c", "brand": ["a", "b"], "price": {"min": 1, "max": 50}},
                   "context": {"hour": 3}},
    "/rank": {"user_id": 1, "history": [1], "items": [1, 2], "profile": {"age": 30}, "context": {"hour": 3}},
    "/items": {"item_id": 992000, "title": "t", "text": "x", "image_base64": None,
               "attributes": {"category": "c", "brand": "b", "price": 3.5, "sales": 2}},
}
HOLE = "@@hostile@@"  # where the hostile JSON text goes: json.dumps could not write 1500 levels, nor NaN keys


def _places(value, path=()):
    """(path, is_key) of every value and every key under `value`, the whole body included."""
    yield path, False
    if isinstance(value, dict):
        for key, inner in value.items():
            yield (*path, key), True
            yield from _places(inner, (*path, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _places(inner, (*path, i))


def _with_hole(body, path: tuple, is_key: bool):
    """A copy of `body` with HOLE at `path` (as the key itself when `is_key`)."""
    if not path:
        return HOLE
    copy = json.loads(json.dumps(body))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if is_key:
        parent[HOLE] = parent.pop(path[-1])
    else:
        parent[path[-1]] = HOLE
    return copy


def _deep(depth: int, opener: str) -> str:
    closer = {"[": "]", '{"a": ': "}"}[opener]
    return opener * depth + "1" + closer * depth


def _around(lone: str):
    """JSON strings holding lone surrogates between ordinary text (json.dumps writes them as \\udXXX escapes)."""
    return st.text(max_size=5).map(lambda around: json.dumps(around + lone + around))


HOSTILE_JSON = st.one_of(
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3).flatmap(_around),
    st.integers(min_value=2**63 - 2, max_value=10**400).flatmap(lambda n: st.sampled_from([str(n), str(-n)])),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0.0", "5e-324", "1.7976931348623157e308",
                     '"nan"', '"inf"', '"-Infinity"', '"1e999"', "null", "true", "{}", "[]", '""', '"\\u0000"']),
    st.tuples(st.integers(1, 1500), st.sampled_from(["[", '{"a": '])).map(lambda d: _deep(*d)),
    st.integers(1_001, 20_000).map(lambda n: "[" + ",".join(["1"] * n) + "]"),
    st.integers(101, 2_000).map(lambda n: json.dumps({f"k{i}": i for i in range(n)})),
)


@pytest.mark.parametrize("route", list(SEEDS))
def test_one_hostile_place_in_a_valid_body_is_never_a_5xx(client, route):
    """Every place of a valid body made hostile in turn, hypothesis choosing what goes there; a 4xx says what was
    wrong in JSON."""
    places = list(_places(SEEDS[route]))

    @given(place=st.sampled_from(places), hostile=HOSTILE_JSON)
    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def run(place, hostile):
        path, is_key = place
        if is_key and not hostile.startswith('"'):
            hostile = json.dumps(hostile)  # a key is a string: the hostile text becomes one
        text = json.dumps(_with_hole(SEEDS[route], path, is_key)).replace(f'"{HOLE}"', hostile)
        answer = client.post(route, content=text.encode(), headers={"content-type": "application/json"})
        assert answer.status_code < 500, (text[:300], answer.text[:300])
        assert answer.status_code < 400 or "detail" in answer.json()

    run()


@pytest.mark.parametrize("route", list(SEEDS))
def test_a_lone_surrogate_in_every_string_and_key_is_a_422(client, route):
    """Deterministic: each string value and each key of a valid body, in turn, given a lone surrogate."""
    seed = SEEDS[route]
    strings = [(path, is_key) for path, is_key in _places(seed) if is_key or isinstance(_at(seed, path), str)]
    assert len(strings) >= 5
    for path, is_key in strings:
        text = json.dumps(_with_hole(seed, path, is_key)).replace(f'"{HOLE}"', '"x\\ud800"')
        answer = client.post(route, content=text.encode(), headers={"content-type": "application/json"})
        assert answer.status_code == 422 and "lone surrogate" in answer.text, (path, answer.text[:300])


def _at(value, path: tuple):
    for step in path:
        value = value[step]
    return value
