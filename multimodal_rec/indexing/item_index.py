"""The index folder and the live item index that serving searches (and adds cold-start items to).

  index.faiss    the factory index, inner product, holding the external item ids (IVF natively, else IndexIDMap2)
  ids.npy        (n,) int64, the item ids in the order of vectors.npy
  vectors.npy    (n, d) float32, the exact vectors (memory-mapped on load): `reconstruct` by id
  manifest.json  written last; sha256 of every file, dim, data fingerprint, measured recall@10
"""

from __future__ import annotations

import threading
from pathlib import Path

import faiss
import numpy as np

from multimodal_rec.embeddings import MAX_DIM, EmbeddingsError, checked_int, load_json, load_npy, sha256_file

INDEX_FORMAT = "multimodal_rec.index/1"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
VECTORS_FILE = "vectors.npy"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (INDEX_FILE, IDS_FILE, VECTORS_FILE)
MAX_SEARCH_PARAM = 1 << 16


class IndexLoadError(EmbeddingsError):
    """An index folder that cannot be served; the message says what and where."""


def wrap_ids(index: faiss.Index) -> faiss.Index:
    """An IVF index keeps external ids in its lists; others get an IndexIDMap2 (an IVF one would add 8 B/vector)."""
    return index if faiss.try_extract_index_ivf(index) is not None else faiss.IndexIDMap2(index)


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Applies nprobe (IVF) / ef_search (HNSW) from `params` to an index as `wrap_ids` made it."""
    inner = _inner(index)
    if params.get("nprobe") is not None and faiss.try_extract_index_ivf(inner) is not None:
        faiss.extract_index_ivf(inner).nprobe = int(params["nprobe"])
    if params.get("ef_search") is not None and hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = int(params["ef_search"])


def _search_parameters(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Per-call parameters carrying `selector`; they replace the index's own nprobe/efSearch, so copy those."""
    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe)
    if hasattr(inner, "hnsw"):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=inner.hnsw.efSearch)
    return faiss.SearchParameters(sel=selector)


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"queries must be (B, {dim}) float32, got shape {queries.shape}")
    return queries


