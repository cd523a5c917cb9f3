"""Which FAISS index to build: the factory rule, and parsing of factory strings.

The index object is :class:`index.ann.vector_index.VectorIndex`; its building blocks (inner-product
PCA, id selectors, exact re-ranking, input checks) are in :mod:`index.ann.parts`, and
:func:`index.ann.build.build_index` trains, adds and tunes. The brute-force reference and the seeded
test vectors are in :mod:`index.ann.reference`.

The rule (:func:`choose_factory`), from the measurements in ``docs/engine-facts.md`` (2-core CPU, 512-d,
inner product):

* up to :data:`EXACT_THRESHOLD` vectors: ``"Flat"``. An exact scan of 100k x 512 float32 is 205 MB,
  ~9 ms a query at the measured ~22 GB/s (1M took 91 ms), needs no training, has recall 1.0 and removes
  ids exactly. Filtered search over a small allowed set is cheap too.
* beyond: an IVF index (it removed 10k ids in 0.01 s and takes ``IDSelector`` filters; HNSW cannot
  remove ids and costs ~2.3 KB a vector, so it is never chosen, only accepted as an explicit factory).
  The codec is the best scalar quantizer that fits the memory budget (bytes per vector *including* the
  8-byte id and the per-vector share of centroids and transform): ``Flat``, ``SQfp16``, ``SQ8``, ``SQ6``,
  ``SQ4`` on all dimensions, or - below ``dim/2 + 8`` bytes - the same codecs on the leading components
  of an uncentred PCA (``PCAR{d},IVF...,SQ{b}``; see :func:`ip_pca_matrix`). Product
  quantizers (``PQ64`` etc.) were measured worse per byte than PCA+SQ on clustered 512-d data
  (``benchmarks/bench_faiss.py``), and a refine stage cannot fit a ~100-byte budget with an 8-byte id.
  Which of the reduced codecs wins depends on the spectrum of the data, so when a sample is given the
  candidates are compared by their measured recall on it (:func:`index.ann.build.rank_candidates`,
  used by :func:`index.ann.build.build_index`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import List, Optional

import faiss

from cxr_search.errors import SearchIndexError

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

    1M vectors gives 4096 (the setting measured in ``docs/engine-facts.md``); capped at ``n / 39``
    because FAISS wants at least 39 training points per centroid.
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
    chosen (it cannot remove ids). :func:`index.ann.build.build_index` with ``factory=None`` refines this
    choice among :func:`candidate_factories` by measured recall on a sample of the data.

    Raises:
        SearchIndexError: The budget is too small for any codec.
    """
    return candidate_factories(n, dim, bytes_per_vector=bytes_per_vector)[0]


@dataclass(frozen=True)
class ParsedFactory:
    """A factory string split into what :class:`index.ann.vector_index.VectorIndex` builds.

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
