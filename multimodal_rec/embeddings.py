"""The embeddings folder: what `export` writes and `index`/serving read.

  manifest.json              written last: its presence means the export is complete
  items/part-00000.parquet   columns: item_id (int64), vector (fixed-size list of float32 or float16)
  users/part-00000.parquet   columns: user_id (int64), vector
  progress.json              while an export runs: the shards already written (for resuming)

Shards are written atomically (temp file + rename), so a killed export never leaves a half-written
shard that looks whole; the manifest lists every shard with its row count and sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FORMAT = "multimodal_rec.embeddings/1"
MANIFEST_FILE = "manifest.json"
PROGRESS_FILE = "progress.json"
KINDS = {"items": "item_id", "users": "user_id"}


class EmbeddingsError(ValueError):
    """An embeddings folder (or index) that cannot be used; the message says what and where."""


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_file(path: str | Path) -> Iterator[str]:
    """Yields a temp path beside `path`; once the block succeeds it becomes `path` (readable by all) in one
    rename, and a failure leaves no half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str | Path, payload: dict) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as out:
        json.dump(payload, out, indent=2)


def load_json(path: str | Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise EmbeddingsError(f"{path} is not valid JSON: {error}") from error


def shard_name(kind: str, number: int) -> str:
    return f"{kind}/part-{number:05d}.parquet"


def write_shard(root: str | Path, kind: str, number: int, ids: np.ndarray, vectors: np.ndarray,
                dtype: str = "float32") -> dict:
    """Writes one shard atomically; returns its manifest entry {"file", "rows", "sha256"}."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.dtype(dtype))
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"vectors must be (n, d) with n = len(ids) = {len(ids)}, got {vectors.shape}")
    values = pa.array(vectors.reshape(-1), type=pa.from_numpy_dtype(vectors.dtype))
    table = pa.table({KINDS[kind]: pa.array(np.asarray(ids, dtype=np.int64)),
                      "vector": pa.FixedSizeListArray.from_arrays(values, vectors.shape[1])})
    with atomic_file(Path(root) / shard_name(kind, number)) as tmp:
        pq.write_table(table, tmp)
        entry = {"file": shard_name(kind, number), "rows": len(ids), "sha256": sha256_file(tmp)}
    return entry


def load_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        hint = " (an export was started but did not finish: run it again to resume)" if (
            root / PROGRESS_FILE).is_file() else ""
        raise EmbeddingsError(f"{root} is not a complete embeddings folder: {MANIFEST_FILE} is missing{hint}")
    manifest = load_json(path)
    if manifest.get("format") != FORMAT:
        raise EmbeddingsError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest


def read_shard(root: str | Path, entry: dict, dim: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, vectors (n, d) float32) of one shard, checked against its manifest entry."""
    path = Path(root) / entry["file"]
    if not path.is_file():
        raise EmbeddingsError(f"shard {path} listed in the manifest is missing")
    if verify and sha256_file(path) != entry["sha256"]:
        raise EmbeddingsError(f"shard {path} is corrupt: its sha256 does not match the manifest")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise EmbeddingsError(f"shard {path} cannot be read: {error}") from error
    id_column = "item_id" if "item_id" in table.column_names else "user_id"
    column = table.column("vector").combine_chunks()
    if column.type.list_size != dim or len(table) != entry["rows"]:
        raise EmbeddingsError(f"shard {path} holds {len(table)} x {column.type.list_size} vectors, "
                              f"the manifest says {entry['rows']} x {dim}")
    vectors = column.values.to_numpy(zero_copy_only=False).reshape(len(table), dim).astype(np.float32, copy=False)
    return table.column(id_column).to_numpy(), vectors


def iter_embeddings(root: str | Path, kind: str = "items", verify: bool = True) -> Iterator[tuple[np.ndarray,
                                                                                                  np.ndarray]]:
    """Streams (ids, vectors) shard by shard: bounded memory for catalogues that do not fit."""
    manifest = load_manifest(root)
    if kind not in manifest.get("shards", {}):
        raise EmbeddingsError(f"{root} has no {kind} embeddings")
    for entry in manifest["shards"][kind]:
        yield read_shard(root, entry, manifest["dim"], verify)


def read_embeddings(root: str | Path, kind: str = "items", verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All (ids (n,), vectors (n, d) float32 contiguous) of one kind."""
    manifest = load_manifest(root)
    parts = list(iter_embeddings(root, kind, verify))
    if not parts:
        return np.empty(0, dtype=np.int64), np.empty((0, manifest["dim"]), dtype=np.float32)
    ids = np.concatenate([p[0] for p in parts])
    return ids, np.ascontiguousarray(np.concatenate([p[1] for p in parts]))
