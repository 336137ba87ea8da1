"""An artifact folder with a large synthetic catalogue, for load tests at scale.

The model parts (query tower, ranker, user profiles) come from a real export; the items are N
clustered unit vectors (see bench/index.py) with a catalogue table, and an index is built over them.
Reasons then name the history item but no modality (there are no per-modality vectors).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from bench.index import synthetic
from multimodal_rec import embeddings as emb
from multimodal_rec.index import build_index
from multimodal_rec.serving.model_files import CONFIG_FILE, WEIGHTS_FILE
from multimodal_rec.serving.parts import CATALOG_FILE

SHARD_ROWS = 100_000


def make_synthetic_artifacts(source: Path, out: Path, n_items: int, index: str = "ivf", seed: int = 0) -> Path:
    source_manifest = emb.load_manifest(source)
    rng = np.random.default_rng(seed)
    vectors = synthetic(n_items, source_manifest["dim"], max(n_items // 250, 10), rng)
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # their checks name the source's checkpoint and data
        shutil.copy(source / name, out / name)
    items = [emb.write_shard(out, "items", i, ids[s:s + SHARD_ROWS], vectors[s:s + SHARD_ROWS])
             for i, s in enumerate(range(0, n_items, SHARD_ROWS))]
    users = [emb.write_shard(out, "users", i, *chunk) for i, chunk in enumerate(emb.iter_embeddings(source, "users"))]
    categories = np.array(["books", "shoes", "kitchen", "toys", "garden", "music", "tools", "sports"])
    pd.DataFrame({
        "item_id": ids, "title": [f"item {i}" for i in ids], "category": categories[rng.integers(0, 8, n_items)],
        "price": rng.lognormal(3, 1, n_items).round(2), "popularity": rng.zipf(1.5, n_items).clip(max=10**6),
        "cold": False, "has_image": True, "has_text": True,
    }).to_parquet(out / CATALOG_FILE, index=False)
    emb.write_json_atomic(out / emb.MANIFEST_FILE, {
        **{k: source_manifest[k] for k in ("format", "checkpoint_sha256", "data_fingerprint", "dim", "metric",
                                           "normalised")},
        "counts": {"items": n_items, "users": int(sum(e["rows"] for e in users))},
        "shards": {"items": items, "users": users}, "synthetic_items": True,
    })
    build_index(out, index, out / f"index-{index}")
    return out
