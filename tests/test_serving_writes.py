"""Writes to the endpoint: tokens, the artifacts root, withdrawn items, and the journal that survives a crash."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.journal import Journal
from multimodal_rec.serving.service import RecommenderService
from tests.conftest import twin_item

WRITE, READ = "write-token-1", "read-token-2"


@pytest.fixture()
def root(tiny_artifacts, tmp_path) -> Path:
    """An artifacts root holding a copy of the tiny export, and a folder outside it."""
    shutil.copytree(tiny_artifacts, tmp_path / "root" / "current")
    shutil.copytree(tiny_artifacts, tmp_path / "outside")
    return tmp_path / "root"


def _client(root: Path, tokens: Tokens, journal: bool = True) -> TestClient:
    service = RecommenderService(root / "current", artifacts_root=root,
                                 journal=root / "journal.jsonl" if journal else None)
    return TestClient(create_app(service, tokens=tokens))


def _items(tiny_checkpoint) -> pd.DataFrame:
    return pd.read_parquet(tiny_checkpoint.parents[2] / "data" / "items.parquet").set_index("item_id", drop=False)


WRITES = [("post", "/items", {"item_id": 5_000_001, "title": "new"}), ("delete", "/items/3", None),
          ("post", "/admin/reload", {})]


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_writes_need_the_write_token(root, method, path, body):
    client = _client(root, Tokens(write=WRITE, read=None))
    send = {"json": body} if body is not None else {}
    missing = client.request(method, path, **send)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = client.request(method, path, headers={"Authorization": "Bearer nope"}, **send)
    assert wrong.status_code == 403 and "not valid" in wrong.json()["detail"]
    basic = client.request(method, path, headers={"Authorization": f"Basic {WRITE}"}, **send)
    assert basic.status_code == 401
    right = client.request(method, path, headers={"Authorization": f"Bearer {WRITE}"}, **send)
    assert right.status_code in (200, 201), right.text


@pytest.mark.parametrize(("method", "path", "body"), WRITES)
def test_without_a_configured_token_writes_are_off_and_say_how_to_enable_them(root, method, path, body):
    client = _client(root, Tokens())
    answer = client.request(method, path, headers={"Authorization": "Bearer anything"},
                            **({"json": body} if body is not None else {}))
    assert answer.status_code == 403 and "MMREC_WRITE_TOKEN" in answer.json()["detail"]


def test_reads_are_open_unless_a_read_token_is_configured(root):
    open_client = _client(root, Tokens(write=WRITE))
    assert open_client.post("/recommend", json={"history": [1]}).status_code == 200
    client = _client(root, Tokens(write=WRITE, read=READ))
    assert client.post("/recommend", json={"history": [1]}).status_code == 401
    assert client.get("/items/1/similar", headers={"Authorization": "Bearer nope"}).status_code == 403
    for token in (READ, WRITE):
        headers = {"Authorization": f"Bearer {token}"}
        assert client.post("/recommend", json={"history": [1]}, headers=headers).status_code == 200
        assert client.get("/metrics", headers=headers).status_code == 200
    assert client.post("/items", json={"item_id": 5_000_002, "title": "x"},
                       headers={"Authorization": f"Bearer {READ}"}).status_code == 403  # reading is not writing
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200  # probes


def test_reload_reads_only_under_the_artifacts_root(root):
    client = _client(root, Tokens(write=WRITE))
    headers = {"Authorization": f"Bearer {WRITE}"}
    (root / "link").symlink_to(root.parent / "outside")
    for target in ("../outside", str(root.parent / "outside"), "link", "current/../../outside", "/etc"):
        answer = client.post("/admin/reload", json={"artifacts": target}, headers=headers)
        assert answer.status_code == 403 and "outside the artifacts root" in answer.text, target
    shutil.copytree(root / "current", root / "next")
    for target in ("next", str(root / "current")):
        answer = client.post("/admin/reload", json={"artifacts": target}, headers=headers)
        assert answer.status_code == 200 and answer.json()["artifacts"] == str((root / target).resolve())
    assert client.post("/admin/reload", json={"artifacts": "a\x00b"}, headers=headers).status_code == 422


def test_a_withdrawn_item_stops_being_recommended_at_once(root):
    client = _client(root, Tokens(write=WRITE))
    headers = {"Authorization": f"Bearer {WRITE}"}
    answer = client.post("/recommend", json={"history": [1, 2, 3], "k": 5}).json()
    top = answer["items"][0]["item_id"]
    withdrawn = client.delete(f"/items/{top}", headers=headers)
    assert withdrawn.status_code == 200 and withdrawn.json()["withdrawn"] is True
    after = client.post("/recommend", json={"history": [1, 2, 3], "k": 200}).json()
    assert top not in [item["item_id"] for item in after["items"]]
    ranked = client.post("/rank", json={"history": [1], "items": [top, 4]}).json()
    assert [i["item_id"] for i in ranked["items"]] == [4] and ranked["withdrawn_item_ids"] == [top]
    assert client.get(f"/items/{top}/similar").status_code == 410
    assert top not in [i["item_id"] for i in client.get("/items/4/similar", params={"k": 100}).json()["items"]]
    assert client.post("/recommend", json={"history": [top], "k": 3}).status_code == 200  # may still be history
    assert client.delete(f"/items/{top}", headers=headers).status_code == 200  # again: no change
    assert client.delete("/items/4999999", headers=headers).status_code == 404
    assert client.get("/readyz").json()["withdrawn_items"] == 1


def test_the_journal_is_replayed_after_a_reload(root, tiny_checkpoint):
    client = _client(root, Tokens(write=WRITE))
    headers = {"Authorization": f"Bearer {WRITE}"}
    items = _items(tiny_checkpoint)
    assert client.post("/items", json=twin_item(items, 5, 6_000_001), headers=headers).status_code == 201
    assert client.delete("/items/7", headers=headers).status_code == 200
    described = client.post("/admin/reload", json={}, headers=headers).json()
    assert described["items"] == 201 and described["withdrawn_items"] == 1
    assert client.get("/items/6000001/similar").status_code == 200
    assert client.get("/items/7/similar").status_code == 410


def test_a_torn_last_line_is_dropped_with_a_warning_and_the_rest_replayed(root, caplog):
    journal = Journal(root / "journal.jsonl")
    journal.append({"op": "withdraw", "item_id": 3})
    with open(root / "journal.jsonl", "a") as handle:
        handle.write('{"op": "withdraw", "item_id": 4')  # the crash came mid-line
    client = _client(root, Tokens(write=WRITE))
    assert "torn" in caplog.text
    assert client.get("/items/3/similar").status_code == 410 and client.get("/items/4/similar").status_code == 200
    assert client.delete("/items/5", headers={"Authorization": f"Bearer {WRITE}"}).status_code == 200
    lines = (root / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(line.endswith("}") for line in lines)  # the next entry is whole


def _serve(root: Path, logs: str) -> tuple:
    """serve.py as its own process (bench/server_process.py) on `root`/current, with the write token."""
    from bench.server_process import start_server

    (root.parent / logs).mkdir()
    return start_server(root / "current", None, root.parent / logs, env={"MMREC_WRITE_TOKEN": WRITE})


@pytest.mark.slow
def test_added_and_withdrawn_items_survive_sigkill(root, tiny_checkpoint):
    items = _items(tiny_checkpoint)
    headers = {"Authorization": f"Bearer {WRITE}"}
    server, url = _serve(root, "first")
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
            for new_id, source in ((7_000_001, 10), (7_000_002, 11)):
                assert client.post("/items", json=twin_item(items, source, new_id)).status_code == 201
            assert client.delete("/items/12").status_code == 200
    finally:
        server.send_signal(signal.SIGKILL)  # no shutdown hook runs: only what was fsynced survives
        server.wait(30)
    assert (root / "journal.jsonl").is_file()  # serve.py's default: beside the artifacts, under the root
    server, url = _serve(root, "restarted")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for new_id, source in ((7_000_001, 10), (7_000_002, 11)):
                similar = client.get(f"/items/{source}/similar", params={"k": 5}).json()
                assert new_id in [item["item_id"] for item in similar["items"]]  # its twin: the nearest item
            ranked = client.post("/rank", json={"history": [1, 2], "items": [7_000_001, 7_000_002]})
            assert ranked.status_code == 200
            everything = client.post("/recommend", json={"history": [1, 2], "k": 1000}).json()
            ids = [item["item_id"] for item in everything["items"]]
            assert 7_000_001 in ids and 7_000_002 in ids and 12 not in ids
            assert client.get("/items/12/similar").status_code == 410
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def test_the_next_export_takes_the_journal_in(root, tiny_checkpoint, tmp_path):
    from multimodal_rec.embeddings import load_manifest
    from multimodal_rec.export import export
    from multimodal_rec.index import build_index
    from multimodal_rec.serving.artifacts import ArtifactsError
    from tests.conftest import export_config

    client = _client(root, Tokens(write=WRITE))
    headers = {"Authorization": f"Bearer {WRITE}"}
    items = _items(tiny_checkpoint)
    for new_id, source in ((8_000_001, 20), (8_000_002, 21)):
        assert client.post("/items", json=twin_item(items, source, new_id), headers=headers).status_code == 201
    assert client.delete("/items/22", headers=headers).status_code == 200
    out = tmp_path / "next-export"
    manifest = export(export_config(tiny_checkpoint, out, journal=str(root / "journal.jsonl")))
    assert manifest["counts"]["items"] == 202 and manifest["journal"]["added_items"] == 2
    assert manifest["journal"]["withdrawn_items"] == 1
    build_index(out, "flat", out / "index-flat")  # the index holds the added items too
    taken = TestClient(create_app(RecommenderService(out)))  # no journal: all of it comes from the export
    assert taken.get("/readyz").json()["items"] == 202 and taken.get("/items/22/similar").status_code == 410
    assert 8_000_001 in [i["item_id"] for i in taken.get("/items/20/similar", params={"k": 3}).json()["items"]]
    again = export(export_config(tiny_checkpoint, out))  # the same export without the journal: as exported
    assert again["counts"]["items"] == 200 and "journal" not in again and load_manifest(out)["counts"]["items"] == 200
    with pytest.raises(ArtifactsError, match="index holds 202 vectors but the export 200"):
        RecommenderService(out)  # an index built before is stale now, and says so
    shutil.rmtree(out / "index-flat")
    assert TestClient(create_app(RecommenderService(out))).get("/readyz").json()["items"] == 200
