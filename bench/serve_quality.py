"""Ranking quality as a shop's client sees it: every user's history sent to `/recommend` over HTTP.

    python train.py experiment=ml100k_mm_serve hydra.run.dir=logs/train/ml100k_mm_serve
    python bench/serve_quality.py --run logs/train/ml100k_mm_serve --artifacts artifacts/ml100k_mm_serve

(`experiment=ml100k_mm_serve`: the benchmark's model on all items, refit with the validation targets; any run
folder works, e.g. `experiment=ml100k_mm data.cold_item_fraction=0` without the refit.)

Exports the run and builds a flat (exact) index with the project's own commands when `--artifacts` has none,
starts `python serve.py` on loopback, and for each user sends the whole history but the last interaction
(ordered by timestamp, ties by item id, as the protocol orders them), the hour of that last interaction and
`exclude_seen: true`, then scores the answer against the held-out last item: HR@10, NDCG@10, MRR@10, HR@20,
NDCG@20 over all users. No user id is sent, so the server cannot read the held-out item from its stored
histories.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, markdown_table  # noqa: E402
from bench.server_process import start_server  # noqa: E402
from multimodal_rec.data.schema import load_dataset  # noqa: E402
from multimodal_rec.data.sequences import hour_of_day  # noqa: E402
from multimodal_rec.data.splits import build_split  # noqa: E402
from multimodal_rec.embeddings import MANIFEST_FILE  # noqa: E402
from multimodal_rec.evaluation.metrics import RankingEvaluator  # noqa: E402
from multimodal_rec.training import write_json_atomic  # noqa: E402

K = 20


def prepare_artifacts(run: Path, artifacts: Path) -> None:
    """export + flat index, as the README's pipeline runs them."""
    if not (artifacts / MANIFEST_FILE).is_file():
        subprocess.run([sys.executable, "-m", "multimodal_rec.export", f"ckpt_path={run}", f"out={artifacts}"],
                       check=True)
    if not (artifacts / "index-flat").is_dir():
        subprocess.run([sys.executable, "-m", "multimodal_rec.index", f"embeddings={artifacts}", "index=flat"],
                       check=True)


def requests_of(data_dir: Path) -> list[tuple[dict, int]]:
    """(request body, held-out item id) per user with at least two interactions."""
    dataset = load_dataset(data_dir)
    split = build_split(dataset, 0.0)
    item_ids = dataset.items["item_id"].to_numpy(np.int64)
    out = []
    for user in range(split.n_users):
        items = split.sequence(user)
        if len(items) < 2:
            continue
        last = split.offsets[user + 1] - 1
        body = {"history": item_ids[items[:-1]].tolist(), "k": K, "exclude_seen": True,
                "context": {"hour": int(hour_of_day(split.timestamps[last]))}}
        out.append((body, int(item_ids[items[-1]])))
    return out


async def ask_all(url: str, requests: list[tuple[dict, int]], clients: int) -> list[int | None]:
    """The held-out item's rank (0-based) in each answer's top K, None where it is not there."""
    ranks: list[int | None] = [None] * len(requests)
    queue = list(enumerate(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            position, (body, target) = queue.pop()
            answer = await client.post("/recommend", json=body)
            if answer.status_code != 200:
                raise RuntimeError(f"/recommend answered {answer.status_code}: {answer.text[:500]}")
            ids = [item["item_id"] for item in answer.json()["items"]]
            if set(ids) & set(body["history"]):
                raise RuntimeError(f"exclude_seen returned history items: {set(ids) & set(body['history'])}")
            ranks[position] = ids.index(target) if target in ids else None

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return ranks


def metrics(ranks: list[int | None]) -> dict:
    """The protocol's metrics from the target ranks (None: not in the answer's top K)."""
    evaluator = RankingEvaluator(n_items=1, ks=(10, K))
    evaluator.add_ranks(torch.tensor([K if r is None else r for r in ranks]))
    values = evaluator.compute()
    return {key: values[key] for key in ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20")} | {"users": len(ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a training run folder (or checkpoint) to export first")
    parser.add_argument("--artifacts", type=Path, required=True, help="export folder (written from --run if new)")
    parser.add_argument("--data", type=Path, default=Path("data/ml100k_mm"), help="the prepared dataset")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("logs/bench/serve_quality.json"))
    args = parser.parse_args()
    if args.run is not None:
        prepare_artifacts(args.run, args.artifacts)
    requests = requests_of(args.data)
    with tempfile.TemporaryDirectory() as log_dir:
        server, url = start_server(args.artifacts, "flat", Path(log_dir))
        try:
            ranks = asyncio.run(ask_all(url, requests, args.clients))
        finally:
            server.kill()
    result = metrics(ranks)
    print(f"\n/recommend with each user's history but the last item, exclude_seen ({machine()})\n")
    print(markdown_table([{"model": str(args.artifacts), **result}], ("users", "hr@10", "ndcg@10", "mrr@10",
                                                                      "hr@20", "ndcg@20")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"artifacts": str(args.artifacts), **result})


if __name__ == "__main__":
    main()
