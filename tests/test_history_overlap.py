"""A history sent with `user_id` continues the stored one: the part that repeats the stored history's end is read
once, not twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multimodal_rec.serving.query import build_query, continuation
from multimodal_rec.serving.service import RecommenderService


@pytest.mark.parametrize(("stored", "session", "kept"), [
    ([1, 2, 3], [2, 3, 4], [4]),  # overlap of two
    ([1, 2, 3], [1, 2, 3], []),  # the whole stored history sent again
    ([1, 2, 3], [3, 3], [3]),  # the last stored item once more, then again
    ([5, 1, 5, 1], [5, 1, 7], [7]),  # the longest overlap wins
    ([1, 2, 3], [4, 5], [4, 5]),  # no overlap
    ([], [4], [4]),
    ([1, 2], [], []),
])
def test_continuation_drops_the_overlap(stored, session, kept):
    assert continuation(np.array(stored), np.array(session)).tolist() == kept


def test_sending_the_stored_history_again_reads_it_once(tiny_artifacts):
    artifacts = RecommenderService(tiny_artifacts).artifacts
    user = next(int(u) for u in artifacts.user_ids if len(artifacts.user_history(int(u))) >= 3)
    stored = [int(i) for i in artifacts.user_history(user)]
    with torch.no_grad():
        with_tail = build_query(artifacts, user, stored[-3:] + [int(artifacts.item_ids[0])], None, 5)
        new_only = build_query(artifacts, user, [int(artifacts.item_ids[0])], None, 5)
    np.testing.assert_allclose(with_tail.vector, new_only.vector, atol=1e-6)
    assert len(with_tail.history_rows) == len(stored) + 1
