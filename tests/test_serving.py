"""The ranking endpoint over real HTTP: every endpoint, every bad input, sessions, new items, reloads."""

from __future__ import annotations

import base64
import shutil
import threading

import httpx
import numpy as np
import pandas as pd
import pytest

from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.service import RecommenderService
from tests.conftest import serving_in_thread, twin_item

TOKEN = "test-write-token"


@pytest.fixture(scope="module")
def live(tiny_artifacts, tmp_path_factory):
    """A server on loopback over a copy of the tiny artifacts (tests add items to it)."""
    folder = tmp_path_factory.mktemp("serve") / "artifacts"
    shutil.copytree(tiny_artifacts, folder)
    service = RecommenderService(folder)
    app = create_app(service, max_body_bytes=1_000_000, tokens=Tokens(write=TOKEN))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with serving_in_thread(app) as url, httpx.Client(base_url=url, timeout=30, headers=headers) as client:
        yield client, service


def _ids(answer: dict) -> list[int]:
    return [item["item_id"] for item in answer["items"]]


def test_recommend_for_a_known_user(live):
    client, service = live
    user = int(service.artifacts.user_ids[0])
    answer = client.post("/recommend", json={"user_id": user, "k": 5}).json()
    assert answer["strategy"] == "history" and len(answer["items"]) == 5
    scores = [item["score"] for item in answer["items"]]
    assert scores == sorted(scores, reverse=True)
    seen = set(service.artifacts.user_history(user).tolist())
    assert not seen & set(_ids(answer))  # exclude_seen is the default
    reason = answer["items"][0]["reason"]
    assert reason["because_of"] in seen and reason["modality"] in ("id", "image", "text", "attributes")


def test_reasons_between_cold_items_leave_out_their_ids(live):
    """Cold items all have the unknown-ID vector: their ID parts agree perfectly and say nothing, so a reason
    between two of them must name what they do share (content), not "id"."""
    client, service = live
    catalog = service.artifacts.catalog
    cold = [int(i) for i in catalog.loc[catalog["cold"], "item_id"]]
    answer = client.post("/recommend", json={"history": cold[:2], "k": 5, "filters": {"cold": True}}).json()
    assert len(answer["items"]) == 5  # a JSON true filters on the "cold" flag
    for item in answer["items"]:
        reason = item["reason"]
        assert reason["because_of"] in cold[:2]
        assert "id" not in reason["modality_similarity"] and reason["modality"] in ("image", "text", "attributes")
        assert "mostly by id" not in reason["text"]


def test_the_answer_follows_the_session(live):
    client, service = live
    items = [int(i) for i in service.artifacts.item_ids]
    first = client.post("/recommend", json={"history": [items[3]], "k": 10}).json()
    grown = client.post("/recommend", json={"history": [items[3], items[150]], "k": 10}).json()
    assert _ids(first) != _ids(grown)
    assert items[150] not in _ids(grown)


def test_exclude_seen_covers_a_history_longer_than_max_len(live):
    """The model reads the last max_len items; every item sent (and stored) is still excluded."""
    client, service = live
    max_len = int(service.artifacts.parts["max_len"])
    items = [int(i) for i in service.artifacts.item_ids]
    history = items[: 4 * max_len]  # 40 items, 30 of them older than what the model reads
    k = len(items) - len(history)  # every other item: an old history item in the answer could not hide
    answer = client.post("/recommend", json={"history": history, "k": k, "exclude_seen": True}).json()
    assert len(answer["items"]) == k and not set(history) & set(_ids(answer))
    user = int(service.artifacts.user_ids[2])
    stored = [int(i) for i in service.artifacts.user_history(user)]
    sent = [i for i in items if i not in stored][: 2 * max_len]
    both = client.post("/recommend", json={"user_id": user, "history": sent, "k": 100}).json()
    assert not (set(stored) | set(sent)) & set(_ids(both))
    kept = client.post("/recommend", json={"history": history, "k": len(items), "exclude_seen": False}).json()
    assert set(history) <= set(_ids(kept))  # without exclusion they are rankable


