"""The embeddings folder: what `export` writes and `index`/serving read.

  manifest.json              written last: its presence means the export is complete
  items/part-00000.parquet   columns: item_id (int64), vector (fixed-size list of float32 or float16)
  users/part-00000.parquet   columns: user_id (int64), vector
  progress.json              while an export runs: the shards already written (for resuming)

Shards are written atomically (temp file + rename), so a killed export never leaves a half-written
shard that looks whole; the manifest lists every shard with its row count and sha256, and `files` the
size and sha256 of each serving file (model.json, catalog.parquet, ...).

Whoever can write the folder can craft it: every size the manifest declares is checked against the
files before anything of that size is allocated, and Parquet files are read with a cap on what they
decode to, so a small file cannot make a reader allocate gigabytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
MAX_DIM = 1 << 16  # the widest vectors a manifest may declare
MAX_ROWS = 1 << 40
# decoded data may be this much larger than its file (compression), plus READ_SLACK; beyond: a crafted file
MAX_EXPANSION, READ_SLACK = 32, 16 << 20
READ_BATCH = 1024  # rows decoded at once, so the cap is checked before a crafted file decodes far past it
SHA256 = re.compile(r"[0-9a-f]{64}")


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


def checked_int(value, what: str, low: int = 0, high: int = MAX_ROWS, error: type = None) -> int:
    """`value` if it is an int in [low, high] (not a bool, float or string), else a one-line `error`
    (EmbeddingsError or a subclass)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise (error or EmbeddingsError)(f"{what} must be an integer in [{low}, {high}], got {str(value)[:50]!r}")
    return value


def load_json(path: str | Path) -> dict:
    """A JSON object; anything else (invalid, nested too deep to parse, not an object) is refused."""
    try:
        payload = json.loads(Path(path).read_text())
    except ValueError as error:  # not JSON, not UTF-8, an integer of thousands of digits
        raise EmbeddingsError(f"{path} is not valid JSON: {error}") from error
    except RecursionError as error:
        raise EmbeddingsError(f"{path} is nested too deeply to be one of our JSON files") from error
    if not isinstance(payload, dict):
        raise EmbeddingsError(f"{path} holds a JSON {type(payload).__name__}, not an object")
    return payload


def file_record(path: str | Path) -> dict:
    """{"bytes", "sha256"} of a file, as the manifest records it."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def check_file(path: Path, record, hint: str) -> None:
    """Refuses `path` unless it is the file `record` ({"bytes", "sha256"}) describes; the size first (cheap)."""
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or not SHA256.fullmatch(
            record["sha256"]):
        raise EmbeddingsError(f"the manifest's record of {path.name} is not {{bytes, sha256}}; {hint}")
    if not path.is_file():
        raise EmbeddingsError(f"{path} is listed in the manifest but missing; {hint}")
    size = path.stat().st_size
    if size != checked_int(record.get("bytes"), f"the manifest's size of {path.name}"):
        raise EmbeddingsError(f"{path} does not match its size and sha256 in the manifest ({size} bytes, recorded "
                              f"{record['bytes']}: changed since the export); {hint}")
    if sha256_file(path) != record["sha256"]:
        raise EmbeddingsError(f"{path} does not match its sha256 in the manifest (changed since the export); {hint}")


def read_parquet(path: str | Path, max_bytes: int, rows: int | None = None) -> pa.Table:
    """A Parquet file read batch by batch, refused when its footer does not declare `rows` rows or once what it
    decodes to passes `max_bytes`: a small (crafted) file cannot decompress into a huge table."""
    too_large = f"{path} decodes to more than {max_bytes} bytes, too much for its {Path(path).stat().st_size} on disk"
    with pq.ParquetFile(path) as handle:
        meta = handle.metadata
        if rows is not None and meta.num_rows != rows:
            raise EmbeddingsError(f"{path} holds {meta.num_rows} rows, expected {rows}")
        if sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) > max_bytes:  # as declared
            raise EmbeddingsError(too_large)
        batches, decoded = [], 0
        for batch in handle.iter_batches(batch_size=READ_BATCH):  # as decoded: a footer can lie
            decoded += batch.nbytes
            if decoded > max_bytes:
                raise EmbeddingsError(too_large)
            batches.append(batch)
        return pa.Table.from_batches(batches, schema=handle.schema_arrow)


def npy_header(path: str | Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) that a .npy file declares, checked against its size without reading the data (np.load
    would allocate the declared size first); Python objects (a pickle) are refused."""
    path = Path(path)
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"version {version} is not written by numpy's np.save")
            shape, _, dtype = read[version](handle)
        except ValueError as error:
            raise EmbeddingsError(f"{path} is not a .npy array: {error}") from error
        start = handle.tell()
    if dtype.hasobject:
        raise EmbeddingsError(f"{path} holds Python objects (a pickle, which can run code when loaded); refused")
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize + start
    if size != path.stat().st_size:
        raise EmbeddingsError(f"{path} declares {shape} {dtype} ({size} bytes) but is {path.stat().st_size} bytes")
    return shape, dtype


