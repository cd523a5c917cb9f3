"""Retrieval metrics computed from similarity matrices, in batches.

Ranks are 1-based and pessimistic on ties: a positive tied with k negatives is ranked after them,
so a constant model cannot look good. Scores within :data:`TIE_TOL` count as tied: identical vectors
(a duplicated report text) can score a few float32 ulps apart depending on where a matrix product
puts them in its SIMD lanes, and a tie must not depend on that.

:func:`rank_bounds_from_scores` also gives the optimistic rank (ties resolved in the positive's favour):
any order of tied items, such as the one a sort happens to return, gives a rank between the two, so
the pair bounds what another evaluator that leaves ties to its sort can report.
"""

from __future__ import annotations

from typing import Dict, Hashable, Iterable, List, Sequence, Tuple

import numpy as np

#: Scores closer than this to the best positive's count as tied with it (float32 products of unit vectors).
TIE_TOL = 1e-6


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
            ranks[i] = 1 + int(np.count_nonzero(sims[row, mask] >= best - TIE_TOL))
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


def dedup_exact(texts: Sequence[str]) -> Tuple[List[str], np.ndarray]:
    """De-duplicate texts by exact string, the reference retrieval protocol's candidate pool.

    Args:
        texts: One text per item (no normalisation: "Normal." and "normal." stay distinct, as in
            the reference, which compares the strings it feeds the tokenizer).

    Returns:
        ``(unique, index)``: the distinct texts in order of first appearance and, for each input
        text, the position of its string in ``unique`` (int64 ``[len(texts)]``).
    """
    position: Dict[str, int] = {}
    index = np.empty(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        index[i] = position.setdefault(text, len(position))
    return list(position), index


def ranks_from_scores(scores: np.ndarray, ids: np.ndarray, positives: Sequence[Iterable[int]]) -> np.ndarray:
    """Best positive rank per query from a full ranking returned by a search engine.

    The same pessimistic tie rule as :func:`positive_ranks`: every non-positive whose score is >= the
    best positive's (less :data:`TIE_TOL`) ranks above it, whatever order the engine returned tied items in.

    Args:
        scores: ``[Q, C]`` scores of each query's returned candidates (all ``C`` of them).
        ids: ``[Q, C]`` candidate ids matching ``scores``.
        positives: For each query, the ids of its positive candidates (at least one).

    Returns:
        int64 ``[Q]`` ranks, 1 = the top candidate.

    Raises:
        ValueError: A query without a positive, or whose positives are not among the returned ids.
    """
    return rank_bounds_from_scores(scores, ids, positives)[0]


def rank_bounds_from_scores(scores: np.ndarray, ids: np.ndarray,
                            positives: Sequence[Iterable[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Pessimistic and optimistic best-positive rank per query from a full ranking.

    Pessimistic (the rank every metric reports): non-positives tied with the best positive rank above
    it. Optimistic: they rank below it; only non-positives scoring more than :data:`TIE_TOL` above the
    best positive count. The two differ exactly for the queries with a tie at the positive's score.

    Args:
        scores: ``[Q, C]`` scores of each query's returned candidates (all ``C`` of them).
        ids: ``[Q, C]`` candidate ids matching ``scores``.
        positives: For each query, the ids of its positive candidates (at least one).

    Returns:
        ``(pessimistic, optimistic)``, int64 ``[Q]`` each, 1 = the top candidate.

    Raises:
        ValueError: A query without a positive, or whose positives are not among the returned ids.
    """
    pessimistic = np.empty(len(scores), dtype=np.int64)
    optimistic = np.empty(len(scores), dtype=np.int64)
    for i in range(len(scores)):
        pos = np.fromiter(positives[i], dtype=np.int64)
        if pos.size == 0:
            raise ValueError(f"query {i} has no positive candidate")
        is_pos = np.isin(ids[i], pos)
        if not is_pos.any():
            raise ValueError(f"query {i}: none of its positives was returned; search all candidates")
        best = scores[i][is_pos].max()
        others = scores[i][~is_pos]
        pessimistic[i] = 1 + int(np.count_nonzero(others >= best - TIE_TOL))
        optimistic[i] = 1 + int(np.count_nonzero(others > best + TIE_TOL))
    return pessimistic, optimistic


def bootstrap_recall(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10), *, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, chunk: int = 100) -> Dict[str, List[float]]:
    """Percentile bootstrap confidence intervals of Recall@K and the mean rank.

    Queries are resampled with replacement ``resamples`` times from ``numpy.random.default_rng(seed)``,
    so the same ranks and seed give the same intervals on every machine.

    Args:
        ranks: ``[Q]`` ranks of the queries (the resampling unit).
        ks: Cut-offs.
        resamples: Number of bootstrap samples (0 = no intervals, an empty dict).
        seed: Seed of the resampling.
        level: Coverage of the interval (0.95 = the 2.5th and 97.5th percentiles).
        chunk: Resamples drawn per step (memory bound: chunk x Q indices).

    Returns:
        ``{"R@1": [low, high], ..., "mean_rank": [low, high]}``.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if resamples <= 0 or len(ranks) == 0:
        return {}
    rng = np.random.default_rng(seed)
    columns = {f"R@{k}": (ranks <= k).astype(np.float64) for k in ks}
    columns["mean_rank"] = ranks
    samples: Dict[str, List[np.ndarray]] = {name: [] for name in columns}
    done = 0
    while done < resamples:
        n = min(chunk, resamples - done)
        idx = rng.integers(0, len(ranks), size=(n, len(ranks)))  # [n, Q]
        for name, values in columns.items():
            samples[name].append(values[idx].mean(axis=1))
        done += n
    tail = (1.0 - level) / 2.0 * 100.0
    out = {}
    for name, parts in samples.items():
        lo, hi = np.percentile(np.concatenate(parts), [tail, 100.0 - tail])
        out[name] = [float(lo), float(hi)]
    return out