class ItemIndex:
    """Search by inner product over the built index plus items added at runtime.

    The built index stays immutable (HNSW cannot remove ids); `add` puts new or replaced items in a
    small exact IndexIDMap2(Flat) "delta" and hides replaced ids of the built index with an ID
    selector, so an id always maps to its latest vector. Search merges both by score.
    """

    def __init__(self, index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, manifest: dict):
        self.index = index
        self.manifest = manifest
        self.dim = int(index.d)
        self._ids = ids
        self._vectors = vectors
        self._order = np.argsort(ids, kind="stable")  # id -> row of vectors.npy, by binary search
        self._delta = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        self._delta_ids: set[int] = set()
        self._hidden = np.empty(0, dtype=np.int64)  # built-index ids replaced by the delta
        self._params = None  # (SearchParameters, selectors it points to): kept together so SWIG objects live
        self._lock = threading.Lock()

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - len(self._hidden) + int(self._delta.ntotal)

    def _rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id in vectors.npy, -1 where the built index does not hold it."""
        if not len(self._ids):
            return np.full(len(item_ids), -1, dtype=np.int64)
        where = np.minimum(np.searchsorted(self._ids, item_ids, sorter=self._order), len(self._ids) - 1)
        rows = self._order[where]
        return np.where(self._ids[rows] == item_ids, rows, -1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (B, k) float32, item ids (B, k) int64), best first; id -1 and score -inf pad short rows."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = _as_queries(queries, self.dim)
        with self._lock:  # one consistent view: the delta and the hidden ids of the same moment
            params = self._params
            delta = self._delta.search(queries, k) if self._delta.ntotal else None
        scores, ids = self.index.search(queries, k, params=params[0] if params else None)
        if delta is not None:
            scores, ids = np.hstack([scores, delta[0]]), np.hstack([ids, delta[1]])
        scores = np.where(ids < 0, -np.inf, scores).astype(np.float32)
        if scores.shape[1] > k:
            top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
        return scores, ids

    def add(self, item_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Adds items (or replaces the vector of ids already there); searchable as soon as this returns."""
        item_ids = np.ascontiguousarray(item_ids, dtype=np.int64).reshape(-1)
        vectors = _as_queries(vectors, self.dim)
        if len(vectors) != len(item_ids):
            raise ValueError(f"{len(item_ids)} ids for {len(vectors)} vectors")
        if len(np.unique(item_ids)) != len(item_ids):
            raise ValueError("item ids to add must be distinct")
        with self._lock:
            self._delta.remove_ids(faiss.IDSelectorBatch(item_ids))
            self._delta.add_with_ids(vectors, item_ids)
            self._delta_ids.update(item_ids.tolist())
            built = item_ids[self._rows(item_ids) >= 0]
            if len(np.setdiff1d(built, self._hidden)):
                self._hidden = np.union1d(self._hidden, built)
                batch = faiss.IDSelectorBatch(self._hidden)
                exclude = faiss.IDSelectorNot(batch)
                self._params = (_search_parameters(self.index, exclude), exclude, batch)

    def set_search(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Changes the search-time settings (IVF nprobe, HNSW efSearch) of the built index."""
        with self._lock:
            set_search_params(self.index, {"nprobe": nprobe, "ef_search": ef_search})
            if self._params is not None:
                self._params = (_search_parameters(self.index, self._params[1]), *self._params[1:])

    def reconstruct(self, item_id: int) -> np.ndarray:
        """The (d,) float32 vector of an item (its latest, if added at runtime); KeyError if absent."""
        item_id = int(item_id)
        with self._lock:
            if item_id in self._delta_ids:
                return self._delta.reconstruct(item_id)
        row = int(self._rows(np.array([item_id], dtype=np.int64))[0])
        if row < 0:
            raise KeyError(f"item {item_id} is not in the index")
        return np.array(self._vectors[row], dtype=np.float32)


def read_index_manifest(index_dir: str | Path) -> dict:
    """The index manifest, with what loading sizes things by checked (dim, ntotal, files, search params)."""
    path = Path(index_dir) / MANIFEST_FILE
    if not path.is_file():
        raise IndexLoadError(f"{index_dir} is not a complete index folder: {MANIFEST_FILE} is missing")
    try:
        manifest = load_json(path)
    except EmbeddingsError as error:
        raise IndexLoadError(str(error)) from error
    if manifest.get("format") != INDEX_FORMAT:
        raise IndexLoadError(f"{path}: format {str(manifest.get('format'))[:80]!r} is not {INDEX_FORMAT!r}")
    try:
        checked_int(manifest.get("dim"), f"{path}: dim", 1, MAX_DIM)
        checked_int(manifest.get("ntotal"), f"{path}: ntotal")
        params, files = manifest.get("params"), manifest.get("files")
        if not isinstance(params, dict) or not isinstance(files, dict) or not all(
                isinstance(files.get(name), dict) for name in DATA_FILES):
            raise EmbeddingsError(f"{path} lacks the params or the record of its files")
        for key in ("nprobe", "ef_search"):  # search cost grows with them: a crafted 10**12 would never answer
            if params.get(key) is not None:
                checked_int(params[key], f"{path}: {key}", 1, MAX_SEARCH_PARAM)
    except EmbeddingsError as error:
        raise IndexLoadError(str(error)) from error
    return manifest


def load_index(index_dir: str | Path, expect_dim: int | None = None,
               expect_fingerprint: str | None = None) -> ItemIndex:
    """Loads and checks an index folder: every file against its sha256, then dimension, fingerprint, size."""
    root = Path(index_dir)
    manifest = read_index_manifest(root)
    if expect_dim is not None and manifest["dim"] != expect_dim:
        raise IndexLoadError(f"{root}: the index has dimension {manifest['dim']}, expected {expect_dim}")
    if expect_fingerprint is not None and manifest["data_fingerprint"] != expect_fingerprint:
        raise IndexLoadError(f"{root}: the index was built from data {manifest['data_fingerprint']!r}, "
                             f"expected {expect_fingerprint!r} (rebuild it from the current embeddings)")
    for name in DATA_FILES:
        path, record = root / name, manifest["files"][name]
        if not path.is_file():
            raise IndexLoadError(f"{root}: {name} is missing")
        if not path.resolve().is_relative_to(root.resolve()):
            raise IndexLoadError(f"{path} leads out of {root} (a symbolic link)")
        if sha256_file(path) != record.get("sha256"):
            raise IndexLoadError(f"{path} is corrupt: its sha256 does not match the manifest")
    try:
        index = faiss.read_index(str(root / INDEX_FILE))
    except RuntimeError as error:
        raise IndexLoadError(f"{root / INDEX_FILE} cannot be read by faiss: {error}") from error
    with_ids = isinstance(index, faiss.IndexIDMap2) or faiss.try_extract_index_ivf(index) is not None
    if not with_ids or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexLoadError(f"{root / INDEX_FILE} is not an inner-product index with ids (IndexIDMap2 or IVF)")
    if index.d != manifest["dim"] or index.ntotal != manifest["ntotal"]:
        raise IndexLoadError(f"{root / INDEX_FILE} holds {index.ntotal} x {index.d} vectors, "
                             f"the manifest says {manifest['ntotal']} x {manifest['dim']}")
    try:  # headers checked against the files' sizes first; no pickles
        ids, vectors = load_npy(root / IDS_FILE), load_npy(root / VECTORS_FILE, mmap_mode="r")
    except EmbeddingsError as error:
        raise IndexLoadError(str(error)) from error
    if (ids.shape != (index.ntotal,) or vectors.shape != (index.ntotal, index.d) or ids.dtype != np.int64
            or vectors.dtype != np.float32):
        raise IndexLoadError(f"{root}: ids {ids.shape} {ids.dtype} / vectors {vectors.shape} {vectors.dtype} do not "
                             f"match the index ({index.ntotal} x {index.d}; int64 / float32)")
    set_search_params(index, manifest["params"])
    return ItemIndex(index, ids, vectors, manifest)
