"""Embeddings folder -> index folder: train on a sample, add shard by shard, measure recall, swap in atomically."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from multimodal_rec.embeddings import (
    EmbeddingsError,
    load_manifest,
    read_shard,
    sha256_file,
    write_json_atomic,
)
from multimodal_rec.indexing.item_index import (
    DATA_FILES,
    IDS_FILE,
    INDEX_FILE,
    INDEX_FORMAT,
    MANIFEST_FILE,
    VECTORS_FILE,
    read_index_manifest,
    set_search_params,
    wrap_ids,
)
from multimodal_rec.indexing.recall import exact_top_k, recall_at_k, scores_of
from multimodal_rec.indexing.spec import IndexSpec, as_spec

log = logging.getLogger(__name__)

RECALL_K = 10
ADD_CHUNK = 1 << 16
QUERY_NOISE = 0.5  # norm of the noise added to item vectors used as queries when there are no users
REQUIRED_KEYS = ("dim", "data_fingerprint", "checkpoint_sha256", "shards")


def _check_embeddings(root: Path) -> tuple[dict, int]:
    manifest = load_manifest(root)
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing or "items" not in manifest["shards"]:
        raise EmbeddingsError(f"{root}/manifest.json is incomplete: missing {missing or ['shards.items']}")
    if manifest.get("metric", "inner_product") != "inner_product":
        raise EmbeddingsError(f"{root}: metric {manifest['metric']!r} is not inner_product")
    n = sum(int(entry["rows"]) for entry in manifest["shards"]["items"])
    if n == 0:
        raise EmbeddingsError(f"{root} holds no item embeddings")
    return manifest, n


def _sample_rows(root: Path, manifest: dict, kind: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random vectors of `kind` (fewer if there are fewer), read shard by shard."""
    total = sum(int(entry["rows"]) for entry in manifest["shards"].get(kind, []))
    picked = np.sort(rng.choice(total, size=min(count, total), replace=False))
    parts, start = [], 0
    for entry in manifest["shards"].get(kind, []):
        stop = start + int(entry["rows"])
        mine = picked[(picked >= start) & (picked < stop)] - start
        if len(mine):
            parts.append(read_shard(root, entry, manifest["dim"])[1][mine])
        start = stop
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.empty((0, manifest["dim"]), np.float32)


def _copy_items(root: Path, manifest: dict, n: int, folder: Path, train_rows: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Streams the item shards into ids.npy / vectors.npy (memory-mapped) and returns a training sample."""
    dim = manifest["dim"]
    ids = np.lib.format.open_memmap(folder / IDS_FILE, mode="w+", dtype=np.int64, shape=(n,))
    vectors = np.lib.format.open_memmap(folder / VECTORS_FILE, mode="w+", dtype=np.float32, shape=(n, dim))
    picked = np.sort(rng.choice(n, size=train_rows, replace=False))
    start = 0
    for entry in manifest["shards"]["items"]:
        shard_ids, shard_vectors = read_shard(root, entry, dim)
        if not np.isfinite(shard_vectors).all():
            raise EmbeddingsError(f"{root / entry['file']} holds NaN or infinite vectors")
        ids[start:start + len(shard_ids)] = shard_ids
        vectors[start:start + len(shard_ids)] = shard_vectors
        start += len(shard_ids)
    ids.flush()
    vectors.flush()
    if len(np.unique(ids)) != n:
        raise EmbeddingsError(f"{root}: item ids are not unique")
    return ids, vectors, np.ascontiguousarray(vectors[picked])


def _sample_queries(root: Path, manifest: dict, vectors: np.ndarray, count: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """User vectors when the folder has them, else item vectors moved by noise and renormalised."""
    users = _sample_rows(root, manifest, "users", count, rng)
    if len(users):
        return users, "users"
    rows = np.sort(rng.choice(len(vectors), size=min(count, len(vectors)), replace=False))
    queries = np.asarray(vectors[rows], dtype=np.float32)
    queries += rng.normal(size=queries.shape).astype(np.float32) * (QUERY_NOISE / np.sqrt(queries.shape[1]))
    faiss.normalize_L2(queries)
    return queries, "perturbed items"


def _train_and_add(spec: IndexSpec, factory: str, params: dict, dim: int, ids: np.ndarray, vectors: np.ndarray,
                   sample: np.ndarray) -> tuple[faiss.Index, str]:
    base = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if spec.ef_construction is not None and hasattr(base, "hnsw"):
        base.hnsw.efConstruction = int(spec.ef_construction)
    if isinstance(base, faiss.IndexIVFPQ):
        base.do_polysemous_training = False  # only serves polysemous search (Hamming filtering), slow to train
    index = wrap_ids(base)
    device, resources = "cpu", None
    # IVF is where a GPU pays (k-means, list assignment); HNSW has no GPU version, Flat only copies.
    # One GPU: replicas on several would each train their own k-means.
    if faiss.get_num_gpus() > 0 and faiss.try_extract_index_ivf(index) is not None:
        resources = faiss.StandardGpuResources()
        index, device = faiss.index_cpu_to_gpu(resources, 0, index), "gpu:0"
    if not index.is_trained:
        try:
            index.train(sample)
        except RuntimeError as error:  # e.g. PQ needs at least 256 training vectors
            raise EmbeddingsError(f"FAISS cannot train {factory} on {len(sample)} vectors: {error}") from error
    for start in range(0, len(ids), ADD_CHUNK):
        index.add_with_ids(np.ascontiguousarray(vectors[start:start + ADD_CHUNK]),
                           np.ascontiguousarray(ids[start:start + ADD_CHUNK]))
    if resources is not None:
        index = faiss.index_gpu_to_cpu(index)  # written and served from CPU
    set_search_params(index, params)
    return index, device


def _swap_in(folder: Path, out: Path) -> None:
    """Renames the finished folder to `out`, moving an older index aside first and deleting it after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / out.name)
    os.replace(folder, out)
    if old is not None:
        shutil.rmtree(old)


