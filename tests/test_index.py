"""FAISS index: exactness of Flat, recall floors of the approximate ones, refusals, runtime adds, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from multimodal_rec.config import PROJECT_ROOT
from multimodal_rec.embeddings import FORMAT, EmbeddingsError, write_json_atomic, write_shard
from multimodal_rec.indexing import IndexLoadError, build_index, load_index, load_spec
from multimodal_rec.indexing.recall import exact_top_k, recall_at_k, scores_of

N, DIM = 3000, 32


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Normalised vectors around 30 cluster centres, like embeddings of a catalogue."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(30, dim))
    x = centres[rng.integers(0, 30, n)] + 0.4 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_embeddings(root, vectors: np.ndarray, users: np.ndarray | None = None, shards: int = 3, **manifest):
    ids = np.arange(len(vectors), dtype=np.int64) * 7 + 5  # external ids: not row numbers
    parts = np.array_split(np.arange(len(vectors)), shards)
    entries = {"items": [write_shard(root, "items", i, ids[p], vectors[p]) for i, p in enumerate(parts)], "users": []}
    if users is not None:
        entries["users"] = [write_shard(root, "users", 0, np.arange(len(users)), users)]
    write_json_atomic(root / "manifest.json", {
        "format": FORMAT, "dim": vectors.shape[1], "metric": "inner_product", "normalised": True,
        "data_fingerprint": "fp-1", "checkpoint_sha256": "ck-1",
        "counts": {"items": len(vectors), "users": 0 if users is None else len(users)}, "shards": entries,
        **manifest})
    return ids


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    vectors = clustered(N, DIM, seed=0)
    return root, write_embeddings(root, vectors), vectors


@pytest.fixture(scope="module")
def built(catalogue, tmp_path_factory):
    """Builds each index type once per module: {name: (folder, manifest)}."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp("indexes") / name
            cache[name] = (out, build_index(catalogue[0], load_spec(name), out, recall_queries=300))
        return cache[name]

    return get


def brute_force(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return ids[np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k]]


def run_cli(*args: str, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "multimodal_rec.index", *args], capture_output=True, text=True,
                          env=env, cwd=cwd or PROJECT_ROOT, timeout=120)


def test_flat_returns_the_exact_top_k(catalogue, built):
    _, ids, vectors = catalogue
    folder, manifest = built("flat")
    index = load_index(folder, expect_dim=DIM, expect_fingerprint="fp-1")
    queries = clustered(50, DIM, seed=1)
    scores, found = index.search(queries, 10)
    assert found.dtype == np.int64 and scores.dtype == np.float32 and found.shape == (50, 10)
    np.testing.assert_array_equal(found, brute_force(vectors, ids, queries, 10))
    np.testing.assert_allclose(scores, np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10], atol=1e-5)
    assert manifest["recall@10"] == 1.0 and manifest["ntotal"] == N == index.ntotal
    assert manifest["data_fingerprint"] == "fp-1" and manifest["checkpoint_sha256"] == "ck-1"


@pytest.mark.parametrize("name", ["ivf", "hnsw"])
def test_approximate_indexes_reach_the_recall_floor(catalogue, built, name):
    _, ids, vectors = catalogue
    folder, manifest = built(name)
    assert manifest["recall@10"] >= 0.9
    queries = clustered(200, DIM, seed=2)  # recall measured here too, not only trusted from the manifest
    _, found = load_index(folder).search(queries, 10)
    exact = brute_force(vectors, ids, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall >= 0.9, recall


def test_ivfpq_stores_far_fewer_bytes_per_vector(built):
    flat, pq = built("flat")[1], built("ivfpq")[1]
    assert pq["bytes_per_vector"] < flat["bytes_per_vector"] / 3
    assert pq["factory"].endswith("PQ16x8") and pq["recall@10"] > 0.5


def test_recall_counts_misses_ties_and_short_rows():
    exact = np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7], [0.9, -np.inf, -np.inf]], dtype=np.float32)
    found = np.array([[0.9, 0.7, 0.5], [0.9, 0.8, 0.7], [0.9, -np.inf, -np.inf]], dtype=np.float32)
    assert recall_at_k(found, exact) == pytest.approx((2 / 3 + 1 + 1) / 3)  # row 2: a tie at the k-th score


def test_exact_top_k_merges_chunks(catalogue):
    _, ids, vectors = catalogue
    queries = clustered(20, DIM, seed=4)
    scores, found = exact_top_k(queries, ids, vectors, 10, chunk=7)  # the heap merges 429 chunks
    np.testing.assert_array_equal(found, brute_force(vectors, ids, queries, 10))
    np.testing.assert_allclose(scores, scores_of(queries, found, ids, vectors), atol=1e-5)


def test_users_serve_as_recall_queries_when_present(tmp_path):
    write_embeddings(tmp_path / "emb", clustered(500, DIM, 0), users=clustered(40, DIM, 3))
    manifest = build_index(tmp_path / "emb", "flat", tmp_path / "index")
    assert manifest["recall_query_source"] == "users" and manifest["recall_queries"] == 40
    assert manifest["recall@10"] == 1.0


