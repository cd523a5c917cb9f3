"""Queries: text -> images / studies, image -> report sections / images / studies, with filters.

Filters (view, sex, age range, date range, modality; parsed in :mod:`index.filters`) are resolved to
the allowed ids in SQL and applied inside FAISS with an ID selector, so k hits come back whenever k
match. Image queries exclude the query's own patient by default (its study included): a radiologist
looking for similar cases does not want the same patient's other films, and an evaluation must not
count them. :meth:`Searcher.query_text` and :meth:`Searcher.query_image` also say what the hits cannot
show (:class:`index.query_checks.QueryWarning`): a query of unknown words, a truncated query, an image
query that is itself in the index, filters that nothing matches.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
from sqlalchemy import and_, exists, select

from cxr_search.errors import ConfigError, InputFileError
from cxr_search.inference import Embedder
from index.filters import Filters, check_k, check_level, check_returns
from index.index_dir import IndexDir, model_identity
from index.query_checks import QueryWarning, text_query_warnings
from index.store import EMBEDDED, Image, Patient, Section, Study, chunks

logger = logging.getLogger(__name__)

_EXCERPT = 300
#: Cosine from which an indexed image is taken to be the query image itself.
SAME_IMAGE_COSINE = 0.9999


@dataclass
class Hit:
    """One search result."""

    rank: int
    score: float
    kind: str
    id: int
    study_uid: str
    study_date: Optional[str]
    sex: Optional[str]
    age: Optional[float]
    image_id: Optional[int] = None
    sop_uid: Optional[str] = None
    view: Optional[str] = None
    path: Optional[str] = None
    section_kind: Optional[str] = None
    section_text: Optional[str] = None
    report_excerpt: str = ""
    images: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


@dataclass
class SearchResult:
    """The hits of one query and what they cannot show.

    Attributes:
        hits: The hits, best first.
        warnings: Things to tell the user about the query (empty when there are none).
    """

    hits: List[Hit]
    warnings: List[QueryWarning] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict: ``hits`` and ``query_warnings``."""
        return {"hits": [h.to_dict() for h in self.hits], "query_warnings": [w.to_dict() for w in self.warnings]}


@dataclass(frozen=True)
class _QueryIdentity:
    path_keys: Tuple[str, ...] = ()
    sop_uid: Optional[str] = None
    study_uid: Optional[str] = None
    patient_src: Optional[str] = None


