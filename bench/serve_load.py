"""Load test of the ranking endpoint: p50/p95/p99 latency, requests per second and errors.

    OMP_NUM_THREADS=1 python bench/serve_load.py --artifacts artifacts/ml100k_mm
    OMP_NUM_THREADS=1 python bench/serve_load.py --artifacts artifacts/ml100k_mm --synthetic-items 1000000
    git worktree add /tmp/before HEAD~1 && OMP_NUM_THREADS=1 python bench/serve_load.py --artifacts ... \
        --baseline-root /tmp/before --batch-wait-ms 0 1        # before and after (batching off and on), side by side

The server runs as its own process on loopback (`python serve.py ...`); the client keeps exactly N
requests in flight (N = 1, 8, 32) for `--seconds` each. /healthz, which does no work, is measured at
each concurrency as the baseline: the ratio column is p99 over the baseline's p99 in the same run.
The synthetic catalogue reuses the model parts of `--artifacts` with N clustered item vectors and an
IVF index, and asks with session histories drawn from it.

Several servers (`--baseline-root`: one run from another checkout, e.g. the last commit; `--batch-wait-ms`:
one per setting) are started together and measured in turn, row by row, so that each comparison shares the
machine's state of the moment (on shared cores, compare ratios within one run, not across runs).
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
from bench import server_process  # noqa: E402
from bench.common import machine, markdown_table  # noqa: E402
from bench.server_process import STAGES, start_server  # noqa: E402
from bench.synthetic_catalogue import make_synthetic_artifacts  # noqa: E402
from multimodal_rec.config import PROJECT_ROOT  # noqa: E402
from multimodal_rec.embeddings import MANIFEST_FILE, file_record, load_manifest, read_embeddings  # noqa: E402
from multimodal_rec.serving.parts import SERVING_FILES  # noqa: E402
from multimodal_rec.training import write_json_atomic  # noqa: E402


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: a full client library costs the load generator
    more CPU per request than the server spends, and on 2 cores that would be measured as server latency."""

    def __init__(self, host: str, port: int, token: str | None = None):
        self.host, self.port = host, port
        self.auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.reader = self.writer = None

    async def exchange(self, method: str, path: str, payload) -> tuple[int, dict[str, str], bytes]:
        """(status, headers by lower-case name, body) of one request on the kept-alive connection."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode() if payload is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n{self.auth}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status, headers = int((await self.reader.readline()).split()[1]), {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers, await self.reader.readexactly(int(headers.get("content-length", 0)))

    async def request(self, method: str, path: str, payload) -> int:
        return (await self.exchange(method, path, payload))[0]

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
                  seconds: float, rows: list, servers: dict[str, tuple[Path | None, tuple]]) -> None:
    """servers: label -> (project root to serve with, None: this one; its serve.py overrides)."""
    log_dir = Path(tempfile.mkdtemp(prefix="serve_load_"))
    started = {}
    try:
        for label, (root, extra) in servers.items():
            folder = log_dir / label.replace(" ", "_").replace("=", "")
            folder.mkdir()
            # its own journal and event store: servers of one folder would otherwise share them
            extra = (*extra, f"journal={folder / 'journal.jsonl'}", f"events={folder / 'events.sqlite'}")
            started[label] = start_server(artifacts, index, folder, extra=extra, root=root)
        for _, url in started.values():
            for _, (method, path, payload) in payloads.items():  # warm-up: first calls load lazily
                for _ in range(5):
                    httpx.request(method, f"{url}{path}", json=payload() if payload else None, timeout=60)
        for n in clients:
            baselines = {label: asyncio.run(drive(url, "GET", "/healthz", None, n, min(seconds, 5)))
                         for label, (_, url) in started.items()}
            for endpoint, (method, path, payload) in payloads.items():
                for label, (_, url) in started.items():
                    result = asyncio.run(drive(url, method, path, payload, n, seconds))
                    result["p99 / healthz p99"] = result["p99 ms"] / baselines[label]["p99 ms"]
                    rows.append({"catalogue": name, "server": label, "endpoint": endpoint, "clients": n, **result})
                    print(f"  {name} [{label}] {endpoint} x{n}: p99 {result['p99 ms']:.1f} ms, {result['rps']:.0f} "
                          f"req/s, {result['errors']} errors", flush=True)
            for label, baseline in baselines.items():
                rows.append({"catalogue": name, "server": label, "endpoint": "/healthz (baseline)", "clients": n,
                             **baseline})
    finally:
        for server, _ in started.values():
            server.terminate()
            server.wait(30)
        shutil.rmtree(log_dir, ignore_errors=True)


def record_files(folder: Path) -> None:
    """Records the serving files' sizes and checksums in the manifest, as an export does (serving refuses a
    folder without them)."""
    manifest = load_manifest(folder)
    manifest["files"] = {name: file_record(folder / name) for name in SERVING_FILES if (folder / name).is_file()}
    write_json_atomic(folder / MANIFEST_FILE, manifest)


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


# ---- where a request's time goes (--profile): the server runs under server_process.profiled_server -----------
def parse_cost(payloads: dict, endpoint: str, samples: int = 2000) -> float:
    """Seconds to parse and validate one request body as FastAPI does (json.loads, then the pydantic model)."""
    from multimodal_rec.serving.schemas import RankRequest, RecommendRequest

    model = RankRequest if "rank" in endpoint else RecommendRequest
    bodies = [json.dumps(payloads[endpoint][2]()).encode() for _ in range(samples)]
    started = time.process_time()
    for body in bodies:
        model.model_validate(json.loads(body))
    return (time.process_time() - started) / samples


def profile(artifacts: Path, index: str | None, payloads: dict, clients: list[int], seconds: float,
            servers: dict[str, tuple[Path | None, tuple]]) -> list[dict]:
    """Per server, endpoint and concurrency: a fresh server with its stages timed, driven for `seconds`; each
    stage's milliseconds per request, and the rest of the server's CPU per request (HTTP, FastAPI, parsing)."""
    rows = []
    for label, (root, extra) in servers.items():
        for endpoint, (method, path, payload) in payloads.items():
            for n in clients:
                folder = Path(tempfile.mkdtemp(prefix="serve_profile_"))
                out = folder / "stages.json"
                extra_args = (*extra, f"journal={folder / 'journal.jsonl'}", f"events={folder / 'events.sqlite'}")
                launcher = (str(Path(server_process.__file__).resolve()), "--profiled-server", str(out))
                server, url = start_server(artifacts, index, folder, extra=extra_args, root=root, launcher=launcher)
                try:
                    for _ in range(5):
                        httpx.request(method, f"{url}{path}", json=payload(), timeout=60)
                    result = asyncio.run(drive(url, method, path, payload, n, seconds))
                    time.sleep(1.5)  # the server writes its stages every half second
                finally:
                    server.terminate()
                    server.wait(60)
                stages = json.loads(out.read_text())
                shutil.rmtree(folder, ignore_errors=True)
                per = {stage: 1000 * value / max(stages["requests"], 1) for stage, value in stages["stages"].items()}
                cpu = 1000 * stages["cpu"] / max(stages["requests"], 1)
                parse = 1000 * parse_cost(payloads, endpoint)
                rows.append({"server": label, "endpoint": endpoint, "clients": n, "rps": result["rps"],
                             "p99 ms": result["p99 ms"], "CPU ms/request": cpu, **per,
                             "JSON parse + validation (offline)": parse,
                             "HTTP, FastAPI, parsing (rest)": cpu - sum(per.values())})
                print(f"  profile [{label}] {endpoint} x{n}: {cpu:.2f} ms CPU per request", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an export folder (python -m ...export)")
    parser.add_argument("--index", default=None, help="index-<name> of the folder to serve with")
    parser.add_argument("--synthetic-items", type=int, default=0, help="also a synthetic catalogue of this size")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "logs" / "bench" / "serve_load.json")
    parser.add_argument("--baseline-root", type=Path, default=None,
                        help="also serve from this checkout (e.g. `git worktree add /tmp/before HEAD`), side by side")
    parser.add_argument("--batch-wait-ms", type=float, nargs="+", default=None,
                        help="one server of this checkout per setting of batch_wait_ms (default: serve.yaml's)")
    parser.add_argument("--synthetic-folder", type=Path, default=None,
                        help="keep the synthetic catalogue here (made once, reused by later runs)")
    parser.add_argument("--skip-artifacts", action="store_true", help="only the synthetic catalogue")
    parser.add_argument("--profile", action="store_true",
                        help="where a request's time goes: each stage's ms per request, per server and concurrency")
    args = parser.parse_args()
    servers: dict[str, tuple[Path | None, tuple]] = {}
    if args.baseline_root:
        servers["before"] = (args.baseline_root, ())
    for wait in args.batch_wait_ms or [None]:
        label = "after" if wait is None else f"after batch_wait_ms={wait:g}"
        servers[label] = (None, () if wait is None else (f"batch_wait_ms={wait:g}",))
    if args.profile:
        by_user = not load_manifest(args.artifacts).get("synthetic_items")  # as run_catalogue asks each catalogue
        rows = profile(args.artifacts, args.index, payloads_for(args.artifacts, by_user), args.clients, args.seconds,
                       servers)
        columns = ("server", "endpoint", "clients", "rps", "p99 ms", "CPU ms/request", *STAGES,
                   "HTTP, FastAPI, parsing (rest)", "JSON parse + validation (offline)")
        print(f"\nWhere a request's time goes ({machine()}, server OMP_NUM_THREADS=1, {args.seconds:.0f} s per row; "
              "ms per request)\n")
        print(markdown_table([{**row, "catalogue": args.artifacts.name} for row in rows], columns, first="catalogue"))
        write_json_atomic(args.out, {"machine": machine(), "profile": rows})
        return
    rows: list[dict] = []
    if not args.skip_artifacts:
        run_catalogue(args.artifacts.name, args.artifacts, args.index, payloads_for(args.artifacts, True),
                      args.clients, args.seconds, rows, servers)
    if args.synthetic_items:
        folder = args.synthetic_folder or Path(tempfile.mkdtemp(prefix="synthetic_catalogue_"))
        try:
            if not (folder / "index-ivf").is_dir():
                started = time.perf_counter()
                make_synthetic_artifacts(args.artifacts, folder, args.synthetic_items, index="ivf")
                print(f"synthetic catalogue of {args.synthetic_items} items + IVF index in "
                      f"{time.perf_counter() - started:.0f} s", flush=True)
            record_files(folder)
            run_catalogue(f"synthetic {args.synthetic_items:,} items (IVF)", folder, "ivf",
                          payloads_for(folder, False), args.clients, args.seconds, rows, servers)
        finally:
            if args.synthetic_folder is None:
                shutil.rmtree(folder, ignore_errors=True)
    columns = ("server", "endpoint", "clients", "requests", "rps", "p50 ms", "p95 ms", "p99 ms", "errors",
               "p99 / healthz p99")
    print(f"\nServing load ({machine()}, server OMP_NUM_THREADS=1, {args.seconds:.0f} s per row)\n")
    print(markdown_table(rows, columns, first="catalogue"))
    write_json_atomic(args.out, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
