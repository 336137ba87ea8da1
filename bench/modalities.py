"""Ablation of the modalities on one dataset, in one run: ID-only GRU, + text, + image, the full model (and
both ends with the causal self-attention history encoder instead of the GRU), and the full model with one
of its settings undone (`--variants sampled cosine profile_context small_gru ranker`), on the warm test
users and on the cold-start items; each variant trained with every seed given, the
table shows the mean over seeds (and the standard deviation of NDCG@10).

    python bench/modalities.py                       # ml100k_mm (needs MMREC_SHARED_DATA), seed 0
    OMP_NUM_THREADS=1 python bench/modalities.py --jobs 2 --seeds 0 1 2   # two runs at a time
    python bench/modalities.py --data synthetic --variants id full -- trainer.max_epochs=5
    python bench/modalities.py --seeds 0 1 2 --retest   # test the runs' best checkpoints again, no training
    python bench/modalities.py --seeds 0 1 2 3 --resume # train only what is missing, continue interrupted runs
"""

from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import re
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import COLUMNS, data_overrides, exit_with_parent, print_tables, train_config
from omegaconf import OmegaConf

from multimodal_rec.models.loading import config_differences, read_checkpoint
from multimodal_rec.training import retest, train, write_json_atomic

TRANSFORMER = "model.recommender.history_encoder.rnn=transformer"
FULL = "model.modalities=[id,image,text,attributes]"
VARIANTS = {
    "id": ("ID-only GRU", ["model.modalities=[id]"]),
    "text": ("+ text", ["model.modalities=[id,text]"]),
    "image": ("+ image", ["model.modalities=[id,image]"]),
    "full": ("full (id+image+text+attributes)", ["model.modalities=[id,image,text,attributes]"]),
    "id_transformer": ("ID-only transformer", ["model.modalities=[id]", TRANSFORMER]),
    "full_transformer": ("full, transformer history", ["model.modalities=[id,image,text,attributes]", TRANSFORMER]),
    # the full model with one of its settings undone: what each change is worth
    "sampled": ("full, sampled softmax", [FULL, "model.recommender.loss=sampled"]),
    "cosine": ("full, cosine / temperature", [FULL, "model.recommender.score=cosine"]),
    "profile_context": ("full, + profile and hour", [FULL, "model.recommender.history_encoder.use_profile=true",
                                                     "model.recommender.history_encoder.use_context=true"]),
    "small_gru": ("full, GRU 64 / dropout 0.1", [FULL, "model.recommender.history_encoder.hidden=64",
                                                 "model.recommender.history_encoder.dropout=0.1"]),
    "ranker": ("full, + ranking network", [FULL, "model.recommender.rerank_top=50"]),
}


COMPARED = ("seed", "data", "model", "trainer", "callbacks")  # what a retested run must share with the config


def run_variant(out: Path, overrides: list[str], only_test: bool = False, resume: bool = False) -> dict:
    """Trains (or with only_test, tests again) one run. With resume, a run finished in `out` is tested again
    instead of trained, and an interrupted one continues from its last.ckpt; either must have the settings."""
    logging.basicConfig(level=logging.WARNING)
    cfg = train_config(out, overrides)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    wanted = {key: resolved.get(key) for key in COMPARED}
    if only_test or (resume and (out / "metrics.json").is_file()):
        return retest(out, expect=wanted)
    last = out / "checkpoints" / "last.ckpt"
    if resume and last.is_file():
        differ = config_differences(read_checkpoint(last), wanted)
        if differ:
            raise ValueError(f"{last} was trained with other {differ} than asked for; move {out} away to start over")
        cfg.ckpt_path = str(last)
    return train(cfg)


def mean_rows(name: str, outcomes: list[dict]) -> dict[str, dict]:
    """One row per stage: each metric averaged over the seeds; NDCG@10's spread and the epochs too."""
    rows = {}
    for stage in ("test", "test_cold"):
        values = {c: [o["metrics"].get(f"{stage}/{c}", float("nan")) for o in outcomes] for c in COLUMNS}
        row = {"model": name, **{c: statistics.fmean(v) for c, v in values.items()}}
        ndcg = values["ndcg@10"]
        row["ndcg@10 sd"] = statistics.stdev(ndcg) if len(ndcg) > 1 else float("nan")
        row["seeds"] = len(outcomes)
        row["epochs"] = "/".join(str(o["epochs"]) for o in outcomes)
        # training (fit) time, as bench/quality.py's baselines count theirs; a run from before it was kept: all
        row["seconds"] = round(sum(o.get("fit_seconds", o["seconds"]) for o in outcomes) / len(outcomes))
        row["per seed ndcg@10"] = [round(x, 4) for x in ndcg]
        rows[stage] = row
    return rows


def paired_gain(test_rows: list[dict]) -> dict | None:
    """The full model against the ID-only GRU seed by seed (a seed gives both the same data order and split):
    the gains in test NDCG@10, their mean and standard error, and on how many seeds the full model is ahead."""
    per_seed = {row["model"]: row["per seed ndcg@10"] for row in test_rows}
    full, base = per_seed.get(VARIANTS["full"][0]), per_seed.get(VARIANTS["id"][0])
    if full is None or base is None:
        return None
    gains = [round(f - b, 4) for f, b in zip(full, base)]
    error = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else float("nan")
    return {"gains": gains, "mean": round(statistics.fmean(gains), 4), "standard_error": round(error, 4),
            "ahead": sum(g > 0 for g in gains), "seeds": len(gains)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml100k_mm", help="experiment (ml100k_mm) or data config name")
    parser.add_argument("--out", default="logs/bench/modalities", type=Path)
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="a run per seed; the table averages them")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["id", "text", "image", "full"])
    parser.add_argument("--retest", action="store_true",
                        help="no training: test each run's best checkpoint again (same settings required)")
    parser.add_argument("--resume", action="store_true",
                        help="keep what --out holds: finished runs are tested again, not trained; interrupted ones "
                             "continue from their last.ckpt (same settings required)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    base = data_overrides(args.data)
    rows = {"test": [], "test_cold": []}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {}
        for key in args.variants:
            name, overrides = VARIANTS[key]
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")  # one run folder per variant and seed
            futures[key] = [pool.submit(run_variant, args.out / f"{slug}_seed{seed}",
                                        [*base, *overrides, f"seed={seed}", *args.overrides], args.retest,
                                        args.resume)
                            for seed in args.seeds]
        for key, runs in futures.items():  # rows in the table's order, whichever finishes first
            outcomes = [run.result() for run in runs]
            for stage, row in mean_rows(VARIANTS[key][0], outcomes).items():
                rows[stage].append(row)
            print(f"{VARIANTS[key][0]}: done, test NDCG@10 per seed {rows['test'][-1]['per seed ndcg@10']}",
                  flush=True)
    title = f"Modalities on {args.data}, test split, full ranking, mean of seeds {args.seeds}"
    print_tables(rows, title, ("ndcg@10 sd", "seeds", "epochs", "seconds"))
    gain = paired_gain(rows["test"])
    if gain is not None:
        print(f"\nFull model - ID-only GRU, test NDCG@10 per seed: {' / '.join(f'{g:+.4f}' for g in gain['gains'])}; "
              f"mean {gain['mean']:+.4f} (standard error {gain['standard_error']:.4f}), "
              f"ahead on {gain['ahead']} of {gain['seeds']} seeds")
    write_json_atomic(args.out / "modalities.json", {**rows, "full_minus_id": gain})


if __name__ == "__main__":
    main()
