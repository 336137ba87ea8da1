"""Index benchmark: Flat, IVF, HNSW and IVF-PQ over clustered synthetic embeddings (and optionally a real export).

For each index: build seconds, index bytes per vector, queries per second at batch 1 and batch 256, recall@10
against exact search, and QPS as a multiple of Flat's in the same run. IVF and HNSW are swept over a few
search settings (nprobe, efSearch); every other number comes from the shipped conf/index/*.yaml.

    OMP_NUM_THREADS=1 python bench/index.py --threads 1                 # 100k and 1M items, d=64
    python bench/index.py --sizes 100000 --real artifacts/embeddings    # plus the real catalogue
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from common import machine, markdown_table

from multimodal_rec.embeddings import FORMAT, read_embeddings, write_json_atomic, write_shard
from multimodal_rec.indexing import build_index, load_index, load_spec
from multimodal_rec.indexing.recall import exact_top_k, recall_at_k, scores_of

TYPES = ("flat", "ivf", "hnsw", "ivfpq")
SWEEP = {"ivf": ("nprobe", (16, 32, 64, 128)), "hnsw": ("ef_search", (32, 64, 128, 256)), "ivfpq": ("nprobe", (32, 64))}
COLUMNS = ("setting", "build s", "bytes/vector", "QPS b=1", "QPS b=256", "recall@10", "x Flat b=1", "x Flat b=256")
SHARD_ROWS = 100_000


def synthetic(n: int, dim: int, clusters: int, rng: np.random.Generator, spread: float = 1.0,
              noise: float = 0.5, rank: int = 8) -> np.ndarray:
    """Unit vectors like a catalogue's embeddings: Zipf-sized clusters around random centres, each spread
    along `rank` directions of its own (typical norm `spread`), plus isotropic noise (norm `noise`) and 2%
    outliers anywhere on the sphere. Clusters overlap: the 10th neighbour is at cosine ~0.65 on average."""
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / (np.arange(clusters) + 10.0) ** 0.8
    label = np.sort(rng.choice(clusters, size=n, p=weights / weights.sum()))
    x = centres[label] + rng.normal(scale=noise / np.sqrt(dim), size=(n, dim)).astype(np.float32)
    bounds = np.searchsorted(label, np.arange(clusters + 1))
    for c in range(clusters):  # each cluster's own low-rank spread
        basis = rng.normal(scale=spread / np.sqrt(rank * dim), size=(rank, dim)).astype(np.float32)
        x[bounds[c]:bounds[c + 1]] += rng.normal(size=(bounds[c + 1] - bounds[c], rank)).astype(np.float32) @ basis
    outliers = rng.random(n) < 0.02
    x[outliers] = rng.normal(size=(outliers.sum(), dim))
    faiss.normalize_L2(x)
    return x[rng.permutation(n)]


def write_folder(root: Path, vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """An embeddings folder with the queries as its users, so the built manifest's recall uses them too."""
    ids = np.arange(len(vectors), dtype=np.int64)
    items = [write_shard(root, "items", i, ids[s:s + SHARD_ROWS], vectors[s:s + SHARD_ROWS])
             for i, s in enumerate(range(0, len(vectors), SHARD_ROWS))]
    users = [write_shard(root, "users", 0, np.arange(len(queries)), queries)]
    write_json_atomic(root / "manifest.json", {
        "format": FORMAT, "dim": vectors.shape[1], "metric": "inner_product", "normalised": True,
        "data_fingerprint": f"synthetic-{len(vectors)}", "checkpoint_sha256": "none",
        "counts": {"items": len(vectors), "users": len(queries)}, "shards": {"items": items, "users": users}})
    return ids


def queries_per_second(index, queries: np.ndarray, batch: int, min_seconds: float = 1.0) -> float:
    """Queries per second searching `queries` in batches of `batch`, repeated for at least min_seconds."""
    batches = [queries[start:start + batch] for start in range(0, len(queries), batch)]
    done, started = 0, time.perf_counter()
    while True:
        for part in batches:
            index.search(part, 10)
            done += len(part)
            if batch == 1 and time.perf_counter() - started > min_seconds:  # slow exact search: stop early
                return done / (time.perf_counter() - started)
        if time.perf_counter() - started > min_seconds:
            return done / (time.perf_counter() - started)


