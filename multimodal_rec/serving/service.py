"""The service behind the endpoints: holds the artifacts in use, adds new items, swaps in new artifacts."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from multimodal_rec.serving import engine
from multimodal_rec.serving.artifacts import Artifacts, load_artifacts
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.new_items import NewItemEncoder

log = logging.getLogger(__name__)


class RecommenderService:
    def __init__(self, artifacts_dir: str | Path, index_name: str | None = None):
        self.index_name = index_name
        self._state: tuple[Artifacts, NewItemEncoder] | None = None
        self._reload_lock = threading.Lock()
        self.loaded_at = 0.0
        self.load(artifacts_dir)

    @property
    def artifacts(self) -> Artifacts:
        if self._state is None:
            raise RequestError(503, "no artifacts are loaded")
        return self._state[0]

    def load(self, artifacts_dir: str | Path) -> dict:
        """Loads new artifacts beside the old ones and swaps them in one assignment: requests in flight
        finish on the old ones, and a folder that fails to load leaves the old ones in service."""
        with self._reload_lock:
            artifacts = load_artifacts(artifacts_dir, self.index_name)
            self._state = (artifacts, NewItemEncoder(artifacts.parts))
            self.loaded_at = time.time()
        return self.describe()

    def describe(self) -> dict:
        artifacts = self.artifacts
        return {"artifacts": str(artifacts.root), "items": len(artifacts.item_ids), "users": len(artifacts.user_ids),
                "dim": artifacts.dim, "index": artifacts.index.manifest.get("name"),
                "data_fingerprint": artifacts.manifest["data_fingerprint"],
                "checkpoint_sha256": artifacts.manifest["checkpoint_sha256"], "loaded_at": self.loaded_at}

    # ---- requests -------------------------------------------------------------------------------------
    def recommend(self, user_id, history, profile, hour, k, filters, exclude_seen) -> dict:
        artifacts = self.artifacts
        query = engine.build_query(artifacts, user_id, history, profile, hour)
        return engine.recommend(artifacts, query, k, filters, exclude_seen)

    def rank(self, user_id, history, profile, hour, items) -> dict:
        artifacts = self.artifacts
        query = engine.build_query(artifacts, user_id, history, profile, hour)
        return engine.rank(artifacts, query, items)

    def similar(self, item_id: int, k: int) -> dict:
        return engine.similar(self.artifacts, item_id, k)

    def add_item(self, item_id: int, title: str, text: str | None, image_base64: str | None,
                 attributes: dict) -> dict:
        """Encodes a new item with the item tower and makes it recommendable at once."""
        artifacts, encoder = self._state
        if item_id in artifacts.item_row:
            raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
        vector, parts = encoder.encode(text, image_base64, attributes)
        row = {"item_id": item_id, "title": title, "popularity": 0, "cold": True,
               "has_image": image_base64 is not None, "has_text": bool(text and text.strip())}
        row.update({k: v for k, v in attributes.items() if k in artifacts.catalog.columns})
        with artifacts.lock:
            if item_id in artifacts.item_row:  # added by a concurrent request
                raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
            artifacts.index.add(np.array([item_id], dtype=np.int64), vector[None])
            artifacts.item_vectors = np.vstack([artifacts.item_vectors, vector[None]])
            if artifacts.modality_parts is not None:
                extra = parts[None] if parts is not None else np.zeros_like(artifacts.modality_parts[:1])
                artifacts.modality_parts = np.concatenate([artifacts.modality_parts, extra])
            addition = pd.DataFrame([row]).astype({c: artifacts.catalog[c].dtype for c in row
                                                   if c in artifacts.catalog and c != "title"}, errors="ignore")
            artifacts.catalog = pd.concat([artifacts.catalog, addition], ignore_index=True)
            artifacts.titles = np.append(artifacts.titles, np.array([title], dtype=object))
            artifacts.item_ids = np.append(artifacts.item_ids, np.int64(item_id))
            artifacts.item_row[item_id] = len(artifacts.item_ids) - 1  # last: readers now see a whole item
        log.info("added item %d (%s)", item_id, title)
        return {"item_id": item_id, "indexed": True, "items": len(artifacts.item_ids)}
