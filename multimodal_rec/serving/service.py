"""The service behind the endpoints: holds the artifacts in use, adds and withdraws items (journaled),
swaps in new artifacts."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

from multimodal_rec.serving import engine
from multimodal_rec.serving.access_log import hashed_id
from multimodal_rec.serving.artifacts import Artifacts, load_artifacts
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.filters import RESERVED
from multimodal_rec.serving.journal import Journal
from multimodal_rec.serving.new_items import NewItemEncoder
from multimodal_rec.serving.shop_ids import answer_out, items_in, known_item_row, known_user, user_in

log = logging.getLogger(__name__)


class RecommenderService:
    """artifacts_root: the only folders a reload may name (default: the one holding `artifacts_dir`);
    journal: where items added or withdrawn through the API are kept (None: in memory only)."""

    def __init__(self, artifacts_dir: str | Path, index_name: str | None = None,
                 artifacts_root: str | Path | None = None, journal: str | Path | None = None):
        self.index_name = index_name
        self.root = Path(artifacts_root or Path(artifacts_dir).resolve().parent).resolve()
        self.journal = Journal(journal) if journal else None
        self._state: tuple[Artifacts, NewItemEncoder] | None = None
        self._write_lock = threading.RLock()  # one write at a time: reloads, additions, withdrawals
        self.loaded_at = 0.0
        self.replayed_entries = 0  # journal entries read by the last load
        self.load(artifacts_dir)

    @property
    def artifacts(self) -> Artifacts:
        if self._state is None:
            raise RequestError(503, "no artifacts are loaded")
        return self._state[0]

    def reload_target(self, target: str | None) -> Path:
        """The folder a reload request names, refused (403) unless it lies under the artifacts root once
        `..` and symbolic links are resolved; relative names are taken from the root."""
        if not target:
            return self.artifacts.root
        candidate = Path(target)
        try:
            resolved = (candidate if candidate.is_absolute() else self.root / candidate).resolve()
        except (ValueError, OSError) as error:  # a NUL byte, a symlink loop
            raise RequestError(422, f"{target!r} is not a usable path: {error}") from error
        if not resolved.is_relative_to(self.root):
            raise RequestError(403, f"{target!r} is outside the artifacts root; reloads only read folders under "
                               "it (serve.yaml artifacts_root)")
        return resolved

    def load(self, artifacts_dir: str | Path) -> dict:
        """Loads new artifacts beside the old ones, replays the journal onto them and swaps them in with one
        assignment: requests in flight finish on the old ones, and a folder that fails to load leaves the
        old ones in service."""
        with self._write_lock:
            artifacts = load_artifacts(artifacts_dir, self.index_name)
            encoder = NewItemEncoder(artifacts.parts)
            if self.journal is not None:
                self._replay(artifacts, encoder)
            self._state = (artifacts, encoder)
            self.loaded_at = time.time()
        return self.describe()

    def describe(self) -> dict:
        artifacts = self.artifacts
        return {"artifacts": str(artifacts.root), "items": len(artifacts.item_ids), "users": len(artifacts.user_ids),
                "withdrawn_items": len(artifacts.withdrawn), "forgotten_users": len(artifacts.forgotten),
                "dim": artifacts.dim,
                "index": artifacts.index.manifest.get("name"),
                "data_fingerprint": artifacts.manifest["data_fingerprint"],
                "checkpoint_sha256": artifacts.manifest["checkpoint_sha256"], "loaded_at": self.loaded_at,
                "privacy": artifacts.manifest.get("privacy"),  # (epsilon, delta) spent in training, if DP
                "journal": str(self.journal.path) if self.journal else None}

    # ---- requests: ids as the client sends them (the shop's own, see shop_ids.py), answers alike --------
    def _query(self, artifacts: Artifacts, user_id, history, profile, hour) -> engine.Query:
        session = items_in(artifacts.shop_ids, history, "unknown item ids in history") if history else history
        return engine.build_query(artifacts, known_user(artifacts, user_id), session, profile, hour)

    def recommend(self, user_id, history, profile, hour, k, filters, exclude_seen) -> dict:
        artifacts = self.artifacts
        query = self._query(artifacts, user_id, history, profile, hour)
        return answer_out(artifacts.shop_ids, engine.recommend(artifacts, query, k, filters, exclude_seen))

    def rank(self, user_id, history, profile, hour, items) -> dict:
        artifacts = self.artifacts
        query = self._query(artifacts, user_id, history, profile, hour)
        return answer_out(artifacts.shop_ids, engine.rank(artifacts, query, items_in(artifacts.shop_ids, items)))

    def similar(self, item_id, k: int) -> dict:
        artifacts = self.artifacts
        row = known_item_row(artifacts, item_id)
        if row in artifacts.withdrawn:
            raise RequestError(410, f"item {item_id} was withdrawn", withdrawn_item_ids=[item_id])
        return answer_out(artifacts.shop_ids, engine.similar(artifacts, row, k))

    @staticmethod
    def _exists(artifacts: Artifacts, item_id) -> bool:
        ids = artifacts.shop_ids
        return (str(item_id) in ids.item_canonical) if ids is not None else item_id in artifacts.item_row

    def add_item(self, item_id, title: str, text: str | None, image_base64: str | None, attributes: dict) -> dict:
        """Encodes a new item with the item tower, journals it and makes it recommendable at once."""
        item = {"item_id": item_id, "title": title, "text": text, "image_base64": image_base64,
                "attributes": attributes}
        for _ in range(3):
            artifacts, encoder = self._state
            if artifacts.shop_ids is None and isinstance(item_id, str):
                raise RequestError(422, f"item ids of this catalogue are integers, got {item_id!r}")
            if self._exists(artifacts, item_id):
                raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
            # the slow part, outside the write lock (withdrawals do not wait for it); a bad image is a 422
            encoded = encoder.encode(text, image_base64, attributes)
            with self._write_lock:
                if self._state[0] is not artifacts:
                    continue  # reloaded meanwhile: encode again with the model now in service
                if self._exists(artifacts, item_id):
                    raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
                if self.journal is not None:
                    self.journal.append({"op": "add", "item": item})
                _insert(artifacts, item, *encoded)
            log.info("added item %s", item_id)
            return {"item_id": item_id, "indexed": True, "items": len(artifacts.item_ids)}
        raise RequestError(503, "the artifacts were reloaded three times while the item was encoded; send it again")

    def withdraw_item(self, item_id) -> dict:
        """The item is no longer recommended (nor ranked, nor similar to anything); histories may still name it."""
        with self._write_lock:
            artifacts = self.artifacts
            row = known_item_row(artifacts, item_id)
            if row not in artifacts.withdrawn:
                if self.journal is not None:
                    self.journal.append({"op": "withdraw", "item_id": item_id})
                artifacts.withdrawn = artifacts.withdrawn | {row}  # a new set: readers see the old or the new
        log.info("withdrew item %s", item_id)
        return {"item_id": item_id, "withdrawn": True, "withdrawn_items": len(artifacts.withdrawn)}

    def forget_user(self, user_id) -> dict:
        """Removes a person's stored history and profile from the running server at once, journaled so that a
        restart or a reload keeps them gone (`python -m multimodal_rec.data.forget` removes them from the data)."""
        with self._write_lock:
            artifacts = self.artifacts
            canonical = user_in(artifacts.shop_ids, user_id)
            if canonical in artifacts.forgotten:
                return {"forgotten": True, "forgotten_users": len(artifacts.forgotten)}
            if canonical not in artifacts.user_row:
                raise RequestError(404, f"unknown user id {user_id}", unknown_user_id=user_id)
            if self.journal is not None:
                self.journal.append({"op": "forget_user", "user_id": user_id})
            _forget(artifacts, canonical)
        log.info("forgot user %s", hashed_id(user_id))
        return {"forgotten": True, "forgotten_users": len(artifacts.forgotten)}

    def _replay(self, artifacts: Artifacts, encoder: NewItemEncoder) -> None:
        """The journal's additions and withdrawals, applied in order to freshly loaded artifacts; an item the
        artifacts already hold (a later export took it in) is kept as exported."""
        added = withdrawn = skipped = 0
        entries = self.journal.entries()
        self.replayed_entries = len(entries)
        for entry in entries:
            try:
                if entry["op"] == "add":
                    item = entry["item"]
                    if self._exists(artifacts, item["item_id"]):
                        skipped += 1
                        continue
                    encoded = encoder.encode(item.get("text"), item.get("image_base64"), item.get("attributes") or {})
                    _insert(artifacts, item, *encoded)
                    added += 1
                elif entry["op"] == "forget_user":
                    canonical = user_in(artifacts.shop_ids, entry["user_id"])
                    if canonical in artifacts.user_row:
                        _forget(artifacts, canonical)
                elif entry["op"] == "withdraw":
                    row = known_item_row(artifacts, entry["item_id"])  # unknown: a RequestError, skipped below
                    artifacts.withdrawn = artifacts.withdrawn | {row}
                    withdrawn += 1
                else:
                    raise KeyError(f"unknown op {entry['op']!r}")
            except (KeyError, TypeError, ValueError) as error:  # RequestError is a ValueError
                log.warning("journal entry (op %s) skipped: %s", entry.get("op"), error)  # no user ids in logs
        if added or withdrawn or skipped:
            log.info("journal %s replayed: %d items added, %d withdrawn, %d already exported", self.journal.path,
                     added, withdrawn, skipped)


def _forget(artifacts: Artifacts, user_id: int) -> None:
    """The user's row, history, profile codes and exported vector, overwritten and unreachable."""
    with artifacts.lock:
        row = artifacts.user_row.pop(user_id)
        lo, hi = artifacts.history_offsets.pop(user_id)
        artifacts.parts["histories"]["items"][lo:hi] = -1
        profiles = artifacts.parts["user_profiles"]
        profiles.categorical[row] = 0
        profiles.numeric[row] = 0
        artifacts.user_vectors[row] = 0
        artifacts.forgotten = artifacts.forgotten | {user_id}


def _insert(artifacts: Artifacts, item: dict, vector: np.ndarray, parts: np.ndarray | None) -> None:
    """Makes an encoded item searchable; the caller holds the service's write lock. A shop id gets the next
    canonical id (the journal replays additions in order, so a restart gives the same)."""
    ids, title, attributes = artifacts.shop_ids, str(item["title"]), item.get("attributes") or {}
    item_id = int(item["item_id"]) if ids is None else int(artifacts.item_ids.max(initial=0)) + 1
    row = {"item_id": item_id, "title": title, "popularity": 0, "cold": True,
           "has_image": item.get("image_base64") is not None, "has_text": bool((item.get("text") or "").strip())}
    if ids is not None:
        row["source_id"] = str(item["item_id"])
    row.update({k: v for k, v in attributes.items() if k in artifacts.catalog.columns and k not in RESERVED})
    with artifacts.lock:
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
        if item.get("image_base64"):
            artifacts.uploaded_images[item_id] = item["image_base64"]
        artifacts.item_row[item_id] = len(artifacts.item_ids) - 1  # readers now see a whole item
        if ids is not None:
            ids.item_source[item_id] = row["source_id"]
            ids.item_canonical[row["source_id"]] = item_id
