"""Queries: text -> images / studies, image -> report sections / images / studies, with filters.

Filters (view, sex, age range, date range, modality) are resolved to the allowed ids in SQL and
applied inside FAISS with an ID selector, so k hits come back whenever k match. Image queries
exclude the query's own patient by default (its study included): a radiologist looking for similar
cases does not want the same patient's other films, and an evaluation must not count them.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np
from sqlalchemy import and_, exists, select

from cxr_search.errors import ConfigError, InputFileError
from cxr_search.inference import Embedder
from index.index_dir import IndexDir, model_identity
from index.store import EMBEDDED, Image, Patient, Section, Study, chunks

logger = logging.getLogger(__name__)

LEVELS = ("image", "study")
RETURNS = ("reports", "images", "studies")
FILTER_KEYS = ("view", "sex", "age", "since", "until", "modality")
_EXCERPT = 300


@dataclass(frozen=True)
class Filters:
    """Search filters; ``None`` means no constraint."""

    views: Optional[Tuple[str, ...]] = None
    sexes: Optional[Tuple[str, ...]] = None
    age_min: Optional[float] = None
    age_max: Optional[float] = None
    since: Optional[_dt.date] = None
    until: Optional[_dt.date] = None
    modalities: Optional[Tuple[str, ...]] = None

    @property
    def empty(self) -> bool:
        """Whether nothing is filtered."""
        return all(v is None for v in asdict(self).values())


def _date(text: str, key: str) -> _dt.date:
    try:
        return _dt.date.fromisoformat(text.strip())
    except ValueError as exc:
        raise ConfigError(f"filter {key}={text!r}: not a date; write YYYY-MM-DD") from exc


def parse_filters(items: Iterable[str] = (), *, since: Optional[str] = None, until: Optional[str] = None) -> Filters:
    """Parse ``key=value`` filters (``view=PA``, ``view=PA,AP``, ``sex=F``, ``age=40-60``, ``since=2020-01-01``).

    Raises:
        ConfigError: An unknown key or a malformed value (the message lists what is accepted).
    """
    out: Dict[str, Any] = {}
    pairs = [str(i) for i in items] + ([f"since={since}"] if since else []) + ([f"until={until}"] if until else [])
    for item in pairs:
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise ConfigError(f"filter {item!r}: write key=value, for example view=PA or age=40-60")
        if key not in FILTER_KEYS:
            raise ConfigError(f"unknown filter {key!r}; known filters: {', '.join(FILTER_KEYS)}")
        if key in ("view", "modality"):
            out["views" if key == "view" else "modalities"] = tuple(v.strip().upper() for v in value.split(",") if v.strip())
        elif key == "sex":
            sexes = tuple(v.strip().upper() for v in value.split(","))
            if not set(sexes) <= {"M", "F", "O"}:
                raise ConfigError(f"filter sex={value!r}: use M, F or O")
            out["sexes"] = sexes
        elif key == "age":
            m = re.fullmatch(r"(\d+(?:\.\d+)?)?\s*-\s*(\d+(?:\.\d+)?)?|(\d+(?:\.\d+)?)", value)
            if not m or not any(m.groups()):
                raise ConfigError(f"filter age={value!r}: write a range such as 40-60, 40- or -60, or one age")
            if m.group(3):
                out["age_min"] = out["age_max"] = float(m.group(3))
            else:
                out["age_min"] = float(m.group(1)) if m.group(1) else None
                out["age_max"] = float(m.group(2)) if m.group(2) else None
        else:
            out[key] = _date(value, key)
    return Filters(**out)


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
        self.index = IndexDir.open(index_dir, db_url=db_url)
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
        """Images (or studies) matching a description.

        Raises:
            ConfigError: Empty query, bad k or level.
        """
        if not query or not query.strip():
            raise ConfigError("empty query; type a description such as 'large right pleural effusion'")
        _check_k(k)
        if level not in LEVELS:
            raise ConfigError(f"unknown level {level!r}; use image or study")
        vec = self.embedder.embed_texts([query.strip()], precision=self.text_precision)  # [1, D]
        kind = "image" if level == "image" else "study"
        return self._search(vec, kind, k, filters or Filters(), excluded_studies=set())

    def search_image(self, image: Any, *, k: int = 10, returns: str = "images", filters: Optional[Filters] = None,
                     include_same_patient: bool = False) -> List[Hit]:
        """Report sections, images or studies similar to an image (a path, PIL image or array).

        The query's own study and every study of its patient are excluded unless
        ``include_same_patient`` (known from the DICOM header, or from the store when the file is
        indexed).

        Raises:
            ConfigError: Bad k or ``returns``.
            InputFileError: The image cannot be read (the message names the file).
        """
        _check_k(k)
        if returns not in RETURNS:
            raise ConfigError(f"unknown --return {returns!r}; use reports, images or studies")
        vec = self.embedder.embed_images([image])  # [1, D]
        excluded = set() if include_same_patient else self._same_patient_studies(image)
        kind = {"reports": "section", "images": "image", "studies": "study"}[returns]
        return self._search(vec, kind, k, filters or Filters(), excluded_studies=excluded)

    def embed_query_image(self, image: Any) -> np.ndarray:
        """The query embedding of an image, ``[1, D]``."""
        return self.embedder.embed_images([image])

    # ------------------------------------------------------------------------------ internals
    def _same_patient_studies(self, image: Any) -> Set[int]:
        if not isinstance(image, (str, Path)):
            return set()
        path = Path(image)
        study_uid = patient_src = None
        try:
            from cxr_search.dicom.header import read_dicom_header

            header = read_dicom_header(path)
            study_uid = header.study_instance_uid
            patient_src = header.patient_id or (f"study:{study_uid}" if study_uid else None)
        except InputFileError:
            pass  # not DICOM: identity only from the store below
        sec = self.index.secret
        with self.index.store.session() as s:
            pids: Set[int] = set()
            sids: Set[int] = set()
            for key in {sec.path_key(str(path)), sec.path_key(str(path.resolve()))}:
                for sid, pid in s.execute(select(Study.id, Study.patient_id).join(Image, Image.study_id == Study.id)
                                          .where(Image.path_key == key)).all():
                    sids.add(sid)
                    pids.add(pid)
            if study_uid:
                for sid, pid in s.execute(select(Study.id, Study.patient_id).where(Study.study_uid == study_uid)).all():
                    sids.add(sid)
                    pids.add(pid)
            if patient_src:
                pid = s.scalar(select(Patient.id).where(Patient.pseudo_id == sec.patient_key(patient_src)))
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
            conds.append(Study.age_years <= f.age_max)
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

    def _search(self, vec: np.ndarray, kind: str, k: int, f: Filters, *, excluded_studies: Set[int]) -> List[Hit]:
        allowed = self._allowed_ids(kind, f)
        if allowed is not None and not len(allowed):
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


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1 or k > 10_000:
        raise ConfigError(f"k={k!r}: give a number of hits between 1 and 10000")


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


__all__ = ["FILTER_KEYS", "Filters", "Hit", "LEVELS", "RETURNS", "Searcher", "parse_filters"]
