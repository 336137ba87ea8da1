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
from multimodal_rec.serving.journal import Journal, JournalError
from multimodal_rec.serving.new_items import NewItemEncoder, normalized_image
from multimodal_rec.serving.shop_ids import answer_out, items_in, known_item_row, known_user, user_in
from multimodal_rec.serving.stored_vectors import encoding_entry, encoding_key, stored_encoding

log = logging.getLogger(__name__)
REPLAY_BATCH = 1024  # journaled additions inserted together on a replay


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
                "journal": str(self.journal.path) if self.journal else None, "writes": self.writes()}

    def writes(self) -> dict:
        """Whether writes (items, withdrawals, forgetting) can be taken now, and why not."""
        reason = self.journal.unavailable if self.journal is not None else None
        return {"available": reason is None, **({"reason": reason} if reason else {})}

    def _refuse_if_unwritable(self) -> None:
        if self.journal is not None and self.journal.unavailable:
            raise RequestError(503, f"writes are unavailable: {self.journal.unavailable}",
                               headers={"Retry-After": "60"})

    def _journal(self, entry: dict) -> None:
        """Journals a write before it takes effect; 503 with the reason when the journal cannot take it."""
        if self.journal is None:
            return
        self._refuse_if_unwritable()
        try:
            self.journal.append(entry)
        except JournalError as error:
            raise RequestError(503, f"writes are unavailable: {error.strerror or error}",
                               headers={"Retry-After": "60"}) from error

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
        self._refuse_if_unwritable()  # before the encoders' work
        item = {"item_id": item_id, "title": title, "text": text, "image_base64": normalized_image(image_base64),
                "attributes": attributes}
        for _ in range(3):
            artifacts, encoder = self._state
            if artifacts.shop_ids is None and isinstance(item_id, str):
                raise RequestError(422, f"item ids of this catalogue are integers, got {item_id!r}")
            if self._exists(artifacts, item_id):
                raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
            # the slow part, outside the write lock (withdrawals do not wait for it); a bad image is a 422
            encoded = encoder.encode(text, item["image_base64"], attributes)  # as a replay would encode it
            with self._write_lock:
                if self._state[0] is not artifacts:
                    continue  # reloaded meanwhile: encode again with the model now in service
                if self._exists(artifacts, item_id):
                    raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
                self._journal({"op": "add", "item": item, "encoded": encoding_entry(artifacts, *encoded)})
                _insert_many(artifacts, [(item, *encoded)])
            log.info("added item %s", item_id)
            return {"item_id": item_id, "indexed": True, "items": len(artifacts.item_ids)}
        raise RequestError(503, "the artifacts were reloaded three times while the item was encoded; send it again")

    def withdraw_item(self, item_id) -> dict:
        """The item is no longer recommended (nor ranked, nor similar to anything); histories may still name it."""
        with self._write_lock:
            artifacts = self.artifacts
            row = known_item_row(artifacts, item_id)
            if row not in artifacts.withdrawn:
                self._journal({"op": "withdraw", "item_id": item_id})
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
            self._journal({"op": "forget_user", "user_id": user_id})
            _forget(artifacts, canonical)
        log.info("forgot user %s", hashed_id(user_id))
        return {"forgotten": True, "forgotten_users": len(artifacts.forgotten)}

    def _replay(self, artifacts: Artifacts, encoder: NewItemEncoder) -> None:
        """The journal's additions and withdrawals, applied in order to freshly loaded artifacts; an item the
        artifacts already hold (a later export took it in) is kept as exported. The journal is read line by
        line; an addition keeps the vector it was encoded to, reused while the model is the same (a reload of
        another model encodes it again), and additions are inserted in batches, not one array copy each."""
        counts = {"added": 0, "reused": 0, "withdrawn": 0, "skipped": 0, "entries": 0}
        model, pending, pending_ids = encoding_key(artifacts), [], set()
        for entry in self.journal.entries():
            counts["entries"] += 1
            op = entry.get("op")
            try:
                if op == "add":
                    item = entry["item"]
                    if self._exists(artifacts, item["item_id"]) or str(item["item_id"]) in pending_ids:
                        counts["skipped"] += 1
                        continue
                    encoded = stored_encoding(entry.get("encoded"), model, artifacts)
                    counts["reused"] += encoded is not None
                    if encoded is None:
                        encoded = encoder.encode(item.get("text"), item.get("image_base64"),
                                                 item.get("attributes") or {})
                    pending.append((item, *encoded))
                    pending_ids.add(str(item["item_id"]))
                    if len(pending) >= REPLAY_BATCH:
                        counts["added"] += _insert_many(artifacts, pending)
                        pending, pending_ids = [], set()
                    continue
                counts["added"] += _insert_many(artifacts, pending)  # in order: later ops may name them
                pending, pending_ids = [], set()
                if op == "forget_user":
                    canonical = user_in(artifacts.shop_ids, entry["user_id"])
                    if canonical in artifacts.user_row:
                        _forget(artifacts, canonical)
                elif op == "withdraw":
                    row = known_item_row(artifacts, entry["item_id"])  # unknown: a RequestError, skipped below
                    artifacts.withdrawn = artifacts.withdrawn | {row}
                    counts["withdrawn"] += 1
                else:
                    raise KeyError(f"unknown op {str(op)[:40]!r}")
            except (KeyError, TypeError, ValueError) as error:  # RequestError is a ValueError
                # the op and the kind of error only: a forgotten user's id must not reach the logs
                log.warning("journal entry %d (op %s) skipped: %s", counts["entries"], str(op)[:40],
                            type(error).__name__)
        counts["added"] += _insert_many(artifacts, pending)
        self.replayed_entries = counts["entries"]
        if counts["added"] or counts["withdrawn"] or counts["skipped"]:
            log.info("journal %s replayed: %d items added (%d with their stored vectors), %d withdrawn, %d already "
                     "exported", self.journal.path, counts["added"], counts["reused"], counts["withdrawn"],
                     counts["skipped"])


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


