"""Ablation of the modalities on one dataset, in one run: ID-only GRU, + text, + image, the full model,
on the warm test users and on the cold-start items.

    python bench/modalities.py                       # ml100k_mm (needs ../shared/data)
    python bench/modalities.py --data synthetic -- trainer.max_epochs=5
    OMP_NUM_THREADS=1 python bench/modalities.py --jobs 2   # two variants at a time, one process each
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import add_rows, data_overrides, print_tables, train_config

from multimodal_rec.training import train, write_json_atomic

VARIANTS = {
    "ID-only GRU": ["model.modalities=[id]"],
    "+ text": ["model.modalities=[id,text]"],
    "+ image": ["model.modalities=[id,image]"],
    "full (id+image+text+attributes)": ["model.modalities=[id,image,text,attributes]"],
}


def run_variant(out: Path, overrides: list[str]) -> dict:
    logging.basicConfig(level=logging.WARNING)
    return train(train_config(out, overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml100k_mm", help="experiment (ml100k_mm) or data config name")
    parser.add_argument("--out", default="logs/bench/modalities", type=Path)
    parser.add_argument("--jobs", type=int, default=1, help="variants trained at once, each in its own process")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = data_overrides(args.data)
    rows = {"test": [], "test_cold": []}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for name, overrides in VARIANTS.items():
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")  # one run folder per variant
            futures[name] = pool.submit(run_variant, args.out / slug, [*base, *overrides, *args.overrides])
        for name, future in futures.items():  # rows in the table's order, whichever finishes first
            outcome = future.result()
            add_rows(rows, name, outcome["metrics"], epochs=outcome["epochs"], seconds=outcome["seconds"])
            print(f"{name}: done in {outcome['seconds']} s", flush=True)
    print_tables(rows, f"Modalities on {args.data}, test split, full ranking", ("epochs", "seconds"))
    write_json_atomic(args.out / "modalities.json", rows)


if __name__ == "__main__":
    main()
