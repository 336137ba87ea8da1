"""Reports of the evaluation: configs composed outside a Hydra app, tables printed as markdown."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from multimodal_rec.config import CONF_DIR

COLUMNS = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "coverage@10")


def train_config(output_dir: Path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return f"{platform.node()} ({torch.get_num_threads()} threads, {device}), {time.strftime('%Y-%m-%d')}"


def markdown_table(rows: list[dict], columns: tuple, first: str = "model") -> str:
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append(f"| {row[first]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_overrides(data: str) -> list[str]:
    """`ml100k_mm` means its experiment (10% cold items); any other name is a data config with 10% cold."""
    return ["experiment=ml100k_mm"] if data == "ml100k_mm" else [f"data={data}", "data.cold_item_fraction=0.1"]


def add_rows(rows: dict[str, list], name: str, metrics: dict, **extra) -> None:
    """One table row per stage (`test`, `test_cold`) from `stage/metric` keys."""
    for stage, table in rows.items():
        table.append({"model": name, **extra, **{c: metrics.get(f"{stage}/{c}", float("nan")) for c in COLUMNS}})


def print_tables(rows: dict[str, list], title: str, extra_columns: tuple) -> None:
    print(f"\n{title} ({machine()})\n")
    print(markdown_table(rows["test"], (*COLUMNS, *extra_columns)))
    print("\nCold-start items (never in training), same metrics:\n")
    print(markdown_table(rows["test_cold"], COLUMNS))
