"""The warm engine: one model, the index's current generation, queries, and rendered images.

A *generation* is one consistent state of the index folder: the three FAISS files and the
``index.json`` that ``IndexDir.sync`` writes after them (each file is replaced atomically). Its id is
a hash of that ``index.json``. A request takes the current generation once and answers from it
alone; when ``index add`` / ``index remove`` write a new one, the next request that checks (at most
every ``reload_check_s``) loads it beside the old one and swaps it in, so no query fails or mixes
two generations. A load is accepted only if ``index.json`` did not change while the FAISS files were
read, no FAISS file is newer than it (a sync still writing), and every file holds the number of
vectors ``index.json`` records.

The store is shared by all generations (it is the live source of truth): a hit whose row was
deleted after its generation was written is dropped, never shown half.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
from sqlalchemy import select

from cxr_search.config import PreprocessConfig
from cxr_search.errors import ConfigError, SearchIndexError
from cxr_search.inference import Embedder
from index.filters import Filters, check_k, check_level, parse_filters
from index.index_dir import FAISS_FILES, META_FILE
from index.search import Hit, Searcher
from index.store import EMBEDDED, Image, Patient, Report, Section, Series, Study

logger = logging.getLogger(__name__)

_KIND_OF_RETURN = {"reports": "section", "images": "image", "studies": "study"}


@dataclass
class Generation:
    """One loaded, consistent state of the index.

    Attributes:
        id: Hash of the generation's ``index.json`` (changes with every sync).
        searcher: Its searcher (FAISS files loaded; the store shared).
        counts: The store's totals when it was loaded.
        loaded_at: ``time.time()`` of the load.
    """

    id: str
    searcher: Searcher
    counts: Dict[str, int]
    loaded_at: float
    stamp: Tuple[int, int, int]

    def ids(self, kind: str) -> np.ndarray:
        """The ids the generation's FAISS file of ``kind`` holds."""
        return self.searcher.index.vector_index(kind).ids()


