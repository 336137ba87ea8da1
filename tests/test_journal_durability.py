"""The journal under a failing disk: a failed append never swallows the next acknowledged write, an unwritable
journal is found at start (503 with the reason, readiness says so), and a replay reuses stored vectors."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from multimodal_rec.serving import journal as journal_module
from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.journal import Journal, JournalError
from multimodal_rec.serving.new_items import NewItemEncoder
from multimodal_rec.serving.service import RecommenderService

WRITE = "write-token-1"
HEADERS = {"Authorization": f"Bearer {WRITE}"}


@pytest.fixture()
def root(tiny_artifacts, tmp_path) -> Path:
    shutil.copytree(tiny_artifacts, tmp_path / "root" / "current")
    return tmp_path / "root"


def _service(root: Path, journal: Path | None = None) -> RecommenderService:
    return RecommenderService(root / "current", artifacts_root=root, journal=journal or root / "journal.jsonl")


def _fill_disk_once(monkeypatch) -> None:
    """The next os.write in the journal writes half its bytes, then the disk is full (ENOSPC)."""
    real_write, state = os.write, {"failed": False}

    def write(handle, data):
        if state["failed"]:
            return real_write(handle, data)
        state["failed"] = True
        real_write(handle, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_module.os, "write", write)


def test_a_failed_append_leaves_no_fragment_for_the_next_entry_to_land_on(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append({"op": "withdraw", "item_id": 1})
    before = (tmp_path / "journal.jsonl").read_bytes()
    _fill_disk_once(monkeypatch)
    with pytest.raises(JournalError, match="No space left"):
        journal.append({"op": "withdraw", "item_id": 2})
    assert (tmp_path / "journal.jsonl").read_bytes() == before  # cut back to the last whole entry
    journal.append({"op": "withdraw", "item_id": 3})  # acknowledged: must survive a restart
    assert [e["item_id"] for e in Journal(tmp_path / "journal.jsonl").entries()] == [1, 3]


def test_the_disk_filling_mid_append_answers_503_and_the_next_acknowledged_item_survives_a_restart(
        root, monkeypatch):
    client = TestClient(create_app(_service(root), tokens=Tokens(write=WRITE)))
    _fill_disk_once(monkeypatch)
    failed = client.post("/items", json={"item_id": 7_000_001, "title": "lost"}, headers=HEADERS)
    assert failed.status_code == 503 and "No space left" in failed.json()["detail"]
    assert client.get("/items/7000001").status_code == 404  # not acknowledged, not served either
    assert client.post("/items", json={"item_id": 7_000_002, "title": "kept"}, headers=HEADERS).status_code == 201
    restarted = TestClient(create_app(_service(root), tokens=Tokens(write=WRITE)))
    assert restarted.get("/items/7000002").status_code == 200
    assert restarted.get("/items/7000001").status_code == 404


def test_when_even_the_cut_fails_writes_stop_with_the_reason(root, monkeypatch):
    client = TestClient(create_app(_service(root), tokens=Tokens(write=WRITE)))
    _fill_disk_once(monkeypatch)

    def cannot_truncate(path, size):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_module, "_truncate", cannot_truncate)
    assert client.post("/items", json={"item_id": 7_000_001, "title": "x"}, headers=HEADERS).status_code == 503
    second = client.delete("/items/3", headers=HEADERS)  # would land on the fragment: refused instead
    assert second.status_code == 503 and "partial entry" in second.json()["detail"]
    assert second.headers["retry-after"]
    assert client.get("/items/3/similar").status_code == 200  # the refused withdrawal did not take effect


def test_an_unwritable_journal_is_found_at_start_and_writes_answer_503_with_the_reason(root):
    (root / "journal.jsonl").mkdir()  # a folder where the file should be: unwritable even for root
    service = _service(root)
    writes = service.describe()["writes"]
    assert writes["available"] is False and "cannot be written" in writes["reason"]
    client = TestClient(create_app(service, tokens=Tokens(write=WRITE)))
    for answer in (client.post("/items", json={"item_id": 7_000_001, "title": "x"}, headers=HEADERS),
                   client.delete("/items/3", headers=HEADERS), client.delete("/users/1", headers=HEADERS)):
        assert answer.status_code == 503 and "journal" in answer.json()["detail"], answer.text
    assert client.get("/items/3/similar").status_code == 200  # reads go on


def test_a_replay_of_the_same_model_reuses_the_stored_vectors(root, monkeypatch):
    client = TestClient(create_app(_service(root), tokens=Tokens(write=WRITE)))
    for number in range(3):
        body = {"item_id": 7_000_000 + number, "title": f"new {number}", "text": "a red shoe"}
        assert client.post("/items", json=body, headers=HEADERS).status_code == 201
    first = client.post("/recommend", json={"history": [7_000_000], "k": 5}).json()
    encoded = []
    monkeypatch.setattr(NewItemEncoder, "encode", lambda self, *a: encoded.append(a) or pytest.fail("re-encoded"))
    restarted = TestClient(create_app(_service(root), tokens=Tokens(write=WRITE)))
    assert not encoded and restarted.get("/readyz").json()["items"] == 203
    assert restarted.post("/recommend", json={"history": [7_000_000], "k": 5}).json() == first


def test_a_stored_vector_that_does_not_fit_is_encoded_again(root):
    client = TestClient(create_app(_service(root), tokens=Tokens(write=WRITE)))
    assert client.post("/items", json={"item_id": 7_000_001, "title": "x", "text": "a shoe"},
                       headers=HEADERS).status_code == 201
    path = root / "journal.jsonl"
    entry = json.loads(path.read_text())
    entry["encoded"]["vector"] = "AAAA"  # 3 bytes: no vector of this model
    path.write_text(json.dumps(entry) + "\n")
    restarted = _service(root)
    assert restarted.artifacts.item_row.get(7_000_001) is not None


def test_a_replay_does_not_log_the_ids_of_users_it_cannot_apply(root, caplog):
    Journal(root / "journal.jsonl").append({"op": "forget_user", "user_id": "shopper-4242"})  # not an int id
    with caplog.at_level(logging.INFO):
        _service(root)
    assert "skipped" in caplog.text and "shopper-4242" not in caplog.text


def test_a_real_disk_filling_mid_append_keeps_every_acknowledged_entry(tiny_disk):
    journal = Journal(tiny_disk / "journal.jsonl")
    journal.append({"op": "withdraw", "item_id": 1})
    filler = tiny_disk / "filler"
    with open(filler, "wb") as handle:  # all but a few KiB
        handle.write(b"x" * (64 * 1024 - 2 * 4096))
    big = {"op": "add", "item": {"item_id": 2, "title": "t", "text": "y" * 20_000}}
    with pytest.raises(JournalError):
        journal.append(big)
    assert [e["item_id"] for e in Journal(tiny_disk / "journal.jsonl").entries()] == [1]
    filler.unlink()  # the operator frees space: the next entry is whole and readable
    journal.append({"op": "withdraw", "item_id": 3})
    assert [e.get("item_id") for e in Journal(tiny_disk / "journal.jsonl").entries()] == [1, 3]


def _png(width: int, height: int) -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_pictures_are_files_beside_the_journal_not_in_it_nor_in_memory(root):
    client = TestClient(create_app(_service(root), tokens=Tokens(write=WRITE)))
    body = {"item_id": 7_000_001, "title": "red", "image_base64": _png(300, 200)}
    assert client.post("/items", json=body, headers=HEADERS).status_code == 201
    line = (root / "journal.jsonl").read_text()
    assert "image_base64" not in line and len(line) < 4000  # the entry names the picture, a few hundred bytes
    (stored,) = (root / "journal.jsonl.pictures").iterdir()
    restarted = _service(root)
    assert restarted.artifacts.uploaded_images[7_000_001] == stored  # a path, not the picture
    picture = TestClient(create_app(restarted)).get("/items/7000001/image?size=64")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/jpeg"


def test_a_journaled_picture_name_never_leads_out_of_the_pictures_folder(root, tmp_path):
    secret = root / "secret.img"
    secret.write_bytes(b"not yours")
    Journal(root / "journal.jsonl").append({"op": "add", "item": {"item_id": 7_000_001, "title": "x",
                                                                  "image_file": "../secret.img"}})
    service = _service(root)
    assert 7_000_001 not in service.artifacts.uploaded_images  # the name is refused, the item kept without it
    assert service.artifacts.item_row.get(7_000_001) is not None
