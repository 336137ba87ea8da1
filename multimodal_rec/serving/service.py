"""The service behind the endpoints: holds the artifacts in use, adds and withdraws items (journaled),
swaps in new artifacts."""

from __future__ import annotations

import base64
import logging
import threading
import time
from pathlib import Path

from multimodal_rec.serving import engine
from multimodal_rec.serving.access_log import hashed_id
from multimodal_rec.serving.artifacts import Artifacts, load_artifacts
from multimodal_rec.serving.errors import RequestError
from multimodal_rec.serving.event_store import Event, EventStore, EventStoreError
from multimodal_rec.serving.journal import Journal, JournalError
from multimodal_rec.serving.live import LiveSettings, LiveState
from multimodal_rec.serving.live_catalog import forget, insert_many
from multimodal_rec.serving.new_items import NewItemEncoder, normalized_image
from multimodal_rec.serving.query import Query, prepare_query
from multimodal_rec.serving.shop_ids import answer_out, items_in, known_item_row, known_user, user_in
from multimodal_rec.serving.stored_vectors import encoding_entry, encoding_key, stored_encoding

log = logging.getLogger(__name__)
REPLAY_BATCH = 1024  # journaled additions inserted together on a replay
Pending = tuple[Artifacts, engine.Ask]  # a read request checked on the artifacts in service, not yet answered