def build_index(embeddings_dir: str | Path, spec: IndexSpec | dict | str, out_dir: str | Path,
                recall_queries: int = 1000, seed: int = 0) -> dict:
    """Builds the index of the item embeddings in `embeddings_dir` into `out_dir`; returns its manifest."""
    root, out = Path(embeddings_dir), Path(out_dir)
    spec = as_spec(spec)
    if recall_queries < 1:
        raise EmbeddingsError(f"recall_queries must be at least 1, got {recall_queries}")
    emb, n = _check_embeddings(root)
    if out.exists() and not out.is_dir():
        raise EmbeddingsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        try:
            read_index_manifest(out)
        except EmbeddingsError as error:  # never delete a folder that is not one of ours
            raise EmbeddingsError(f"{out} exists and is not an index folder; refusing to replace it") from error
    factory, params = spec.resolve(n, emb["dim"])
    rng = np.random.default_rng(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    folder.chmod(0o755)  # mkdtemp makes it private; the index folder should read like any other
    try:
        started = time.perf_counter()
        ids, vectors, sample = _copy_items(root, emb, n, folder, params["train_rows"], rng)
        index, device = _train_and_add(spec, factory, params, emb["dim"], ids, vectors, sample)
        del sample
        faiss.write_index(index, str(folder / INDEX_FILE))
        build_seconds = time.perf_counter() - started
        log.info("built %s (%s) over %d items in %.1fs on %s", spec.name, factory, n, build_seconds, device)

        queries, query_source = _sample_queries(root, emb, vectors, recall_queries, rng)
        started = time.perf_counter()
        exact_scores, _ = exact_top_k(queries, ids, vectors, RECALL_K)
        _, found = index.search(queries, RECALL_K)
        recall = recall_at_k(scores_of(queries, found, ids, vectors), exact_scores)
        log.info("recall@%d = %.4f on %d queries (%s)", RECALL_K, recall, len(queries), query_source)

        files = {name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
                 for name in DATA_FILES}
        manifest = {
            "format": INDEX_FORMAT, "name": spec.name, "factory": factory, "params": params,
            "spec": spec.to_dict(), "dim": emb["dim"], "metric": "inner_product",
            "normalised": bool(emb.get("normalised", True)), "data_fingerprint": emb["data_fingerprint"],
            "checkpoint_sha256": emb["checkpoint_sha256"], "embeddings": str(root.resolve()),
            "ntotal": int(index.ntotal), f"recall@{RECALL_K}": recall, "recall_queries": len(queries),
            "recall_query_source": query_source, "recall_seconds": time.perf_counter() - started,
            "build_seconds": build_seconds, "index_bytes": files[INDEX_FILE]["bytes"],
            "bytes_per_vector": files[INDEX_FILE]["bytes"] / max(int(index.ntotal), 1),
            "faiss_version": faiss.__version__, "device": device, "files": files,
        }
        del ids, vectors  # close the memmaps before the folder moves
        write_json_atomic(folder / MANIFEST_FILE, manifest)
        _swap_in(folder, out)
    finally:
        if folder.exists():
            shutil.rmtree(folder)
    return manifest
