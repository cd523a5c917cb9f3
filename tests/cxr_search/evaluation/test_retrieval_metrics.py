"""Batched retrieval metrics against a naive full-matrix loop."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_search.evaluation.retrieval_metrics import positive_ranks, recall_at_k


def naive_ranks(q, c, positives):
    out = []
    for i in range(len(q)):
        scores = [float(q[i] @ c[j]) for j in range(len(c))]
        best = max(scores[j] for j in positives[i])
        out.append(1 + sum(1 for j in range(len(c)) if j not in positives[i] and scores[j] >= best))
    return np.array(out)


def test_batched_ranks_equal_naive_loop():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 8)).astype(np.float32)
    c = rng.normal(size=(23, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    positives = [set(rng.choice(23, size=1 + i % 3, replace=False).tolist()) for i in range(37)]
    np.testing.assert_array_equal(positive_ranks(q, c, positives, batch_size=5), naive_ranks(q, c, positives))


def test_ties_are_pessimistic_and_recall():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    c = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=np.float32)  # all tie at 0
    assert positive_ranks(q, c, [{1}])[0] == 3
    r = recall_at_k(np.array([1, 3, 7, 12]), ks=(1, 5, 10))
    assert r == {"R@1": 0.25, "R@5": 0.5, "R@10": 0.75, "mean_rank": 5.75}
    with pytest.raises(ValueError, match="no positive"):
        positive_ranks(q, c, [set()])


def test_rank_bounds_count_ties_both_ways():
    from cxr_search.evaluation.retrieval_metrics import TIE_TOL, rank_bounds_from_scores

    # Query 0: positive (id 2) tied with ids 1 and 3 (one of them a few ulps away), id 0 above.
    # Query 1: no tie.
    scores = np.array([[0.9, 0.5, 0.5 + TIE_TOL / 4, 0.5 - TIE_TOL / 4, 0.1],
                       [0.9, 0.7, 0.5, 0.3, 0.1]], dtype=np.float64)
    ids = np.array([[0, 1, 2, 3, 4], [4, 0, 1, 2, 3]])
    pess, opt = rank_bounds_from_scores(scores, ids, [{2}, {1}])
    assert pess.tolist() == [4, 3] and opt.tolist() == [2, 3]
    # Any order of the tied items gives a rank between the two bounds.
    for order in ([1, 2, 3], [2, 1, 3], [3, 1, 2]):
        rank = 2 + order.index(2)
        assert opt[0] <= rank <= pess[0]
