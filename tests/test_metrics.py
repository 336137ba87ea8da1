"""Tests for multimodal_rec.evaluation: ranking metrics, chunked driver, AUC and log-loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from multimodal_rec.evaluation import (
    DEFAULT_KS,
    RankingEvaluator,
    auc,
    evaluate_scores,
    log_loss,
    log_loss_with_logits,
    target_ranks,
)

KS = (1, 3, 10)


def _t(x: list) -> torch.Tensor:
    return torch.tensor(x)


# ---------------------------------------------------------------- hand-computed values

def test_hand_computed_three_users() -> None:
    # 5 items. user 0: target 0 is best -> rank 0; user 1: target 4, items 1,2 above -> rank 2;
    # user 2: target 2, items 0,1,3 above but item 3 excluded -> rank 2... with item 1 excluded too -> rank 1.
    scores = _t([[0.9, 0.5, 0.4, 0.3, 0.1],
                 [0.0, 0.8, 0.7, 0.1, 0.6],
                 [0.9, 0.8, 0.5, 0.7, 0.2]])
    targets = _t([0, 4, 2])
    rows, cols = _t([2, 2]), _t([1, 3])
    assert target_ranks(scores, targets, rows, cols).tolist() == [0, 2, 1]
    m = evaluate_scores(scores, targets, rows, cols, ks=(1, 2, 3))
    assert m["n_users"] == 3.0
    assert m["hr@1"] == pytest.approx(1 / 3)
    assert m["hr@2"] == pytest.approx(2 / 3)
    assert m["hr@3"] == pytest.approx(1.0)
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["ndcg@2"] == pytest.approx((1.0 + 1 / math.log2(3)) / 3)
    assert m["ndcg@3"] == pytest.approx((1.0 + 1 / math.log2(3) + 0.5) / 3)  # rank 2 -> 1/log2(4)
    assert m["mrr@1"] == pytest.approx(1 / 3)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    # top-1 lists: u0 {0}, u1 {1}, u2 {0} -> 2 of 5 items
    assert m["coverage@1"] == pytest.approx(2 / 5)
    # top-2: u0 {0,1}, u1 {1,2}, u2 {0,2} -> {0,1,2}
    assert m["coverage@2"] == pytest.approx(3 / 5)
    # top-3: u0 {0,1,2}, u1 {1,2,4}, u2 {0,2,4} -> {0,1,2,4}
    assert m["coverage@3"] == pytest.approx(4 / 5)
    names = ("hr", "ndcg", "mrr", "coverage")
    assert set(m) == {f"{name}@{k}" for name in names for k in (1, 2, 3)} | {"n_users"}


def test_default_ks_keys() -> None:
    assert DEFAULT_KS == (10, 20)
    m = evaluate_scores(torch.randn(4, 30), _t([0, 1, 2, 3]))
    assert {"hr@10", "ndcg@10", "mrr@10", "coverage@10", "hr@20", "coverage@20", "n_users"} <= set(m)


def test_ties_are_pessimistic() -> None:
    scores = torch.zeros(2, 6)  # constant scorer -> worst rank
    assert target_ranks(scores, _t([0, 5])).tolist() == [5, 5]
    scores = _t([[1.0, 2.0, 2.0, 2.0, 0.0]])  # target 2 ties with 1 and 3
    assert target_ranks(scores, _t([2])).tolist() == [2]
    m = evaluate_scores(scores, _t([2]), ks=(2, 3))
    assert m["hr@2"] == 0.0 and m["hr@3"] == 1.0 and m["mrr@3"] == pytest.approx(1 / 3)
    # top-2 list of ties breaks by lower index: {1, 2}
    assert m["coverage@2"] == pytest.approx(2 / 5)


def test_nan_other_scores_count_as_minus_inf() -> None:
    scores = _t([[float("nan"), 0.5, float("-inf"), 1.0]])
    assert target_ranks(scores, _t([1])).tolist() == [1]
    scores = _t([[float("nan"), float("-inf"), 1.0]])
    assert target_ranks(scores, _t([1])).tolist() == [2]  # -inf target ties with NaN(-inf) -> pessimistic


def test_single_item_users_and_everything_excluded() -> None:
    m = evaluate_scores(torch.zeros(2, 1), _t([0, 0]), ks=(1, 5))
    assert m["hr@1"] == 1.0 and m["ndcg@5"] == 1.0 and m["coverage@5"] == 1.0
    # user 0 has every other item excluded -> rank 0; user 1 has target ranked last
    scores = _t([[0.0, 5.0, 6.0], [0.0, 5.0, 6.0]])
    rows, cols = _t([0, 0]), _t([1, 2])
    assert target_ranks(scores, _t([0, 0]), rows, cols).tolist() == [0, 2]
    m = evaluate_scores(scores, _t([0, 0]), rows, cols, ks=(1,))
    assert m["hr@1"] == 0.5 and m["coverage@1"] == pytest.approx(2 / 3)  # items {0, 2}


def test_k_larger_than_catalogue() -> None:
    scores = torch.randn(5, 4)
    targets = _t([0, 1, 2, 3, 0])
    m = evaluate_scores(scores, targets, _t([0, 1]), _t([3, 0]), ks=(2, 50))
    assert m["hr@50"] == 1.0
    assert m["coverage@50"] == 1.0  # only the 4 existing items count
    assert 0.0 < m["ndcg@50"] <= 1.0


def test_exclusions_move_target_up() -> None:
    scores = _t([[0.9, 0.8, 0.7, 0.1]])
    assert target_ranks(scores, _t([2])).tolist() == [2]
    assert target_ranks(scores, _t([2]), _t([0]), _t([0])).tolist() == [1]
    assert target_ranks(scores, _t([2]), _t([0, 0]), _t([0, 1])).tolist() == [0]
    m = evaluate_scores(scores, _t([2]), _t([0, 0]), _t([0, 1]), ks=(1,))
    assert m["hr@1"] == 1.0 and m["coverage@1"] == 0.25  # excluded items never in the top list


# ---------------------------------------------------------------- independent reference

def _random_case(n_users: int = 50, n_items: int = 100, seed: int = 0):
    g = np.random.default_rng(seed)
    scores = g.integers(0, 30, size=(n_users, n_items)).astype(np.float32)  # many forced ties
    scores[:5] = 1.0  # fully constant rows
    scores[5, :10] = np.nan
    targets = g.integers(0, n_items, size=n_users)
    rows, cols = [], []
    for u in range(n_users):
        hist = g.choice(n_items, size=int(g.integers(0, 20)), replace=False)
        for i in hist:
            if i != targets[u]:
                rows.append(u)
                cols.append(int(i))
    return scores, targets, np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)


def _reference(scores, targets, rows, cols, ks):
    n_users, n_items = scores.shape
    excl = [set() for _ in range(n_users)]
    for r, c in zip(rows, cols, strict=True):
        excl[r].add(int(c))
    out = {f"{m}@{k}": 0.0 for m in ("hr", "ndcg", "mrr") for k in ks}
    covered = {k: set() for k in ks}
    for u in range(n_users):
        s = [(-math.inf if math.isnan(x) else float(x)) for x in scores[u]]
        cand = [i for i in range(n_items) if i not in excl[u]]
        t = int(targets[u])
        rank = sum(1 for i in cand if i != t and s[i] >= s[t])
        order = sorted(cand, key=lambda i: (-s[i], i))
        for k in ks:
            covered[k].update(order[:k])
            if rank < k:
                out[f"hr@{k}"] += 1
                out[f"ndcg@{k}"] += 1 / math.log2(rank + 2)
                out[f"mrr@{k}"] += 1 / (rank + 1)
    out = {key: v / n_users for key, v in out.items()}
    out.update({f"coverage@{k}": len(covered[k]) / n_items for k in ks})
    return out


def test_against_reference_loop() -> None:
    scores, targets, rows, cols = _random_case()
    expected = _reference(scores, targets, rows, cols, KS)
    got = evaluate_scores(torch.from_numpy(scores), torch.from_numpy(targets),
                          torch.from_numpy(rows), torch.from_numpy(cols), ks=KS)
    assert got["n_users"] == 50
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def _batched(scores, targets, rows, cols, batch, ks=KS, chunk_size=None):
    ev = RankingEvaluator(scores.shape[1], ks)
    for start in range(0, scores.shape[0], batch):
        end = min(start + batch, scores.shape[0])
        sel = (rows >= start) & (rows < end)
        s, t = scores[start:end], targets[start:end]
        if chunk_size is None:
            ev.update(s, t, rows[sel] - start, cols[sel])
        else:
            ev.update_chunked(lambda a, b, s=s: s[:, a:b], s[torch.arange(len(t)), t], t,
                              rows[sel] - start, cols[sel], chunk_size=chunk_size)
    return ev.compute()


def test_batch_size_independence_and_chunked_equality() -> None:
    scores, targets, rows, cols = (torch.from_numpy(a) for a in _random_case(seed=1))
    full = _batched(scores, targets, rows, cols, batch=50)
    assert _batched(scores, targets, rows, cols, batch=1) == full
    assert _batched(scores, targets, rows, cols, batch=7) == full
    for chunk in (1, 7, 33, scores.shape[1]):
        assert _batched(scores, targets, rows, cols, batch=50, chunk_size=chunk) == full, chunk
    assert _batched(scores, targets, rows, cols, batch=7, chunk_size=33) == full


def test_chunked_large_k_and_float64() -> None:
    scores = torch.randn(6, 9, dtype=torch.float64).round(decimals=1)
    targets = _t([0, 3, 8, 2, 2, 5])
    rows, cols = _t([0, 0, 4]), _t([1, 2, 8])
    ks = (1, 4, 20)
    expected = evaluate_scores(scores, targets, rows, cols, ks=ks)
    for chunk in (1, 2, 9, 100):
        assert _batched(scores, targets, rows, cols, batch=6, ks=ks, chunk_size=chunk) == expected


def test_evaluator_reset_empty_batch_and_no_users() -> None:
    ev = RankingEvaluator(5, ks=(2,))
    ev.update(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    ev.update_chunked(lambda a, b: torch.zeros(0, b - a), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    m = ev.compute()
    assert m["n_users"] == 0 and math.isnan(m["hr@2"]) and m["coverage@2"] == 0.0
    ev.update(torch.randn(3, 5), _t([0, 1, 2]))
    assert ev.compute()["n_users"] == 3
    ev.reset()
    assert ev.compute()["n_users"] == 0


# ---------------------------------------------------------------- errors

def test_nan_target_raises() -> None:
    scores = torch.randn(3, 4)
    scores[0, 1] = scores[2, 3] = float("nan")
    with pytest.raises(ValueError, match="2 row"):
        target_ranks(scores, _t([1, 0, 3]))
    ev = RankingEvaluator(4)
    with pytest.raises(ValueError, match="NaN"):
        ev.update_chunked(lambda a, b: scores[:, a:b], scores[torch.arange(3), _t([1, 0, 3])], _t([1, 0, 3]))


def test_shape_mismatches_raise() -> None:
    with pytest.raises(ValueError, match=r"\(3,\)"):
        target_ranks(torch.randn(3, 4), _t([0, 1]))
    with pytest.raises(ValueError, match="2-D"):
        evaluate_scores(torch.randn(4), _t([0]))
    with pytest.raises(ValueError, match="expects 5"):
        RankingEvaluator(5).update(torch.randn(2, 4), _t([0, 1]))
    with pytest.raises(ValueError, match="equal length"):
        target_ranks(torch.randn(2, 4), _t([0, 1]), _t([0, 1]), _t([2]))
    with pytest.raises(ValueError, match="together"):
        target_ranks(torch.randn(2, 4), _t([0, 1]), _t([0]), None)
    with pytest.raises(ValueError, match="lie in"):
        target_ranks(torch.randn(2, 4), _t([0, 4]))
    with pytest.raises(ValueError, match="returned shape"):
        RankingEvaluator(4).update_chunked(lambda a, b: torch.zeros(2, 1), torch.zeros(2), _t([0, 1]))


def test_target_in_exclusions_raises() -> None:
    with pytest.raises(ValueError, match="target"):
        target_ranks(torch.randn(2, 4), _t([0, 1]), _t([0, 1]), _t([2, 1]))


# ---------------------------------------------------------------- click metrics

def test_auc_hand_example() -> None:
    labels = [1, 0, 1, 0]
    scores = [0.8, 0.4, 0.4, 0.1]
    # pairs (pos, neg): (0.8,0.4)=1, (0.8,0.1)=1, (0.4,0.4)=0.5, (0.4,0.1)=1 -> 3.5 / 4
    assert auc(labels, scores) == pytest.approx(0.875)
    assert auc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(0.875)
    assert auc([0, 1], [0.3, 0.3]) == 0.5
    assert auc([0, 1], [1.0, 0.0]) == 0.0
    with pytest.raises(ValueError, match="single class"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="same number"):
        auc([1, 0], [0.2])


def test_auc_against_sklearn() -> None:
    sk_metrics = pytest.importorskip("sklearn.metrics")
    g = np.random.default_rng(3)
    labels = g.integers(0, 2, size=500)
    scores = g.integers(0, 20, size=500) / 7.0  # ties
    assert auc(labels, scores) == pytest.approx(sk_metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_log_loss_hand_value() -> None:
    expected = -(math.log(0.9) + math.log(1 - 0.2)) / 2
    assert log_loss([1, 0], [0.9, 0.2]) == pytest.approx(expected)
    assert log_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.2])) == pytest.approx(expected)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))  # clipped, finite
    z = [2.0, -1.0]
    expected_z = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert log_loss_with_logits([1, 0], z) == pytest.approx(expected_z)
    assert math.isfinite(log_loss_with_logits([0], [1000.0]))
    with pytest.raises(ValueError, match="logits"):
        log_loss([1], [3.0])


def test_ranks_from_elsewhere_give_the_same_metrics_by_hand():
    evaluator = RankingEvaluator(n_items=100, ks=(10, 20))
    evaluator.add_ranks(torch.tensor([0, 1, 25]))  # 25: a miss at both K
    metrics = evaluator.compute()
    assert metrics["hr@10"] == pytest.approx(2 / 3) and metrics["hr@20"] == pytest.approx(2 / 3)
    assert metrics["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 3)
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 2) / 3) and metrics["n_users"] == 3
    with pytest.raises(ValueError, match="non-negative"):
        evaluator.add_ranks(torch.tensor([-1]))
