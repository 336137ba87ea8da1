"""Shared fixtures: the real data (skipped where the data folder is absent) and tiny generated data."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from multimodal_rec.config import PROJECT_ROOT

SHARED_DATA = Path(os.environ.get("MMREC_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
ML100K_MM = SHARED_DATA / "ml100k-mm"


@pytest.fixture(scope="session")
def ml100k_mm_raw() -> Path:
    if not (ML100K_MM / "ml-100k" / "u.data").is_file():
        pytest.skip(f"real data not found at {ML100K_MM} (set MMREC_SHARED_DATA to its parent folder)")
    return ML100K_MM


@pytest.fixture(scope="session")
def ml100k_mm_dir(ml100k_mm_raw, tmp_path_factory) -> Path:
    """The real dataset prepared once per test session."""
    from multimodal_rec.data.schema import write_dataset
    from multimodal_rec.data.sources.movielens import read_movielens

    out = tmp_path_factory.mktemp("data") / "ml100k_mm"
    raw = read_movielens(
        ml100k_mm_raw / "ml-100k",
        posters=ml100k_mm_raw / "posters",
        details=ml100k_mm_raw / "movielens100k_details.json",
        name="ml100k_mm",
    )
    write_dataset(raw, out)
    return out


@pytest.fixture(scope="session")
def tiny_shop_dir(tmp_path_factory) -> Path:
    """A small generated shop (300 items, 150 users), prepared once per test session."""
    from multimodal_rec.data.schema import write_dataset
    from multimodal_rec.data.sources.synthetic import read_synthetic

    out = tmp_path_factory.mktemp("data") / "tiny_shop"
    write_dataset(read_synthetic(n_items=300, n_users=150, seed=1), out)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving_in_thread(app) -> Iterator[str]:
    """The app served on a loopback port by a thread of this process; yields its base URL."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def tiny_datamodule(root: Path, **overrides):
    from multimodal_rec.data.datamodule import RecDataModule

    settings = {"max_len": 10, "cold_item_fraction": 0.1, "batch_size": 32, "eval_batch_size": 64,
                "image_size": 32, **overrides}
    return RecDataModule("tiny_shop", str(root), **settings)


def train_tiny(root: Path, *overrides: str) -> Path:
    """Trains a tiny model for two epochs on a tiny shop under `root` (train.py with debug=fast, no
    fast_dev_run) -> its last checkpoint."""
    import subprocess
    import sys

    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={root / 'run'}",
               f"data.processed_dir={root / 'data'}", f"paths.cache_dir={root / 'cache'}",
               "trainer.fast_dev_run=false", "trainer.max_epochs=2", "test=false", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The default tiny model with item biases and the re-ranking network (both off by default), so that export,
    index and serving tests cover the bias column and re-ranking; trained once per test session."""
    return train_tiny(tmp_path_factory.mktemp("tiny_run"), "model.recommender.item_bias=true",
                      "model.recommender.rerank_top=20")


def export_config(ckpt: Path, out: Path, **overrides):
    from omegaconf import OmegaConf

    settings = {"ckpt_path": str(ckpt), "out": str(out), "shard_size": 64, "batch_size": 32, "dtype": "float32",
                "device": "cpu", "serving_parts": True, "overwrite": False, "data": {}, **overrides}
    return OmegaConf.create(settings)


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model's export (embeddings + serving parts), no index: serving searches exactly."""
    from multimodal_rec.export import export

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export(export_config(tiny_checkpoint, out))
    return out


def item_png(ref: str) -> str:
    """A synthetic item's image (re-rendered from its reference) as a base64 PNG, as a client sends it."""
    from multimodal_rec.data.synthetic_images import render_synthetic_image

    buffer = io.BytesIO()
    render_synthetic_image(ref, 64).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def twin_item(items: pd.DataFrame, item_id: int, new_id: int) -> dict:
    """A new item with the content (text, image, attributes) of an existing one."""
    source = items.loc[item_id]
    return {"item_id": new_id, "title": f"twin of {source['title']}", "text": source["text"],
            "image_base64": item_png(source["image"]) if isinstance(source["image"], str) else None,
            "attributes": {"category": source["category"], "brand": source["brand"], "price": float(source["price"]),
                           "sales": int(source["sales"])}}


def assert_index_returns_the_top_k(index_dir: Path, artifacts: Path, scores, datamodule, atol: float) -> None:
    """The index over an export finds each user's top 10 of `scores` (the model's own, (users, items)): the same
    scores, and the same items for the users without near-ties (within `atol`) in their top 11."""
    import numpy as np

    from multimodal_rec import embeddings as emb
    from multimodal_rec.index import load_index

    _, user_vectors = emb.read_embeddings(artifacts, "users")
    found_scores, found = load_index(index_dir).search(user_vectors, 10)
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    assert np.allclose(found_scores, np.take_along_axis(scores, expected, 1), atol=atol)
    gaps = np.diff(np.sort(scores, axis=1)[:, ::-1][:, :11], axis=1)
    clear = (np.abs(gaps) > atol).all(axis=1)  # users without near-ties in their top 11
    assert clear.mean() > 0.8
    item_ids = datamodule.dataset.items["item_id"].to_numpy()
    assert np.array_equal(found[clear], item_ids[expected[clear]])


@pytest.fixture()
def tiny_disk(tmp_path, request):
    """A real small filesystem (tmpfs; needs root, as CI has) of 64 KiB or the size given by indirect
    parametrisation, unmounted afterwards."""
    import subprocess

    folder = tmp_path / "disk"
    folder.mkdir()
    size = getattr(request, "param", "64k")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:100]}); the injected-fault tests "
                    "above cover the same path")
    yield folder
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a file a test left open does not fail it


class WritesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), i.e. runs code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def copy_artifacts(tiny_artifacts: Path, tmp_path: Path) -> Path:
    """A copy of the tiny export to craft (tests change files in it)."""
    import shutil

    folder = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, folder)
    return folder
