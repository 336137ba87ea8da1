"""Is a difference between two trained settings larger than what the targets themselves make noisy?

Each folder holds the runs of one setting, one per seed: trained models (`<folder>/*/metrics.json`), whose best
checkpoint ranks the validation and the warm test targets again, or baselines (`<folder>/*/per_user.json`, as
`python -m multimodal_rec.evaluate --out <folder>` writes them); each user's NDCG@10 is averaged over the
setting's seeds and compared, user by user, with the reference's (the same seeds). The mean of those paired
differences is the setting's effect, and its standard error over users is the noise that more seeds cannot
remove: every seed ranks the same ~840 targets, so a setting that wins on them may lose on another ~840 drawn
from the same users. Validation and test are two such draws: `compare` says whether their two differences are
further apart than that noise allows (|z| > 1.96). `bench/significance.py` prints the table.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from multimodal_rec.evaluation.protocol import eval_loader
from multimodal_rec.evaluation.ranking import target_ranks
from multimodal_rec.models.loading import resolve_checkpoint, restore_model


class SignificanceError(ValueError):
    """Settings that cannot be compared: no runs, two runs of one seed, no shared seed, other users."""


STAGES = ("val", "test")


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
        raise SignificanceError(f"{spec}: no runs (<folder>/<prefix><run>/metrics.json or per_user.json) found")
    seeds = [seed_of(run) for run in runs]
    if len(set(seeds)) < len(seeds):
        raise SignificanceError(f"{spec} holds two runs of one seed ({', '.join(r.name for r in runs)}): "
                         "name one setting's runs with folder:prefix")
    return {seed: user_ndcg(run) for seed, run in zip(seeds, runs)}


def per_user_mean(runs: dict, seeds: list[str], stage: str) -> tuple[np.ndarray, np.ndarray]:
    """(users, NDCG@10 averaged over the seeds) of one stage; users sorted."""
    users = np.array(sorted(runs[seeds[0]][stage]))
    return users, np.mean([[runs[s][stage][u] for u in users] for s in seeds], axis=0)


def compare(reference: dict, candidate: dict) -> dict:
    seeds = sorted(set(reference) & set(candidate))
    if not seeds:
        raise SignificanceError("a setting shares no seed with the reference")
    row = {"seeds": " ".join(seeds)}
    diffs = {}
    for stage in STAGES:
        users, ref = per_user_mean(reference, seeds, stage)
        others, cand = per_user_mean(candidate, seeds, stage)
        if not np.array_equal(users, others):
            raise SignificanceError(f"the two settings rank different {stage} users (another split or cold fraction): "
                             "nothing to pair")
        d = cand - ref
        se = d.std(ddof=1) / math.sqrt(len(d))
        diffs[stage] = (d.mean(), se)
        row[f"{stage} ndcg@10"] = float(cand.mean())
        row[f"{stage} diff"] = f"{d.mean():+.4f} ± {1.96 * se:.4f}"
    (dv, sv), (dt, st) = diffs["val"], diffs["test"]
    row["val vs test z"] = f"{(dv - dt) / math.hypot(sv, st):+.2f}"
    return row
