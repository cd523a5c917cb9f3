"""Building a FAISS index from vectors: choose the factory on a sample, train, add, tune the search parameter.

:func:`build_index` measures recall@10 against exact search on the data itself (see
:mod:`index.ann.factory` for the rule that lists the candidates).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import faiss
import numpy as np

from cxr_search.errors import SearchIndexError
from index.ann.factory import candidate_factories, parse_factory, with_nlist
from index.ann.parts import DEFAULT_RERANK_K, check_ids, check_vectors
from index.ann.reference import k_recall_at_k
from index.ann.vector_index import VectorIndex

logger = logging.getLogger(__name__)
_IP = faiss.METRIC_INNER_PRODUCT


def _neighbours_without_self(index_search: Any, qids: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` ids of each query row after dropping the query's own id (searching k+1)."""
    _, ids = index_search(k + 1)
    out = np.full((len(qids), k), -1, dtype=np.int64)
    for r, (row, own) in enumerate(zip(ids, qids, strict=False)):
        rest = row[row != own][:k]
        out[r, :len(rest)] = rest
    return out


def rank_candidates(sample: np.ndarray, factories: List[str], *, n_queries: int = 500, seed: int = 0,
                    k: int = 10) -> List[Tuple[str, float]]:
    """Codec-limited recall@k of each factory on a sample (all lists probed; <= 256 lists).

    ``n_queries`` rows of ``sample`` are held out as queries; the rest is indexed.
    """

    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(sample))
    nq = min(n_queries, len(sample) // 5)
    queries, base = sample[np.sort(perm[:nq])], sample[np.sort(perm[nq:])]
    ids = np.arange(len(base), dtype=np.int64)
    _, truth = faiss.knn(queries, base, k, metric=_IP)
    out = []
    for f in factories:
        nl = min(parse_factory(sample.shape[1], f).nlist, 256, max(1, len(base) // 39))
        idx = VectorIndex.create(sample.shape[1], with_nlist(f, nl))
        idx.train(base)
        idx.add(base, ids)
        idx.set_search_params(nprobe=nl)
        out.append((f, k_recall_at_k(idx.search(queries, k)[1], truth, k)))
    return out


def build_index(vectors: np.ndarray, ids: np.ndarray, *, factory: Optional[str] = None,
                bytes_per_vector: Optional[float] = None, train_size: Optional[int] = None,
                recall_queries: int = 1000, seed: int = 0, progress: bool = False,
                target_recall: float = 0.95) -> Tuple[VectorIndex, Dict[str, Any]]:
    """Choose (or use) a factory, train on a seeded sample, add everything, tune and measure recall@10.

    Choice (``factory=None``): :func:`choose_factory`'s candidates that fit ``bytes_per_vector``; when
    several fit they are ranked by :func:`rank_candidates` on a 50k-row sample and the best recall wins
    (ties within 0.005 go to the earlier, default, candidate).

    Recall: ``recall_queries`` rows of ``vectors`` (seeded) are searched as queries; each query's own id
    is dropped from both the approximate and the exact (``faiss.knn``) top-11, and 10-recall@10 of the
    rest is measured - the "more like this image" use. IVF ``nprobe`` (HNSW ``efSearch``) is raised in
    powers of two until recall >= ``target_recall``, or until it stops improving (the codec limit); the
    value chosen is stored in the index. For IVF the same is done for re-ranked search (top
    ``DEFAULT_RERANK_K`` candidates re-scored with the full vectors, ``search(..., rerank=fetch)``), whose
    setting is stored as ``rerank_nprobe``. Flat reports 1.0 without measuring.

    Returns:
        ``(index, info)`` with ``factory, n, dim, bytes_per_vector`` (serialized size / n),
        ``recall_at_10, target_recall, target_met, choose_s, train_s, add_s, tune_s, search_params,
        recall_curve, recall_method``; for IVF ``rerank_recall_at_10``; when the factory was chosen
        among several, ``candidates`` (each with its recall on the sample).
    """

    x = check_vectors(vectors, np.shape(vectors)[-1], "vectors")
    ids = check_ids(ids)
    n, dim = x.shape
    if len(ids) != n:
        raise SearchIndexError(f"{n} vectors but {len(ids)} ids")
    rng = np.random.default_rng(seed)
    info: Dict[str, Any] = {"n": n, "dim": dim, "target_recall": target_recall}
    t0 = time.perf_counter()
    if factory is None:
        cands = candidate_factories(n, dim, bytes_per_vector=bytes_per_vector)
        factory = cands[0]
        if len(cands) > 1:
            sample = x[np.sort(rng.choice(n, min(n, 50_000), replace=False))]
            ranked = rank_candidates(sample, cands, seed=seed)
            best = max(r for _, r in ranked)
            factory = next(f for f, r in ranked if r >= best - 0.005)
            info["candidates"] = [[f, round(r, 4)] for f, r in ranked]
            logger.info("factory candidates (recall@10 on a sample): %s -> %s", ranked, factory)
    info["choose_s"] = round(time.perf_counter() - t0, 3)
    index = VectorIndex.create(dim, factory)
    info["factory"] = factory
    t0 = time.perf_counter()
    if index.kind == "ivf":
        m = min(n, train_size or max(50 * index.nlist, 20_000))
        index.train(x[np.sort(rng.choice(n, m, replace=False))] if m < n else x)
    info["train_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    index.add(x, ids, progress=progress)
    info["add_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    curve: List[List[float]] = []
    recall = 1.0
    if index.kind != "flat" and n > 1:
        curve, recall = _tune(index, x, ids, rng.choice(n, min(recall_queries, n), replace=False), target_recall,
                              info)
    info.update(recall_at_10=round(float(recall), 4), target_met=bool(recall >= target_recall),
                tune_s=round(time.perf_counter() - t0, 3), search_params=index.search_params, recall_curve=curve,
                recall_curve_columns=["nprobe/efSearch", "recall@10", "recall@10 re-ranked"],
                bytes_per_vector=round(index.serialized_size() / max(n, 1), 2),
                recall_method="10-recall@10 of database rows as queries (own id dropped) vs exact search")
    return index, info


def _plateau(values: List[float]) -> bool:
    """Probing more no longer pays: < 0.003 gained by the last doubling and < 0.01 by the last two."""
    return len(values) >= 3 and values[-1] - values[-2] < 0.003 and values[-1] - values[-3] < 0.01


def _tune(index: VectorIndex, x: np.ndarray, ids: np.ndarray, rows: np.ndarray, target: float,
          info: Dict[str, Any]) -> Tuple[List[List[float]], float]:
    """Raise nprobe (efSearch) in powers of two; set it for plain and (IVF) re-ranked search.

    For each mode the value kept is the first reaching ``target + 0.01`` on the build queries (a margin
    for queries unlike the database rows: held-out queries scored ~0.01 lower in the benchmark), or else
    the first within 0.005 of the best recall seen (the codec limit). Returns the curve ``[value, recall,
    re-ranked recall]`` and the plain recall at the value kept; re-ranked facts go into ``info``.
    """

    goal = min(target + 0.01, 1.0)

    rows = np.sort(rows)
    n = len(x)
    q, qids, kk = x[rows], ids[rows], min(10, n - 1)
    truth = _neighbours_without_self(lambda kq: faiss.knn(q, x, min(kq, n), metric=_IP), rows, kk)
    truth = np.where(truth >= 0, ids[np.maximum(truth, 0)], -1)
    order = np.argsort(ids)

    def fetch(want: np.ndarray) -> np.ndarray:
        return x[order[np.searchsorted(ids, want, sorter=order)]]

    ivf = index.kind == "ivf"
    key, top = ("nprobe", index.nlist) if ivf else ("efSearch", 512)
    value, curve = (1 if ivf else 16), []
    while True:
        index.set_search_params(**{key: value})
        plain = k_recall_at_k(_neighbours_without_self(lambda kq: index.search(q, min(kq, n)), qids, kk), truth, kk)
        reranked = k_recall_at_k(_neighbours_without_self(
            lambda kq: index.search(q, min(kq, n), rerank=fetch, rerank_k=DEFAULT_RERANK_K), qids, kk), truth,
            kk) if ivf else plain
        curve.append([value, round(plain, 4), round(reranked, 4)])
        if value >= top or all(curve[-1][col] >= goal or _plateau([c[col] for c in curve]) for col in (1, 2)):
            break
        value = min(top, value * 2)

    def pick(col: int) -> Tuple[int, float]:
        hit = [c for c in curve if c[col] >= goal]
        if hit:
            return hit[0][0], hit[0][col]
        peak = max(c[col] for c in curve)
        c = next(c for c in curve if c[col] >= peak - 0.005)
        return c[0], c[col]

    chosen, recall = pick(1)
    index.set_search_params(**{key: chosen})
    if ivf:
        rerank_value, info["rerank_recall_at_10"] = pick(2)
        index.set_search_params(rerank_nprobe=rerank_value)
    if recall < target:
        logger.warning("%s: recall@10 %.3f < %.2f at best (%s=%d); for more give a larger --bytes-per-vector "
                       "(e.g. 600 for IVF,SQ8), re-rank with full vectors (search(rerank=...): %s) or use an "
                       "exact index", index.factory, recall, target, key, chosen, info.get("rerank_recall_at_10"))
    return curve, recall
