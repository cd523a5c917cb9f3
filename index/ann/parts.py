"""The pieces a FAISS index is made of: id selectors, inner-product PCA, input checks, exact re-ranking."""

from __future__ import annotations

from typing import Any, Callable, List, Tuple

import faiss
import numpy as np

from cxr_search.errors import SearchIndexError

#: Candidates re-scored exactly per query when ``search(..., rerank=fetch)`` is used.
DEFAULT_RERANK_K = 50


def id_selector(ids: np.ndarray) -> Tuple[Any, List[Any]]:
    """An ``IDSelector`` for sorted unique ids, and the objects that must outlive it.

    A bitmap when it is not much larger than a hash set of the ids (store keys are dense), else a batch.
    """
    top = int(ids[-1])
    if (top + 1) / 8 <= 16 * len(ids) + (1 << 20):
        bits = np.zeros(top + 1, dtype=bool)
        bits[ids] = True
        bitmap = np.packbits(bits, bitorder="little")  # FAISS reads bit i at byte i>>3, bit i&7
        return faiss.IDSelectorBitmap(bitmap), [bitmap]
    return faiss.IDSelectorBatch(ids), []


def ip_pca_matrix(sample: np.ndarray, dims: int, rotate: bool, seed: int = 0) -> np.ndarray:
    """``[dims, dim]`` projection on the top eigenvectors of the *uncentred* second moment ``E[x x^T]``.

    FAISS's ``PCAMatrix`` subtracts the mean, which is harmless for L2 but turns an inner-product search
    into ranking by ``q.x - mean.x``; embeddings share a large mean, so that bias is real. Without
    centring, ``q'.x' = q.x - q_perp.x_perp`` and the leading components are the best ``dims`` for
    inner products. ``rotate`` applies a random rotation after it (as FAISS's ``PCAR``) so every kept
    dimension carries similar variance for the per-dimension scalar quantizer.
    """
    x = sample.astype(np.float64)
    _, vecs = np.linalg.eigh(x.T @ x / max(len(x), 1))
    a = vecs[:, ::-1][:, :dims].T
    if rotate:
        rot, _ = np.linalg.qr(np.random.default_rng([seed, dims]).standard_normal((dims, dims)))
        a = rot @ a
    return np.ascontiguousarray(a, dtype=np.float32)


def check_vectors(x: Any, dim: int, what: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[n, dim]`` array (one vector may be 1-D).

    Raises:
        SearchIndexError: Wrong shape, or NaN / infinite values.
    """
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] != dim:
        raise SearchIndexError(f"{what}: expected shape [n, {dim}], got {list(np.shape(x))}")
    if not np.isfinite(a).all():
        raise SearchIndexError(f"{what}: contains NaN or infinite values; re-embed those items")
    return np.ascontiguousarray(a)


def check_ids(ids: Any, what: str = "ids") -> np.ndarray:
    """``ids`` as a C-contiguous int64 array of store primary keys.

    Raises:
        SearchIndexError: A negative id.
    """
    a = np.asarray(ids if ids is not None else [], dtype=np.int64).ravel()
    if len(a) and a.min() < 0:
        raise SearchIndexError(f"{what}: negative id {int(a.min())}; ids are store primary keys (>= 0)")
    return np.ascontiguousarray(a)


def rerank_exact(q: np.ndarray, cand: np.ndarray, k: int, fetch: Callable[[np.ndarray], np.ndarray],
                 dim: int) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of each query among its candidate ids, with vectors from ``fetch``."""
    uniq = np.unique(cand[cand >= 0])
    vecs = check_vectors(fetch(uniq), dim, "re-ranking vectors") if len(uniq) else np.zeros((0, dim), np.float32)
    if len(vecs) != len(uniq):
        raise SearchIndexError(f"re-ranking: asked for {len(uniq)} vectors, got {len(vecs)}")
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    labels = np.full((len(q), k), -1, dtype=np.int64)
    for r, row in enumerate(cand):
        row = row[row >= 0]
        sc = vecs[np.searchsorted(uniq, row)] @ q[r]
        top = np.argsort(-sc, kind="stable")[:k]
        scores[r, :len(top)], labels[r, :len(top)] = sc[top], row[top]
    return scores, labels
