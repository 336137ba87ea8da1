"""Start time of a server whose journal holds many items added through the API (with pictures).

    OMP_NUM_THREADS=1 python -m bench.journal_start --artifacts artifacts/synthetic --items 10000

`--distinct` items with their own text and a 640x480 picture are added through the service (as POST /items
does: encoded, journaled with their vectors); the journal is then grown to `--items` additions by repeating
them under new ids. Measured side by side on one journal: the service's start (load + replay) when the
journal keeps each addition's vector (the same model: nothing is encoded again), and when it does not (what
every start cost before the vectors were kept, and what a reload of another model costs now), the latter on
the first `--encode-items` additions only and scaled to `--items` (it grows linearly: one encoding an item);
start with an empty journal is the floor. One start per setting; the journal file's size is printed too.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import machine, markdown_table
from multimodal_rec.serving.service import RecommenderService


def picture(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def grown_journal(root: Path, distinct: int, total: int) -> tuple[Path, float]:
    """A journal of `total` additions; returns it and the seconds one addition took through the service."""
    journal = root / "seed.jsonl"
    service = RecommenderService(root / "current", artifacts_root=root, journal=journal)
    started = time.perf_counter()
    for number in range(distinct):
        service.add_item(9_000_000 + number, f"added {number}", f"a new product, number {number}",
                         picture(number), {})
    per_item = (time.perf_counter() - started) / distinct
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    grown = root / "journal.jsonl"
    with open(grown, "w") as handle:
        for number in range(total):
            entry = json.loads(json.dumps(entries[number % distinct]))
            entry["item"]["item_id"] = 9_000_000 + number
            handle.write(json.dumps(entry) + "\n")
    return grown, per_item


def timed_start(root: Path, journal: Path | None) -> tuple[float, int]:
    started = time.perf_counter()
    service = RecommenderService(root / "current", artifacts_root=root, journal=journal)
    return time.perf_counter() - started, len(service.artifacts.item_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True, help="an export folder (serving parts written)")
    parser.add_argument("--items", type=int, default=10_000, help="additions in the journal")
    parser.add_argument("--distinct", type=int, default=50, help="items actually encoded, repeated to --items")
    parser.add_argument("--encode-items", type=int, default=500, help="additions the 'encoded again' start reads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        shutil.copytree(args.artifacts, root / "current")
        journal, per_item = grown_journal(root, args.distinct, args.items)
        stripped, encoded = root / "stripped.jsonl", min(args.encode_items, args.items)
        with open(journal) as source, open(stripped, "w") as target:
            for _, line in zip(range(encoded), source):
                entry = json.loads(line)
                entry.pop("encoded")
                target.write(json.dumps(entry) + "\n")
        rows = []
        for name, path in (("empty journal", None), ("vectors kept (same model)", journal),
                           (f"encoded again (before; another model), {encoded} additions", stripped)):
            seconds, items = timed_start(root, path)
            rows.append({"start": name, "seconds": round(seconds, 2), "items served": items,
                         "journal MB": round(path.stat().st_size / 2**20, 1) if path else 0})
            print(rows[-1], flush=True)
        floor, scaled = rows[0]["seconds"], rows[-1]
        rows.append({"start": f"encoded again, scaled to {args.items} additions",
                     "seconds": round(floor + (scaled["seconds"] - floor) * args.items / encoded, 1),
                     "items served": f"({args.items} + catalogue)", "journal MB": ""})
        for row in rows:
            row["x empty"] = f"{row['seconds'] / floor:.1f}x"
    print(f"{machine()}; {args.items} journaled additions with pictures; one addition through the service: "
          f"{per_item * 1000:.0f} ms")
    print(markdown_table(rows, ("seconds", "x empty", "items served", "journal MB"), first="start"))


if __name__ == "__main__":
    main()
