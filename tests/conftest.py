"""Shared fixtures: the real data (skipped where ../shared is absent) and tiny generated data."""

from __future__ import annotations

import os
from pathlib import Path

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


def tiny_datamodule(root: Path, **overrides):
    from multimodal_rec.data.datamodule import RecDataModule

    settings = {"max_len": 10, "cold_item_fraction": 0.1, "batch_size": 32, "eval_batch_size": 64,
                "image_size": 32, **overrides}
    return RecDataModule("tiny_shop", str(root), **settings)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained for two epochs on a tiny shop (train.py with debug=fast, no fast_dev_run)."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("tiny_run")
    command = [sys.executable, str(PROJECT_ROOT / "train.py"), "debug=fast", f"hydra.run.dir={root / 'run'}",
               f"data.processed_dir={root / 'data'}", f"paths.cache_dir={root / 'cache'}",
               "trainer.fast_dev_run=false", "trainer.max_epochs=2", "test=false"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run" / "checkpoints" / "last.ckpt"


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
