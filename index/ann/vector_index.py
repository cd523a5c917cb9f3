"""The FAISS layer: one vector index whose ids are the store's int64 primary keys.

Vectors are L2-normalised float32 and compared by inner product. Ids are never row positions:
exact indexes are ``IndexIDMap2(IndexFlatIP)``, IVF indexes store ids natively (``add_with_ids``;
``IndexIDMap``'s remove is wrong for IVF), HNSW is ``IndexIDMap2(IndexHNSWFlat)`` and cannot remove.
Filters (``allowed`` / ``excluded`` id sets) are applied inside FAISS with ``IDSelector`` search
parameters, and an IVF search is retried with more lists probed until every query has ``k`` hits
(or all lists were probed), so a filter that leaves at least ``k`` vectors always yields ``k`` results.

Files are ``MAGIC + FAISS payload + JSON trailer + trailer length + MAGIC``; the trailer records the
factory, search parameters and a SHA-256 of the payload, checked before FAISS parses anything. Saving
writes a temporary file in the same folder, fsyncs it and renames it over the old one.

Which index to build is decided in :mod:`index.ann.factory`; :func:`index.ann.build.build_index` trains,
adds, and tunes the search parameter on the data itself (recall@10 against exact search).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import faiss
import numpy as np

from cxr_search.errors import SearchIndexError
from cxr_search.fileio import atomic_write
from index.ann.factory import ParsedFactory, parse_factory
from index.ann.parts import DEFAULT_RERANK_K, check_ids, check_vectors, id_selector, ip_pca_matrix, rerank_exact
from index.ann.reference import exact_search

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]
_MAGIC = b"CXRANN01"
_FORMAT = "cxr-search-faiss/1"
_CHUNK = 65_536
_IP = faiss.METRIC_INNER_PRODUCT


def _in_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, ids)
    pos[pos >= len(sorted_ids)] = 0
    return (sorted_ids[pos] == ids) if len(sorted_ids) else np.zeros(len(ids), dtype=bool)


class VectorIndex:
    """A FAISS index keyed by store ids (see the module docstring).

    Attributes:
        factory: The factory string it was created with.
        dim: Vector dimension.
    """

    def __init__(self, index: Any, factory: str, dim: int, search_params: Optional[Dict[str, Any]] = None,
                 keep: Tuple[Any, ...] = ()) -> None:
        self.factory = factory
        self.dim = int(dim)
        self._parsed: ParsedFactory = parse_factory(dim, factory)
        self._index = index  # owns (or, through ``keep``, keeps alive) every FAISS object below
        self._keep = keep
        self._ivf = faiss.extract_index_ivf(index) if self._parsed.kind == "ivf" else None
        self._ids: Optional[np.ndarray] = None  # sorted cache of ids(); truth is the FAISS index
        self._gpu: Any = None
        self._gpu_res: Any = None
        self._params: Dict[str, Any] = {}
        if search_params:
            self.set_search_params(**search_params)

    # --------------------------------------------------------------------------- creation
    @classmethod
    def create(cls, dim: int, factory: str = "Flat") -> "VectorIndex":
        """An empty index of ``factory`` (see :func:`index.ann.factory.parse_factory`).

        Raises:
            SearchIndexError: Unsupported or invalid factory string.
        """
        p = parse_factory(dim, factory)
        try:
            if p.kind == "flat":
                inner = faiss.IndexFlatIP(dim)
                return cls(faiss.IndexIDMap2(inner), factory, dim, keep=(inner,))
            if p.kind == "hnsw":
                inner = faiss.IndexHNSWFlat(dim, p.hnsw_m, _IP)
                return cls(faiss.IndexIDMap2(inner), factory, dim, keep=(inner,))
            sub = faiss.index_factory(p.pca_dims or dim, p.inner, _IP)
            faiss.extract_index_ivf(sub)  # raises unless the inner factory is an IVF index
        except RuntimeError as exc:
            raise SearchIndexError(f"factory {factory!r} is invalid for dimension {dim}: {exc}") from exc
        if p.pca_dims is None:
            return cls(sub, factory, dim)
        lt = faiss.LinearTransform(dim, p.pca_dims, False)
        lt.is_trained = False
        return cls(faiss.IndexPreTransform(lt, sub), factory, dim, keep=(lt, sub))

    # --------------------------------------------------------------------------- facts
    @property
    def kind(self) -> str:
        """``"flat"``, ``"ivf"`` or ``"hnsw"``."""
        return self._parsed.kind

    @property
    def ntotal(self) -> int:
        """Number of vectors held."""
        return int(self._index.ntotal)

    @property
    def is_trained(self) -> bool:
        """Whether vectors can be added."""
        return bool(self._index.is_trained)

    @property
    def nlist(self) -> int:
        """IVF list count (0 for other kinds)."""
        return int(self._ivf.nlist) if self._ivf is not None else 0

    @property
    def search_params(self) -> Dict[str, Any]:
        """The search parameters in force (persisted with the index)."""
        return dict(self._params)

    def __repr__(self) -> str:
        return f"VectorIndex({self.factory!r}, dim={self.dim}, ntotal={self.ntotal}, params={self._params})"

    # --------------------------------------------------------------------------- mutation
    def train(self, sample: np.ndarray) -> None:
        """Train the quantizers (no-op for Flat and HNSW).

        Raises:
            SearchIndexError: Too few or malformed training vectors.
        """
        x = check_vectors(sample, self.dim, "training sample")
        if self.kind != "ivf":
            return
        if self.ntotal:
            raise SearchIndexError(f"{self.factory}: index already holds {self.ntotal} vectors; retraining "
                                   "would invalidate them - build a new index (build_index)")
        if len(x) < self.nlist:
            raise SearchIndexError(f"{self.factory}: {len(x)} training vectors for {self.nlist} lists; "
                                   f"give at least {39 * self.nlist} or a factory with fewer lists")
        try:
            if self._parsed.pca_dims is None:
                self._index.train(x)
            else:
                lt = faiss.downcast_VectorTransform(self._index.chain.at(0))
                sub = self._index.index
                a = ip_pca_matrix(x, self._parsed.pca_dims, self._parsed.pca_rotate)
                faiss.copy_array_to_vector(a.ravel(), lt.A)
                faiss.copy_array_to_vector(np.zeros(self._parsed.pca_dims, np.float32), lt.b)
                lt.is_trained = True
                sub.train(np.ascontiguousarray(x @ a.T))
                self._index.is_trained = True
        except RuntimeError as exc:
            raise SearchIndexError(f"{self.factory}: training failed: {exc}") from exc

    def add(self, vectors: np.ndarray, ids: np.ndarray, *, progress: bool = False) -> None:
        """Add vectors under their store ids.

        Raises:
            SearchIndexError: Untrained index, shape mismatch, or an id repeated in ``ids`` or already
                present (duplicates never enter silently).
        """
        x = check_vectors(vectors, self.dim, "vectors to add")
        ids = check_ids(ids)
        if len(ids) != len(x):
            raise SearchIndexError(f"{len(x)} vectors but {len(ids)} ids to add")
        if not len(ids):
            return
        if not self.is_trained:
            raise SearchIndexError(f"{self.factory}: index is not trained; call train() (or use build_index)")
        order = np.argsort(ids, kind="stable")
        sid = ids[order]
        rep = sid[1:][sid[1:] == sid[:-1]]
        if len(rep):
            raise SearchIndexError(f"ids repeated in one add: {np.unique(rep)[:5].tolist()}; ids must be unique")
        present = self._id_cache()
        dup = sid[_in_sorted(present, sid)]
        if len(dup):
            raise SearchIndexError(f"{len(dup)} id(s) already in the index (e.g. {dup[:5].tolist()}); "
                                   "remove them first to replace their vectors")
        chunks = range(0, len(x), _CHUNK)
        if progress:
            from tqdm import tqdm

            chunks = tqdm(chunks, desc="adding vectors", unit="chunk")
        for s in chunks:
            self._index.add_with_ids(x[s:s + _CHUNK], ids[s:s + _CHUNK])
        self._ids = np.insert(present, np.searchsorted(present, sid), sid)
        self._gpu = None

    def remove(self, ids: Iterable[int]) -> int:
        """Remove ids (absent ones are ignored); returns how many vectors were removed.

        Raises:
            SearchIndexError: HNSW index (it cannot remove; rebuild it).
        """
        ids = np.unique(check_ids(ids))
        if self.kind == "hnsw":
            raise SearchIndexError(f"{self.factory}: HNSW indexes cannot remove ids; rebuild the index without "
                                   "those ids (build_index), or use an IVF or Flat factory, which can")
        if not len(ids) or not self.ntotal:
            return 0
        sel, keep = id_selector(ids)
        n = int(self._index.remove_ids(sel))
        del keep
        present = self._id_cache()
        self._ids = present[~_in_sorted(ids, present)]
        self._gpu = None
        return n

    def set_search_params(self, **kw: Any) -> None:
        """Set ``nprobe`` / ``rerank_nprobe`` (IVF; the latter for ``search(rerank=...)``) or ``efSearch``
        (HNSW); saved with the index.

        Raises:
            SearchIndexError: A parameter this kind of index does not have, or an out-of-range value.
        """
        allowed = {"ivf": ("nprobe", "rerank_nprobe"), "hnsw": ("efSearch",), "flat": ()}[self.kind]
        for key, value in kw.items():
            if key not in allowed:
                raise SearchIndexError(f"{self.factory}: unknown search parameter {key!r} "
                                       f"(this index takes: {', '.join(allowed) or 'none'})")
            v = int(value)
            if key in ("nprobe", "rerank_nprobe") and not 1 <= v <= self.nlist:
                raise SearchIndexError(f"{self.factory}: {key} must be in 1..{self.nlist}, got {v}")
            if key == "nprobe":
                self._ivf.nprobe = v
                if self._gpu is not None:
                    faiss.GpuParameterSpace().set_index_parameter(self._gpu, "nprobe", v)
            elif key == "efSearch":
                if v < 1:
                    raise SearchIndexError(f"{self.factory}: efSearch must be >= 1, got {v}")
                faiss.downcast_index(self._index.index).hnsw.efSearch = v
            self._params[key] = v

    # --------------------------------------------------------------------------- ids
    def ids(self) -> np.ndarray:
        """Every id held, int64, sorted (repeats included, so ``index verify`` can see them)."""
        if self.kind == "ivf":
            inv = self._ivf.invlists
            parts = [np.zeros(0, dtype=np.int64)]
            for lst in range(inv.nlist):
                size = inv.list_size(lst)
                if size:
                    ptr = inv.get_ids(lst)
                    parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                    inv.release_ids(lst, ptr)
            out = np.concatenate(parts)
        else:
            out = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        out.sort()
        self._ids = out
        return out.copy()

    def _id_cache(self) -> np.ndarray:
        return self._ids if self._ids is not None else self.ids()

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean array: which of ``ids`` are in the index."""
        return _in_sorted(self._id_cache(), np.asarray(ids, dtype=np.int64).ravel())

    # --------------------------------------------------------------------------- search
    def search(self, queries: np.ndarray, k: int, *, allowed: Optional[np.ndarray] = None,
               excluded: Optional[np.ndarray] = None, rerank: Optional[Callable[[np.ndarray], np.ndarray]] = None,
               rerank_k: int = DEFAULT_RERANK_K) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner-product search, optionally restricted to ``allowed`` and not ``excluded`` ids.

        Args:
            queries: ``[Q, dim]`` (or one ``[dim]`` query).
            k: Hits per query.
            allowed: Only these ids may be returned (ids not in the index are ignored).
            excluded: These ids may not be returned.
            rerank: Optional ``fetch(ids) -> [len(ids), dim]`` float32 giving the *full* vectors of ids
                (for instance from the store or a memory-mapped file). The index then returns
                ``max(k, rerank_k)`` candidates and they are re-scored exactly: a compressed index whose
                codec limits recall (see ``build_index``'s ``rerank_recall_at_10``) gets exact ranking
                for the cost of fetching ``rerank_k`` vectors per query.
            rerank_k: Candidates re-scored per query.

        Returns:
            ``(scores [Q, k] float32, ids [Q, k] int64)``, best first, padded with ``-inf`` / ``-1``
            only when fewer than ``k`` eligible vectors exist.

        Raises:
            SearchIndexError: Malformed queries, ``k < 1``, or ``rerank`` returned malformed vectors.
        """
        q = check_vectors(queries, self.dim, "queries")
        if int(k) < 1:
            raise SearchIndexError(f"k must be >= 1, got {k}")
        k = int(k)
        if rerank is not None:
            _, cand = self._search(q, max(k, int(rerank_k)), allowed, excluded, self._params.get("rerank_nprobe"))
            return rerank_exact(q, cand, k, rerank, self.dim)
        return self._search(q, k, allowed, excluded, None)

    def _search(self, q: np.ndarray, k: int, allowed: Optional[np.ndarray], excluded: Optional[np.ndarray],
                nprobe: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        labels = np.full((len(q), k), -1, dtype=np.int64)
        if not len(q) or not self.ntotal:
            return scores, labels
        present = self._id_cache()
        sel, keep, eligible, ex = None, [], None, np.zeros(0, dtype=np.int64)
        if allowed is not None:
            eligible = np.unique(check_ids(allowed, "allowed ids"))
            eligible = eligible[_in_sorted(present, eligible)]
            if excluded is not None:
                eligible = np.setdiff1d(eligible, check_ids(excluded, "excluded ids"), assume_unique=False)
            n_eligible = len(eligible)
            if n_eligible:
                sel, keep = id_selector(eligible)
        elif excluded is not None:
            ex = np.unique(check_ids(excluded, "excluded ids"))
            ex = ex[_in_sorted(present, ex)]
            n_eligible = len(present) - len(ex)
            if len(ex):
                inner, keep = id_selector(ex)
                sel = faiss.IDSelectorNot(inner)
                keep.append(inner)
        else:
            n_eligible = len(present)
        if n_eligible <= 0:
            return scores, labels
        want = min(k, n_eligible)
        if self.kind == "ivf":
            fraction = n_eligible / max(len(present), 1) if eligible is not None else 1.0
            short = self._search_ivf(q, k, sel, want, fraction, scores, labels, nprobe)
        else:
            params = (faiss.SearchParametersHNSW(sel=sel, efSearch=max(self._params.get("efSearch", 16), k))
                      if self.kind == "hnsw" else faiss.SearchParameters(sel=sel))
            scores[:], labels[:] = self._index.search(q, k, params=params)
            short = np.flatnonzero((labels >= 0).sum(1) < want)
        if len(short):
            # HNSW can strand a search in a filtered-out region; an exact pass over the eligible vectors
            # (Flat/HNSW keep full vectors) restores the guarantee.
            if self.kind == "ivf":
                raise SearchIndexError(f"{self.factory}: probing all {self.nlist} lists found fewer than {want} "
                                       "of the eligible vectors; the index is inconsistent - run cxr-search "
                                       "index verify and rebuild it")
            cand = eligible if eligible is not None else present[~_in_sorted(ex, present)]
            vecs = self._index.reconstruct_batch(cand) if len(cand) <= 4 * _CHUNK else None
            if vecs is None:
                vecs = np.concatenate([self._index.reconstruct_batch(cand[s:s + _CHUNK])
                                       for s in range(0, len(cand), _CHUNK)])
            scores[short], labels[short] = exact_search(vecs, cand, q[short], k)
        del keep
        bad = labels < 0
        scores[bad] = -np.inf
        return scores, labels

    def _search_ivf(self, q: np.ndarray, k: int, sel: Any, want: int, fraction: float,
                    scores: np.ndarray, labels: np.ndarray, nprobe: Optional[int]) -> np.ndarray:
        """IVF search with nprobe raised x4 for the queries still short of ``want`` hits."""
        nlist, base = self.nlist, int(nprobe or self._ivf.nprobe)
        # An allow-list keeping a fraction f of the vectors leaves ~f of each probed list: probe 1/f as many.
        nprobe = min(nlist, max(base, math.ceil(base / max(fraction, 1e-9))))
        rows = np.arange(len(q))
        first = True
        while True:
            if first and sel is None and self._gpu is not None and nprobe == self._ivf.nprobe:
                d, i = self._gpu.search(q[rows], k)
            else:
                params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)
                d, i = self._index.search(q[rows], k, params=params)
            first = False
            scores[rows], labels[rows] = d, i
            rows = rows[(i >= 0).sum(1) < want]
            if not len(rows) or nprobe >= nlist:
                return rows
            nprobe = min(nlist, nprobe * 4)

    # --------------------------------------------------------------------------- GPU
    def to_gpu_if_available(self) -> None:
        """Search unfiltered queries of an IVF index on GPU 0 when FAISS sees a GPU; otherwise do nothing.

        The CPU index stays the truth (filters, add, remove and save use it, and they drop the GPU copy;
        call again after changes); a failed copy is logged.
        """
        if faiss.get_num_gpus() < 1 or self.kind != "ivf":
            return  # Flat (<= EXACT_THRESHOLD) is fast on CPU; HNSW has no GPU form here
        try:
            res = faiss.StandardGpuResources()
            gpu = faiss.index_cpu_to_gpu(res, 0, self._index)
            faiss.GpuParameterSpace().set_index_parameter(gpu, "nprobe", int(self._ivf.nprobe))
            self._gpu, self._gpu_res = gpu, res
        except (RuntimeError, AttributeError) as exc:
            logger.warning("%s: cannot copy the index to the GPU (%s); searching on CPU", self.factory, exc)
            self._gpu = None

    # --------------------------------------------------------------------------- files
    def serialized_size(self) -> int:
        """Bytes of the FAISS serialization (the index's memory footprint, near enough), without writing."""
        size = [0]

        def count(b: bytes) -> int:
            size[0] += len(b)
            return len(b)

        writer = faiss.PyCallbackIOWriter(count)
        faiss.write_index(self._index, writer)
        del writer
        return size[0]

    def save(self, path: PathLike) -> None:
        """Write the index atomically (temp file in the same folder, fsync, rename).

        Raises:
            SearchIndexError: The file cannot be written.
        """
        path = Path(path)
        try:
            with atomic_write(path, "wb") as fh:
                fh.write(_MAGIC)
                digest, size = hashlib.sha256(), [0]

                def write(b: bytes) -> int:
                    digest.update(b)
                    size[0] += len(b)
                    return fh.write(b)

                writer = faiss.PyCallbackIOWriter(write)
                faiss.write_index(self._index, writer)
                del writer  # flushes its buffer through ``write``
                trailer = json.dumps({"format": _FORMAT, "factory": self.factory, "dim": self.dim,
                                      "metric": "inner_product", "ntotal": self.ntotal,
                                      "search_params": self._params, "faiss_version": faiss.__version__,
                                      "payload_bytes": size[0], "payload_sha256": digest.hexdigest()}).encode()
                fh.write(trailer + struct.pack("<Q", len(trailer)) + _MAGIC)
        except OSError as exc:
            raise SearchIndexError(f"{path}: cannot write the index ({exc})") from exc

    @classmethod
    def load(cls, path: PathLike) -> "VectorIndex":
        """Read an index written by :meth:`save`.

        Raises:
            SearchIndexError: Missing, truncated or corrupt file (checksum verified before parsing).
        """
        path = Path(path)
        fix = "rebuild it from the store by running cxr-search index build again; cxr-search index verify checks it"
        if not path.is_file():
            raise SearchIndexError(f"{path}: index file missing; {fix}")
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < 2 * len(_MAGIC) + 8 or fh.read(len(_MAGIC)) != _MAGIC:
                    raise ValueError("not a cxr-search FAISS file")
                fh.seek(size - len(_MAGIC) - 8)
                (tlen,) = struct.unpack("<Q", fh.read(8))
                if fh.read(len(_MAGIC)) != _MAGIC or tlen > size:
                    raise ValueError("truncated (no trailer)")
                fh.seek(size - len(_MAGIC) - 8 - tlen)
                meta = json.loads(fh.read(tlen))
                payload = int(meta["payload_bytes"])
                if meta.get("format") != _FORMAT or len(_MAGIC) + payload + tlen + 8 + len(_MAGIC) != size:
                    raise ValueError("size or format does not match its trailer")
                fh.seek(len(_MAGIC))
                digest = hashlib.sha256()
                for left in range(payload, 0, -(1 << 24)):
                    digest.update(fh.read(min(left, 1 << 24)))
                if digest.hexdigest() != meta["payload_sha256"]:
                    raise ValueError("checksum mismatch")
                fh.seek(len(_MAGIC))
                index = faiss.read_index(faiss.PyCallbackIOReader(fh.read))
            return cls(index, meta["factory"], int(meta["dim"]), meta.get("search_params") or {})
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SearchIndexError) as exc:
            raise SearchIndexError(f"{path}: corrupt or unreadable index file ({exc}); {fix}") from exc
