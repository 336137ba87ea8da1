"""Helpers shared by the benchmark scripts: composing configs outside a Hydra app, printing tables."""

from __future__ import annotations

import json
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


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