def _insert_many(artifacts: Artifacts, encoded: list[tuple[dict, np.ndarray, np.ndarray | None]]) -> int:
    """Makes encoded items searchable, in one copy of each array; the caller holds the service's write lock;
    returns how many. A shop id gets the next canonical id (the journal replays additions in order, so a
    restart gives the same)."""
    if not encoded:
        return 0
    ids = artifacts.shop_ids
    next_id = int(artifacts.item_ids.max(initial=0)) + 1
    rows, item_ids = [], []
    for number, (item, _, _) in enumerate(encoded):
        item_id = int(item["item_id"]) if ids is None else next_id + number
        row = {"item_id": item_id, "title": str(item["title"]), "popularity": 0, "cold": True,
               "has_image": item.get("image_base64") is not None,
               "has_text": bool((item.get("text") or "").strip())}
        if ids is not None:
            row["source_id"] = str(item["item_id"])
        row.update({k: v for k, v in (item.get("attributes") or {}).items()
                    if k in artifacts.catalog.columns and k not in RESERVED})
        rows.append(row)
        item_ids.append(item_id)
    new_ids = np.asarray(item_ids, dtype=np.int64)
    vectors = np.stack([vector for _, vector, _ in encoded]).astype(np.float32)
    with artifacts.lock:
        artifacts.index.add(new_ids, vectors)
        artifacts.item_vectors = np.concatenate([artifacts.item_vectors, vectors])
        if artifacts.modality_parts is not None:
            blank = np.zeros_like(artifacts.modality_parts[0])
            extra = np.stack([parts if parts is not None else blank for _, _, parts in encoded])
            artifacts.modality_parts = np.concatenate([artifacts.modality_parts, extra.astype(blank.dtype)])
        columns = {c for row in rows for c in row}
        addition = pd.DataFrame(rows).astype({c: artifacts.catalog[c].dtype for c in columns
                                              if c in artifacts.catalog and c != "title"}, errors="ignore")
        artifacts.catalog = pd.concat([artifacts.catalog, addition], ignore_index=True)
        artifacts.titles = np.append(artifacts.titles, np.array([r["title"] for r in rows], dtype=object))
        first = len(artifacts.item_ids)
        artifacts.item_ids = np.append(artifacts.item_ids, new_ids)
        for number, (item, _, _) in enumerate(encoded):
            if item.get("image_base64"):
                artifacts.uploaded_images[item_ids[number]] = item["image_base64"]
            if ids is not None:
                ids.item_source[item_ids[number]] = rows[number]["source_id"]
                ids.item_canonical[rows[number]["source_id"]] = item_ids[number]
            artifacts.item_row[item_ids[number]] = first + number  # readers now see a whole item
    return len(encoded)
