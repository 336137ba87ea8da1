"""Does the guide learn from the shop it serves? Time replayed over HTTP against `python serve.py`.

    python bench/replay.py                                              # train, export, replay all (~20k events)
    python bench/replay.py --artifacts logs/bench/replay/artifacts --max-events 4000   # reuse the export

T is the time by which `--quantile` (0.8) of all events had happened. A model is trained on the events before T
(`data.before_quantile`: users without an earlier event are unknown to it, items without one are its new
arrivals), exported, and served; the events at or after T are replayed in time order (ties by user, item). Before
each event the user's top 10 is asked for (POST /recommend, exclude_seen, context.time = the event's time): a hit
when the event's item is in it, its rank giving NDCG@10. Then, where the setting posts events, the event is
posted (POST /events). A user the server does not know (a new customer before their first posted event; in
`static` always) is asked for without a user id (`{"k": 10}`: the server's popularity answer), not counted a miss.

Settings, each on a fresh server (own event store and journal) from the same export: `static` (no events
posted), `live` (events posted: histories grow, new customers become known), `live + signals` (posted, with the
`--signals` serve.py overrides for the online signals), and `popularity (live counts)`, computed here from every
event before T and those replayed so far (the most popular items the user has not seen).

The first half of the replayed events tunes: a setting's overrides may hold several values (`key=a,b`; every
combination of `--tune`, and for `live + signals` of `--signals` too, is one candidate), each candidate replays
the first half, the best by overall HR@10 replays on through the second half, on which the table reports.
Groups: all events; events on new arrivals (items without an event before T); events of new customers (users
without an event before T).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from bench.server_process import start_server  # noqa: E402
from multimodal_rec.config import PROJECT_ROOT  # noqa: E402
from multimodal_rec.data.schema import load_dataset  # noqa: E402
from multimodal_rec.embeddings import MANIFEST_FILE  # noqa: E402

K = 10
TOKEN = "replay-write-token"
DEFAULT_SIGNALS = ["live.trending_weight=0.1,0.3,1.0", "live.new_arrival_weight=0,1.0"]
GROUPS = ("all", "new arrivals", "new customers")
SETTINGS = {"static": "static", "live": "live", "signals": "live + signals", "popularity": "popularity (live counts)"}


def grid(overrides: list[str]) -> list[list[str]]:
    """Every combination of the comma-separated values: ["a=1,2", "b=3"] -> [["a=1", "b=3"], ["a=2", "b=3"]]."""
    choices = [[f"{key}={value}" for value in values.split(",")]
               for key, values in (override.split("=", 1) for override in overrides)]
    return [list(combination) for combination in itertools.product(*choices)]


def train_and_export(out: Path, args) -> Path:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run, artifacts = out / "run", out / "artifacts"
    if not (run / "metrics.json").is_file():
        subprocess.run([sys.executable, "train.py", f"experiment={args.experiment}",
                        f"data.before_quantile={args.quantile}", f"trainer.max_epochs={args.epochs}",
                        f"hydra.run.dir={run}", *args.train], cwd=PROJECT_ROOT, env=env, check=True)
    if not (artifacts / MANIFEST_FILE).is_file():
        subprocess.run([sys.executable, "-m", "multimodal_rec.export", f"ckpt_path={run}", f"out={artifacts}"],
                       cwd=PROJECT_ROOT, env=env, check=True)
    return artifacts


def replay_events(data_dir: Path, artifacts: Path) -> tuple[int, pd.DataFrame, pd.DataFrame]:
    """(T, events before T, events at or after T in replay order with their groups), T read from the export."""
    manifest = json.loads((artifacts / MANIFEST_FILE).read_text())
    found = re.search(r"-before(\d+)", manifest["data_fingerprint"])
    if found is None:
        raise SystemExit(f"{artifacts} was not trained on a time cut (data.before_quantile / before_time)")
    cut = int(found.group(1))
    events = load_dataset(data_dir).interactions[["user_id", "item_id", "timestamp", "event"]]
    before = events[events["timestamp"] < cut]
    after = events[events["timestamp"] >= cut].sort_values(["timestamp", "user_id", "item_id"], kind="stable")
    after = after.reset_index(drop=True)
    after["new arrivals"] = ~after["item_id"].isin(before["item_id"])
    after["new customers"] = ~after["user_id"].isin(before["user_id"])
    if before["user_id"].nunique() != manifest["counts"]["users"]:
        raise SystemExit(f"{artifacts} holds {manifest['counts']['users']} users, the data before T "
                         f"{before['user_id'].nunique()}: another data folder? (--data)")
    return cut, before, after


class ServedReplay:
    """One candidate: a fresh server (own event store, journal) and the ranks of the events it replayed."""

    def __init__(self, artifacts: Path, overrides: list[str], post: bool, known: set, log_root: Path):
        self.overrides, self.post, self.known = overrides, post, set(known)
        self.log_dir = Path(tempfile.mkdtemp(prefix="replay-", dir=log_root))
        extra = (f"journal={self.log_dir / 'journal.jsonl'}", f"events={self.log_dir / 'events.sqlite'}", *overrides)
        self.server, url = start_server(artifacts, None, self.log_dir, env={"MMREC_WRITE_TOKEN": TOKEN}, extra=extra)
        self.client = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"})
        self.ranks: list[int] = []  # per replayed event: 0-based rank in the top K, K = a miss
        self.anonymous = 0  # asked without a user id (unknown to the server)

    def run(self, events: pd.DataFrame, start: int, stop: int, label: str) -> None:
        rows = events.iloc[start:stop]
        for user, item, when, name in tqdm(zip(rows["user_id"].tolist(), rows["item_id"].tolist(),
                                               rows["timestamp"].tolist(), rows["event"].tolist()),
                                           total=len(rows), desc=label, mininterval=5):
            body = {"k": K, "exclude_seen": True, "context": {"time": when}}
            answer = self.client.post("/recommend", json={"user_id": user, **body}) if user in self.known else None
            if answer is None or answer.status_code == 404:  # unknown to the server: its popularity answer
                self.anonymous += 1
                answer = self.client.post("/recommend", json=body)
            answer.raise_for_status()
            ids = [entry["item_id"] for entry in answer.json()["items"]]
            self.ranks.append(ids.index(item) if item in ids else K)
            if self.post:
                posted = self.client.post("/events", json={"events": [
                    {"user_id": user, "item_id": item, "event": str(name), "time": when,
                     "event_id": f"{user}-{item}-{when}"}]})
                if posted.status_code != 200:
                    raise RuntimeError(f"POST /events answered {posted.status_code}: {posted.text[:300]}")
                self.known.add(user)

    def close(self) -> None:
        self.client.close()
        self.server.kill()
        self.server.wait()


def popularity_ranks(before: pd.DataFrame, events: pd.DataFrame, item_ids: np.ndarray) -> list[int]:
    """The most popular items (every event before T and replayed so far) the user has not seen, ties by item id."""
    row = {item: i for i, item in enumerate(item_ids)}
    counts = np.bincount(before["item_id"].map(row), minlength=len(item_ids)).astype(np.int64)
    seen = before.groupby("user_id")["item_id"].agg(lambda items: {row[i] for i in items}).to_dict()
    ranks = []
    for user, item in tqdm(zip(events["user_id"].tolist(), events["item_id"].tolist()), total=len(events),
                           desc="popularity (live counts)", mininterval=5):
        mine = seen.setdefault(user, set())
        order = np.lexsort((np.arange(len(counts)), -counts))  # most counted first, ties by lower index
        top = [r for r in order[: K + len(mine)] if r not in mine][:K]
        ranks.append(top.index(row[item]) if row[item] in top else K)
        counts[row[item]] += 1
        mine.add(row[item])
    return ranks


def figures(ranks: np.ndarray, events: pd.DataFrame, part: slice) -> dict:
    """HR@10 and NDCG@10 per group over the events of `part`, with their counts."""
    ranks, events = np.asarray(ranks)[part], events.iloc[part]
    out = {}
    for group in GROUPS:
        mask = np.ones(len(events), bool) if group == "all" else events[group].to_numpy()
        hits = ranks[mask] < K
        gains = np.where(hits, 1.0 / np.log2(np.minimum(ranks[mask], K - 1) + 2.0), 0.0)
        out[group] = {"n": int(mask.sum()), "hr@10": float(hits.mean()) if mask.any() else float("nan"),
                      "ndcg@10": float(gains.mean()) if mask.any() else float("nan")}
    return out


def tuned(name: str, candidates: list[list[str]], post: bool, events: pd.DataFrame, half: int, args, known: set,
          log_root: Path) -> dict:
    """Every candidate over the first half; the best by overall HR@10 on through the second half."""
    best, tried = None, []
    for overrides in candidates:
        started = time.time()
        replay = ServedReplay(args.artifacts, overrides, post, known, log_root)
        try:
            replay.run(events, 0, half, " ".join([name, *overrides, "(1st half)"]))
        except BaseException:
            replay.close()
            raise
        first = figures(replay.ranks, events, slice(0, half))
        tried.append({"setting": name, "overrides": overrides, "first_half": first,
                      "seconds": round(time.time() - started, 1)})
        if best is None or first["all"]["hr@10"] > best[1]["all"]["hr@10"]:
            if best is not None:
                best[0].close()
            best = (replay, first)
        else:
            replay.close()
    (replay, first), resumed = best, time.time()
    try:
        replay.run(events, half, len(events), " ".join([name, *replay.overrides, "(2nd half)"]))
    finally:
        replay.close()
    return {"setting": name, "overrides": replay.overrides, "first_half": first, "anonymous": replay.anonymous,
            "second_half": figures(replay.ranks, events, slice(half, len(events))), "tried": tried,
            "seconds": round(sum(t["seconds"] for t in tried) + time.time() - resumed, 1)}  # servers' starts too


def table(results: list[dict], counts: dict) -> str:
    head = ["setting", "1st half HR@10"] + [f"{metric} {group} (n={counts[group]:,})"
                                           for group in GROUPS for metric in ("HR@10", "NDCG@10")]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for result in results:
        name = result["setting"] + (f" ({' '.join(result['overrides'])})" if result.get("overrides") else "")
        cells = [f"{result['first_half']['all']['hr@10']:.3f}"] + [
            f"{result['second_half'][group][metric]:.3f}" for group in GROUPS for metric in ("hr@10", "ndcg@10")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, help="an export of a time-cut model (skips training)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "logs/bench/replay",
                        help="run/ and artifacts/ are written here without --artifacts; replay.json always")
    parser.add_argument("--data", type=Path, default=PROJECT_ROOT / "data/ml100k_mm", help="the prepared dataset")
    parser.add_argument("--quantile", type=float, default=0.8, help="T: the time by which this share had happened")
    parser.add_argument("--experiment", default="ml100k_mm_serve")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--train", nargs="*", default=[], help="more train.py overrides")
    parser.add_argument("--max-events", type=int, help="replay only the first N events after T")
    parser.add_argument("--tune", nargs="*", default=[], help="serve.py overrides for every server setting, "
                        "key=a,b: each combination a candidate, chosen on the first half")
    parser.add_argument("--signals", nargs="*", default=DEFAULT_SIGNALS,
                        help=f"serve.py overrides of `live + signals`, likewise (default: {' '.join(DEFAULT_SIGNALS)})")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    args.artifacts = (args.artifacts or train_and_export(args.out, args)).resolve()
    trained = round(time.time() - started, 1)
    cut, before, events = replay_events(args.data, args.artifacts)
    events = events.iloc[: args.max_events] if args.max_events else events
    half = (len(events) + 1) // 2
    second = events.iloc[half:]
    counts = {group: int(len(second) if group == "all" else second[group].sum()) for group in GROUPS}
    print(f"T = {cut} ({pd.Timestamp(cut, unit='s', tz='UTC').isoformat()}): {len(before):,} events before, "
          f"{len(events):,} replayed ({half:,} to tune, {len(second):,} reported)")
    known, results = set(before["user_id"].tolist()), []
    log_root = Path(tempfile.mkdtemp(prefix="replay-servers-", dir=args.out))
    plans = {"static": (grid(args.tune), False), "live": (grid(args.tune), True),
             "signals": (grid(args.tune + args.signals), True)}
    for name in args.settings:
        if name == "popularity":
            began = time.time()
            ranks = popularity_ranks(before, events, load_dataset(args.data).items["item_id"].to_numpy())
            results.append({"setting": SETTINGS[name], "overrides": [],
                            "first_half": figures(ranks, events, slice(0, half)),
                            "second_half": figures(ranks, events, slice(half, len(events))),
                            "seconds": round(time.time() - began, 1)})
        else:
            results.append(tuned(SETTINGS[name], *plans[name], events, half, args, known, log_root))
        print(f"{results[-1]['setting']}: {results[-1]['seconds']} s", flush=True)
    print(f"\nReplay of {len(events):,} events after T over HTTP; figures on the second half ({machine()})\n")
    print(table(results, counts))
    tried = [t for r in results for t in r.get("tried", []) if len(r["tried"]) > 1]
    if tried:
        print("\nCandidates on the first half (overall HR@10 / NDCG@10):\n")
        for t in tried:
            print(f"- {t['setting']} {' '.join(t['overrides'])}: {t['first_half']['all']['hr@10']:.3f} / "
                  f"{t['first_half']['all']['ndcg@10']:.3f}")
    shutil.rmtree(log_root)  # the servers' logs and event stores (kept when a run fails)
    wall = round(time.time() - started, 1)
    print(f"\nwall time {wall} s ({trained} s of it training and exporting)")
    (args.out / "replay.json").write_text(json.dumps(
        {"artifacts": str(args.artifacts), "cut_time": cut, "events": len(events), "half": half,
         "results": results, "wall_seconds": wall, "train_export_seconds": trained}, indent=1))


if __name__ == "__main__":
    main()