class Searcher:
    """Search an index folder with the model it was built with.

    Args:
        index_dir: The index folder.
        embedder: The Embedder of the model (its fingerprint and preprocessing must equal the index's);
            query images are embedded on its device and in its precision. A long-lived Searcher keeps
            it warm.
        db_url: Store URL when it is not the one recorded in the index.
        text_precision: Precision of the query text encoder: ``auto`` (int8 on a CPU Embedder, where a
            single query is bound by reading BERT's fp32 weights; the device's best float precision on
            a GPU), ``int8``, ``fp32``, ``bf16``, ``fp16``. The index itself is always built in the
            precision given to ``index build``.

    Raises:
        SearchIndexError: Missing or corrupt index files, or a model mismatch.
    """

    def __init__(self, index_dir: Union[str, Path], embedder: Embedder, *, db_url: Optional[str] = None,
                 text_precision: str = "auto") -> None:
        self.index = IndexDir.open(index_dir, db_url=db_url, readonly=True)
        self.index.check_model(model_identity(embedder.model))
        self.embedder = embedder
        if text_precision == "auto":
            text_precision = "int8" if embedder.device.type == "cpu" else "auto"
        self.text_precision = text_precision
        for kind in ("image", "section", "study"):
            # Load now, so that a missing or corrupt file fails here and not at the first query;
            # large (IVF) indices are copied to the GPU when FAISS sees one.
            self.index.vector_index(kind).to_gpu_if_available()

    def close(self) -> None:
        """Release the store's connections."""
        self.index.close()

    # ------------------------------------------------------------------------------ queries
    def search_text(self, query: str, *, k: int = 10, level: str = "image",
                    filters: Optional[Filters] = None) -> List[Hit]:
        """Images (or studies) matching a description (:meth:`query_text` without its warnings)."""
        return self.query_text(query, k=k, level=level, filters=filters).hits

    def search_image(self, image: Any, *, k: int = 10, returns: str = "images", filters: Optional[Filters] = None,
                     include_same_patient: bool = False) -> List[Hit]:
        """Report sections, images or studies similar to an image (:meth:`query_image` without its warnings)."""
        return self.query_image(image, k=k, returns=returns, filters=filters,
                                include_same_patient=include_same_patient).hits

    def query_text(self, query: str, *, k: int = 10, level: str = "image",
                   filters: Optional[Filters] = None) -> "SearchResult":
        """Images (or studies) matching a description, with what the hits cannot show.

        Warnings: the query's word pieces are mostly unknown to the tokenizer, the query was cut at
        the tokenizer's length, no indexed item matches the filters.

        Raises:
            ConfigError: Empty query, bad k or level.
        """
        check_k(k)
        check_level(level)
        vec, warnings = self.embed_query_text(query)
        kind = "image" if level == "image" else "study"
        hits = self._search(vec, kind, k, filters or Filters(), excluded_studies=set(), warnings=warnings)
        return SearchResult(hits, warnings)

    def query_image(self, image: Any, *, k: int = 10, returns: str = "images", filters: Optional[Filters] = None,
                    include_same_patient: bool = False) -> "SearchResult":
        """Report sections, images or studies similar to an image (a path, PIL image or array).

        The query's own study and every study of its patient are excluded unless
        ``include_same_patient`` (known from the DICOM header, or from the store when the file is
        indexed). A query image that is itself in the index (same SOPInstanceUID, same file, or an
        indexed image of the same content: cosine >= :data:`SAME_IMAGE_COSINE`) gets a warning.

        Raises:
            ConfigError: Bad k or ``returns``.
            InputFileError: The image cannot be read (the message names the file).
        """
        check_k(k)
        check_returns(returns)
        if isinstance(image, (str, Path)) and Path(image).is_dir():
            raise InputFileError(str(image), "is a directory; give one image file (DICOM, PNG or JPEG)")
        vec = self.embedder.embed_images([image])  # [1, D]
        identity = self._query_identity(image)
        warnings: List[QueryWarning] = []
        own = self._indexed_copy(vec, identity)
        if own:
            tail = ("it is among the hits" if include_same_patient else
                    "its patient's studies are left out of the hits (--include-same-patient keeps them)")
            warnings.append(QueryWarning("query_in_index", f"the query image is in the index ({own}); {tail}"))
        excluded = set() if include_same_patient else self._same_patient_studies(identity)
        kind = {"reports": "section", "images": "image", "studies": "study"}[returns]
        hits = self._search(vec, kind, k, filters or Filters(), excluded_studies=excluded, warnings=warnings)
        return SearchResult(hits, warnings)

    def embed_query_text(self, query: str) -> Tuple[np.ndarray, List[QueryWarning]]:
        """The embedding ``[1, D]`` of a text query and what its words tell (mostly unknown, truncated).

        The only step of a text query that runs the model: a server serialises it and runs the rest
        (FAISS, store) concurrently.

        Raises:
            ConfigError: Empty query.
        """
        if not query or not query.strip():
            raise ConfigError("empty query; type a description such as 'large right pleural effusion'")
        text = query.strip()
        warnings = text_query_warnings(self.embedder.model.require_tokenizer(), text)
        return self.embedder.embed_texts([text], precision=self.text_precision), warnings

    def query_vector(self, vec: np.ndarray, kind: str, *, k: int = 10, filters: Optional[Filters] = None,
                     excluded_studies: Iterable[int] = ()) -> "SearchResult":
        """Hits of an embedding already at hand (e.g. an indexed image's stored vector: "more like this").

        Args:
            vec: float32 ``[1, D]``, L2-normalised, in the index's model space.
            kind: ``image``, ``section`` or ``study``.
            k: Number of hits.
            filters: The filters.
            excluded_studies: Store ids of studies whose items are left out.

        Raises:
            ConfigError: Bad k or kind.
        """
        check_k(k)
        if kind not in ("image", "section", "study"):
            raise ConfigError(f"unknown kind {kind!r}; use image, section or study")
        warnings: List[QueryWarning] = []
        hits = self._search(np.asarray(vec, dtype=np.float32).reshape(1, -1), kind, k, filters or Filters(),
                            excluded_studies=set(excluded_studies), warnings=warnings)
        return SearchResult(hits, warnings)

    def embed_query_image(self, image: Any) -> np.ndarray:
        """The query embedding of an image, ``[1, D]``."""
        return self.embedder.embed_images([image])

    # ------------------------------------------------------------------------------ internals
    def _query_identity(self, image: Any) -> "_QueryIdentity":
        """What identifies a query file in the store: its path keys and, for DICOM, its UIDs and patient."""
        if not isinstance(image, (str, Path)):
            return _QueryIdentity()
        path = Path(image)
        sec = self.index.secret
        ident = _QueryIdentity(path_keys=tuple({sec.path_key(str(path)), sec.path_key(str(path.resolve()))}))
        try:
            from cxr_search.dicom.header import read_dicom_header

            header = read_dicom_header(path)
        except InputFileError:
            return ident  # not DICOM: identity only from the store
        study_uid = header.study_instance_uid
        return _QueryIdentity(path_keys=ident.path_keys, sop_uid=header.sop_instance_uid, study_uid=study_uid,
                              patient_src=header.patient_id or (f"study:{study_uid}" if study_uid else None))

    def _indexed_copy(self, vec: np.ndarray, ident: "_QueryIdentity") -> Optional[str]:
        """How the query image is in the index (``"SOPInstanceUID ..."``, ``"same file"``, ...), or None."""
        with self.index.store.session() as s:
            if ident.sop_uid:
                row = s.execute(select(Image.id).where(Image.sop_uid == ident.sop_uid, Image.status == EMBEDDED)).first()
                if row is not None:
                    return f"SOPInstanceUID {ident.sop_uid}, image id {row[0]}"
            for key in ident.path_keys:
                row = s.execute(select(Image.id, Image.sop_uid).where(Image.path_key == key,
                                                                      Image.status == EMBEDDED)).first()
                if row is not None:
                    return f"the same file, SOPInstanceUID {row[1]}, image id {row[0]}"
        index = self.index.vector_index("image")
        if not index.ntotal:
            return None
        rerank = None if index.kind == "flat" else (lambda ids: self.index.fetch_vectors("image", ids))
        scores, ids = index.search(vec, 1, rerank=rerank)
        if ids[0][0] >= 0 and float(scores[0][0]) >= SAME_IMAGE_COSINE:
            with self.index.store.session() as s:
                sop = s.scalar(select(Image.sop_uid).where(Image.id == int(ids[0][0])))
            return f"an indexed image with the same content, SOPInstanceUID {sop}, image id {int(ids[0][0])}"
        return None

    def _same_patient_studies(self, ident: "_QueryIdentity") -> Set[int]:
        sec = self.index.secret
        with self.index.store.session() as s:
            pids: Set[int] = set()
            sids: Set[int] = set()
            for key in ident.path_keys:
                for sid, pid in s.execute(select(Study.id, Study.patient_id).join(Image, Image.study_id == Study.id)
                                          .where(Image.path_key == key)).all():
                    sids.add(sid)
                    pids.add(pid)
            if ident.study_uid:
                for sid, pid in s.execute(select(Study.id, Study.patient_id)
                                          .where(Study.study_uid == ident.study_uid)).all():
                    sids.add(sid)
                    pids.add(pid)
            if ident.patient_src:
                pid = s.scalar(select(Patient.id).where(Patient.pseudo_id == sec.patient_key(ident.patient_src)))
                if pid is not None:
                    pids.add(pid)
            if pids:
                sids |= set(s.scalars(select(Study.id).where(Study.patient_id.in_(sorted(pids)))).all())
        return sids

    def _allowed_ids(self, kind: str, f: Filters) -> Optional[np.ndarray]:
        if f.empty:
            return None
        conds = []
        if f.sexes:
            conds.append(Study.sex.in_(f.sexes))
        if f.age_min is not None:
            conds.append(Study.age_years >= f.age_min)
        if f.age_max is not None:
            conds.append(Study.age_years < f.age_max + 1)  # whole years: 60.7 is 60
        if f.since is not None:
            conds.append(Study.study_date >= f.since)
        if f.until is not None:
            conds.append(Study.study_date <= f.until)
        image_conds = [Image.status == EMBEDDED]
        if f.views:
            image_conds.append(Image.view.in_(f.views))
        if f.modalities:
            image_conds.append(Image.modality.in_(f.modalities))
        if kind == "image":
            q = select(Image.id).join(Study, Image.study_id == Study.id).where(and_(*conds, *image_conds))
        else:
            has_image = exists(select(Image.id).where(Image.study_id == Study.id, *image_conds))
            if kind == "study":
                q = select(Study.id).where(and_(*conds, has_image))
            else:
                q = select(Section.id).join(Study, Section.study_id == Study.id).where(and_(*conds, has_image))
        with self.index.store.session() as s:
            return np.asarray(sorted(s.scalars(q).all()), dtype=np.int64)

    def _excluded_ids(self, kind: str, studies: Set[int]) -> Optional[np.ndarray]:
        if not studies:
            return None
        if kind == "study":
            return np.asarray(sorted(studies), dtype=np.int64)
        col, table_study = (Image.id, Image.study_id) if kind == "image" else (Section.id, Section.study_id)
        out: List[int] = []
        with self.index.store.session() as s:
            for part in chunks(sorted(studies)):
                out.extend(s.scalars(select(col).where(table_study.in_(part))).all())
        return np.asarray(sorted(out), dtype=np.int64)

    def _search(self, vec: np.ndarray, kind: str, k: int, f: Filters, *, excluded_studies: Set[int],
                warnings: Optional[List[QueryWarning]] = None) -> List[Hit]:
        allowed = self._allowed_ids(kind, f)
        if allowed is not None and not len(allowed):
            if warnings is not None:
                what = {"image": "image", "section": "report section", "study": "study"}[kind]
                warnings.append(QueryWarning("no_match", f"no indexed {what} matches the filters {f.describe()}"))
            return []
        excluded = self._excluded_ids(kind, excluded_studies)
        index = self.index.vector_index(kind)
        # A compressed (IVF) index ranks its candidates approximately: re-score the top candidates with
        # the full vectors from the store (`docs/engine-facts.md`: codes of ~100 bytes cannot order near-ties).
        rerank = None if index.kind == "flat" else (lambda ids: self.index.fetch_vectors(kind, ids))
        scores, ids = index.search(vec, k, allowed=allowed, excluded=excluded, rerank=rerank)
        pairs = [(float(sc), int(i)) for sc, i in zip(scores[0], ids[0], strict=False) if i >= 0]
        return self._hits(kind, pairs)

    def _hits(self, kind: str, pairs: Sequence[Tuple[float, int]]) -> List[Hit]:
        ids = [i for _, i in pairs]
        if not ids:
            return []
        sec = self.index.secret
        with self.index.store.session() as s:
            if kind == "image":
                rows = {r.Image.id: r for r in s.execute(
                    select(Image, Study).join(Study, Image.study_id == Study.id).where(Image.id.in_(ids)))}
                study_ids = {r.Study.id for r in rows.values()}
            elif kind == "section":
                rows = {r.Section.id: r for r in s.execute(
                    select(Section, Study).join(Study, Section.study_id == Study.id).where(Section.id.in_(ids)))}
                study_ids = {r.Study.id for r in rows.values()}
            else:
                rows = {r.Study.id: r for r in s.execute(select(Study).where(Study.id.in_(ids)))}
                study_ids = set(ids)
            excerpts = _excerpts(s, study_ids)
            # Image hits carry their own file; the other kinds list their study's images.
            images = _study_images(s, study_ids) if kind != "image" else {}
        hits: List[Hit] = []
        for rank, (score, rid) in enumerate(pairs, start=1):
            row = rows.get(rid)
            if row is None:  # deleted from the store after the FAISS file was loaded
                continue
            st = row.Study
            hit = Hit(rank=rank, score=round(score, 6), kind=kind, id=rid, study_uid=st.study_uid,
                      study_date=st.study_date.isoformat() if st.study_date else None, sex=st.sex, age=st.age_years,
                      report_excerpt=excerpts.get(st.id, ""))
            study_imgs = [{**im, "path": sec.decrypt_path(im.pop("path_enc"))} for im in
                          (dict(x) for x in images.get(st.id, []))] if kind != "image" else []
            if kind == "image":
                im = row.Image
                hit.image_id, hit.sop_uid, hit.view = im.id, im.sop_uid, im.view
                hit.path = sec.decrypt_path(im.path_enc)
            else:
                hit.images = study_imgs
                if study_imgs:
                    hit.image_id, hit.sop_uid = study_imgs[0]["image_id"], study_imgs[0]["sop_uid"]
                    hit.view, hit.path = study_imgs[0]["view"], study_imgs[0]["path"]
                if kind == "section":
                    hit.section_kind, hit.section_text = row.Section.kind, row.Section.text
            hits.append(hit)
        return hits


