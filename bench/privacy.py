"""Privacy-utility table: the multimodal model trained with user-level DP-SGD at several epsilons, against
the same model without privacy and the popularity baseline, on one split (ml100k_mm: cold fraction 0.1).

    OMP_NUM_THREADS=1 python bench/privacy.py --jobs 2 --epsilons inf 8 3 1 -- trainer.max_epochs=12

The privacy unit is a user (all of one person's events); delta = 1 / training users. epsilon = inf is the
ordinary training (early stopping on validation, best epoch); the private runs train for the planned epochs
and are tested on their last weights (choosing an epoch by validation is not covered by the guarantee).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import add_rows, data_overrides, exit_with_parent, print_tables, train_config
from quality import run_baseline

from multimodal_rec.training import train, write_json_atomic


def run(out: Path, overrides: list[str]) -> dict:
    logging.basicConfig(level=logging.WARNING)
    return train(train_config(out, overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="ml100k_mm")
    parser.add_argument("--out", default="logs/bench/privacy", type=Path)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilons", nargs="+", default=["inf", "8", "3", "1"])
    parser.add_argument("--batch-size", type=int, default=256, help="expected users per DP step")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for the private runs (e.g. trainer.max_epochs)")
    args = parser.parse_args()
    base = [*data_overrides(args.data), f"seed={args.seed}"]
    rows = {"test": [], "test_cold": []}
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        futures = {}
        for epsilon in args.epsilons:
            if epsilon == "inf":
                futures[epsilon] = pool.submit(run, args.out / "eps_inf", base)
            else:
                private = ["privacy=dp", f"privacy.epsilon={epsilon}", f"data.batch_size={args.batch_size}",
                           *args.overrides]
                futures[epsilon] = pool.submit(run, args.out / f"eps_{epsilon}", [*base, *private])
        popularity = run_baseline("popularity", base, args.out / "popularity", args.seed)
        for epsilon, future in futures.items():
            outcome = future.result()
            spent = outcome.get("privacy", {}).get("epsilon_spent", float("inf"))
            add_rows(rows, f"multimodal, epsilon {epsilon}", outcome["metrics"], spent=spent,
                     epochs=outcome["epochs"], seconds=outcome["seconds"])
            print(f"epsilon {epsilon}: test NDCG@10 {outcome['metrics'].get('test/ndcg@10'):.4f}", flush=True)
    add_rows(rows, "popularity", popularity["metrics"], spent=0.0, epochs=0, seconds=popularity["seconds"])
    print("\nPrivacy unit: a user (all of their events). delta = 1 / training users.")
    print_tables(rows, f"Privacy and utility on {args.data}, seed {args.seed}", ("spent", "epochs", "seconds"))
    write_json_atomic(args.out / "privacy.json", rows)


if __name__ == "__main__":
    main()
