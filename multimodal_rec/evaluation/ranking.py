"""Full-ranking kernels: pessimistic target ranks and deterministic top-K lists, in memory or chunked.

See :mod:`multimodal_rec.evaluation.metrics` for the protocol. Top-K lists order items by
(score descending, item index ascending) among non-excluded items; NaN scores count as -inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Pairs = tuple[Tensor, Tensor] | None


def clean_scores(scores: Tensor) -> Tensor:
    """NaN -> -inf (other items only; a NaN target is rejected before this is used)."""
    return torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)


def check_targets(targets: Tensor, batch: int, n_items: int) -> Tensor:
    if targets.dim() != 1 or targets.shape[0] != batch:
        raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer item indices, got dtype {targets.dtype}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_items):
        raise ValueError(f"targets must lie in [0, {n_items}), got range "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    return targets.long()


def check_scores(scores: Tensor, targets: Tensor) -> Tensor:
    """Validate (B, N) scores against (B,) targets; returns long targets on the scores' device."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D (B, N), got shape {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be floating point, got dtype {scores.dtype}")
    return check_targets(targets, scores.shape[0], scores.shape[1]).to(scores.device)


def check_exclusions(exclude_rows: Tensor | None, exclude_cols: Tensor | None, targets: Tensor,
                     n_items: int) -> Pairs:
    """Validate (E,) (row, item) exclusion pairs; returns long tensors on the targets' device or None."""
    if exclude_rows is None and exclude_cols is None:
        return None
    if exclude_rows is None or exclude_cols is None:
        raise ValueError("exclude_rows and exclude_cols must be given together")
    rows = torch.as_tensor(exclude_rows).to(targets.device)
    cols = torch.as_tensor(exclude_cols).to(targets.device)
    if rows.dim() != 1 or rows.shape != cols.shape:
        raise ValueError(f"exclude_rows/exclude_cols must be 1-D of equal length, got "
                         f"{tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.dtype.is_floating_point or cols.dtype.is_floating_point:
        raise ValueError("exclude_rows/exclude_cols must be integer tensors")
    rows, cols = rows.long(), cols.long()
    if rows.numel() == 0:
        return None
    batch = targets.shape[0]
    if int(rows.min()) < 0 or int(rows.max()) >= batch:
        raise ValueError(f"exclude_rows must lie in [0, {batch}), got [{int(rows.min())}, {int(rows.max())}]")
    if int(cols.min()) < 0 or int(cols.max()) >= n_items:
        raise ValueError(f"exclude_cols must lie in [0, {n_items}), "
                         f"got [{int(cols.min())}, {int(cols.max())}]")
    clash = int((targets[rows] == cols).sum())
    if clash:
        raise ValueError(f"{clash} exclusion pair(s) exclude the user's own target; the protocol never "
                         "excludes the target")
    return rows, cols


def check_target_scores(target_scores: Tensor) -> None:
    n_nan = int(torch.isnan(target_scores).sum())
    if n_nan:
        raise ValueError(f"target score is NaN in {n_nan} row(s)")


def _ranks(scores: Tensor, targets: Tensor, pairs: Pairs) -> Tensor:
    """Validated inputs -> (B,) pessimistic 0-based ranks."""
    batch = scores.shape[0]
    arange = torch.arange(batch, device=scores.device)
    target_scores = scores[arange, targets]  # (B,)
    check_target_scores(target_scores)
    ge = clean_scores(scores) >= target_scores.unsqueeze(1)  # (B, N)
    ge[arange, targets] = False
    if pairs is not None:
        ge[pairs[0], pairs[1]] = False
    return ge.sum(dim=1)


def target_ranks(scores: Tensor, targets: Tensor, exclude_rows: Tensor | None = None,
                 exclude_cols: Tensor | None = None) -> Tensor:
    """(B,) long 0-based pessimistic rank of each target among its non-excluded items.

    rank = number of non-excluded other items whose score is >= the target's (NaN counts as -inf).
    """
    targets = check_scores(scores, targets)
    pairs = check_exclusions(exclude_rows, exclude_cols, targets, scores.shape[1])
    if scores.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    return _ranks(scores, targets, pairs)


def topk_masks(scores: Tensor, pairs: Pairs, ks: tuple[int, ...]) -> dict[int, Tensor]:
    """{k: (B, N) bool} membership of each row's top-k list (ties -> lower item index first)."""
    s = clean_scores(scores)  # (B, N)
    valid = torch.ones_like(s, dtype=torch.bool)  # (B, N)
    if pairs is not None:
        s = s.clone()
        s[pairs[0], pairs[1]] = float("-inf")
        valid[pairs[0], pairs[1]] = False
    masks: dict[int, Tensor] = {}
    for k in ks:
        kk = min(k, s.shape[1])
        v = s.topk(kk, dim=1).values[:, -1:]  # (B, 1) k-th largest; excluded items sit at -inf
        gt = s > v  # (B, N) all strictly better items are in (fewer than kk of them)
        eq = (s == v) & valid  # (B, N)
        need = kk - gt.sum(dim=1)  # (B,)
        rows = (eq.sum(dim=1) > need).nonzero().squeeze(1)  # rows where ties must be cut
        if rows.numel():
            cut = eq[rows].to(torch.int32).cumsum(dim=1) <= need[rows].unsqueeze(1)
            eq[rows] &= cut
        masks[k] = gt | eq
    return masks


def _merge(buf: tuple[Tensor, Tensor, Tensor], vals: Tensor, idx: Tensor, invalid: Tensor,
           kmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge a running (B, <=kmax) top list with a chunk; order = (valid first, score desc, index asc).

    The buffer's indices are all smaller than the chunk's and its valid equal-score entries are
    index-sorted, so stable sorts on concatenation order realise the index tie-break exactly.
    """
    vals = torch.cat([buf[0], vals], dim=1)
    idx = torch.cat([buf[1], idx], dim=1)
    invalid = torch.cat([buf[2], invalid], dim=1)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(invalid.gather(1, order), dim=1, stable=True).indices)
    order = order[:, :kmax]
    return vals.gather(1, order), idx.gather(1, order), invalid.gather(1, order)


def chunked_ranks_topk(score_chunk: Callable[[int, int], Tensor], target_scores: Tensor, targets: Tensor,
                       pairs: Pairs, n_items: int, kmax: int, chunk_size: int
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Stream items in chunks; returns (B,) ranks, (B, kmax') top item indices and their valid flags.

    Memory is bounded by B * (chunk_size + kmax). Same result as `_ranks` + `topk_masks`.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, device = targets.shape[0], targets.device
    tscore = target_scores.unsqueeze(1)  # (B, 1)
    if pairs is not None:  # sort pairs by item so each chunk takes a contiguous slice
        order = torch.argsort(pairs[1])
        pairs = (pairs[0][order], pairs[1][order])
    ranks = torch.zeros(batch, dtype=torch.long, device=device)
    buf: tuple[Tensor, Tensor, Tensor] | None = None
    for start in range(0, n_items, chunk_size):
        end = min(start + chunk_size, n_items)
        chunk = score_chunk(start, end)
        if chunk.shape != (batch, end - start):
            raise ValueError(f"score_chunk({start}, {end}) returned shape {tuple(chunk.shape)}, "
                             f"expected {(batch, end - start)}")
        s = clean_scores(chunk.to(device))  # (B, C)
        invalid = torch.zeros_like(s, dtype=torch.bool)  # (B, C)
        if pairs is not None:
            lo, hi = torch.searchsorted(pairs[1], torch.tensor([start, end], device=device)).tolist()
            invalid[pairs[0][lo:hi], pairs[1][lo:hi] - start] = True
        in_chunk = ((targets >= start) & (targets < end)).nonzero().squeeze(1)
        counted = (s >= tscore) & ~invalid  # (B, C)
        counted[in_chunk, targets[in_chunk] - start] = False
        ranks += counted.sum(dim=1)
        s = s.masked_fill(invalid, float("-inf"))
        idx = torch.arange(start, end, device=device).expand(batch, -1)  # (B, C)
        if buf is None:
            buf = (s[:, :0], idx[:, :0], invalid[:, :0])
        buf = _merge(buf, s.to(buf[0].dtype), idx, invalid, kmax)
    assert buf is not None
    return ranks, buf[1], ~buf[2]