def load_npy(path: str | Path, mmap_mode: str | None = None) -> np.ndarray:
    """np.load without pickles, once the header is checked against the file's size."""
    npy_header(path)
    return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)


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
        raise EmbeddingsError(f"{path}: format {str(manifest.get('format'))[:80]!r} is not {FORMAT!r}")
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: dict) -> None:
    """The types of what readers size things by (dim, shard rows) and shard paths that stay in the folder;
    missing keys are reported by whoever needs them."""
    if "dim" in manifest:
        checked_int(manifest["dim"], f"{path}: dim", 1, MAX_DIM)
    shards = manifest.get("shards", {})
    if not isinstance(shards, dict) or not set(shards) <= set(KINDS):
        raise EmbeddingsError(f"{path}: shards must map {sorted(KINDS)} to lists of shards")
    for kind, entries in shards.items():
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise EmbeddingsError(f"{path}: shards.{kind} must be a list of {{file, rows, sha256}}")
        for entry in entries:
            if not isinstance(entry.get("file"), str) or not re.fullmatch(rf"{kind}/part-\d{{5,}}\.parquet",
                                                                          entry["file"]):
                raise EmbeddingsError(f"{path}: {str(entry.get('file'))[:80]!r} is not a {kind} shard of the folder")
            checked_int(entry.get("rows"), f"{path}: rows of {entry['file']}")
            if not isinstance(entry.get("sha256"), str):
                raise EmbeddingsError(f"{path}: {entry['file']} has no sha256")


def read_shard(root: str | Path, entry: dict, dim: int, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,) int64, vectors (n, d) float32) of one shard, checked against its manifest entry."""
    path = Path(root) / entry["file"]
    if not path.is_file():
        raise EmbeddingsError(f"shard {path} listed in the manifest is missing")
    if not path.resolve().is_relative_to(Path(root).resolve()):
        raise EmbeddingsError(f"shard {path} leads out of {root} (a symbolic link)")
    rows, size = entry["rows"], path.stat().st_size
    if rows * dim * 2 > size * MAX_EXPANSION + READ_SLACK:  # float16 at least: checked before anything is read
        raise EmbeddingsError(f"shard {path} is {size} bytes, far too small for the {rows} x {dim} vectors the "
                              "manifest declares")
    if verify and sha256_file(path) != entry["sha256"]:
        raise EmbeddingsError(f"shard {path} is corrupt: its sha256 does not match the manifest")
    try:
        schema = pq.read_schema(path)
        vector = schema.field("vector").type if "vector" in schema.names else None
        if (not isinstance(vector, pa.FixedSizeListType) or vector.list_size != dim
                or vector.value_type not in (pa.float16(), pa.float32())):
            raise EmbeddingsError(f"shard {path} holds {vector} vectors, the manifest says {dim} floats")
        table = read_parquet(path, rows * (dim * 4 + 16) + READ_SLACK, rows)
    except (pa.ArrowException, OSError) as error:
        raise EmbeddingsError(f"shard {path} cannot be read: {error}") from error
    id_column = "item_id" if "item_id" in table.column_names else "user_id"
    column = table.column("vector").combine_chunks()
    ids = table.column(id_column) if id_column in table.column_names else None
    if ids is None or ids.type != pa.int64() or ids.null_count or column.null_count:
        raise EmbeddingsError(f"shard {path} lacks int64 {id_column}s or holds missing values")
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(rows, dim).astype(np.float32, copy=False)
    return ids.to_numpy(), vectors


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
