"""Retrieval metrics computed from similarity matrices, in batches.

Ranks are 1-based and pessimistic on ties: a positive tied with k negatives is ranked after them,
so a constant model cannot look good.
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable, Sequence

import numpy as np


def positive_ranks(queries: np.ndarray, candidates: np.ndarray, positives: Sequence[Iterable[int]],
                   *, batch_size: int = 1024) -> np.ndarray:
    """Best (smallest) rank of any positive candidate for each query.

    Args:
        queries: ``[Q, D]`` L2-normalised embeddings.
        candidates: ``[C, D]`` L2-normalised embeddings.
        positives: For each query, the indices of its positive candidates (at least one).
        batch_size: Queries scored per matrix product (memory bound: batch_size x C floats).

    Returns:
        int64 ``[Q]`` ranks, 1 = the top candidate.
    """
    q = np.asarray(queries, dtype=np.float32)
    c = np.asarray(candidates, dtype=np.float32)
    ranks = np.empty(len(q), dtype=np.int64)
    for start in range(0, len(q), batch_size):
        sims = q[start : start + batch_size] @ c.T  # [B, C]
        for row, i in enumerate(range(start, min(start + batch_size, len(q)))):
            pos = np.fromiter(positives[i], dtype=np.int64)
            if pos.size == 0:
                raise ValueError(f"query {i} has no positive candidate")
            best = sims[row, pos].max()
            # Pessimistic ties: every non-positive scoring >= the best positive ranks above it.
            mask = np.ones(len(c), dtype=bool)
            mask[pos] = False
            ranks[i] = 1 + int(np.count_nonzero(sims[row, mask] >= best))
    return ranks


def recall_at_k(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Recall@K for each K and the mean rank."""
    ranks = np.asarray(ranks)
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["mean_rank"] = float(np.mean(ranks))
    return out


def label_precision_at_k(queries: np.ndarray, candidates: np.ndarray, query_labels: Sequence[Hashable],
                         candidate_labels: Sequence[Hashable], k: int = 10, *, batch_size: int = 1024) -> float:
    """Mean share of each query's top-``k`` candidates whose label equals the query's.

    A label is any hashable value, e.g. the frozenset of a study's findings ("label-precision@10":
    share of the top 10 whose finding set equals the query's). Ties in similarity are broken by
    candidate order (stable sort), so the value is deterministic.

    Args:
        queries: ``[Q, D]`` L2-normalised embeddings.
        candidates: ``[C, D]`` L2-normalised embeddings.
        query_labels: ``Q`` labels.
        candidate_labels: ``C`` labels.
        k: Cut-off (at most ``C``).
        batch_size: Queries scored per matrix product.
    """
    q = np.asarray(queries, dtype=np.float32)
    c = np.asarray(candidates, dtype=np.float32)
    if len(q) != len(query_labels) or len(c) != len(candidate_labels):
        raise ValueError("one label per query and per candidate is needed")
    k = min(int(k), len(c))
    if k < 1 or len(q) == 0:
        raise ValueError("label precision needs k >= 1 and at least one query and candidate")
    ids = {lab: i for i, lab in enumerate(dict.fromkeys(list(query_labels) + list(candidate_labels)))}
    qi = np.array([ids[lab] for lab in query_labels])
    ci = np.array([ids[lab] for lab in candidate_labels])
    hits = 0
    for start in range(0, len(q), batch_size):
        sims = q[start : start + batch_size] @ c.T  # [B, C]
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [B, k]
        hits += int(np.count_nonzero(ci[top] == qi[start : start + batch_size, None]))
    return hits / (len(q) * k)
