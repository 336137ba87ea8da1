"""Export throughput of the item tower, in items per second (used by bench/index.py --checkpoint).

Two figures from the same checkpoint and catalogue: the export as it runs (frozen image/text features
from the cache, then projections + fusion), and the full tower from raw content (decode + resize the
images, EfficientNet, tokenised text through MiniLM, then the tower), i.e. what a new catalogue costs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from multimodal_rec.export import Exporter
from multimodal_rec.models import feature_cache
from multimodal_rec.models.loading import resolve_checkpoint, restore_model


def export_throughput(checkpoint: str | Path, batch_size: int = 256) -> list[dict]:
    checkpoint = resolve_checkpoint(checkpoint)
    model, datamodule, _ = restore_model(checkpoint)
    n_items, n_users = model.n_items, datamodule.split.n_users
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        Exporter(model, datamodule, "bench", out, shard_size=50_000, batch_size=batch_size).run()
        export_seconds = time.perf_counter() - started
    items, size = datamodule.item_features, datamodule.image_size
    started = time.perf_counter()
    with torch.no_grad():
        for kind, encoder in model.frozen_encoders.items():
            if kind == "image":
                feature_cache.image_features(encoder, items, size, batch_size=64)
            else:
                feature_cache.text_features(encoder, items, batch_size=128)
        for start in range(0, n_items, batch_size):
            model.item_vectors(torch.arange(start, min(start + batch_size, n_items)))
    raw_seconds = time.perf_counter() - started
    export_rate = (n_items + n_users) / export_seconds
    raw_rate = n_items / raw_seconds
    encoders = "+".join(sorted(model.frozen_encoders)) or "none frozen"
    return [
        {"path": f"export (cached features), {n_items} items + {n_users} users", "seconds": export_seconds,
         "vectors/s": export_rate, "x raw": export_rate / raw_rate},
        {"path": f"full item tower from raw content ({encoders}), {n_items} items", "seconds": raw_seconds,
         "vectors/s": raw_rate, "x raw": 1.0},
    ]
