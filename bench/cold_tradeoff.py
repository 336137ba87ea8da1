"""What cold-start hits cost warm users when cold items are pushed up: the trade-off of a score offset.

    python bench/cold_tradeoff.py --runs logs/bench/dim128_wide/full_id_image_text_attributes_seed*
    python bench/cold_tradeoff.py --split val --runs ...   # on the validation targets: to choose an offset
    python bench/cold_tradeoff.py --recent-from 1997 --runs ...   # the offset on cold items of 1997 or later only

For each trained run (a folder with metrics.json, trained with cold items held out) it scores the warm and the
cold-start test users by retrieval, as evaluation does for a model without the ranking network, then again with
`offset` added to every cold item's score (items never trained on: their vectors come from content alone), and
prints the mean over the runs per offset: warm NDCG@10 / HR@10 against cold NDCG@10 / HR@10. Offset 0 is the
model as trained and served. `--recent-from Y` gives the offset only to cold items whose `year` attribute is Y
or later (new releases: a larger share of the targets than of the catalogue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, markdown_table  # noqa: E402
from multimodal_rec.evaluation.protocol import evaluate  # noqa: E402
from multimodal_rec.models.loading import resolve_checkpoint, restore_model  # noqa: E402

OFFSETS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)
COLUMNS = ("warm ndcg@10", "warm hr@10", "cold ndcg@10", "cold hr@10", "cold share of top 10")


@torch.no_grad()
def tradeoff(run: Path, offsets: tuple[float, ...], split_name: str = "test", recent_from: float | None = None
             ) -> list[dict]:
    """One row per offset for one run, on the test (or validation) targets; with `recent_from`, the offset goes
    to the cold items of that year or later only."""
    model, datamodule, _ = restore_model(resolve_checkpoint(run))  # its data set up as training had it
    split = datamodule.split
    if not len(split.cold_items):
        raise SystemExit(f"{run} was trained without cold items (data.cold_item_fraction=0): nothing to trade")
    vectors, biases = model.all_item_embeddings()
    cold = torch.zeros(split.n_items)
    cold[torch.as_tensor(split.cold_items)] = 1.0
    boosted = cold  # the items the offset goes to
    if recent_from is not None:
        items = datamodule.dataset.items
        if "year" not in items:
            raise SystemExit(f"{run}: the items have no `year` attribute for --recent-from")
        boosted = cold * torch.as_tensor((items["year"] >= recent_from).to_numpy(), dtype=torch.float32)
    warm_users, cold_users = (len(split.target_positions(stage)[0]) for stage in (split_name, f"{split_name}_cold"))
    rows = []
    for offset in offsets:
        shown = [0.0, 0]  # cold items in every user's top 10, slots

        def score(batch, offset=offset, shown=shown):
            scores = model.score_batch(batch, vectors, biases)["retrieval"] + offset * boosted
            masked = scores.clone()
            masked[batch["exclude_rows"], batch["exclude_cols"]] = float("-inf")
            top = masked.topk(10, dim=1).indices
            shown[0] += float(cold[top].sum())
            shown[1] += top.numel()
            return scores

        row = {"offset": f"{offset:g}", "cold share of targets": cold_users / (warm_users + cold_users)}
        for stage, name in ((split_name, "warm"), (f"{split_name}_cold", "cold")):
            metrics = evaluate(score, split, stage, datamodule.max_len)
            row[f"{name} ndcg@10"], row[f"{name} hr@10"] = metrics["ndcg@10"], metrics["hr@10"]
        row["cold share of top 10"] = shown[0] / shown[1]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="training run folders (metrics.json)")
    parser.add_argument("--offsets", type=float, nargs="+", default=list(OFFSETS))
    parser.add_argument("--recent-from", type=float, help="the offset only on cold items of this year or later")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="val: the validation targets (choose an offset there, read test once)")
    args = parser.parse_args()
    per_run = [tradeoff(run, tuple(args.offsets), args.split, args.recent_from) for run in args.runs]
    rows = [{"offset": group[0]["offset"], **{c: sum(r[c] for r in group) / len(group) for c in COLUMNS}}
            for group in zip(*per_run)]
    share = per_run[0][0]["cold share of targets"]
    print(f"\nCold items' scores + offset, {args.split} targets ({share:.1%} of them cold items), mean of "
          f"{len(per_run)} runs ({machine()})\n")
    print(markdown_table(rows, COLUMNS, first="offset"))


if __name__ == "__main__":
    main()
