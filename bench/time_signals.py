"""How much the clock says about the next item, before any model: is a time feature worth building?

    python bench/time_signals.py                  # ml100k_mm, the split the models are evaluated on
    python bench/time_signals.py --runs logs/bench/final/full_id_image_text_attributes_seed*   # on a model

For each validation and test target at time t it ranks all items by their training interactions in the
`W` days before t (strictly before: nothing after the query time is read; ties by all training
interactions before t), the user's earlier items excluded, and prints NDCG@10 / HR@10 per window, against
all-time popularity. It also prints how long after the user's previous event the targets come (the
"time since last event" feature a query tower could read). With `--runs` (trained runs, each on its own
split), it adds beta * log(1 + the item's training interactions in the W days before t) to the model's
retrieval scores instead: what the clock adds to what the model already knows.
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


def training_events(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """(items, timestamps) of the training interactions in time order: sorted once, read by every window."""
    train = split.train_interactions().sort_values("timestamp", kind="stable")
    return train["item"].to_numpy(), train["timestamp"].to_numpy()


def recent_counts(events: tuple[np.ndarray, np.ndarray], split: Split, stage: str, days: int | None) -> np.ndarray:
    """(targets of `stage`, N): each item's training interactions (`training_events`) in the `days` before the
    target's time (strictly before t; all of them before it with None)."""
    items, times = events
    _, positions = split.target_positions(stage)
    counts = np.empty((len(positions), split.n_items))
    for row, position in enumerate(positions):
        t = split.timestamps[position]
        before = np.searchsorted(times, t, side="left")  # events strictly before t
        start = 0 if days is None else np.searchsorted(times, t - days * DAY, side="left")
        counts[row] = np.bincount(items[start:before], minlength=split.n_items)
    return counts


def popularity_ranks(counts: np.ndarray, split: Split, stage: str) -> np.ndarray:
    """0-based rank of each target of `stage` when items are ordered by `counts` (`recent_counts`)."""
    users, positions = split.target_positions(stage)
    ranks = np.empty(len(users), dtype=np.int64)
    for row, (user, position) in enumerate(zip(users, positions)):
        score = counts[row]
        score[split.seen(int(user), stage)] = -1.0
        ranks[row] = int((score > score[split.items[position]]).sum())
    return ranks


@torch.no_grad()
def blended(run: Path, betas: tuple[float, ...], windows: tuple[int, ...]) -> dict:
    """{(stage, days, beta): NDCG@10} of a trained run's retrieval scores + beta * log(1 + recent counts)."""
    from multimodal_rec.evaluation.protocol import eval_loader
    from multimodal_rec.models.loading import resolve_checkpoint, restore_model

    model, datamodule, _ = restore_model(resolve_checkpoint(run))
    split, vectors, biases = datamodule.split, *model.all_item_embeddings()
    events, out = training_events(split), {}
    for stage in ("val", "test"):
        batches = list(eval_loader(split, stage, datamodule.max_len))
        scores = torch.cat([model.score_batch(batch, vectors, biases)["retrieval"] for batch in batches])
        for days in windows:
            recent = torch.log1p(torch.from_numpy(recent_counts(events, split, stage, days)).float())
            for beta in betas:
                evaluator, start = RankingEvaluator(split.n_items, ks=(10,)), 0
                for batch in batches:
                    rows = slice(start, start + len(batch["target"]))
                    evaluator.update(scores[rows] + beta * recent[rows], batch["target"], batch["exclude_rows"],
                                     batch["exclude_cols"])
                    start = rows.stop
                out[(stage, days, beta)] = evaluator.compute()["ndcg@10"]
    return out


def print_blends(runs: list[Path]) -> None:
    betas, windows = (0.0, 0.05, 0.1, 0.2, 0.3), (1, 7, 30)
    per_run = [blended(run, betas, windows) for run in runs]
    rows = [{"window": f"{days} days", "beta": f"{beta:g}",
             **{f"{stage} ndcg@10": float(np.mean([r[(stage, days, beta)] for r in per_run]))
                for stage in ("val", "test")}}
            for days in windows for beta in betas]
    print(f"\nThe model's retrieval scores + beta * log(1 + training interactions in the window before t), mean of "
          f"{len(runs)} runs ({machine()})\n")
    print(markdown_table(rows, ("beta", "val ndcg@10", "test ndcg@10"), first="window"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/ml100k_mm"), help="a prepared dataset")
    parser.add_argument("--cold-item-fraction", type=float, default=0.1)
    parser.add_argument("--runs", type=Path, nargs="+", help="trained runs: blend the clock into their scores")
    args = parser.parse_args()
    if args.runs:
        print_blends(args.runs)
        return
    split = build_split(load_dataset(args.data), args.cold_item_fraction, seed=0)
    events, rows = training_events(split), []
    all_before = {stage: recent_counts(events, split, stage, None) for stage in ("val", "test")}
    for days in WINDOWS:
        row = {"signal": f"training interactions in the {days} days before t" if days else "all before t"}
        for stage in ("val", "test"):
            counts = all_before[stage] if days is None else recent_counts(events, split, stage, days)
            ranks = popularity_ranks(counts + 1e-6 * all_before[stage], split, stage)  # ties: all before t
            evaluator = RankingEvaluator(split.n_items, ks=(10,))
            evaluator.add_ranks(torch.from_numpy(ranks))
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
