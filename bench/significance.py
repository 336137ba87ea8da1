"""Is a difference between two trained settings larger than what the targets themselves make noisy?

    python -m bench.significance --reference logs/bench/final --settings logs/bench/ema995w2 logs/bench/ls01

Prints, for each setting against the reference, the paired per-user NDCG@10 differences on validation and test
with 1.96 standard errors over users, and whether the two disagree by more than that noise
(multimodal_rec/evaluation/significance.py says how).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from multimodal_rec.evaluation.report import machine, markdown_table
from multimodal_rec.evaluation.significance import STAGES, SignificanceError, compare, setting

COLUMNS = ("seeds", "val ndcg@10", "val diff", "test ndcg@10", "test diff", "val vs test z")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="the reference setting's runs: folder or folder:prefix")
    parser.add_argument("--settings", nargs="+", required=True, help="the settings compared, each as --reference")
    args = parser.parse_args()
    try:
        reference = setting(args.reference)
        rows = [{"setting": spec.rstrip("/").rsplit("/", 1)[-1], **compare(reference, setting(spec))}
                for spec in args.settings]
    except SignificanceError as error:
        sys.exit(f"error: {error}")
    means = {stage: np.mean([np.mean(list(run[stage].values())) for run in reference.values()]) for stage in STAGES}
    print(f"\nNDCG@10 against {args.reference} (validation {means['val']:.4f}, test {means['test']:.4f}, mean of "
          f"{len(reference)} seeds), paired by user, mean of the shared seeds; ± is 1.96 standard errors over users "
          f"({machine()})\n")
    print(markdown_table(rows, COLUMNS, first="setting"))


if __name__ == "__main__":
    main()