def _stamp(path: Path) -> Tuple[int, int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Engine:
    """A warm model and the index generation it answers from.

    Args:
        index_dir: The index folder (only read).
        embedder: The index's model, warm.
        db_url: Store URL when not the index's own.
        text_precision: Query text precision (see :class:`index.search.Searcher`).
        reload_check_s: Least seconds between two looks at ``index.json``.
        query_concurrency: Model forward passes run at once; on a small CPU one at a time is fastest
            (parallel passes only fight over the same cores).

    Raises:
        SearchIndexError: Not an index, damaged files, a model of another fingerprint, or no
            consistent generation within a few seconds.
    """

    def __init__(self, index_dir: Union[str, Path], embedder: Embedder, *, db_url: Optional[str] = None,
                 text_precision: str = "auto", reload_check_s: float = 0.5, query_concurrency: int = 1) -> None:
        self.index_dir = Path(index_dir).expanduser()
        self.embedder = embedder
        self.db_url = db_url
        self.text_precision = text_precision
        self.reload_check_s = reload_check_s
        self._reload_lock = threading.Lock()
        self._infer = threading.BoundedSemaphore(max(1, query_concurrency))
        self._next_check = 0.0
        self.reloads = 0
        gen = None
        for _ in range(50):  # a sync in progress is waited out (bounded: 50 x 0.1 s)
            gen = self._load()
            if gen is not None:
                break
            time.sleep(0.1)
        if gen is None:
            raise SearchIndexError(f"{self.index_dir}: the index kept changing while it was loaded; try again")
        self._current: Generation = gen
        self._warm_up()

    # ------------------------------------------------------------------------------ generations
    def _load(self) -> Optional[Generation]:
        meta = self.index_dir / META_FILE
        before = _stamp(meta)
        for name in FAISS_FILES.values():
            p = self.index_dir / name
            if p.exists() and p.stat().st_mtime_ns > before[0]:
                return None  # a sync is writing: its index.json comes last
        raw = meta.read_bytes()
        searcher = Searcher(self.index_dir, self.embedder, db_url=self.db_url, text_precision=self.text_precision)
        try:
            facts = searcher.index.meta.get("indices") or {}
            consistent = _stamp(meta) == before and all(
                "n" not in facts.get(kind, {}) or searcher.index.vector_index(kind).ntotal == int(facts[kind]["n"])
                for kind in FAISS_FILES)
            if not consistent:
                searcher.close()
                return None
            counts = searcher.index.store.counts()
        except BaseException:
            searcher.close()
            raise
        return Generation(id=hashlib.sha256(raw).hexdigest()[:12], searcher=searcher, counts=counts,
                          loaded_at=time.time(), stamp=before)

    def _warm_up(self) -> None:
        """Run the first text and image passes now (lazy int8 quantisation, kernels), not in a user's query."""
        from PIL import Image as PILImage

        t0 = time.perf_counter()
        try:
            self._current.searcher.embedder.embed_texts(["warm up"], precision=self._current.searcher.text_precision)
        except Exception as exc:  # a model without a text tower still serves image queries
            logger.warning("text tower warm-up failed: %s", exc)
        self.embedder.embed_images([PILImage.new("L", (64, 64))])
        logger.info("model warm in %.2f s", time.perf_counter() - t0)

    def current(self) -> Generation:
        """The generation to answer from (picks up a new one when the index changed; never blocks on a load)."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.reload_check_s
            self.refresh()
        return self._current

    def refresh(self) -> bool:
        """Load a new generation if ``index.json`` changed; returns whether one was swapped in.

        Another thread already loading makes this return at once (its caller keeps the current one).
        """
        if not self._reload_lock.acquire(blocking=False):
            return False
        try:
            try:
                stamp = _stamp(self.index_dir / META_FILE)
            except OSError as exc:
                logger.warning("%s: cannot read (%s); still answering from generation %s", self.index_dir, exc,
                               self._current.id)
                return False
            if stamp == self._current.stamp:
                return False
            try:
                gen = self._load()
            except (SearchIndexError, OSError) as exc:
                logger.warning("new index generation not loadable yet (%s); still answering from %s", exc,
                               self._current.id)
                return False
            if gen is None:
                return False
            old, self._current = self._current, gen
            self.reloads += 1
            logger.info("index generation %s -> %s (%s)", old.id, gen.id, gen.counts)
            # Requests still holding `old` keep working: disposing the pool only closes idle connections.
            old.searcher.close()
            return True
        finally:
            self._reload_lock.release()

    def close(self) -> None:
        """Release the store's connections."""
        self._current.searcher.close()

    @property
    def model_sha256(self) -> str:
        """The model's fingerprint (equal to the index's)."""
        return str(self._current.searcher.index.meta.get("model_sha256", ""))

    @property
    def model_source(self) -> str:
        """Where the index says its model came from."""
        return str(self._current.searcher.index.meta.get("model_source", ""))

    # ------------------------------------------------------------------------------ queries
    def search_text(self, gen: Generation, query: str, *, k: int, offset: int, level: str,
                    filters: Filters) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """(hits ``offset .. offset + k`` as API dicts, query warnings) of a text query.

        Raises:
            ConfigError: Empty query or bad options.
        """
        check_level(level)
        check_k(offset + k)
        with self._infer:  # only the model pass is serialised; FAISS and the store answer queries side by side
            vec, warnings = gen.searcher.embed_query_text(query)
        result = gen.searcher.query_vector(vec, "image" if level == "image" else "study", k=offset + k, filters=filters)
        return self._page(gen, result.hits, offset, k), [w.to_dict() for w in [*warnings, *result.warnings]]

    def search_image(self, gen: Generation, image: Any, *, k: int, offset: int, returns: str, filters: Filters,
                     include_same_patient: bool) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
        """(hits, query warnings) of an uploaded image (an in-memory file path, or a PIL image).

        Raises:
            InputFileError: The image cannot be decoded.
        """
        with self._infer:
            result = gen.searcher.query_image(image, k=offset + k, returns=returns, filters=filters,
                                              include_same_patient=include_same_patient)
        return self._page(gen, result.hits, offset, k), [w.to_dict() for w in result.warnings]

    def search_like(self, gen: Generation, image_id: int, *, k: int, offset: int, returns: str, filters: Filters,
                    include_same_patient: bool) -> Optional[Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]]:
        """"More like this": hits of an indexed image's stored vector (no file read, no model pass).

        Returns:
            (hits, query warnings), or None when ``image_id`` is not an embedded image of the store.
        """
        if returns not in _KIND_OF_RETURN:
            raise ConfigError(f"unknown return {returns!r}; use reports, images or studies")
        searcher = gen.searcher
        with searcher.index.store.session() as s:
            row = s.execute(select(Image.study_id, Study.patient_id).join(Study, Image.study_id == Study.id)
                            .where(Image.id == image_id, Image.status == EMBEDDED)).first()
            if row is None:
                return None
            excluded: Set[int] = set()
            if not include_same_patient:
                excluded = set(s.scalars(select(Study.id).where(Study.patient_id == row.patient_id)).all()) | {row.study_id}
        vec = searcher.index.fetch_vectors("image", np.asarray([image_id], dtype=np.int64))  # [1, D]
        if not np.any(vec):
            return None
        # Searcher has no public "search by vector"; its internal step is the same one its queries end in.
        warnings: List[Any] = []
        hits = searcher._search(vec, _KIND_OF_RETURN[returns], offset + k, filters, excluded_studies=excluded,
                                warnings=warnings)
        return self._page(gen, hits, offset, k), [w.to_dict() for w in warnings]

    def _page(self, gen: Generation, hits: Sequence[Hit], offset: int, k: int) -> List[Dict[str, Any]]:
        page = list(hits)[offset: offset + k]
        extra = self._image_facts(gen, [h.image_id for h in page if h.image_id is not None])
        out = []
        for h in page:
            d = h.to_dict()
            d.pop("path", None)  # server paths never leave the server
            d["images"] = [{k2: v for k2, v in im.items() if k2 != "path"} | {"thumbnail_url": thumb_url(im["image_id"])}
                           for im in d.get("images") or []]
            facts = extra.get(h.image_id, {}) if h.image_id is not None else {}
            d.update(series_uid=facts.get("series_uid"), modality=facts.get("modality"),
                     patient_key=facts.get("patient_key"),
                     thumbnail_url=thumb_url(h.image_id) if h.image_id is not None else None,
                     study_url=f"/api/studies/{h.study_uid}")
            out.append(d)
        return out

    @staticmethod
    def _image_facts(gen: Generation, image_ids: Sequence[int]) -> Dict[int, Dict[str, Any]]:
        if not image_ids:
            return {}
        q = (select(Image.id, Image.modality, Series.series_uid, Patient.pseudo_id)
             .join(Study, Image.study_id == Study.id).join(Patient, Study.patient_id == Patient.id)
             .outerjoin(Series, Image.series_id == Series.id).where(Image.id.in_(sorted(set(image_ids)))))
        with gen.searcher.index.store.session() as s:
            return {r[0]: {"modality": r[1], "series_uid": r[2], "patient_key": patient_key(r[3])} for r in s.execute(q)}

    # ------------------------------------------------------------------------------ records
    def study(self, gen: Generation, study_uid: str) -> Optional[Dict[str, Any]]:
        """A study's metadata, embedded images and report by section; None when not in the store."""
        with gen.searcher.index.store.session() as s:
            row = s.execute(select(Study, Patient.pseudo_id).join(Patient, Study.patient_id == Patient.id)
                            .where(Study.study_uid == study_uid)).first()
            if row is None:
                return None
            st = row.Study
            images = s.execute(select(Image.id, Image.sop_uid, Image.view, Image.modality, Image.rows, Image.columns,
                                      Series.series_uid).outerjoin(Series, Image.series_id == Series.id)
                               .where(Image.study_id == st.id, Image.status == EMBEDDED).order_by(Image.id)).all()
            report = s.scalar(select(Report).where(Report.study_id == st.id))
            sections = s.execute(select(Section.kind, Section.text).where(Section.study_id == st.id)
                                 .order_by(Section.id)).all()
        return {
            "study_uid": st.study_uid, "study_date": st.study_date.isoformat() if st.study_date else None,
            "age": st.age_years, "sex": st.sex, "patient_key": patient_key(row.pseudo_id),
            "images": [{"image_id": i.id, "sop_uid": i.sop_uid, "series_uid": i.series_uid, "view": i.view,
                        "modality": i.modality, "rows": i.rows, "columns": i.columns,
                        "thumbnail_url": thumb_url(i.id), "preview_url": f"/api/images/{i.id}/preview"}
                       for i in images],
            "report": None if report is None else {
                "source": report.source, "text": report.text,
                "sections": [{"kind": k, "text": t} for k, t in sections]},
        }

    def image_file(self, gen: Generation, image_id: int) -> Optional[Tuple[str, str]]:
        """(file path, SOP Instance UID) of an embedded image; None when not in the store."""
        with gen.searcher.index.store.session() as s:
            row = s.execute(select(Image.path_enc, Image.sop_uid)
                            .where(Image.id == image_id, Image.status == EMBEDDED)).first()
        if row is None:
            return None
        return gen.searcher.index.secret.decrypt_path(row.path_enc), row.sop_uid


