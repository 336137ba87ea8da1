"""Is a difference between two trained settings larger than what the targets themselves make noisy?

    python bench/significance.py --reference logs/bench/final --settings logs/bench/ema995w2 logs/bench/ls01

Each folder holds the runs of one setting, one per seed: trained models (`<folder>/*/metrics.json`, as
`bench/modalities.py --out <folder>` writes them), whose best checkpoint ranks the validation and the warm test
targets again, or baselines (`<folder>/*/per_user.json`, as `bench/quality.py --out <folder>` writes them);
each user's NDCG@10 is averaged over the setting's seeds and compared, user by user, with the reference's
(the same seeds). The mean of those paired differences is the setting's effect, and its standard error over
users is the noise that more seeds cannot remove: every seed ranks the same ~840 targets, so a setting that
wins on them may lose on another ~840 drawn from the same users. Validation and test are two such draws; the
last column says whether their two differences are further apart than that noise allows (|z| > 1.96).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, markdown_table  # noqa: E402
from multimodal_rec.evaluation.protocol import eval_loader  # noqa: E402
from multimodal_rec.evaluation.ranking import target_ranks  # noqa: E402
from multimodal_rec.models.loading import resolve_checkpoint, restore_model  # noqa: E402

STAGES = ("val", "test")
COLUMNS = ("seeds", "val ndcg@10", "val diff", "test ndcg@10", "test diff", "val vs test z")


@torch.no_grad()
def user_gains(score_fn, split, max_len: int) -> dict[str, dict[int, float]]:
    """{stage: {user: NDCG@10}} of a scorer (batch -> (B, N) scores) on the validation and test targets."""
    out = {}
    for stage in STAGES:
        out[stage] = {}
        for batch in eval_loader(split, stage, max_len):
            ranks = target_ranks(score_fn(batch), batch["target"], batch["exclude_rows"], batch["exclude_cols"])
            gains = torch.where(ranks < 10, 1.0 / torch.log2(ranks.double() + 2), 0.0)
            out[stage].update(zip(batch["user"].tolist(), gains.tolist()))
    return out


@torch.no_grad()
def user_ndcg(run: Path) -> dict[str, dict[int, float]]:
    """{stage: {user: NDCG@10}} of one run: its best checkpoint scored as its evaluation scored it, or a
    baseline's `per_user.json`."""
    if (run / "per_user.json").is_file():
        saved = json.loads((run / "per_user.json").read_text())
        return {stage: {int(user): gain for user, gain in saved[stage].items()} for stage in STAGES}
    model, datamodule, _ = restore_model(resolve_checkpoint(run))
    vectors, biases = model.all_item_embeddings()

    def score(batch):
        scores = model.score_batch(batch, vectors, biases)
        return scores.get("ranked", scores["retrieval"])

    return user_gains(score, datamodule.split, datamodule.max_len)


def seed_of(run: Path) -> str:
    return run.name.rsplit("seed", 1)[-1]


def setting(spec: str) -> dict[str, dict[str, dict[int, float]]]:
    """{seed: user_ndcg} of every run in a setting's folder (`folder`, or `folder:prefix` for the runs whose
    names start with prefix, where one folder holds several settings)."""
    folder, _, prefix = spec.partition(":")
    folder = Path(folder)
    runs = sorted({p.parent for pattern in (f"{prefix}*/metrics.json", f"{prefix}*/per_user.json")
                   for p in folder.glob(pattern)})
    if not runs:
        raise SystemExit(f"{spec}: no runs (<folder>/<prefix><run>/metrics.json or per_user.json) found")
    seeds = [seed_of(run) for run in runs]
    if len(set(seeds)) < len(seeds):
        raise SystemExit(f"{spec} holds two runs of one seed ({', '.join(r.name for r in runs)}): "
                         "name one setting's runs with folder:prefix")
    return {seed: user_ndcg(run) for seed, run in zip(seeds, runs)}


def per_user_mean(runs: dict, seeds: list[str], stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(users, NDCG@10 averaged over the seeds) of one stage; users sorted."""
    users = np.array(sorted(runs[seeds[0]][stage]))
    return users, np.mean([[runs[s][stage][u] for u in users] for s in seeds], axis=0)


def compare(reference: dict, candidate: dict) -> dict:
    seeds = sorted(set(reference) & set(candidate))
    if not seeds:
        raise SystemExit("a setting shares no seed with the reference")
    row = {"seeds": " ".join(seeds)}
    diffs = {}
    for stage in STAGES:
        users, ref = per_user_mean(reference, seeds, stage)
        others, cand = per_user_mean(candidate, seeds, stage)
        if not np.array_equal(users, others):
            raise SystemExit(f"the two settings rank different {stage} users (another split or cold fraction): "
                             "nothing to pair")
        d = cand - ref
        se = d.std(ddof=1) / math.sqrt(len(d))
        diffs[stage] = (d.mean(), se)
        row[f"{stage} ndcg@10"] = float(cand.mean())
        row[f"{stage} diff"] = f"{d.mean():+.4f} ± {1.96 * se:.4f}"
    (dv, sv), (dt, st) = diffs["val"], diffs["test"]
    row["val vs test z"] = f"{(dv - dt) / math.hypot(sv, st):+.2f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the reference setting's runs: folder or folder:prefix")
    parser.add_argument("--settings", nargs="+", required=True, help="the settings compared, each as --reference")
    args = parser.parse_args()
    reference = setting(args.reference)
    rows = [{"setting": spec.rstrip("/").rsplit("/", 1)[-1], **compare(reference, setting(spec))}
            for spec in args.settings]
    means = {stage: np.mean([np.mean(list(run[stage].values())) for run in reference.values()]) for stage in STAGES}
    print(f"\nNDCG@10 against {args.reference} (validation {means['val']:.4f}, test {means['test']:.4f}, mean of "
          f"{len(reference)} seeds), paired by user, mean of the shared seeds; ± is 1.96 standard errors over users "
          f"({machine()})\n")
    print(markdown_table(rows, COLUMNS, first="setting"))


if __name__ == "__main__":
    main()