def test_rows_short_of_k_are_padded(tmp_path):
    vectors = clustered(5, DIM, 0)
    ids = write_embeddings(tmp_path / "emb", vectors, shards=1)
    build_index(tmp_path / "emb", "flat", tmp_path / "index")
    scores, found = load_index(tmp_path / "index").search(vectors[:2], 8)
    assert sorted(found[0, :5]) == sorted(ids) and (found[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


@pytest.mark.parametrize("name", ["flat", "ivf", "hnsw"])
def test_items_added_at_runtime_are_found_and_replace_older_vectors(catalogue, built, name):
    _, ids, vectors = catalogue
    index = load_index(built(name)[0])
    new = clustered(2, DIM, seed=9)
    index.add(np.array([10**9, ids[0]]), new)  # one new item, one replacing item ids[0]
    assert index.ntotal == N + 1
    _, found = index.search(new, 5)
    assert found[0, 0] == 10**9 and found[1, 0] == ids[0]
    np.testing.assert_allclose(index.reconstruct(ids[0]), new[1])
    _, found = index.search(vectors[:1], 10)  # its old vector no longer finds it
    assert ids[0] not in found[0]
    np.testing.assert_allclose(index.reconstruct(ids[1]), vectors[1])
    newer = clustered(1, DIM, seed=10)
    index.add(np.array([10**9]), newer)  # a runtime item replaced again
    assert index.ntotal == N + 1 and index.search(newer, 1)[1][0, 0] == 10**9
    np.testing.assert_allclose(index.reconstruct(10**9), newer[0])
    with pytest.raises(KeyError):
        index.reconstruct(-5)


def test_corrupt_or_unreadable_index_file_is_refused(built, tmp_path):
    folder = shutil.copytree(built("flat")[0], tmp_path / "copy")
    data = bytearray((folder / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(IndexLoadError, match="corrupt"):
        load_index(folder)
    (folder / "index.faiss").write_bytes(b"not a faiss index")
    manifest = json.loads((folder / "manifest.json").read_text())  # sha256 made to match: faiss must refuse
    from multimodal_rec.embeddings import sha256_file

    manifest["files"]["index.faiss"]["sha256"] = sha256_file(folder / "index.faiss")
    write_json_atomic(folder / "manifest.json", manifest)
    with pytest.raises(IndexLoadError, match="cannot be read by faiss"):
        load_index(folder)


def test_mismatches_are_refused(built, tmp_path):
    folder = built("flat")[0]
    with pytest.raises(IndexLoadError, match="dimension 32, expected 64"):
        load_index(folder, expect_dim=64)
    with pytest.raises(IndexLoadError, match="built from data 'fp-1'"):
        load_index(folder, expect_fingerprint="fp-2")
    copy = shutil.copytree(folder, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    write_json_atomic(copy / "manifest.json", {**manifest, "ntotal": N + 1})
    with pytest.raises(IndexLoadError, match="the manifest says 3001"):
        load_index(copy)
    (copy / "vectors.npy").unlink()
    with pytest.raises(IndexLoadError, match="vectors.npy is missing"):
        load_index(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(IndexLoadError, match="manifest.json is missing"):
        load_index(copy)


def test_pq_m_falls_back_to_a_divisor_of_the_dimension():
    """65-d exports (item biases): PQ16 cannot split them, PQ13 can; a divisor under half of pq_m is refused."""
    assert load_spec("ivfpq").resolve(100_000, 65)[1]["pq_m"] == 13
    assert load_spec("ivfpq").resolve(100_000, 64)[1]["pq_m"] == 16
    with pytest.raises(EmbeddingsError, match="nearest divisor below it is 1"):
        load_spec("ivfpq").resolve(100_000, 67)


def test_build_refuses_bad_input(catalogue, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EmbeddingsError, match="not an index folder"):
        build_index(catalogue[0], "flat", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").is_file()
    with pytest.raises(EmbeddingsError, match="pq_m=33 must divide the dimension 32"):
        build_index(catalogue[0], load_spec("ivfpq", pq_m=33), tmp_path / "pq")
    with pytest.raises(EmbeddingsError, match="cannot train IVF2,PQ16x8 on 100 vectors"):
        build_index(catalogue[0], load_spec("ivfpq", train_size=100), tmp_path / "pq")
    with pytest.raises(EmbeddingsError, match="FAISS rejects factory 'IVF"):
        build_index(catalogue[0], load_spec("ivf", factory="IVF{nlist},Bogus"), tmp_path / "bogus")
    with pytest.raises(EmbeddingsError, match="unknown index 'nope'"):
        load_spec("nope")
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # failed builds leave no temp folder behind


def test_rebuild_replaces_the_old_index(catalogue, tmp_path):
    build_index(catalogue[0], "flat", tmp_path / "index")
    manifest = build_index(catalogue[0], load_spec("ivf", nprobe=4), tmp_path / "index")
    assert load_index(tmp_path / "index").manifest["factory"] == manifest["factory"] != "Flat"
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no temp or old folder left behind


def test_cli_writes_an_index_folder(catalogue, tmp_path):
    result = run_cli(f"embeddings={catalogue[0]}", "index=hnsw", f"out={tmp_path / 'hnsw'}",
                     "index.ef_search=32", "recall_queries=100", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr
    index = load_index(tmp_path / "hnsw", expect_dim=DIM, expect_fingerprint="fp-1")
    assert index.manifest["params"]["ef_search"] == 32 and index.ntotal == N and "recall@10" in result.stdout


def test_cli_refuses_incomplete_embeddings_and_unknown_index_with_exit_2(tmp_path):
    root = tmp_path / "emb"
    write_embeddings(root, clustered(100, DIM, 0))
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["data_fingerprint"]
    write_json_atomic(root / "manifest.json", manifest)
    result = run_cli(f"embeddings={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "incomplete: missing ['data_fingerprint']" in result.stderr
    assert "Traceback" not in result.stderr
    (root / "manifest.json").unlink()
    result = run_cli(f"embeddings={root}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "manifest.json is missing" in result.stderr
    result = run_cli(f"embeddings={root}", "index=annoy")
    assert result.returncode == 2 and "unknown index 'annoy': choose one of flat, hnsw, ivf, ivfpq" in result.stderr