def thumb_url(image_id: int) -> str:
    """API URL of an image's thumbnail."""
    return f"/api/images/{image_id}/thumbnail"


def patient_key(pseudo_id: Optional[str]) -> Optional[str]:
    """The patient's key in API answers: the first 16 hex digits of its keyed pseudonym (no PHI)."""
    return pseudo_id[:16] if pseudo_id else None


def filters_from(view: Optional[Sequence[str]] = None, sex: Optional[Sequence[str]] = None,
                 age: Optional[Sequence[Optional[float]]] = None, since: Optional[str] = None,
                 until: Optional[str] = None, modality: Optional[Sequence[str]] = None) -> Filters:
    """Filters from API / form values, validated as the CLI's ``--filter`` is.

    Raises:
        ConfigError: A bad value (the message says which).
    """
    items: List[str] = []
    if view:
        items.append("view=" + ",".join(v for v in view if v))
    if sex:
        items.append("sex=" + ",".join(v for v in sex if v))
    if modality:
        items.append("modality=" + ",".join(v for v in modality if v))
    if age is not None and any(a is not None for a in age):
        lo, hi = (list(age) + [None, None])[:2]
        items.append(f"age={0 if lo is None else lo:g}-{'' if hi is None else format(hi, 'g')}")
    items = [i for i in items if not i.endswith("=")]
    return parse_filters(items, since=since or None, until=until or None)


