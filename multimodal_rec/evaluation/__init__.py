"""Offline evaluation: leave-one-out full-ranking metrics and click-prediction metrics."""

from .metrics import (
    DEFAULT_KS,
    RankingEvaluator,
    auc,
    evaluate_scores,
    log_loss,
    log_loss_with_logits,
    target_ranks,
)

__all__ = ["DEFAULT_KS", "RankingEvaluator", "auc", "evaluate_scores", "log_loss",
           "log_loss_with_logits", "target_ranks"]
