"""A person's right to be forgotten: DELETE /users/{id} on the running server (journaled), and a dataset
without them for the next training run; user ids stay out of the logs."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from multimodal_rec.data.forget import forget, read_user_ids
from multimodal_rec.data.schema import DatasetError, load_dataset
from multimodal_rec.serving.access_log import HashUserIds, hashed_id
from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.service import RecommenderService
from tests.conftest import PROJECT_ROOT

WRITE = {"Authorization": "Bearer forget-token"}


def _client(root):
    service = RecommenderService(root / "current", artifacts_root=root, journal=root / "journal.jsonl")
    return TestClient(create_app(service, tokens=Tokens(write="forget-token"))), service


def test_delete_user_removes_history_and_profile_and_survives_a_restart(tiny_artifacts, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_artifacts, root / "current")
    client, service = _client(root)
    user = int(service.artifacts.user_ids[7])
    assert client.post("/recommend", json={"user_id": user}).status_code == 200
    assert client.delete(f"/users/{user}").status_code == 401  # a write: the token is needed
    answer = client.delete(f"/users/{user}", headers=WRITE)
    assert answer.status_code == 200 and answer.json()["forgotten_users"] == 1
    gone = client.post("/recommend", json={"user_id": user})
    assert gone.status_code == 404 and "unknown user" in gone.json()["detail"]
    assert client.get(f"/users/{user}/history").status_code == 404
    assert client.delete(f"/users/{user}", headers=WRITE).status_code == 200  # again: nothing left to do
    assert client.delete("/users/987654321", headers=WRITE).status_code == 404
    row = service.artifacts.parts["histories"]["user_ids"].tolist().index(user)
    lo, hi = service.artifacts.parts["histories"]["offsets"][row: row + 2]
    assert (service.artifacts.parts["histories"]["items"][lo:hi] == -1).all()  # overwritten, not just unlinked
    restarted, _ = _client(root)  # a new process reads the journal
    assert restarted.post("/recommend", json={"user_id": user}).status_code == 404
    assert restarted.get("/readyz").json()["forgotten_users"] == 1


def test_user_ids_in_paths_are_hashed_in_the_access_log():
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "DELETE", "/users/4242/history?limit=3", "1.1", 200), None)
    assert HashUserIds().filter(record)
    assert "4242" not in record.getMessage() and f"/users/#{hashed_id(4242)}/history" in record.getMessage()
    assert hashed_id(4242) != hashed_id(4243)


def test_forget_writes_a_dataset_without_the_users_and_training_works(tiny_shop_dir, tmp_path):
    before = load_dataset(tiny_shop_dir)
    victims = [int(u) for u in before.users["user_id"][:3]]
    users_file = tmp_path / "forget.txt"
    users_file.write_text(f"# requests of 2026-12-03\n{victims[0]}\n\n{victims[1]}\n{victims[2]}\n999999\n")
    assert read_user_ids(users_file) == {*victims, 999999}
    out = tmp_path / "data"
    manifest = forget(tiny_shop_dir, read_user_ids(users_file), out)
    after = load_dataset(out)
    assert not after.users["user_id"].isin(victims).any() and not after.interactions["user_id"].isin(victims).any()
    assert len(after.users) == len(before.users) - 3 and manifest["forgotten_users"] == 3
    assert manifest["fingerprint"] != before.fingerprint and manifest["forgotten_from"] == before.fingerprint
    pd.testing.assert_frame_equal(after.items.drop(columns="image"), before.items.drop(columns="image"))
    assert load_dataset(tiny_shop_dir).fingerprint == before.fingerprint  # another `out`: the source is untouched
    (tmp_path / "bad.txt").write_text("12\nnot-a-user\n")
    with pytest.raises(DatasetError, match="line 2"):
        read_user_ids(tmp_path / "bad.txt")
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={tmp_path / 'run'}",
               f"data.processed_dir={out}", f"paths.cache_dir={tmp_path / 'cache'}", "test=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
