"""Terms of the retrieval softmax that depend on the batch alone: the items a position must not be trained
against (`mask_seen`), the sampled loss's log-Q correction (`log_inclusion`) and the loss on the items further
ahead (`future_loss`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mask_seen(similarity: torch.Tensor, batch: dict, valid: torch.Tensor, positives: torch.Tensor,
              pad: int) -> torch.Tensor:
    """(P, N) full-softmax scores -> each position's softmax without the user's earlier items (those before the
    window, `before`, and the window's up to the position): evaluation and serving never rank them, so training
    need not push them down. The target keeps its score (a repeated item is still a target). `pad` = N."""
    history, target_scores = batch["history"], similarity.gather(1, positives[:, None])
    steps = torch.arange(history.shape[1], device=history.device)
    later = steps[None, :] > steps[:, None]  # (t, s): item s comes after position t
    seen = history[:, None, :].expand(-1, len(steps), -1).masked_fill(later, pad)[valid]  # (P, L)
    sink = torch.cat([similarity, similarity.new_zeros(len(similarity), 1)], dim=1)  # column `pad` absorbs pads
    similarity = sink.scatter(1, seen, float("-inf"))
    if "before" in batch:  # (B, K) left-padded items before the window (TrainWindows.carry_before)
        earlier = similarity.new_zeros((len(history), similarity.shape[1]), dtype=torch.bool)
        earlier.scatter_(1, batch["before"], True)  # (B, N + 1)
        similarity = similarity.masked_fill(earlier[torch.nonzero(valid, as_tuple=True)[0]], float("-inf"))
    return similarity[:, :pad].scatter(1, positives[:, None], target_scores)


def log_inclusion(candidates: torch.Tensor, n_positives: int, log_popularity: torch.Tensor, num_negatives: int,
                  pool_size: int) -> torch.Tensor:
    """log P(candidate is in the de-duplicated pool): in-batch targets are drawn by popularity, so without this
    correction popular items are pushed down as negatives (log-Q correction). `num_negatives` uniform draws
    from `pool_size` trained items."""
    share = torch.exp(log_popularity[candidates] - log_popularity.logsumexp(0))
    expected = n_positives * share + num_negatives / pool_size
    return torch.log(-torch.expm1(-expected))  # 1 - (1 - p)^n ~ 1 - exp(-expected)


def future_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, steps: int,
                ignore: int) -> torch.Tensor:
    """Cross-entropy of each position's (P, N) logits on the items 2..1+steps steps ahead (the next item is the
    main loss's), averaged over the steps a window still holds: the query learns what the user goes on to take,
    not only the next item, which is what ranking one step beyond the training data asks (PinnerFormer's dense
    future loss). `targets` (B, L) are the next items (`ignore` where none), `valid` their (B, L) mask."""
    ahead = torch.full((steps, *targets.shape), ignore, dtype=targets.dtype, device=targets.device)
    for step in range(1, steps + 1):
        ahead[step - 1, :, :-step] = targets[:, step:]  # the next item of position t + step
    ahead = ahead[:, valid].T  # (P, steps)
    held = ahead != ignore
    log_probs = logits.log_softmax(dim=1).gather(1, ahead.clamp_min(0))  # one softmax for every step
    per_step = -torch.where(held, log_probs, 0.0).sum(0) / held.sum(0).clamp_min(1)  # (steps,)
    reached = held.any(0)
    return (per_step * reached).sum() / reached.sum().clamp_min(1)  # 0 when no window looks that far ahead


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing over the candidates a row can score (columns at -inf, the items never
    trained on, take no share; torch's `label_smoothing` would give them one and return inf)."""
    if smoothing == 0:
        return F.cross_entropy(logits, labels)
    log_probs = logits.log_softmax(dim=1)
    finite = torch.isfinite(logits)
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    uniform = -torch.where(finite, log_probs, 0.0).sum(1) / finite.sum(1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()
