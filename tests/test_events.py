"""POST /events: the shop's events are committed before the answer and used at once, without retraining."""

from __future__ import annotations

import contextlib
import shutil
import signal
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.event_store import Event, EventStore, EventStoreError
from multimodal_rec.serving.live import LiveSettings
from multimodal_rec.serving.service import RecommenderService

WRITE = "write-token-1"
HEADERS = {"Authorization": f"Bearer {WRITE}"}
NEW_CUSTOMER = 9_000_001  # not in the export


@pytest.fixture()
def root(tiny_artifacts, tmp_path) -> Path:
    shutil.copytree(tiny_artifacts, tmp_path / "root" / "current")
    return tmp_path / "root"


def _client(root: Path, **settings) -> tuple[TestClient, RecommenderService]:
    service = RecommenderService(root / "current", artifacts_root=root, events=root / "events.sqlite", **settings)
    return TestClient(create_app(service, tokens=Tokens(write=WRITE))), service


def _ids(answer) -> list:
    return [item["item_id"] for item in answer.json()["items"]]


def _post(client: TestClient, *events: dict):
    return client.post("/events", json={"events": list(events)}, headers=HEADERS)


def test_an_event_changes_the_next_answer_without_a_reload(root):
    client, service = _client(root)
    user = int(service.artifacts.user_ids[0])
    before = _ids(client.post("/recommend", json={"user_id": user, "k": 10}))
    picked = before[0]
    answer = _post(client, {"user_id": user, "item_id": picked, "event": "purchase", "time": "2026-12-07T10:00:00Z"})
    assert answer.status_code == 200 and answer.json() == {"stored": 1, "duplicates": 0}
    after = _ids(client.post("/recommend", json={"user_id": user, "k": 10}))
    assert picked not in after and after != before  # exclude_seen covers it; the history moved the query


def test_a_new_customer_gets_a_history_based_answer_after_their_first_event(root):
    client, service = _client(root)
    assert client.post("/recommend", json={"user_id": NEW_CUSTOMER, "k": 5}).status_code == 404
    item = int(service.artifacts.item_ids[3])
    assert _post(client, {"user_id": NEW_CUSTOMER, "item_id": item}).status_code == 200
    answer = client.post("/recommend", json={"user_id": NEW_CUSTOMER, "k": 5}).json()
    assert answer["strategy"] == "history" and item not in [i["item_id"] for i in answer["items"]]
    session = client.post("/recommend", json={"history": [item], "k": 5}).json()
    assert [i["item_id"] for i in answer["items"]] == [i["item_id"] for i in session["items"]]


def test_a_retried_event_id_counts_once(root):
    client, service = _client(root)
    event = {"user_id": NEW_CUSTOMER, "item_id": int(service.artifacts.item_ids[1]), "event_id": "order-17/line-1"}
    assert _post(client, event).json() == {"stored": 1, "duplicates": 0}
    assert _post(client, event, {**event, "event_id": "order-17/line-2"}).json() == {"stored": 1, "duplicates": 1}
    assert service.events.count() == 2 and len(service.live.history(str(NEW_CUSTOMER))) == 2


def test_bad_events_are_refused_whole_with_the_reason(root):
    client, service = _client(root, event_weights={"view": 1, "purchase": 3})
    known = int(service.artifacts.item_ids[0])
    unknown = _post(client, {"user_id": 1, "item_id": known, "event": "view"}, {"user_id": 1, "item_id": 987654})
    assert unknown.status_code == 404 and unknown.json()["unknown_item_ids"] == [987654]
    name = _post(client, {"user_id": 1, "item_id": known, "event": "wishlist"})
    assert name.status_code == 422 and "wishlist" in name.json()["detail"]
    when = _post(client, {"user_id": 1, "item_id": known, "event": "view", "time": "yesterday"})
    assert when.status_code == 422
    assert client.post("/events", json={"events": [{"user_id": 1, "item_id": known}]}).status_code == 401
    assert service.events.count() == 0


def test_forgetting_a_user_deletes_their_events(root):
    client, service = _client(root)
    user = int(service.artifacts.user_ids[0])
    items = [int(i) for i in service.artifacts.item_ids[:2]]
    assert _post(client, {"user_id": user, "item_id": items[0]}, {"user_id": NEW_CUSTOMER, "item_id": items[1]},
                 ).status_code == 200
    assert client.delete(f"/users/{NEW_CUSTOMER}", headers=HEADERS).status_code == 200  # known only by events
    assert client.delete(f"/users/{user}", headers=HEADERS).status_code == 200
    assert service.events.count() == 0
    assert client.post("/recommend", json={"user_id": NEW_CUSTOMER, "k": 5}).status_code == 404


