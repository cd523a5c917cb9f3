"""The references every FAISS index is measured against: brute-force search, k-recall@k, and seeded
clustered unit vectors that stand in for image embeddings (tests, ``benchmarks/bench_faiss.py``,
``cxr-search bench speed``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["clustered_unit_vectors", "exact_search", "k_recall_at_k"]


def clustered_unit_vectors(n: int, dim: int = 512, *, n_clusters: Optional[int] = None,
                           spectrum_decay: float = 0.5, noise: float = 0.027, offset: float = 1.0,
                           seed: int = 0, stream: int = 0, chunk: int = 65_536) -> np.ndarray:
    """Seeded clustered L2-normalised float32 vectors, a stand-in for image embeddings.

    ``x = normalise(offset * u + c_j + noise * R (s * g))``: ``u`` is one shared unit direction (CLIP-like
    embeddings share a large mean: random pairs have cosine ~0.4 here), ``c_j`` one of ``n_clusters``
    unit centres (default ``n // 100``, i.e. ~100 vectors a cluster at any ``n``) drawn with the same
    spectrum, ``g`` standard normal, ``R`` a fixed random rotation and ``s_i ~ i ** -spectrum_decay``
    (normalised to mean square 1) a decaying per-component scale: 0.5 gives a variance spectrum ~1/i,
    roughly that of CLIP embeddings, 0 isotropic noise (hardest to compress). With the defaults at 512-d
    the mean nearest-neighbour cosine is 0.90 at n = 200k and 1M (measured by ``benchmarks/bench_faiss.py``).
    Held-out queries: the same arguments (including ``n_clusters``) with another ``stream``.

    Args:
        n: Number of vectors.
        dim: Dimension.
        n_clusters: Number of clusters.
        spectrum_decay: Exponent of the per-component scale.
        noise: Within-cluster noise scale.
        offset: Weight of the shared direction.
        seed: Seed of centres, rotation and noise; the same seed gives the same clusters.
        stream: Noise stream: another stream draws new vectors from the *same* clusters (held-out
            queries).
        chunk: Rows generated at a time (bounds temporary memory).

    Returns:
        ``[n, dim]`` float32, rows of unit norm.
    """
    rng = np.random.default_rng([seed, 0])
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = (np.arange(dim) + 1.0) ** -spectrum_decay
    scale /= np.sqrt(np.mean(scale**2))
    n_clusters = int(n_clusters or max(1, n // 100))
    shared = rng.standard_normal(dim)
    shared /= np.linalg.norm(shared)
    centres = (rng.standard_normal((n_clusters, dim)) * scale) @ rot.T
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres += offset * shared
    out = np.empty((n, dim), dtype=np.float32)
    for i, start in enumerate(range(0, n, chunk)):
        m = min(chunk, n - start)
        r = np.random.default_rng([seed, 1 + stream, i])
        x = centres[r.integers(n_clusters, size=m)] + noise * ((r.standard_normal((m, dim)) * scale) @ rot.T)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[start:start + m] = x
    return out


def exact_search(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner product in numpy (the reference every index is tested against).

    Returns:
        ``(scores [Q, k] float32, ids [Q, k] int64)`` best first, padded with ``-inf`` / ``-1``.
    """
    x = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(queries, dtype=np.float32)
    q = q[None, :] if q.ndim == 1 else q
    ids = np.asarray(ids, dtype=np.int64)
    best_s = np.full((len(q), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(q), k), -1, dtype=np.int64)
    step = max(1024, (1 << 25) // max(len(q), 1))
    for s in range(0, len(x), step):
        sc = q @ x[s:s + step].T
        cat_s = np.concatenate([best_s, sc], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(ids[s:s + step], sc.shape)], axis=1)
        top = np.argpartition(-cat_s, k - 1, axis=1)[:, :k] if cat_s.shape[1] > k else np.argsort(-cat_s, 1)
        best_s = np.take_along_axis(cat_s, top, 1)
        best_i = np.take_along_axis(cat_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def k_recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """k-recall@k: mean fraction of each query's exact top-``k`` ids found in its approximate top-``k``."""
    a, e = np.asarray(approx_ids)[:, :k], np.asarray(exact_ids)[:, :k]
    hits = [len(set(ar[ar >= 0].tolist()) & set(er[er >= 0].tolist())) / max(int((er >= 0).sum()), 1)
            for ar, er in zip(a, e, strict=False)]
    return float(np.mean(hits)) if hits else 1.0