def test_filters_and_cold_users(live):
    client, service = live
    catalog = service.artifacts.catalog
    category = str(catalog["category"].iat[0])
    answer = client.post("/recommend", json={"history": [int(catalog["item_id"].iat[5])], "k": 5,
                                             "filters": {"category": category, "price": {"max": 1e9}}}).json()
    assert answer["items"] and all(catalog.set_index("item_id").loc[i, "category"] == category for i in _ids(answer))
    popular = client.post("/recommend", json={"k": 3}).json()
    assert popular["strategy"] == "popularity" and popular["cold_start"]
    assert _ids(popular)[0] == int(catalog.sort_values("popularity", ascending=False, kind="stable")["item_id"].iat[0])
    profile = client.post("/recommend", json={"profile": {"gender": "f", "age": 30}, "k": 3}).json()
    assert profile["strategy"] == "profile" and len(profile["items"]) == 3


def test_a_model_without_profiles_answers_a_profile_alone_by_popularity(tiny_artifacts):
    """A query tower trained with use_profile=false cannot read a profile: such a request gets the popular
    items and says so, rather than one "profile" answer that is the same for every profile."""
    service = RecommenderService(tiny_artifacts)
    service.artifacts.parts["history_encoder"].profile = None
    answer = service.recommend(None, None, {"gender": "f", "age": 30}, None, 3, None, True)
    assert answer["strategy"] == "popularity" and len(answer["items"]) == 3
    with pytest.raises(RequestError, match="unknown profile attribute"):  # still checked
        service.recommend(None, None, {"shoe_size": 42}, None, 3, None, True)


def test_rank_and_similar(live):
    client, service = live
    items = [int(i) for i in service.artifacts.item_ids[:8]]
    ranked = client.post("/rank", json={"user_id": int(service.artifacts.user_ids[1]), "items": items}).json()
    assert sorted(_ids(ranked)) == sorted(items)
    similar = client.get(f"/items/{items[2]}/similar", params={"k": 4}).json()
    assert len(similar["items"]) == 4 and items[2] not in _ids(similar)


def test_a_new_item_is_recommended_to_a_matching_history(live, tiny_checkpoint):
    """New items are encoded from content as the catalogue's cold (never interacted) items were, and are
    recommendable at once: the twin of the user's best-matching cold item gets (almost: its title differs)
    that item's vector, ranks among the best of the cold items, above the twin of their worst match, and
    is in the index /recommend searches."""
    client, service = live
    artifacts = service.artifacts
    items = pd.read_parquet(tiny_checkpoint.parents[2] / "data" / "items.parquet").set_index("item_id", drop=False)
    user = int(artifacts.user_ids[3])
    cold = [int(i) for i in artifacts.catalog.loc[artifacts.catalog["cold"], "item_id"]]
    order = _ids(client.post("/rank", json={"user_id": user, "items": cold}).json())
    for new_id, source in ((777001, order[0]), (777002, order[-1])):
        created = client.post("/items", json=twin_item(items, source, new_id))
        assert created.status_code == 201, created.text
    original, twin = (artifacts.tower_vectors([artifacts.item_row[i]])[0] for i in (order[0], 777001))
    assert float(original @ twin) / float(np.linalg.norm(original) * np.linalg.norm(twin)) > 0.95
    ranked = _ids(client.post("/rank", json={"user_id": user, "items": [*cold, 777001, 777002]}).json())
    assert ranked.index(777001) <= 2 and ranked.index(777001) < ranked.index(777002)
    everything = _ids(client.post("/recommend", json={"user_id": user, "k": len(artifacts.item_ids)}).json())
    assert 777001 in everything and 777002 in everything
    assert client.post("/items", json=twin_item(items, order[0], 777001)).status_code == 409  # the id is taken now


def test_health_metrics_and_docs(live):
    client, _ = live
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    assert client.get("/docs").status_code == 200
    metrics = client.get("/metrics").text
    assert 'mmrec_requests_total{route="/recommend",status="200"}' in metrics
    assert "mmrec_request_seconds_bucket" in metrics


