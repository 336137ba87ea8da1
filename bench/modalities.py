"""Ablation of the modalities on one dataset, in one run: ID-only GRU, + text, + image, the full model,
on the warm test users and on the cold-start items.

    python bench/modalities.py                       # ml100k_mm (needs ../shared/data)
    python bench/modalities.py --data synthetic -- trainer.max_epochs=5
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from common import COLUMNS, machine, markdown_table, train_config, write_json

from multimodal_rec.training import train

VARIANTS = {
    "ID-only GRU": ["model.modalities=[id]"],
    "+ text": ["model.modalities=[id,text]"],
    "+ image": ["model.modalities=[id,image]"],
    "full (id+image+text+attributes)": ["model.modalities=[id,image,text,attributes]"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml100k_mm", help="experiment (ml100k_mm) or data config name")
    parser.add_argument("--out", default="logs/bench/modalities", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every variant")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.data == "ml100k_mm":
        base = ["experiment=ml100k_mm"]
    else:
        base = [f"data={args.data}", "data.cold_item_fraction=0.1"]
    rows = {"test": [], "test_cold": []}
    for name, overrides in VARIANTS.items():
        slug = name.split()[0].replace("+", "plus").lower()
        result = train_config(args.out / slug, [*base, *overrides, *args.overrides])
        outcome = train(result)
        for stage in rows:
            row = {"model": name, "seconds": outcome["seconds"], "epochs": outcome["epochs"]}
            row.update({c: outcome["metrics"].get(f"{stage}/{c}", float("nan")) for c in COLUMNS})
            rows[stage].append(row)
        print(f"{name}: done in {outcome['seconds']} s", flush=True)
    print(f"\nModalities on {args.data}, test split, full ranking ({machine()})\n")
    print(markdown_table(rows["test"], (*COLUMNS, "epochs", "seconds")))
    print("\nCold-start items (never in training), same metrics:\n")
    print(markdown_table(rows["test_cold"], COLUMNS))
    write_json(args.out / "modalities.json", rows)


if __name__ == "__main__":
    main()