def test_new_arrivals_being_picked_up_are_lifted_and_say_so(root):
    client, service = _client(root, live=LiveSettings(new_arrival_weight=2.0))
    catalog = service.artifacts.catalog
    cold = [int(i) for i in catalog.loc[catalog["cold"], "item_id"]]
    user = int(service.artifacts.user_ids[0])
    before = _ids(client.post("/recommend", json={"user_id": user, "k": 10, "context": {"time": 1_000_000}}))
    target = next(i for i in cold if i not in before)
    shoppers = [{"user_id": 8_000_000 + n, "item_id": target, "time": 1_000_000 - 60 * n} for n in range(5)]
    assert _post(client, *shoppers).status_code == 200
    answer = client.post("/recommend", json={"user_id": user, "k": 10, "context": {"time": 1_000_000}}).json()
    lifted = {item["item_id"]: item for item in answer["items"]}
    assert target in lifted and lifted[target]["reason"]["kind"] == "new_arrival"
    assert "picked up by 5 shoppers" in lifted[target]["reason"]["text"]
    much_later = client.post("/recommend", json={"user_id": user, "k": 10, "context": {"time": 1_000_000 + 86400 * 60}})
    assert target not in _ids(much_later)  # the counts decay in event time: two months later it is not lifted


def test_the_popularity_fallback_follows_what_is_picked_up_now(root):
    client, service = _client(root)
    rare = int(service.artifacts.catalog.sort_values("popularity")["item_id"].iloc[0])
    most = int(service.artifacts.catalog["popularity"].max())
    assert _post(client, *[{"user_id": 8_000_000 + n, "item_id": rare, "time": 5_000} for n in range(2 * most)]
                 ).status_code == 200
    answer = client.post("/recommend", json={"k": 3, "context": {"time": 5_000}}).json()
    assert answer["strategy"] == "popularity" and answer["items"][0]["item_id"] == rare


@pytest.mark.parametrize("tiny_disk", ["1m"], indirect=True)
def test_a_full_disk_answers_503_and_loses_nothing_acknowledged(tiny_disk):
    store = EventStore(tiny_disk / "events.sqlite")
    kept = Event("1", 5, "5", "view", 1.0, 100.0, "first")
    assert store.add([kept], 1.0) == [True]
    filler = tiny_disk / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):  # the disk is now full: that is the point
        handle.write(b"x" * 1024 * 1024)
    batch = [Event(str(n), 5, "5", "view", 1.0, 200.0 + n, None) for n in range(2000)]
    with pytest.raises(EventStoreError, match="nothing of it was stored"):
        store.add(batch, 2.0)
    filler.unlink()
    store.close()
    again = EventStore(tiny_disk / "events.sqlite")
    assert [e.event_id for e in again.events()] == ["first"]  # the acknowledged one, none of the refused batch
    again.close()


def test_the_store_refuses_at_start_when_it_cannot_be_written(root):
    (root / "events.sqlite").mkdir()  # a folder where the database should be
    client, service = _client(root)
    refused = _post(client, {"user_id": 1, "item_id": int(service.artifacts.item_ids[0])})
    assert refused.status_code == 503 and "event store" in refused.json()["detail"]


@pytest.mark.slow
def test_an_acknowledged_event_survives_kill_9(root):
    from bench.server_process import start_server

    (root.parent / "logs1").mkdir()
    server, url = start_server(root / "current", None, root.parent / "logs1", env={"MMREC_WRITE_TOKEN": WRITE})
    try:
        with httpx.Client(base_url=url, headers=HEADERS, timeout=30) as client:
            item = client.post("/recommend", json={"k": 1}).json()["items"][0]["item_id"]
            assert client.post("/events", json={"events": [{"user_id": NEW_CUSTOMER, "item_id": item}]}
                               ).status_code == 200
    finally:
        server.send_signal(signal.SIGKILL)  # no shutdown hook: only what was committed survives
        server.wait(30)
    with sqlite3.connect(root / "events.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 1
    (root.parent / "logs2").mkdir()
    server, url = start_server(root / "current", None, root.parent / "logs2", env={"MMREC_WRITE_TOKEN": WRITE})
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            answer = client.post("/recommend", json={"user_id": NEW_CUSTOMER, "k": 5})
            assert answer.status_code == 200 and answer.json()["strategy"] == "history"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_decay_is_in_event_time():
    from multimodal_rec.serving.live import LiveState

    live = LiveState(LiveSettings(half_life_hours=1.0))
    live.record("u", 7, 0, 1.0, time=0.0)
    np.testing.assert_allclose(live.decayed_counts(1, 3600.0), [0.5])
    np.testing.assert_allclose(live.decayed_counts(1, 0.0), [1.0])


def test_live_events_after_the_exported_data_survive_a_reload(root):
    client, service = _client(root)
    until = service.artifacts.manifest["events_until"]
    assert isinstance(until, int)  # the export records its data's last event time
    item = int(service.artifacts.item_ids[2])
    assert _post(client, {"user_id": NEW_CUSTOMER, "item_id": item, "time": until + 60},
                 {"user_id": NEW_CUSTOMER + 1, "item_id": item, "time": until - 60}).status_code == 200
    assert client.post("/admin/reload", json={}, headers=HEADERS).status_code == 200
    assert service.live.history(str(NEW_CUSTOMER)) == [item]  # replayed from the store
    assert service.live.history(str(NEW_CUSTOMER + 1)) == []  # before the export's data: a retrain took it in
