"""Loads an artifact folder (export + index + serving parts) once, and checks that its pieces agree.

Whoever can write the artifacts root can craft a folder; loading one must not crash, hang, fetch or reach
outside it. So every file is checked against the size and sha256 the export recorded in manifest.json,
every declared size against the files before it is allocated (model_files.py, embeddings.py), and what a
crafted file still makes a reader raise becomes an ArtifactsError that names the file, in one line: a
422 from POST /admin/reload, exit 2 from serve.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
from safetensors import SafetensorError

from multimodal_rec import embeddings as emb
from multimodal_rec.serving.model_files import CONFIG_FILE, WEIGHTS_FILE, ArtifactsError, load_parts, read_config
from multimodal_rec.serving.parts import CATALOG_FILE, MODALITY_PARTS_FILE, SERVING_FILES, USERS_FILE
from multimodal_rec.serving.shop_ids import ShopIds

log = logging.getLogger(__name__)

REEXPORT = "re-export it: python -m multimodal_rec.export ckpt_path=<run or checkpoint> out={root}"
# what crafted content makes the readers raise besides our own refusals; anything else is a bug and stays one
CONTENT_ERRORS = (KeyError, TypeError, IndexError, ValueError, AttributeError, RecursionError, ArithmeticError,
                  MemoryError, RuntimeError, OSError, pa.ArrowException, SafetensorError)
BOOL, TEXT = pa.types.is_boolean, (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t))
CATALOG_COLUMNS = {"item_id": pa.types.is_int64, "title": TEXT, "popularity": pa.types.is_integer, "cold": BOOL,
                   "has_image": BOOL, "has_text": BOOL}
OPTIONAL_COLUMNS = {"image": lambda t: TEXT(t) or pa.types.is_null(t), "withdrawn": BOOL, "source_id": TEXT}


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
    if not folders[0].resolve().is_relative_to(root.resolve()):
        raise ArtifactsError(f"{folders[0]} leads out of {root} (a symbolic link); an index must lie in the folder")
    from multimodal_rec.index import load_index

    with _reading(folders[0]):
        return load_index(folders[0], expect_dim=dim, expect_fingerprint=fingerprint)


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """What a crafted `path` makes a reader raise, as a one-line ArtifactsError that names it."""
    try:
        yield
    except ArtifactsError:
        raise
    except emb.EmbeddingsError as error:  # the embeddings' and index's own refusals: already one line
        raise ArtifactsError(" ".join(str(error).split())) from error
    except CONTENT_ERRORS as error:
        reason = " ".join(str(error).split())[:300]
        raise ArtifactsError(f"{path} cannot be served ({type(error).__name__}: {reason})") from error


def _verify_files(root: Path, manifest: dict) -> None:
    """Each serving file is the one the export recorded in the manifest (size, then sha256) and lies in the
    folder; a folder exported before the records existed is refused with the command that re-exports it."""
    records, again = manifest.get("files"), REEXPORT.format(root=root)
    if not isinstance(records, dict):
        raise ArtifactsError(f"{root / emb.MANIFEST_FILE} records no checksums of the serving files (exported by an "
                             f"older version); {again}")
    for name in SERVING_FILES:
        path = root / name
        if name not in records:
            if path.exists():
                raise ArtifactsError(f"{path} is not recorded in {emb.MANIFEST_FILE}, so the export did not write "
                                     f"it; {again}")
            continue
        if path.exists() and not path.resolve().is_relative_to(root.resolve()):
            raise ArtifactsError(f"{path} leads out of {root} (a symbolic link); {again}")
        with _reading(path):
            emb.check_file(path, records[name], again)


def _read_table(path: Path, rows: int | None, columns: dict, optional: dict) -> pd.DataFrame:
    """A Parquet table with the columns (name -> type test) serving reads, no larger decoded than its file allows."""
    table = emb.read_parquet(path, path.stat().st_size * emb.MAX_EXPANSION + emb.READ_SLACK, rows)
    for name, fits in {**columns, **optional}.items():
        if name not in table.column_names:
            if name in columns:
                raise ArtifactsError(f"{path} lacks the column {name!r}")
        elif not fits(table.schema.field(name).type) or (name in columns and table.column(name).null_count):
            raise ArtifactsError(f"{path}: column {name!r} is {table.schema.field(name).type} with "
                                 f"{table.column(name).null_count} missing values, not what the export writes")
    return table.to_pandas()


def _modality_parts(path: Path, shape: tuple) -> np.ndarray | None:
    if not path.is_file():
        return None
    found, dtype = emb.npy_header(path)  # refuses pickles and sizes the file does not hold, before reading
    if found != shape or dtype != np.float16:
        raise ArtifactsError(f"{path} is {found} {dtype}, expected {shape} float16")
    return np.load(path, allow_pickle=False)


def image_folder(root: Path, image_root) -> str | None:
    """model.json's `image_root` (the data folder the export was made from), kept only where it lies in the
    artifact folder or in the tree the artifacts root sits in: the parent of the folder holding `root` (e.g. the
    project holding artifacts/ and data/), unless that is a filesystem root. Anything else ("/", /etc, another
    user's home) is dropped with a warning: model.json is written by whoever can write the artifacts root, so it
    must not open other folders to GET /items/{id}/image. serve.yaml's image_root is the operator's and is used
    as it is; a relative one in model.json is taken from the artifact folder."""
    if image_root is None:
        return None
    folder = root.resolve()
    tree = folder.parent.parent
    allowed = [folder] if tree == Path(tree.anchor) else [folder, tree]
    try:
        resolved = (folder / image_root).resolve()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a symlink loop
        resolved = None
    if resolved is not None and any(resolved.is_relative_to(place) for place in allowed):
        return str(resolved)
    log.warning("%s: model.json's image_root %.200r lies outside %s, so pictures are not read from it; set "
                "image_root in serve.yaml to serve them", root, image_root, " or ".join(map(str, allowed)))
    return None


def load_artifacts(root: str | Path, index_name: str | None = None) -> Artifacts:
    """The folder's artifacts, or an ArtifactsError (one line, naming the file) for a folder that cannot be served:
    incomplete, stale, corrupt or crafted."""
    root = Path(root)
    if not root.is_dir():
        raise ArtifactsError(f"artifact folder {root} does not exist")
    with _reading(root / emb.MANIFEST_FILE):
        manifest = emb.load_manifest(root)
        for key in ("checkpoint_sha256", "data_fingerprint", "dim", "shards"):
            if key not in manifest:
                raise ArtifactsError(f"{root / emb.MANIFEST_FILE} lacks {key!r}; {REEXPORT.format(root=root)}")
    with _reading(root / CONFIG_FILE):
        config = read_config(root)  # refuses an old pickled model.pt, foreign classes, hub models: nothing is built
    if not (root / CATALOG_FILE).is_file():
        raise ArtifactsError(f"{root} lacks {CATALOG_FILE}: export with serving_parts=true")
    _verify_files(root, manifest)
    for key in ("checkpoint_sha256", "data_fingerprint", "dim"):
        if config.get(key) != manifest[key]:
            raise ArtifactsError(f"the serving parts and the embeddings disagree on {key}: {str(config.get(key))[:80]} "
                                 f"vs {str(manifest[key])[:80]}")
    with _reading(root / WEIGHTS_FILE):
        parts = load_parts(root, config)
    with _reading(root / "items"):
        item_ids, item_vectors = emb.read_embeddings(root, "items")
    with _reading(root / "users"):
        user_ids, user_vectors = emb.read_embeddings(root, "users")
    histories = parts["histories"]
    if len(np.unique(item_ids)) != len(item_ids) or len(np.unique(user_ids)) != len(user_ids):
        raise ArtifactsError(f"{root}: the exported item or user ids are not unique")
    if not np.array_equal(histories["user_ids"], user_ids) or parts["n_items"] > len(item_ids):
        raise ArtifactsError(f"{root}: {WEIGHTS_FILE} holds the histories of other users, or more items than exported")
    with _reading(root / CATALOG_FILE):
        catalog = _read_table(root / CATALOG_FILE, len(item_ids), CATALOG_COLUMNS, OPTIONAL_COLUMNS)
    if not np.array_equal(catalog["item_id"].to_numpy(np.int64), item_ids):
        raise ArtifactsError(f"{CATALOG_FILE} does not list the exported items in their order")
    with _reading(root / MODALITY_PARTS_FILE):
        shape = (len(item_ids), len(parts.get("part_names", parts["modalities"])), parts.get("item_dim", parts["dim"]))
        modality_parts = _modality_parts(root / MODALITY_PARTS_FILE, shape)
    index = _find_index(root, index_name, manifest["dim"], manifest["data_fingerprint"])
    if index is None:
        log.info("no index-*/ in %s: serving with exact search in memory", root)
        index = ExactIndex(item_ids, item_vectors)
    elif index.ntotal != len(item_ids):
        raise ArtifactsError(f"the index holds {index.ntotal} vectors but the export {len(item_ids)}")
    parts["image_root"] = image_folder(root, parts.get("image_root"))
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
        with _reading(users_file):
            users = _read_table(users_file, None, {"user_id": pa.types.is_int64, "source_id": TEXT}, {}) if (
                users_file.is_file()) else None
            artifacts.shop_ids = ShopIds.from_tables(catalog, users)
    log.info("loaded %s: %d items, %d users, index %s", root, len(item_ids), len(user_ids),
             index.manifest.get("name"))
    return artifacts
