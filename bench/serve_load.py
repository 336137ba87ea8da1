"""Load test of the ranking endpoint: p50/p95/p99 latency, requests per second and errors.

    OMP_NUM_THREADS=1 python bench/serve_load.py --artifacts artifacts/ml100k_mm
    OMP_NUM_THREADS=1 python bench/serve_load.py --artifacts artifacts/ml100k_mm --synthetic-items 1000000

The server runs as its own process on loopback (`python serve.py ...`); the client keeps exactly N
requests in flight (N = 1, 8, 32) for `--seconds` each. /healthz, which does no work, is measured at
each concurrency as the baseline: the ratio column is p99 over the baseline's p99 in the same run.
The synthetic catalogue reuses the model parts of `--artifacts` with N clustered item vectors and an
IVF index, and asks with session histories drawn from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, markdown_table  # noqa: E402
from bench.server_process import start_server  # noqa: E402
from bench.synthetic_catalogue import make_synthetic_artifacts  # noqa: E402
from multimodal_rec.config import PROJECT_ROOT  # noqa: E402
from multimodal_rec.embeddings import read_embeddings  # noqa: E402
from multimodal_rec.training import write_json_atomic  # noqa: E402


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: a full client library costs the load generator
    more CPU per request than the server spends, and on 2 cores that would be measured as server latency."""

    def __init__(self, host: str, port: int, token: str | None = None):
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.reader = self.writer = None

    async def request(self, method: str, path: str, payload) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode() if payload is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{self.auth}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def drive(url: str, method: str, path: str, payload, clients: int, seconds: float) -> dict:
    """Keeps `clients` requests in flight for `seconds`; latencies of the requests that finished."""
    latencies, errors = [], 0
    stop = time.perf_counter() + seconds
    host, port = url.removeprefix("http://").split(":")
    connections = [Connection(host, int(port)) for _ in range(clients)]

    async def worker(connection: Connection):
        nonlocal errors
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                ok = await connection.request(method, path, payload() if payload else None) == 200
            except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                connection.close()  # and reconnect on the next request
                ok, connection.writer = False, None
            latencies.append(time.perf_counter() - started)
            errors += not ok

    began = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - began
    for connection in connections:
        connection.close()
    ms = np.asarray(latencies) * 1000
    return {"requests": len(ms), "rps": len(ms) / elapsed, "p50 ms": float(np.percentile(ms, 50)),
            "p95 ms": float(np.percentile(ms, 95)), "p99 ms": float(np.percentile(ms, 99)), "errors": errors}


def run_catalogue(name: str, artifacts: Path, index: str | None, payloads: dict, clients: list[int],
                  seconds: float, rows: list) -> None:
    log_dir = Path(tempfile.mkdtemp(prefix="serve_load_"))
    server, url = start_server(artifacts, index, log_dir)
    try:
        for _, (method, path, payload) in payloads.items():  # warm-up: first calls load lazily
            for _ in range(5):
                httpx.request(method, f"{url}{path}", json=payload() if payload else None, timeout=60)
        for n in clients:
            baseline = asyncio.run(drive(url, "GET", "/healthz", None, n, min(seconds, 5)))
            for endpoint, (method, path, payload) in payloads.items():
                result = asyncio.run(drive(url, method, path, payload, n, seconds))
                result["p99 / healthz p99"] = result["p99 ms"] / baseline["p99 ms"]
                rows.append({"catalogue": name, "endpoint": endpoint, "clients": n, **result})
                print(f"  {name} {endpoint} x{n}: p99 {result['p99 ms']:.1f} ms, {result['rps']:.0f} req/s, "
                      f"{result['errors']} errors", flush=True)
            rows.append({"catalogue": name, "endpoint": "/healthz (baseline)", "clients": n, **baseline})
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(log_dir, ignore_errors=True)


def payloads_for(artifacts: Path, by_user: bool, seed: int = 0) -> dict:
    rng = random.Random(seed)
    item_ids = [int(i) for i in read_embeddings(artifacts, "items", verify=False)[0]]
    user_ids = [int(u) for u in read_embeddings(artifacts, "users", verify=False)[0]]

    def who() -> dict:
        return {"user_id": rng.choice(user_ids)} if by_user else {"history": rng.sample(item_ids, 5)}

    return {
        "/recommend k=10": ("POST", "/recommend", lambda: {**who(), "k": 10}),
        "/rank 100 items": ("POST", "/rank", lambda: {**who(), "items": rng.sample(item_ids, 100)}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an export folder (python -m ...export)")
    parser.add_argument("--index", default=None, help="index-<name> of the folder to serve with")
    parser.add_argument("--synthetic-items", type=int, default=0, help="also a synthetic catalogue of this size")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "logs" / "bench" / "serve_load.json")
    args = parser.parse_args()
    rows: list[dict] = []
    run_catalogue(args.artifacts.name, args.artifacts, args.index, payloads_for(args.artifacts, True), args.clients,
                  args.seconds, rows)
    if args.synthetic_items:
        folder = Path(tempfile.mkdtemp(prefix="synthetic_catalogue_"))
        try:
            started = time.perf_counter()
            make_synthetic_artifacts(args.artifacts, folder, args.synthetic_items, index="ivf")
            print(f"synthetic catalogue of {args.synthetic_items} items + IVF index in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            run_catalogue(f"synthetic {args.synthetic_items:,} items (IVF)", folder, "ivf",
                          payloads_for(folder, False), args.clients, args.seconds, rows)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    columns = ("endpoint", "clients", "requests", "rps", "p50 ms", "p95 ms", "p99 ms", "errors", "p99 / healthz p99")
    print(f"\nServing load ({machine()}, server OMP_NUM_THREADS=1, {args.seconds:.0f} s per row)\n")
    print(markdown_table(rows, columns, first="catalogue"))
    write_json_atomic(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