def bench_folder(label: str, root: Path, queries: np.ndarray, types: list[str], work: Path) -> list[dict]:
    ids, vectors = read_embeddings(root, "items")
    exact_scores, _ = exact_top_k(queries, ids, vectors, 10)
    rows, flat_qps = [], None
    for name in types:
        manifest = build_index(root, load_spec(name), work / f"{label}-{name}", recall_queries=len(queries))
        index = load_index(work / f"{label}-{name}")
        key, values = SWEEP.get(name, (None, (None,)))
        default = manifest["params"].get(key)
        for value in sorted({*values, default} - {None}) or [None]:
            if key:
                index.set_search(**{key: value})
            qps1, qps256 = queries_per_second(index, queries, 1), queries_per_second(index, queries, 256)
            if name == "flat":
                flat_qps = (qps1, qps256)
            found = index.search(queries, 10)[1]
            setting = (f"{key}={value}" + (" (default)" if value == default else "")) if key else "exact"
            rows.append({
                "data": label, "index": manifest["factory"], "setting": setting,
                "build s": f"{manifest['build_seconds']:.1f}", "bytes/vector": f"{manifest['bytes_per_vector']:.1f}",
                "QPS b=1": round(qps1), "QPS b=256": round(qps256),
                "recall@10": recall_at_k(scores_of(queries, found, ids, vectors), exact_scores),
                "x Flat b=1": f"{qps1 / flat_qps[0]:.1f}" if flat_qps else "",
                "x Flat b=256": f"{qps256 / flat_qps[1]:.1f}" if flat_qps else "",
                "n": len(ids), "threads": faiss.omp_get_max_threads()})
            print(f"  {label} {rows[-1]['index']} {rows[-1]['setting']}: recall {rows[-1]['recall@10']:.3f}, "
                  f"QPS {qps1:.0f} / {qps256:.0f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64, help="the model's embedding dimension")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    parser.add_argument("--threads", type=int, default=None, help="FAISS threads (default: OMP_NUM_THREADS)")
    parser.add_argument("--real", type=Path, help="an embeddings folder (export) to benchmark as well")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint (or run folder): also measure export throughput")
    parser.add_argument("--work", type=Path, help="where to write embeddings and indexes (default: a temp folder)")
    parser.add_argument("--out", default=Path("logs/bench/index"), type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    types = sorted(args.types, key=TYPES.index)  # Flat first: the others are compared to it
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work, rows = Path(work), []
        for size in args.sizes:
            rng = np.random.default_rng(args.seed)
            vectors = synthetic(size + args.queries, args.dim, args.clusters, rng)  # queries drawn the same way
            root = work / f"synthetic-{size}"
            write_folder(root, vectors[args.queries:], vectors[:args.queries])
            del vectors
            queries = read_embeddings(root, "users")[1]
            rows += bench_folder(f"{size // 1000}k", root, queries, types, work)
        if args.real:
            users = read_embeddings(args.real, "users")[1]
            if not len(users):
                raise SystemExit(f"{args.real} has no user vectors to use as queries")
            rng = np.random.default_rng(args.seed)
            queries = users[rng.choice(len(users), min(args.queries, len(users)), replace=False)]
            rows += bench_folder("real", args.real, queries, types, work)
    print(f"\nFAISS {faiss.__version__} indexes, d={args.dim}, recall@10 vs exact on {args.queries} queries "
          f"({machine()}, {faiss.omp_get_max_threads()} FAISS threads)")
    for label in dict.fromkeys(row["data"] for row in rows):
        print(f"\n{label} items:\n")
        print(markdown_table([r for r in rows if r["data"] == label], COLUMNS, first="index"))
    if args.checkpoint:
        from export_speed import export_throughput

        speed = export_throughput(args.checkpoint)
        print(f"\nExport throughput of the item tower ({args.checkpoint}, {torch.get_num_threads()} torch threads)\n")
        print(markdown_table(speed, ("seconds", "vectors/s", "x raw"), first="path"))
        rows += [{"data": "export", **row} for row in speed]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "index.json", rows)
    print(f"\nrows written to {args.out / 'index.json'}")


if __name__ == "__main__":
    main()