def render_image(path: str, size: int) -> bytes:
    """A display-ready JPEG of an image file, its longer side ``size``.

    DICOM goes through the project's reader (modality and VOI LUT, MONOCHROME1 inverted).

    Raises:
        InputFileError: The file is missing or cannot be decoded.
    """
    from PIL import Image as PILImage

    from cxr_search.images import load_image

    img = load_image(path, PreprocessConfig(dicom_shorter_side=size)).convert("L")
    img.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return buf.getvalue()


class ThumbnailCache:
    """Rendered images on disk, keyed by SOP Instance UID and size (never by path; ids may be reused).

    Args:
        folder: ``STATE_DIR/thumbs`` (None: render every time).
    """

    def __init__(self, folder: Optional[Path]) -> None:
        self.folder = folder

    def _path(self, sop_uid: str, size: int) -> Optional[Path]:
        if self.folder is None:
            return None
        key = hashlib.sha256(f"{sop_uid}|{size}|v1".encode()).hexdigest()
        return self.folder / key[:2] / f"{key}.jpg"

    def get(self, path: str, sop_uid: str, size: int) -> bytes:
        """The JPEG, from the cache or rendered (and cached).

        Raises:
            InputFileError: The file cannot be rendered.
        """
        from cxr_search.fileio import atomic_write

        cached = self._path(sop_uid, size)
        if cached is not None and cached.is_file():
            try:
                return cached.read_bytes()
            except OSError:
                pass
        data = render_image(path, size)
        if cached is not None:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                with atomic_write(cached, "wb", permissions=0o600) as fh:
                    fh.write(data)
            except OSError as exc:  # a full or read-only cache must not fail the view
                logger.warning("thumbnail cache not written (%s)", exc)
        return data


__all__ = ["Engine", "Generation", "ThumbnailCache", "filters_from", "patient_key", "render_image", "thumb_url"]
