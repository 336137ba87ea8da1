"""How much the clock says about the next item, before any model: is a time feature worth building?

    python bench/time_signals.py                  # ml100k_mm, the split the models are evaluated on

For each validation and test target at time t it ranks all items by their training interactions in the
`W` days before t (strictly before: nothing after the query time is read; ties by all training
interactions before t), the user's earlier items excluded, and prints NDCG@10 / HR@10 per window, against
all-time popularity. It also prints how long after the user's previous event the targets come (the
"time since last event" feature a query tower could read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, markdown_table  # noqa: E402
from multimodal_rec.data.schema import load_dataset  # noqa: E402
from multimodal_rec.data.splits import Split, build_split  # noqa: E402
from multimodal_rec.evaluation.metrics import RankingEvaluator  # noqa: E402

DAY = 86_400
WINDOWS = (1, 7, 14, 30, 90, None)  # days; None: every training interaction before t


def recent_popularity_ranks(split: Split, stage: str, days: int | None) -> np.ndarray:
    """0-based rank of each target of `stage` when items are ordered by their training interactions in the
    `days` before the target's time (all of them before it with None)."""
    train = split.train_interactions().sort_values("timestamp", kind="stable")
    items, times = train["item"].to_numpy(), train["timestamp"].to_numpy()
    users, positions = split.target_positions(stage)
    ranks = np.empty(len(users), dtype=np.int64)
    for row, (user, position) in enumerate(zip(users, positions)):
        t = split.timestamps[position]
        before = np.searchsorted(times, t, side="left")  # events strictly before t
        start = 0 if days is None else np.searchsorted(times, t - days * DAY, side="left")
        score = np.bincount(items[start:before], minlength=split.n_items).astype(np.float64)
        score += 1e-6 * np.bincount(items[:before], minlength=split.n_items)
        score[split.seen(int(user), stage)] = -1.0
        target = split.items[position]
        ranks[row] = int((score > score[target]).sum())
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/ml100k_mm"), help="a prepared dataset")
    parser.add_argument("--cold-item-fraction", type=float, default=0.1)
    args = parser.parse_args()
    split = build_split(load_dataset(args.data), args.cold_item_fraction, seed=0)
    rows = []
    for days in WINDOWS:
        row = {"signal": f"training interactions in the {days} days before t" if days else "all before t"}
        for stage in ("val", "test"):
            evaluator = RankingEvaluator(split.n_items, ks=(10,))
            evaluator.add_ranks(torch.from_numpy(recent_popularity_ranks(split, stage, days)))
            values = evaluator.compute()
            row[f"{stage} hr@10"], row[f"{stage} ndcg@10"] = values["hr@10"], values["ndcg@10"]
        rows.append(row)
    print(f"\nRecent popularity as the only signal ({machine()})\n")
    print(markdown_table(rows, ("val hr@10", "val ndcg@10", "test hr@10", "test ndcg@10"), first="signal"))
    gaps = []
    for stage in ("val", "test"):
        users, positions = split.target_positions(stage)
        positions = positions[positions > split.offsets[users]]  # the user has an earlier event
        gap = (split.timestamps[positions] - split.timestamps[positions - 1]) / 3600
        gaps.append({"signal": stage, "median h": float(np.median(gap)), "share > 1 h": float((gap > 1).mean()),
                     "share > 1 day": float((gap > 24).mean())})
    print("\nTime from the user's previous event to the target\n")
    print(markdown_table(gaps, ("median h", "share > 1 h", "share > 1 day"), first="signal"))


if __name__ == "__main__":
    main()
