"""Which FAISS index to build and how: factory rule and parsing, building blocks, ``build_index``.

:mod:`index.ann` owns the index object (:class:`index.ann.VectorIndex`) and re-exports the public names
defined here. This module holds the choice of factory, the pieces the index is made of (inner-product
PCA, id selectors, exact re-ranking, input checks) and :func:`build_index`. The brute-force reference
and the seeded test vectors are in :mod:`index.ann_eval`.

The rule (:func:`choose_factory`), from ``engine-facts.md`` (2-core CPU, 512-d, inner product):

* up to :data:`EXACT_THRESHOLD` vectors: ``"Flat"``. An exact scan of 100k x 512 float32 is 205 MB,
  ~9 ms a query at the measured ~22 GB/s (1M took 91 ms), needs no training, has recall 1.0 and removes
  ids exactly. Filtered search over a small allowed set is cheap too.
* beyond: an IVF index (it removes ids in ~1 ms per 10k and takes ``IDSelector`` filters; HNSW cannot
  remove ids and costs ~2.3 KB a vector, so it is never chosen, only accepted as an explicit factory).
  The codec is the best scalar quantizer that fits the memory budget (bytes per vector *including* the
  8-byte id and the per-vector share of centroids and transform): ``Flat``, ``SQfp16``, ``SQ8``, ``SQ6``,
  ``SQ4`` on all dimensions, or - below ``dim/2 + 8`` bytes - the same codecs on the leading components
  of an uncentred PCA (``PCAR{d},IVF...,SQ{b}``; see :func:`ip_pca_matrix`). Product
  quantizers (``PQ64`` etc.) were measured worse per byte than PCA+SQ on clustered 512-d data
  (``benchmarks/bench_faiss.py``), and a refine stage cannot fit a ~100-byte budget with an 8-byte id.
  Which of the reduced codecs wins depends on the spectrum of the data, so when a sample is given the
  candidates are compared by their measured recall on it (:func:`rank_candidates`, used by
  :func:`build_index`).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import faiss

import numpy as np

from cxr_search.errors import SearchIndexError
from index.ann_eval import recall_at_k

if TYPE_CHECKING:
    from index.ann import VectorIndex

logger = logging.getLogger(__name__)
_IP = faiss.METRIC_INNER_PRODUCT

#: Up to this many vectors an exact (``Flat``) index is used: <= ~9 ms a query and 205 MB at 512-d.
EXACT_THRESHOLD: int = 100_000
#: Default memory budget of an ANN index, bytes per vector including its 8-byte id.
DEFAULT_BYTES_PER_VECTOR: float = 100.0
ID_BYTES = 8
#: Fewer PCA components than this would make any budget meaningless; such a budget is refused.
MIN_PCA_DIMS = 16
#: Codecs by bits per dimension, best first: (bits, faiss codec name).
_CODECS = ((32, "Flat"), (16, "SQfp16"), (8, "SQ8"), (6, "SQ6"), (4, "SQ4"))
# Factory strings that need sequential ids or an IndexIDMap whose remove is wrong for them.
_REFUSED = ("Refine", "RFlat", "IDMap", "IVFPQR", "+")

_PCA_RE = re.compile(r"^PCA(R?)(\d+),(.+)$")
_HNSW_RE = re.compile(r"^HNSW(\d+)(,Flat)?$")
_IVF_RE = re.compile(r"(?:^|,)IVF(\d+)")


def choose_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: the power of two nearest ``4 * sqrt(n)``.

    1M vectors gives 4096 (the engine-facts setting); capped at ``n / 39`` because FAISS wants at least
    39 training points per centroid.
    """
    if n < 1:
        return 1
    nlist = 2 ** int(round(math.log2(4.0 * math.sqrt(n))))
    cap = max(1, n // 39)
    while nlist > cap and nlist > 1:
        nlist //= 2
    return int(nlist)


def _overhead(n: int, dim: int, dims: int, nlist: int) -> float:
    """Bytes per vector beside the code: id, centroid table share, PCA matrix share."""
    extra = nlist * dims * 4.0
    if dims < dim:
        extra += dims * dim * 4.0
    return ID_BYTES + extra / max(n, 1)


def candidate_factories(n: int, dim: int, *, bytes_per_vector: Optional[float] = None) -> List[str]:
    """All factory strings that fit the budget, in default preference order.

    Returns ``["Flat"]`` up to :data:`EXACT_THRESHOLD`. Beyond it: the full-dimension codec with the
    most bits that fits, then reduced (PCA) codecs with more bits per kept dimension (6, 8, then 4 bits;
    kept dimensions a multiple of 8).

    Raises:
        SearchIndexError: The budget is too small for any codec.
    """
    if n <= EXACT_THRESHOLD:
        return ["Flat"]
    budget = float(bytes_per_vector if bytes_per_vector is not None else DEFAULT_BYTES_PER_VECTOR)
    nlist = choose_nlist(n)
    full: Optional[str] = None
    full_bits = 0
    for bits, name in _CODECS:
        if dim * bits / 8.0 + _overhead(n, dim, dim, nlist) <= budget:
            full, full_bits = f"IVF{nlist},{name}", bits
            break
    out = [full] if full else []
    # Reduced codecs in default order: 6-bit won on the CLIP-like benchmark data (1/i spectrum), 8-bit on
    # steeper spectra; build_index ranks them on the data anyway.
    for bits, name in sorted(_CODECS, key=lambda c: {6: 0, 8: 1, 4: 2}.get(c[0], 3)):
        if bits <= full_bits or bits > 8:
            continue  # dominated by the full-dimension codec, or too costly to be worth truncating for
        dims = dim
        while dims >= MIN_PCA_DIMS and dims * bits / 8.0 + _overhead(n, dim, dims, nlist) > budget:
            dims = (dims - 1) // 8 * 8  # multiples of 8 keep FAISS's SIMD scalar-quantizer kernels
        if MIN_PCA_DIMS <= dims < dim:
            out.append(f"PCAR{dims},IVF{nlist},{name}")
    if not out:
        need = MIN_PCA_DIMS * 0.5 + _overhead(n, dim, MIN_PCA_DIMS, nlist)
        raise SearchIndexError(
            f"a budget of {budget:g} bytes per vector is too small for {n} vectors of dimension {dim} "
            f"(at least {need:.0f} needed: 8-byte id plus code); give a larger --bytes-per-vector"
        )
    return out


def choose_factory(n: int, dim: int, *, bytes_per_vector: Optional[float] = None) -> str:
    """FAISS factory string for ``n`` vectors of dimension ``dim``.

    ``"Flat"`` (exact) up to :data:`EXACT_THRESHOLD`; beyond it an IVF index whose codec is the best
    that fits ``bytes_per_vector`` (bytes per vector including ids; default
    :data:`DEFAULT_BYTES_PER_VECTOR`, which for 1M x 512-d gives ``PCAR112,IVF4096,SQ6``). HNSW is never
    chosen (it cannot remove ids). :func:`index.ann.build_index` with ``factory=None`` refines this
    choice among :func:`candidate_factories` by measured recall on a sample of the data.

    Raises:
        SearchIndexError: The budget is too small for any codec.
    """
    return candidate_factories(n, dim, bytes_per_vector=bytes_per_vector)[0]


@dataclass(frozen=True)
class ParsedFactory:
    """A factory string split into what :class:`index.ann.VectorIndex` builds.

    Attributes:
        kind: ``"flat"`` (IndexIDMap2 over IndexFlatIP), ``"hnsw"`` (IndexIDMap2 over IndexHNSWFlat,
            no removal) or ``"ivf"`` (native ids, optionally behind an inner-product PCA).
        pca_dims: Components kept by the PCA prefix, or None.
        pca_rotate: Whether a random rotation follows the PCA (``PCAR``), spreading variance evenly over
            the kept dimensions so that per-dimension scalar quantizers waste fewer levels.
        inner: Factory string of the part FAISS builds (after the PCA prefix).
        hnsw_m: HNSW graph degree.
        nlist: IVF list count (0 when not IVF).
    """

    kind: str
    pca_dims: Optional[int]
    pca_rotate: bool
    inner: str
    hnsw_m: int = 0
    nlist: int = 0


def parse_factory(dim: int, factory: str) -> ParsedFactory:
    """Split and check a factory string.

    Raises:
        SearchIndexError: A form this engine does not support (with the supported forms named).
    """
    f = factory.strip().replace(" ", "")
    supported = ('supported: "Flat", "HNSW32", "IVF4096,SQ8", "PCAR88,IVF4096,SQ8", "IVF4096,PQ64x4fs", '
                 '"OPQ64,IVF4096,PQ64" (any FAISS IVF factory, optionally behind PCA/PCAR/OPQ)')
    if f == "Flat":
        return ParsedFactory("flat", None, False, "Flat")
    m = _HNSW_RE.match(f)
    if m:
        return ParsedFactory("hnsw", None, False, f, hnsw_m=int(m.group(1)))
    if any(tok in f for tok in _REFUSED):
        raise SearchIndexError(
            f"factory {factory!r}: refine stages and ID maps need sequential FAISS ids, but this engine "
            f"keeps store ids in the index; {supported}"
        )
    pca_dims, rotate, inner = None, False, f
    m = _PCA_RE.match(f)
    if m:
        rotate, pca_dims, inner = m.group(1) == "R", int(m.group(2)), m.group(3)
        if not 1 <= pca_dims <= dim:
            raise SearchIndexError(f"factory {factory!r}: PCA to {pca_dims} dimensions, but vectors have {dim}")
    nl = _IVF_RE.search(inner)
    if not nl:
        raise SearchIndexError(f"factory {factory!r} is not supported; {supported}")
    return ParsedFactory("ivf", pca_dims, rotate, inner, nlist=int(nl.group(1)))


def with_nlist(factory: str, nlist: int) -> str:
    """The same factory string with another IVF list count (used for trials on a sample)."""
    return _IVF_RE.sub(lambda m: m.group(0).replace(m.group(1), str(nlist)), factory, count=1)


# ------------------------------------------------------------------------------- index building blocks
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


def _neighbours_without_self(index_search: Any, qids: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` ids of each query row after dropping the query's own id (searching k+1)."""
    _, ids = index_search(k + 1)
    out = np.full((len(qids), k), -1, dtype=np.int64)
    for r, (row, own) in enumerate(zip(ids, qids)):
        rest = row[row != own][:k]
        out[r, :len(rest)] = rest
    return out


def rank_candidates(sample: np.ndarray, factories: List[str], *, n_queries: int = 500, seed: int = 0,
                    k: int = 10) -> List[Tuple[str, float]]:
    """Codec-limited recall@k of each factory on a sample (all lists probed; <= 256 lists).

    ``n_queries`` rows of ``sample`` are held out as queries; the rest is indexed.
    """
    from index.ann import VectorIndex

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
        out.append((f, recall_at_k(idx.search(queries, k)[1], truth, k)))
    return out


def build_index(vectors: np.ndarray, ids: np.ndarray, *, factory: Optional[str] = None,
                bytes_per_vector: Optional[float] = None, train_size: Optional[int] = None,
                recall_queries: int = 1000, seed: int = 0, progress: bool = False,
                target_recall: float = 0.95) -> Tuple["VectorIndex", Dict[str, Any]]:
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
    from index.ann import VectorIndex

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


def _tune(index: "VectorIndex", x: np.ndarray, ids: np.ndarray, rows: np.ndarray, target: float,
          info: Dict[str, Any]) -> Tuple[List[List[float]], float]:
    """Raise nprobe (efSearch) in powers of two; set it for plain and (IVF) re-ranked search.

    For each mode the value kept is the first reaching ``target + 0.01`` on the build queries (a margin
    for queries unlike the database rows: held-out queries scored ~0.01 lower in the benchmark), or else
    the first within 0.005 of the best recall seen (the codec limit). Returns the curve ``[value, recall,
    re-ranked recall]`` and the plain recall at the value kept; re-ranked facts go into ``info``.
    """
    from index.ann import DEFAULT_RERANK_K

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
        plain = recall_at_k(_neighbours_without_self(lambda kq: index.search(q, min(kq, n)), qids, kk), truth, kk)
        reranked = recall_at_k(_neighbours_without_self(
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
