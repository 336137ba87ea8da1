"""Loads an artifact folder (export + index + serving parts) once, and checks that its pieces agree."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from multimodal_rec import embeddings as emb
from multimodal_rec.serving.model_files import ArtifactsError, load_parts, read_config
from multimodal_rec.serving.parts import CATALOG_FILE, MODALITY_PARTS_FILE, USERS_FILE
from multimodal_rec.serving.shop_ids import ShopIds

log = logging.getLogger(__name__)


class ExactIndex:
    """Exact inner-product search with external ids: used when the folder holds no built index."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray):
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
        self.manifest = {"name": "exact (in memory)", "recall@10": 1.0}

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))


@dataclass
class Artifacts:
    root: Path
    manifest: dict
    parts: dict
    catalog: pd.DataFrame  # one row per item, in the order of `item_ids`
    item_ids: np.ndarray  # (N,) int64 external ids
    item_vectors: np.ndarray  # (N, dim) float32, as exported: unit tower vectors (+ the item-bias column)
    user_ids: np.ndarray
    user_vectors: np.ndarray
    modality_parts: np.ndarray | None  # (N, M, d) float16
    index: object
    titles: np.ndarray = None  # (N,) object: catalogue titles, for answers without a pandas lookup
    item_row: dict = field(default_factory=dict)  # external item id -> row
    user_row: dict = field(default_factory=dict)
    history_offsets: dict = field(default_factory=dict)  # external user id -> (lo, hi) in parts histories
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards the index and arrays on writes
    withdrawn: frozenset = frozenset()  # rows of items withdrawn through the API: never recommended
    uploaded_images: dict = field(default_factory=dict)  # item id -> base64 image of items added through the API
    forgotten: frozenset = frozenset()  # user ids forgotten through the API (DELETE /users/{id})
    shop_ids: ShopIds | None = None  # the shop's own ids (data=tabular); None: requests use the int ids

    @property
    def dim(self) -> int:
        """Width of the exported vectors the index searches."""
        return int(self.manifest["dim"])

    @property
    def item_dim(self) -> int:
        """Width of the towers' vectors: `dim` less the bias column when the model has item biases."""
        return int(self.parts.get("item_dim", self.dim))

    @property
    def score(self) -> str:
        """How retrieval scores: "cosine" (unit vectors) or "dot"; artifacts from before the choice: cosine."""
        return str(self.parts.get("score", "cosine"))

    def tower_vectors(self, rows: np.ndarray) -> np.ndarray:
        """(R, item_dim) item vectors as the towers give them (no bias column; unit for cosine): history
        inputs, item-item similarity, ranker."""
        return self.item_vectors[rows, : self.item_dim]

    def user_history(self, user_id: int) -> np.ndarray:
        lo, hi = self.history_offsets[user_id]
        return self.parts["histories"]["items"][lo:hi]

    def rows(self, ids) -> tuple[np.ndarray, list]:
        """(rows of the known ids, the unknown ids)."""
        rows = [self.item_row.get(int(i), -1) for i in ids]
        unknown = [int(i) for i, r in zip(ids, rows) if r < 0]
        return np.asarray([r for r in rows if r >= 0], dtype=np.int64), unknown


def _find_index(root: Path, name: str | None, dim: int, fingerprint: str):
    folders = sorted(p for p in root.glob("index-*") if p.is_dir())
    if name:
        folders = [p for p in folders if p.name == f"index-{name}"]
        if not folders:
            raise ArtifactsError(f"{root} has no index-{name}/ (build it with python -m multimodal_rec.index "
                                 f"embeddings={root} index={name})")
    if not folders:
        return None
    if len(folders) > 1:
        raise ArtifactsError(f"{root} holds several indexes ({[p.name for p in folders]}); choose one with index=")
    from multimodal_rec.index import load_index

    return load_index(folders[0], expect_dim=dim, expect_fingerprint=fingerprint)


def load_artifacts(root: str | Path, index_name: str | None = None) -> Artifacts:
    root = Path(root)
    if not root.is_dir():
        raise ArtifactsError(f"artifact folder {root} does not exist")
    manifest = emb.load_manifest(root)
    config = read_config(root)  # refuses an old pickled model.pt before anything else is read
    if not (root / CATALOG_FILE).is_file():
        raise ArtifactsError(f"{root} lacks {CATALOG_FILE}: export with serving_parts=true")
    for key in ("checkpoint_sha256", "data_fingerprint", "dim"):
        if config.get(key) != manifest[key]:
            raise ArtifactsError(f"the serving parts and the embeddings disagree on {key}: {config.get(key)} vs "
                                 f"{manifest[key]}")
    parts = load_parts(root, config)
    item_ids, item_vectors = emb.read_embeddings(root, "items")
    user_ids, user_vectors = emb.read_embeddings(root, "users")
    catalog = pd.read_parquet(root / CATALOG_FILE)
    if not np.array_equal(catalog["item_id"].to_numpy(np.int64), item_ids):
        raise ArtifactsError(f"{CATALOG_FILE} does not list the exported items in their order")
    modality_parts = None
    if (root / MODALITY_PARTS_FILE).is_file():
        modality_parts = np.load(root / MODALITY_PARTS_FILE)
        if modality_parts.shape[0] != len(item_ids):
            raise ArtifactsError(f"{MODALITY_PARTS_FILE} has {modality_parts.shape[0]} rows for {len(item_ids)} items")
    index = _find_index(root, index_name, manifest["dim"], manifest["data_fingerprint"])
    if index is None:
        log.info("no index-*/ in %s: serving with exact search in memory", root)
        index = ExactIndex(item_ids, item_vectors)
    elif index.ntotal != len(item_ids):
        raise ArtifactsError(f"the index holds {index.ntotal} vectors but the export {len(item_ids)}")
    histories = parts["histories"]
    offsets = histories["offsets"]
    artifacts = Artifacts(root, manifest, parts, catalog, item_ids, item_vectors, user_ids, user_vectors,
                          modality_parts, index)
    artifacts.titles = catalog["title"].astype(str).to_numpy(object)
    if "withdrawn" in catalog:  # an export that took in the serving journal
        artifacts.withdrawn = frozenset(np.flatnonzero(catalog["withdrawn"].to_numpy(bool)).tolist())
    artifacts.item_row = {int(i): r for r, i in enumerate(item_ids)}
    artifacts.user_row = {int(u): r for r, u in enumerate(user_ids)}
    artifacts.history_offsets = {int(u): (int(offsets[r]), int(offsets[r + 1]))
                                 for r, u in enumerate(histories["user_ids"])}
    if "source_id" in catalog:
        users_file = root / USERS_FILE
        artifacts.shop_ids = ShopIds.from_tables(catalog, pd.read_parquet(users_file) if users_file.is_file() else None)
    log.info("loaded %s: %d items, %d users, index %s", root, len(item_ids), len(user_ids),
             index.manifest.get("name"))
    return artifacts
