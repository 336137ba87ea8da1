"""The one evaluation protocol: time-ordered leave-one-out, full ranking, earlier items excluded.

Anything that can score every item for a batch of users plugs in through `ScoreFn`; training,
baselines and benchmarks all report through `evaluate`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from multimodal_rec.data.sequences import EvalRows, collate_eval
from multimodal_rec.data.splits import Split
from multimodal_rec.evaluation.metrics import DEFAULT_KS, RankingEvaluator

# batch from `collate_eval` (user, history, target, context_hour, exclude_rows/cols) -> (B, n_items)
ScoreFn = Callable[[dict], Tensor]


def eval_loader(split: Split, stage: str, max_len: int, batch_size: int = 256) -> DataLoader:
    return DataLoader(EvalRows(split, stage, max_len), batch_size=batch_size, collate_fn=collate_eval)


@torch.no_grad()
def evaluate(
    score_fn: ScoreFn,
    split: Split,
    stage: str = "test",
    max_len: int = 50,
    batch_size: int = 256,
    ks=DEFAULT_KS,
    progress: bool = False,
) -> dict[str, float]:
    """Protocol metrics of `score_fn` on the users with a target in `stage` (keys like `ndcg@10`)."""
    evaluator = RankingEvaluator(split.n_items, ks)
    loader = eval_loader(split, stage, max_len, batch_size)
    for batch in tqdm(loader, desc=f"evaluating {stage}", disable=not progress, leave=False):
        scores = score_fn(batch)
        evaluator.update(scores, batch["target"], batch["exclude_rows"], batch["exclude_cols"])
    return evaluator.compute()


def prefixed(metrics: dict[str, float], stage: str) -> dict[str, float]:
    """`ndcg@10` -> `test/ndcg@10` (the metric names of docs/evaluation.md)."""
    return {f"{stage}/{name}": value for name, value in metrics.items()}


def logged_metrics(evaluators: dict[str, RankingEvaluator]) -> dict[str, float]:
    """Evaluators named "<stage>" or "<stage>/<variant>" -> `val/ndcg@10`, `val/retrieval_ndcg@10`, ... and
    `<stage>/n_users`; stages without users are left out."""
    logged = {}
    for name, evaluator in evaluators.items():
        metrics = evaluator.compute()
        if metrics["n_users"] == 0:
            continue
        stage, _, variant = name.partition("/")
        for metric, value in metrics.items():
            if metric != "n_users":
                logged[f"{stage}/{variant + '_' if variant else ''}{metric}"] = value
            elif not variant:
                logged[f"{stage}/n_users"] = value
    return logged
