"""Soak test of the ranking endpoint: many clients for minutes, reads and writes mixed, then checks; once per
load-shedding setting (serve.yaml max_in_flight; 0: off), the settings side by side at the end.

    OMP_NUM_THREADS=1 python bench/serve_soak.py --artifacts artifacts/ml100k_mm --seconds 120 --clients 32
    OMP_NUM_THREADS=1 python bench/serve_soak.py --artifacts ... --seconds 10 --max-in-flight 0 8

`serve.py` runs as its own process with a write token and a journal in a temporary artifacts root. Each
client loops over a mix of /recommend (40%), /rank 100 items (20%), /items/{id}/similar (20%), POST /items
(10%: new items added in pairs of identical text, one after the other) and DELETE /items/{id} (10%: from a pool of 200
catalogue items). Reported: requests, 5xx and other errors by endpoint, p50/p99 latency, the server's RSS
(after warm-up, peak, end), and afterwards every added item must be the nearest neighbour of its twin
(found by /items/{twin}/similar) and no withdrawn item may be recommended. A /similar answer of 410 (the item
was withdrawn meanwhile) is counted apart: it is the designed answer, and so is a 503 with Retry-After where
shedding is on (the client then waits Retry-After seconds, as a well-behaved client does). A prober on its own
connection asks /healthz every 50 ms meanwhile: its p99 is what a liveness probe sees under that load.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, markdown_table  # noqa: E402
from bench.serve_load import Connection  # noqa: E402
from bench.server_process import start_server  # noqa: E402
from multimodal_rec.config import PROJECT_ROOT  # noqa: E402
from multimodal_rec.embeddings import read_embeddings  # noqa: E402
from multimodal_rec.training import write_json_atomic  # noqa: E402

TOKEN = "soak-token"
MIX = {"recommend": 0.4, "rank": 0.2, "similar": 0.2, "add": 0.1, "withdraw": 0.1}
FIRST_NEW_ID = 900_000_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class SoakConnection(Connection):
    """Connection that also reads Retry-After when the answer is a shed request's (503 from the shedding
    middleware), which tells it from a failure (a 503 because writes are unavailable has Retry-After too)."""

    async def request(self, method: str, path: str, payload) -> tuple[int, float | None]:
        status, headers, content = await self.exchange(method, path, payload)
        shed = status == 503 and b"requests in flight" in content and "retry-after" in headers
        return status, (float(headers["retry-after"]) if shed else None)


class Soak:
    def __init__(self, catalog: pd.DataFrame, users: list[int], seed: int):
        self.rng = random.Random(seed)
        self.items, self.users, self.titles = catalog["item_id"].tolist(), users, catalog["title"].tolist()
        self.withdraw_pool = self.rng.sample(self.items, min(200, len(self.items) // 4))
        self.added: list[tuple[int, int]] = []  # (id, twin id)
        self.withdrawn: set[int] = set()
        self.next_id = FIRST_NEW_ID
        self.stats = {name: {"latencies": [], "5xx": 0, "shed": 0, "410 (withdrawn)": 0, "other errors": 0}
                      for name in MIX}  # latencies: of the requests not shed

    def requests(self, kind: str) -> list[tuple[str, str, dict | None, int | None]]:
        """(method, path, body, subject) to send in turn: an addition is a pair of twins (ids 2p, 2p + 1)."""
        rng = self.rng
        if kind == "recommend":
            return [("POST", "/recommend", {"user_id": rng.choice(self.users), "k": 10}, None)]
        if kind == "rank":
            body = {"history": rng.sample(self.items, 5), "items": rng.sample(self.items, 100)}
            return [("POST", "/rank", body, None)]
        if kind == "similar":
            return [("GET", f"/items/{rng.choice(self.items)}/similar?k=10", None, None)]
        if kind == "add":
            pair, self.next_id = self.next_id // 2, self.next_id + 2
            text = f"{self.titles[pair % len(self.titles)]} soak {pair}"
            return [("POST", "/items", {"item_id": new_id, "title": f"soak {new_id}", "text": text}, new_id)
                    for new_id in (2 * pair, 2 * pair + 1)]
        item = rng.choice(self.withdraw_pool)
        return [("DELETE", f"/items/{item}", None, item)]

    async def client(self, connection: SoakConnection, stop: float, added: dict) -> None:
        while time.perf_counter() < stop:
            kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
            for method, path, body, subject in self.requests(kind):
                started = time.perf_counter()
                try:
                    status, retry_after = await connection.request(method, path, body)
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
                    connection.close()
                    connection.writer, status, retry_after = None, 599, None
                stats = self.stats[kind]
                if retry_after is not None:
                    stats["shed"] += 1  # refused at once by design: wait as told, not counted as a failure
                    await asyncio.sleep(min(retry_after, max(0.0, stop - time.perf_counter())))
                    continue
                stats["latencies"].append(time.perf_counter() - started)
                if status >= 500:
                    stats["5xx"] += 1
                elif status == 410 and kind == "similar":
                    stats["410 (withdrawn)"] += 1  # asked about an item withdrawn meanwhile: as designed
                elif status >= 300:
                    stats["other errors"] += 1
                elif kind == "add":
                    added[subject] = body
                elif kind == "withdraw":
                    self.withdrawn.add(subject)


async def drive(soak: Soak, url: str, clients: int, seconds: float, pid: int, rss: list,
                health: list) -> dict:
    host, port = url.removeprefix("http://").split(":")
    connections = [SoakConnection(host, int(port), TOKEN) for _ in range(clients)]
    prober = SoakConnection(host, int(port))
    stop, added = time.perf_counter() + seconds, {}

    async def sample():
        while time.perf_counter() < stop:
            rss.append(rss_mb(pid))
            await asyncio.sleep(1)

    async def probe():  # a liveness probe beside the load: one /healthz every 50 ms
        while time.perf_counter() < stop:
            started = time.perf_counter()
            status, _ = await prober.request("GET", "/healthz", None)
            health.append((time.perf_counter() - started, status))
            await asyncio.sleep(0.05)

    await asyncio.gather(sample(), probe(), *(soak.client(c, stop, added) for c in connections))
    for connection in [*connections, prober]:
        connection.close()
    return added


def check_after(url: str, soak: Soak, added: dict) -> dict:
    """Every added item is the nearest neighbour of its twin; no withdrawn item comes back."""
    found = missing = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        for new_id in sorted(added):
            twin = new_id ^ 1
            if twin not in added:
                continue
            answer = client.get(f"/items/{twin}/similar", params={"k": 10}).json()
            hit = new_id in [item["item_id"] for item in answer["items"]]
            found, missing = found + hit, missing + (not hit)
        leaked = 0
        for user in soak.users[:200]:
            items = client.post("/recommend", json={"user_id": user, "k": 50}).json()["items"]
            leaked += len({item["item_id"] for item in items} & soak.withdrawn)
    return {"added items": len(added), "found by their twin's /similar": found, "not found": missing,
            "withdrawn items": len(soak.withdrawn), "withdrawn items recommended (200 users, top 50)": leaked}


def run_setting(args, max_in_flight: int) -> dict:
    """One soak against a fresh server (and a fresh copy of the artifacts) with `max_in_flight`."""
    root = Path(tempfile.mkdtemp(prefix="serve_soak_"))
    try:
        shutil.copytree(args.artifacts, root / "artifacts")
        catalog = pd.read_parquet(root / "artifacts" / "catalog.parquet")
        users = [int(u) for u in read_embeddings(root / "artifacts", "users", verify=False)[0]]
        soak = Soak(catalog, users, seed=0)
        server, url = start_server(root / "artifacts", None, root, env={"MMREC_WRITE_TOKEN": TOKEN},
                                   extra=(f"artifacts_root={root}",), max_in_flight=max_in_flight)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            for i in range(20):  # warm-up: every kind of request, so the encoders' buffers exist before RSS is read
                httpx.post(f"{url}/recommend", json={"user_id": users[0], "k": 10}, timeout=60)
                httpx.post(f"{url}/items", json={"item_id": FIRST_NEW_ID - 100 + i, "title": "w", "text": "warm up"},
                           headers=headers, timeout=60)
                httpx.get(f"{url}/items/{soak.items[i]}/similar", timeout=60)
            rss, health = [rss_mb(server.pid)], []
            added = asyncio.run(drive(soak, url, args.clients, args.seconds, server.pid, rss, health))
            rss.append(rss_mb(server.pid))
            checks = check_after(url, soak, added)
        finally:
            server.terminate()
            server.wait(30)
        journal_lines = len((root / "journal.jsonl").read_text().splitlines())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = []
    for kind, stats in soak.stats.items():
        ms = np.asarray(stats["latencies"]) * 1000
        rows.append({"endpoint": kind, "requests": len(ms) + stats["shed"], "5xx": stats["5xx"], "shed": stats["shed"],
                     "other errors": stats["other errors"], "410 (withdrawn)": stats["410 (withdrawn)"],
                     "p50 ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
                     "p99 ms": float(np.percentile(ms, 99)) if len(ms) else float("nan")})
    accepted = np.concatenate([np.asarray(stats["latencies"]) for stats in soak.stats.values()]) * 1000
    health_ms = np.asarray([latency for latency, _ in health]) * 1000
    requests, shed = sum(r["requests"] for r in rows), sum(r["shed"] for r in rows)
    summary = {"shedding": f"on (max_in_flight={max_in_flight})" if max_in_flight else "off",
               "requests": requests, "5xx": sum(r["5xx"] for r in rows), "shed (503)": shed,
               "share shed": f"{shed / max(requests, 1):.1%}", "other errors": sum(r["other errors"] for r in rows),
               "accepted p50 ms": float(np.percentile(accepted, 50)),
               "accepted p99 ms": float(np.percentile(accepted, 99)),
               "/healthz p99 ms": float(np.percentile(health_ms, 99)), "/healthz max ms": float(health_ms.max()),
               "/healthz not 200": sum(status != 200 for _, status in health)}
    memory = {"RSS after warm-up MB": rss[0], "peak MB": max(rss), "end MB": rss[-1], "growth MB": max(rss) - rss[0]}
    print(f"\nSoak, shedding {summary['shedding']}: {args.clients} clients for {args.seconds:.0f} s\n")
    print(markdown_table(rows, ("requests", "5xx", "shed", "other errors", "410 (withdrawn)", "p50 ms", "p99 ms"),
                         first="endpoint"))
    print("\n" + "\n".join(f"- {k}: {v:.0f}" for k, v in memory.items()))
    print("\n".join(f"- {k}: {v}" for k, v in checks.items()) + f"\n- journal lines: {journal_lines}")
    return {"max_in_flight": max_in_flight, "rows": rows, "summary": summary, "memory": memory, "checks": checks,
            "journal_lines": journal_lines}


def failures(result: dict, rss_bound_mb: float) -> list[str]:
    summary, checks, growth = result["summary"], result["checks"], result["memory"]["growth MB"]
    failed = [f"{summary['5xx']} 5xx"] if summary["5xx"] else []
    failed += ["errors other than 5xx"] if summary["other errors"] else []
    failed += [f"/healthz answered {summary['/healthz not 200']} times not 200"] if summary["/healthz not 200"] else []
    failed += [f"RSS grew {growth:.0f} MB"] if growth > rss_bound_mb else []
    failed += ["added items not found"] if checks["not found"] else []
    failed += ["withdrawn items recommended"] if checks["withdrawn items recommended (200 users, top 50)"] else []
    return [f"shedding {summary['shedding']}: {failure}" for failure in failed]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an export folder (python -m ...export)")
    parser.add_argument("--seconds", type=float, default=120.0, help="per setting")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-in-flight", type=int, nargs="+", default=[0, 8],
                        help="the shedding settings to compare (serve.yaml max_in_flight; 0: off); one soak each. "
                        "Below --clients for shedding to happen at all")
    parser.add_argument("--rss-bound-mb", type=float, default=300.0, help="allowed RSS growth past warm-up")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "logs" / "bench" / "serve_soak.json")
    args = parser.parse_args()
    results = [run_setting(args, bound) for bound in args.max_in_flight]
    print(f"\nShedding compared: {args.clients} clients, {args.seconds:.0f} s each ({machine()}, server "
          "OMP_NUM_THREADS=1); 5xx excludes the shed answers (503 + Retry-After), counted apart\n")
    print(markdown_table([r["summary"] for r in results], ("requests", "5xx", "shed (503)", "share shed",
                                                            "accepted p50 ms", "accepted p99 ms", "/healthz p99 ms",
                                                            "/healthz max ms"), first="shedding"))
    write_json_atomic(args.out, {"machine": machine(), "clients": args.clients, "seconds": args.seconds,
                                 "settings": results})
    failed = [failure for result in results for failure in failures(result, args.rss_bound_mb)]
    if failed:
        sys.exit("soak FAILED: " + ", ".join(failed))
    print(f"soak passed: zero 5xx besides shed answers, RSS growth under {args.rss_bound_mb:.0f} MB, every added "
          "item found, no withdrawn item recommended")


if __name__ == "__main__":
    main()