@pytest.mark.parametrize("body, status, says", [
    (b"{not json", 422, "JSON decode error"),
    (b'{"k": "ten"}', 422, "valid integer"),
    (b'{"k": 0}', 422, "greater than or equal to 1"),
    (b'{"k": 100000}', 422, "less than or equal to"),
    (b'{"user_id": 99999999}', 404, "unknown user id 99999999"),
    (b'{"history": [99999999]}', 404, "99999999"),
    (b'{"history": [1], "filters": {"colour_of_sky": "blue"}}', 422, "cannot filter on"),
    (b'{"user_id": 1, "surprise": true}', 422, "Extra inputs"),
    (b'{"history": [' + b",".join([b"1"] * 1001) + b"]}", 422, "at most 1000"),
    (b'{"history": [1], "context": {"hour": 25}}', 422, "less than or equal to 23"),
    (b'{"profile": {"age": "old"}}', 422, "must be a number"),
    (b'{"profile": {"shoe_size": 42}}', 422, "unknown profile attribute"),
])
def test_bad_recommend_requests_get_clear_4xx(live, body, status, says):
    client, _ = live
    response = client.post("/recommend", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status and says in response.text, response.text


def test_other_bad_inputs(live):
    client, service = live
    assert client.post("/recommend", content=b"x" * 2_000_000,
                       headers={"content-type": "application/json"}).status_code == 413
    assert client.post("/rank", json={"user_id": 1, "items": [99999999]}).status_code == 404
    assert client.post("/rank", json={"user_id": 1, "items": []}).status_code == 422
    assert client.get("/items/99999999/similar").status_code == 404
    assert client.get("/items/abc/similar").status_code == 422
    corrupt = client.post("/items", json={"item_id": 888001, "title": "x", "image_base64": base64.b64encode(
        b"\x89PNG\r\n\x1a\n broken").decode()})
    assert corrupt.status_code == 422 and "image cannot be decoded" in corrupt.text
    assert client.post("/items", json={"item_id": 888002, "title": "x", "image_base64": "%%%"}).status_code == 422
    cheap = client.post("/items", json={"item_id": 888003, "title": "x", "attributes": {"price": "cheap"}})
    assert cheap.status_code == 422 and "must be a number" in cheap.text
    assert client.get("/healthz").status_code == 200  # still up


def test_reload_swaps_atomically_and_refuses_bad_artifacts(live, tmp_path):
    client, service = live
    before = service.describe()
    refused = client.post("/admin/reload", json={"artifacts": "nothing-here"})  # under the root, not a folder
    assert refused.status_code == 422 and "old ones stay in service" in refused.text
    assert service.describe()["loaded_at"] == before["loaded_at"]
    errors, stop = [], threading.Event()

    def hammer():
        while not stop.is_set():
            response = client.post("/recommend", json={"user_id": int(service.artifacts.user_ids[2]), "k": 5})
            if response.status_code != 200:
                errors.append(response.status_code)

    worker = threading.Thread(target=hammer)
    worker.start()
    reloaded = client.post("/admin/reload", json={})
    stop.set()
    worker.join()
    assert reloaded.status_code == 200 and reloaded.json()["loaded_at"] > before["loaded_at"]
    assert errors == []
    assert reloaded.json()["items"] == 200  # as exported: items added at run time live until a reload


def test_filters_reach_items_an_approximate_index_misses(tiny_artifacts):
    """An ANN index may never return some items for a query: a strict filter then falls back to exact scoring."""
    from multimodal_rec.serving import engine
    from multimodal_rec.serving.query import build_query

    service = RecommenderService(tiny_artifacts)
    artifacts = service.artifacts
    exact_index = artifacts.index

    category = str(artifacts.catalog["category"].iat[120])
    in_category = artifacts.catalog["category"].astype(str) == category
    unreachable = artifacts.item_ids[in_category.to_numpy()]

    class Myopic:  # never returns the filtered category, like an HNSW graph that a query cannot leave
        manifest, ntotal = {"name": "myopic"}, exact_index.ntotal

        def search(self, queries, k):
            scores, ids = exact_index.search(queries, exact_index.ntotal)
            seen = ~np.isin(ids, unreachable)
            return scores[seen][None, :k], ids[seen][None, :k]

    artifacts.index = Myopic()
    wanted = int(in_category.sum())
    query = build_query(artifacts, int(artifacts.user_ids[0]), None, None, None)
    answer = engine.recommend(artifacts, query, 5, {"category": category}, exclude_seen=False)
    assert len(answer["items"]) == min(5, wanted)
    assert all(artifacts.catalog.set_index("item_id").loc[i["item_id"], "category"] == category
               for i in answer["items"])
