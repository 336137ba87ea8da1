"""A shop's own files, end to end: prepared by the generic reader, trained (debug=fast), exported, served, and
answered in the shop's own ids, for each layout: CSV with ISO dates, Parquet, Amazon Reviews 2023 JSONL.gz."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from multimodal_rec.config import PROJECT_ROOT
from multimodal_rec.data.sources.example_shop import write_example_shop
from multimodal_rec.export import export
from multimodal_rec.serving.app import create_app
from multimodal_rec.serving.auth import Tokens
from multimodal_rec.serving.service import RecommenderService
from tests.conftest import export_config

LAYOUTS = {
    "csv": ["data=tabular"],
    "parquet": ["data=tabular", "data.source.items.path=products.parquet",
                "data.source.interactions.path=events.parquet", "data.source.users=null"],
    "amazon2023": ["data=amazon2023"],
}
WRITE = {"Authorization": "Bearer shop-token"}


def _train(root: Path, folder: Path, overrides: list[str]) -> Path:
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), *overrides, f"data.source.folder={folder}", "debug=fast",
               f"hydra.run.dir={root / 'run'}", f"data.processed_dir={root / 'data'}",
               f"paths.cache_dir={root / 'cache'}",
               "trainer.fast_dev_run=false", "trainer.max_epochs=1", "test=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), "teal").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_shops_files_are_trained_exported_and_served_in_its_own_ids(layout, tmp_path):
    written = write_example_shop(tmp_path / "shop", layout, n_items=80, n_users=40, seed=5)
    checkpoint = _train(tmp_path, tmp_path / "shop", LAYOUTS[layout])
    out = tmp_path / "artifacts"
    export(export_config(checkpoint, out))
    items = pd.read_parquet(tmp_path / "data" / "items.parquet")
    users = pd.read_parquet(tmp_path / "data" / "users.parquet")
    catalog = pd.read_parquet(out / "catalog.parquet")
    assert list(catalog["source_id"]) == list(items["source_id"])  # the export keeps the shop's ids
    assert list(pd.read_parquet(out / "users.parquet")["source_id"]) == list(users["source_id"])
    shop_items = set(items["source_id"])
    read = {"csv": pd.read_csv, "parquet": pd.read_parquet}.get(layout)
    if read is not None:
        assert set(read(written["items"])["sku"]) == shop_items

    client = TestClient(create_app(RecommenderService(out), tokens=Tokens(write="shop-token")))
    user = str(users["source_id"].iloc[3])
    history = list(items["source_id"].iloc[:3])
    answer = client.post("/recommend", json={"user_id": user, "history": history, "k": 5})
    assert answer.status_code == 200, answer.text
    got = [item["item_id"] for item in answer.json()["items"]]
    assert len(got) == 5 and set(got) <= shop_items and not set(got) & set(history)
    becauses = [item["reason"].get("because_of") for item in answer.json()["items"]]
    assert all(b is None or b in shop_items for b in becauses)
    ranked = client.post("/rank", json={"user_id": user, "items": history[::-1]}).json()
    assert sorted(item["item_id"] for item in ranked["items"]) == sorted(history)
    similar = client.get(f"/items/{history[0]}/similar", params={"k": 3}).json()
    assert {item["item_id"] for item in similar["items"]} <= shop_items
    assert client.get(f"/users/{user}/history").json()["user_id"] == user
    assert client.get(f"/items/{history[1]}").json()["item_id"] == history[1]
    assert client.get("/catalog/facets").json()["id_kind"] == "string"
    # unknown shop ids are named as sent; an int id is read as its decimal string
    unknown = client.post("/recommend", json={"history": [history[0], "NO-SUCH-SKU"]})
    assert unknown.status_code == 404 and unknown.json()["unknown_item_ids"] == ["NO-SUCH-SKU"]
    assert client.post("/recommend", json={"user_id": "nobody"}).status_code == 404
    assert client.post("/recommend", json={"history": [12345]}).json()["unknown_item_ids"] == [12345]
    # a new product under a new SKU, then withdrawn
    added = client.post("/items", headers=WRITE, json={"item_id": "NEW-SKU-1", "title": "New teal mug",
                                                         "text": "A teal mug.", "image_base64": _png()})
    assert added.status_code == 201 and added.json()["item_id"] == "NEW-SKU-1"
    assert client.post("/items", headers=WRITE, json={"item_id": "NEW-SKU-1", "title": "again"}).status_code == 409
    cold = client.post("/recommend", json={"history": history, "k": 5, "filters": {"cold": True}}).json()
    assert all(item["item_id"] in shop_items | {"NEW-SKU-1"} for item in cold["items"])
    assert client.get("/items/NEW-SKU-1").json()["title"] == "New teal mug"
    assert client.delete("/items/NEW-SKU-1", headers=WRITE).json()["withdrawn"] is True
    assert client.get("/items/NEW-SKU-1/similar").status_code == 410
    assert client.delete(f"/users/{user}", headers=WRITE).json()["forgotten"] is True
    assert client.post("/recommend", json={"user_id": user}).status_code == 404


def test_int_id_catalogues_refuse_string_ids(tiny_artifacts):
    client = TestClient(create_app(RecommenderService(tiny_artifacts)))
    refused = client.post("/recommend", json={"history": ["7"]})
    assert refused.status_code == 422 and "integers" in refused.json()["detail"]
    assert client.get("/items/abc/similar").status_code == 422
    assert client.get("/catalog/facets").json()["id_kind"] == "int"