class RecommenderService:
    """artifacts_root: the only folders a reload may name (default: the one holding `artifacts_dir`);
    journal: where items added or withdrawn through the API are kept (None: in memory only); events: the SQLite
    file of POST /events (None: an in-memory database, gone with the process; serve.py always names a file)."""

    def __init__(self, artifacts_dir: str | Path, index_name: str | None = None,
                 artifacts_root: str | Path | None = None, journal: str | Path | None = None,
                 events: str | Path | None = None, live: LiveSettings | None = None,
                 event_weights: dict | None = None):
        self.index_name = index_name
        self.root = Path(artifacts_root or Path(artifacts_dir).resolve().parent).resolve()
        self.journal = Journal(journal) if journal else None
        self.events = EventStore(events or ":memory:")
        self.live_settings = live or LiveSettings()
        self.event_weights = dict(event_weights or {})  # event name -> weight; empty: every event weighs 1
        self.live = LiveState(self.live_settings)
        self._events_lock = threading.Lock()  # the store and the live state take a batch in the same order
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
            live = self._live_from_store(artifacts)
            self._state, self.live = (artifacts, encoder), live
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
    # Each read is checked on its own (recommend_ask, rank_ask: a 4xx concerns that request alone), then answered
    # with whatever requests arrived with it (answer: one encoder forward, search and ranker forward for all).
    def _query(self, artifacts: Artifacts, user_id, history, profile, hour) -> Query:
        """A user's stored history, + their live events since the export, + the session sent. A user the export
        does not hold is known from their first live event. Its vector, where the history encoder must run, is
        computed with the requests answered together (engine.answer_many)."""
        session = items_in(artifacts.shop_ids, history, "unknown item ids in history") if history else []
        live = [i for i in self.live.history(str(user_id)) if i in artifacts.item_row] if user_id is not None else []
        try:
            canonical = known_user(artifacts, user_id)
        except RequestError:
            if not live:
                raise
            canonical = None  # a new customer: their events are their history
        combined = live + list(session)
        return prepare_query(artifacts, canonical, combined or None, profile, hour)

    def recommend_ask(self, user_id, history, profile, hour, k, filters, exclude_seen,
                      at: float | None = None) -> Pending:
        """A /recommend request checked (4xx here) and ready to be answered (`answer`)."""
        artifacts, live = self.artifacts, self.live
        query = self._query(artifacts, user_id, history, profile, hour)
        return artifacts, engine.recommend_ask(artifacts, query, k, filters, exclude_seen, live,
                                               time.time() if at is None else at)

    def rank_ask(self, user_id, history, profile, hour, items) -> Pending:
        artifacts = self.artifacts
        query = self._query(artifacts, user_id, history, profile, hour)
        return artifacts, engine.rank_ask(artifacts, query, items_in(artifacts.shop_ids, items))

    def answer(self, pending: list[Pending]) -> list[dict | Exception]:
        """The answers of checked requests, in order, computed together for those on the same artifacts (a
        reload may have landed between two); a request whose answer failed gets its exception, alone: when a
        batch fails, each of its requests is answered again on its own."""
        results: list = [None] * len(pending)
        groups: dict[int, tuple[Artifacts, list[int]]] = {}
        for position, (artifacts, _) in enumerate(pending):
            groups.setdefault(id(artifacts), (artifacts, []))[1].append(position)
        for artifacts, positions in groups.values():
            answers = self._answer_together(artifacts, [pending[p][1] for p in positions])
            for position, answer in zip(positions, answers):
                results[position] = answer if isinstance(answer, Exception) else answer_out(artifacts.shop_ids, answer)
        return results

    @staticmethod
    def _answer_together(artifacts: Artifacts, asks: list[engine.Ask]) -> list:
        try:
            return engine.answer_many(artifacts, asks)
        except Exception as error:  # noqa: BLE001 - given to the request it concerns, found by answering alone
            if len(asks) == 1:
                return [error]
            return [RecommenderService._answer_together(artifacts, [ask])[0] for ask in asks]

    def answer_one(self, pending: Pending) -> dict:
        result = self.answer([pending])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def recommend(self, user_id, history, profile, hour, k, filters, exclude_seen, at: float | None = None) -> dict:
        return self.answer_one(self.recommend_ask(user_id, history, profile, hour, k, filters, exclude_seen, at))

    # ---- live events -------------------------------------------------------------------------------------
    def post_events(self, events: list[dict]) -> dict:
        """Stores a batch of the shop's events (committed before the answer) and applies them at once: the
        users' histories grow, the items' online counts too. Unknown items: 404 naming them, nothing stored."""
        if self.events.unavailable:
            raise RequestError(503, f"events are unavailable: {self.events.unavailable}", headers={"Retry-After": "60"})
        artifacts, now = self.artifacts, time.time()
        items = items_in(artifacts.shop_ids, [e["item_id"] for e in events], "unknown item ids in events")
        unknown = [e["item_id"] for e, i in zip(events, items) if i not in artifacts.item_row]
        if unknown:
            raise RequestError(404, f"unknown item ids in events: {unknown[:20]}", unknown_item_ids=unknown)
        if self.event_weights:
            names = sorted({e["event"] for e in events} - set(self.event_weights))
            if names:
                raise RequestError(422, f"unknown event names {names[:10]}; this shop's events: "
                                   f"{sorted(self.event_weights)}")
        stored = [Event(str(e["user_id"]), int(i), str(e["item_id"]), e["event"],
                        float(self.event_weights.get(e["event"], 1.0)), e["time"] if e["time"] is not None else now,
                        e.get("event_id")) for e, i in zip(events, items)]
        with self._events_lock:
            try:
                new = self.events.add(stored, now)
            except EventStoreError as error:
                raise RequestError(503, f"events are unavailable: {error}", headers={"Retry-After": "60"}) from error
            live = self.live
            for event, fresh in zip(stored, new):
                row = artifacts.item_row.get(event.item_id)
                if fresh and row is not None:
                    live.record(event.user_id, event.item_id, row, event.weight, event.time)
        return {"stored": sum(new), "duplicates": len(new) - sum(new)}

    def _live_from_store(self, artifacts: Artifacts) -> LiveState:
        """The live state of freshly loaded artifacts: every stored event after the export's data."""
        live = LiveState(self.live_settings)
        until = artifacts.manifest.get("events_until")
        until = float(until) if isinstance(until, (int, float)) else float("-inf")  # older exports: every event
        for event in self.events.events(after=until):
            row = artifacts.item_row.get(event.item_id)
            if row is not None:
                live.record(event.user_id, event.item_id, row, event.weight, event.time)
        if live.events:
            log.info("%d live events since the export applied from %s", live.events, self.events.path)
        return live

    def rank(self, user_id, history, profile, hour, items) -> dict:
        return self.answer_one(self.rank_ask(user_id, history, profile, hour, items))

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
        picture = normalized_image(image_base64)  # at most 1024 px a side (a larger upload is downscaled)
        item = {"item_id": item_id, "title": title, "text": text, "attributes": attributes}
        for _ in range(3):
            artifacts, encoder = self._state
            if artifacts.shop_ids is None and isinstance(item_id, str):
                raise RequestError(422, f"item ids of this catalogue are integers, got {item_id!r}")
            if self._exists(artifacts, item_id):
                raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
            # the slow part, outside the write lock (withdrawals do not wait for it); a bad image is a 422
            encoded = encoder.encode(text, picture, attributes)  # as a replay would encode it
            kept = self._keep_picture(item, picture)
            with self._write_lock:
                if self._state[0] is not artifacts:
                    continue  # reloaded meanwhile: encode again with the model now in service
                if self._exists(artifacts, item_id):
                    raise RequestError(409, f"item {item_id} already exists", item_id=item_id)
                self._journal({"op": "add", "item": kept, "encoded": encoding_entry(artifacts, *encoded)})
                insert_many(artifacts, [(kept, *encoded)], self._picture_path)
            log.info("added item %s", item_id)
            return {"item_id": item_id, "indexed": True, "items": len(artifacts.item_ids)}
        raise RequestError(503, "the artifacts were reloaded three times while the item was encoded; send it again")

    def _keep_picture(self, item: dict, picture: str | None) -> dict:
        """The item as journaled: its picture stored as a file beside the journal and named (in memory, without a
        journal)."""
        if picture is None:
            return item
        if self.journal is None:
            return {**item, "image_base64": picture}
        try:
            return {**item, "image_file": self.journal.store_picture(base64.b64decode(picture))}
        except JournalError as error:
            raise RequestError(503, f"writes are unavailable: {error.strerror or error}",
                               headers={"Retry-After": "60"}) from error

    def _picture_path(self, name) -> Path | None:
        return self.journal.picture(name) if self.journal is not None else None

    def _picture_to_encode(self, item: dict) -> str | None:
        """The item's picture as the encoder reads it (base64): inline in an older journal, or its stored file."""
        if item.get("image_base64") is not None or not item.get("image_file"):
            return item.get("image_base64")
        path = self._picture_path(item["image_file"])
        if path is None:
            log.warning("a journaled item's picture file is missing; it is encoded without its picture")
            return None
        return base64.b64encode(path.read_bytes()).decode("ascii")

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
            live_events = self._forget_events(user_id)  # their live events (and a live-only customer) go first
            try:
                canonical = user_in(artifacts.shop_ids, user_id)
            except RequestError:
                canonical = None
            if canonical in artifacts.forgotten:
                return {"forgotten": True, "forgotten_users": len(artifacts.forgotten)}
            if canonical not in artifacts.user_row:
                if live_events:
                    log.info("forgot user %s (%d live events)", hashed_id(user_id), live_events)
                    return {"forgotten": True, "forgotten_users": len(artifacts.forgotten)}
                raise RequestError(404, f"unknown user id {user_id}", unknown_user_id=user_id)
            self._journal({"op": "forget_user", "user_id": user_id})
            forget(artifacts, canonical)
        log.info("forgot user %s", hashed_id(user_id))
        return {"forgotten": True, "forgotten_users": len(artifacts.forgotten)}

    def _forget_events(self, user_id) -> int:
        """Deletes a person's live events from the store and the live state; returns how many there were."""
        key = str(user_id)
        had = len(self.live.history(key))
        if self.events.unavailable is None:
            with self._events_lock:
                try:
                    had = max(had, self.events.delete_user(key))
                except EventStoreError as error:
                    raise RequestError(503, f"the user's events could not be deleted: {error}",
                                       headers={"Retry-After": "60"}) from error
                self.live.forget(key)
        return had

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
                        encoded = encoder.encode(item.get("text"), self._picture_to_encode(item),
                                                 item.get("attributes") or {})
                    pending.append((item, *encoded))
                    pending_ids.add(str(item["item_id"]))
                    if len(pending) >= REPLAY_BATCH:
                        counts["added"] += insert_many(artifacts, pending, self._picture_path)
                        pending, pending_ids = [], set()
                    continue
                counts["added"] += insert_many(artifacts, pending, self._picture_path)  # later ops may name them
                pending, pending_ids = [], set()
                if op == "forget_user":
                    canonical = user_in(artifacts.shop_ids, entry["user_id"])
                    if canonical in artifacts.user_row:
                        forget(artifacts, canonical)
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
        counts["added"] += insert_many(artifacts, pending, self._picture_path)
        self.replayed_entries = counts["entries"]
        if counts["added"] or counts["withdrawn"] or counts["skipped"]:
            log.info("journal %s replayed: %d items added (%d with their stored vectors), %d withdrawn, %d already "
                     "exported", self.journal.path, counts["added"], counts["reused"], counts["withdrawn"],
                     counts["skipped"])
