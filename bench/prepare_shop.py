"""The generic reader at scale: a generated shop of `--events` events and `--items` products written as CSV
(string SKUs and customer ids, ISO times, view / cart / purchase), prepared by `data=tabular` twice in fresh
processes. Prints wall time and peak memory (RSS) of each step, against `pandas.read_csv` of the event file
alone and the reader's imports alone in the same run, and whether both preparations give the same dataset
fingerprint.

    python bench/prepare_shop.py                         # 1M events, 100k products
    python bench/prepare_shop.py --events 200000 --items 20000 --chunk-rows 50000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, markdown_table

ROOT = Path(__file__).resolve().parents[1]
EVENTS_PER_USER = 27  # what the generated shop gives: ~15 purchases a user, each a view, some a cart and purchase

MEASURE = """
import resource, runpy, sys, time
started = time.perf_counter()
sys.argv = sys.argv[1:]
try:
    if sys.argv[0] == "read_csv":
        import pandas
        pandas.read_csv(sys.argv[1])
    elif sys.argv[0] == "import":
        import multimodal_rec.data.prepare, multimodal_rec.data.sources.tabular
    else:
        runpy.run_module(sys.argv[0], run_name="__main__")
finally:
    # VmHWM: this process's own peak (ru_maxrss would carry over the parent's peak through fork and exec)
    try:
        status = open("/proc/self/status").read()
        peak = int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("MEASURED", time.perf_counter() - started, peak, file=sys.stderr)
"""


def measured(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of `python -m <args>` (or read_csv <file>) in a fresh process."""
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    line = [x for x in done.stderr.splitlines() if x.startswith("MEASURED")][-1]
    _, seconds, rss = line.split()
    return float(seconds), float(rss)


def write_shop(folder: Path, events: int, items: int, seed: int) -> dict:
    """The example shop, large, without pictures; the event log cut to exactly `events` rows."""
    import pandas as pd

    from multimodal_rec.data.sources.example_shop import write_example_shop

    users = max(10, int(events / EVENTS_PER_USER * 1.1))
    paths = write_example_shop(folder, "csv", n_items=items, n_users=users, seed=seed, images=False)
    log = pd.read_csv(paths["interactions"])
    if len(log) < events:
        raise SystemExit(f"the generator gave {len(log)} events, fewer than {events}: raise EVENTS_PER_USER's margin")
    log.iloc[:events].to_csv(paths["interactions"], index=False)
    return {"events": events, "products": items, "events MB": paths["interactions"].stat().st_size / 2**20,
            "products MB": paths["items"].stat().st_size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--chunk-rows", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "bench" / "prepare_shop.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prepare_shop-"))
    try:
        started = time.perf_counter()
        sizes = write_shop(work / "shop", args.events, args.items, args.seed)
        print(f"wrote the shop in {time.perf_counter() - started:.0f} s: {sizes}")
        rows, fingerprints = [], []
        seconds, rss = measured(["read_csv", str(work / "shop" / "events.csv")])
        rows.append({"step": "pandas.read_csv(events.csv) alone", "s": seconds, "peak RSS MiB": rss})
        base = seconds
        seconds, rss = measured(["import"])
        rows.append({"step": "import the reader, no data", "s": seconds, "peak RSS MiB": rss})
        for attempt in (1, 2):
            out = work / f"prepared{attempt}"
            seconds, rss = measured(["multimodal_rec.data.prepare", "data=tabular", "data.name=bench_shop",
                                     f"data.source.folder={work / 'shop'}", "data.source.users=null",
                                     "data.source.items.columns.image=null",
                                     f"data.source.chunk_rows={args.chunk_rows}",
                                     f"out={out}"])
            manifest = json.loads((out / "manifest.json").read_text())
            fingerprints.append(manifest["fingerprint"])
            rows.append({"step": f"prepare data=tabular (run {attempt})", "s": seconds, "peak RSS MiB": rss})
        for row in rows:
            row["x read_csv"] = row["s"] / base
        print(f"\n{machine()}; {sizes['events']:,} events ({sizes['events MB']:.0f} MB CSV), "
              f"{sizes['products']:,} products ({sizes['products MB']:.0f} MB), chunk_rows {args.chunk_rows:,}")
        print(markdown_table(rows, ("s", "x read_csv", "peak RSS MiB"), first="step"))
        print(f"\nprepared: {manifest['counts']}; filtered: {manifest['filtered']}; "
              f"issues: {manifest['issues']['counts']}")
        same = fingerprints[0] == fingerprints[1]
        print(f"fingerprints: {fingerprints[0]} / {fingerprints[1]} -> {'the same' if same else 'DIFFERENT'}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "sizes": sizes, "rows": rows,
                                        "fingerprints": fingerprints, "counts": manifest["counts"]}, indent=2))
        if not same:
            raise SystemExit("the two preparations differ")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