def _excerpts(s: Any, study_ids: Iterable[int]) -> Dict[int, str]:
    """Report excerpt per study: the impression when there is one, else the first section."""
    out: Dict[int, Tuple[int, str]] = {}
    rank = {"impression": 0, "findings": 1, "report": 2}
    for sid, kind, text in s.execute(select(Section.study_id, Section.kind, Section.text)
                                     .where(Section.study_id.in_(sorted(study_ids)))):
        r = rank.get(kind, 3)
        if sid not in out or r < out[sid][0]:
            out[sid] = (r, text)
    return {sid: (t if len(t) <= _EXCERPT else t[: _EXCERPT - 1].rstrip() + "…") for sid, (_, t) in out.items()}


def _study_images(s: Any, study_ids: Iterable[int]) -> Dict[int, List[Mapping[str, Any]]]:
    out: Dict[int, List[Mapping[str, Any]]] = {}
    q = (select(Image.study_id, Image.id, Image.sop_uid, Image.view, Image.path_enc)
         .where(Image.study_id.in_(sorted(study_ids)), Image.status == EMBEDDED).order_by(Image.id))
    for sid, iid, sop, view, enc in s.execute(q):
        out.setdefault(sid, []).append({"image_id": iid, "sop_uid": sop, "view": view, "path_enc": enc})
    return out


__all__ = ["Hit", "SAME_IMAGE_COSINE", "SearchResult", "Searcher"]
