"""The index's relational store: SQLAlchemy 2.0 typed ORM, SQLite (WAL) by default, any URL works.

What is stored (and what is not): patients only as a keyed HMAC of PatientID (no names, no raw ids,
no birth dates); studies with StudyInstanceUID, date, age at study and sex; series; images with
SOPInstanceUID, view, modality, size, photometric interpretation, transfer syntax and status; file
paths only encrypted with the index's secret (export folders are often named after the patient),
plus an HMAC of the path for look-ups; reports split into sections; one float32 vector per
embedded image and section (the source of truth the FAISS files are rebuilt or synced from);
index builds and failures. Row primary keys are the FAISS ids.
"""

from __future__ import annotations

import datetime as _dt
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    TypeDecorator,
    delete,
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from cxr_search.errors import SearchIndexError
from index.engines import reader_engine, sqlite_file, writer_engine

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
#: Image / section status values.
PENDING, EMBEDDED, FAILED = "pending", "embedded", "failed"
#: What a tombstone can name (see :class:`Tombstone`).
TOMBSTONE_KINDS = ("patient", "study", "sop")
#: Failure.stage values: inputs that failed (header scan, pixel decode) and inputs accounted for
#: without failing (left out by rule, or the losing copy of a SOPInstanceUID duplicate).
SCAN, DECODE, SKIPPED, DUPLICATE = "scan", "decode", "skipped", "duplicate"
NOT_FAILED_STAGES = (SKIPPED, DUPLICATE)
_CHUNK = 500  # ids per IN (...) clause: below SQLite's and PostgreSQL's parameter limits


class OutsideText(TypeDecorator):
    """Text that comes from outside (DICOM header facts, reports, error messages), stored alike on every backend.

    PostgreSQL refuses NUL characters in text and values longer than a VARCHAR's length, both of which
    SQLite stores: one odd file or report would fail a whole batch, and the build, on PostgreSQL only.
    NULs are dropped and, with a ``length``, the value is clipped to it. Only descriptive columns use
    this type; identifiers (UIDs, keys) keep plain types, as clipping one could merge two.
    """

    impl = Text
    cache_ok = True

    def __init__(self, length: Optional[int] = None) -> None:
        super().__init__()
        self.length = length
        self.impl = String(length) if length else Text()  # the same DDL as the plain types

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        if not isinstance(value, str):
            return value
        value = value.replace("\x00", "")
        return value[: self.length] if self.length else value


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class Meta(Base):
    """Key/value facts about the store (schema version)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Patient(Base):
    """A patient, known only by a keyed HMAC of the DICOM PatientID."""

    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudo_id: Mapped[str] = mapped_column(String(64), unique=True)


class Study(Base):
    """A study (StudyInstanceUID), with the facts search filters use."""

    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(128), unique=True)
    patient_id: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[Optional[_dt.date]] = mapped_column(Date, index=True)
    age_years: Mapped[Optional[float]] = mapped_column(Float)
    sex: Mapped[Optional[str]] = mapped_column(String(1))
    accession_key: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    # Set with every image vector written for the study, cleared once the study index holds the new
    # mean: a run killed in between leaves it set, and the next sync recomputes the study vector.
    vector_dirty: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class Series(Base):
    """A series (SeriesInstanceUID) of a study."""

    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(128), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[Optional[str]] = mapped_column(OutsideText(16))


class Image(Base):
    """One radiograph (SOPInstanceUID); its id is its FAISS id in the image index."""

    __tablename__ = "images"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(128), unique=True)
    series_id: Mapped[Optional[int]] = mapped_column(ForeignKey("series.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    path_key: Mapped[str] = mapped_column(String(64), index=True)
    path_enc: Mapped[str] = mapped_column(Text)
    view: Mapped[str] = mapped_column(OutsideText(16), default="UNKNOWN")
    modality: Mapped[Optional[str]] = mapped_column(OutsideText(16))
    rows: Mapped[Optional[int]] = mapped_column(Integer)
    columns: Mapped[Optional[int]] = mapped_column(Integer)
    photometric: Mapped[Optional[str]] = mapped_column(OutsideText(32))
    transfer_syntax: Mapped[Optional[str]] = mapped_column(OutsideText(64))
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)


class ImageVector(Base):
    """The embedding of an image (float32 bytes)."""

    __tablename__ = "image_vectors"
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Report(Base):
    """The report of a study (one per study; the latest source wins)."""

    __tablename__ = "reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), unique=True)
    source: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(OutsideText())


class Section(Base):
    """A report section (findings, impression, or the whole report); its id is its FAISS id."""

    __tablename__ = "sections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(OutsideText())
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)


class SectionVector(Base):
    """The embedding of a report section (float32 bytes)."""

    __tablename__ = "section_vectors"
    section_id: Mapped[int] = mapped_column(ForeignKey("sections.id"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Build(Base):
    """One run of ``index build`` / ``index add`` / ``index remove``."""

    __tablename__ = "builds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    command: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    preprocessing: Mapped[Dict[str, Any]] = mapped_column(JSON)
    factories: Mapped[Dict[str, Any]] = mapped_column(JSON, default=dict)
    counts: Mapped[Dict[str, Any]] = mapped_column(JSON, default=dict)
    created: Mapped[_dt.datetime] = mapped_column(DateTime)
    finished: Mapped[Optional[_dt.datetime]] = mapped_column(DateTime)


class Failure(Base):
    """A file that could not be indexed, and why (kept until the file is indexed after all)."""

    __tablename__ = "failures"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path_key: Mapped[str] = mapped_column(String(64), unique=True)
    path_enc: Mapped[str] = mapped_column(Text)
    stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(OutsideText())
    created: Mapped[_dt.datetime] = mapped_column(DateTime)


class Tombstone(Base):
    """A removal that must stick: later intakes skip what it names until it is lifted.

    ``kind`` is ``patient`` (key: the patient's pseudonym, :meth:`IndexSecret.patient_key`), ``study``
    or ``sop`` (key: :meth:`IndexSecret.uid_key` of the Study / SOP Instance UID). Only keyed HMACs are
    kept, so a tombstone is no trace of the removed patient for anyone without the index secret.
    """

    __tablename__ = "tombstones"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    key: Mapped[str] = mapped_column(String(64))
    created: Mapped[_dt.datetime] = mapped_column(DateTime)


Index("ix_tombstones_kind_key", Tombstone.kind, Tombstone.key, unique=True)
Index("ix_images_study_view", Image.study_id, Image.view)

#: kind -> (row table, vector table, the vector table's id column)
VECTOR_TABLES = {
    "image": (Image, ImageVector, ImageVector.image_id),
    "section": (Section, SectionVector, SectionVector.section_id),
}


def utcnow() -> _dt.datetime:
    """Naive UTC now (what the DateTime columns hold, on every backend)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def default_url(index_dir: Path) -> str:
    """SQLite file inside the index folder."""
    return f"sqlite:///{(Path(index_dir) / 'store.sqlite').resolve()}"


def open_engine(url: str, *, create: bool, readonly: bool = False) -> Engine:
    """An engine for ``url`` with the schema created (``create``) or checked.

    Args:
        url: SQLAlchemy URL.
        create: Create the tables when missing (building).
        readonly: Open for reading only: nothing is created or changed, not even a journal file once the
            engine is disposed, and the index folder may be read-only (see :func:`index.engines.reader_engine`).

    Raises:
        SearchIndexError: The database cannot be opened, or has no cxr-search schema when
            ``create`` is False, or another schema version.
    """
    if create and readonly:
        raise ValueError("a store opened read-only cannot be created")
    try:
        engine = reader_engine(url) if readonly else writer_engine(url)
        if create:
            Base.metadata.create_all(engine)
        with Session(engine) as s:
            row = s.get(Meta, "schema_version")
            if row is None and create:
                s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                s.commit()
            elif row is None:
                raise SearchIndexError(f"{safe_url(url)}: not a cxr-search store; build the index first (cxr-search index build)")
            elif int(row.value) != SCHEMA_VERSION:
                raise SearchIndexError(
                    f"{safe_url(url)}: store schema version {row.value}, this cxr-search reads {SCHEMA_VERSION}; rebuild the index"
                )
    except SQLAlchemyError as exc:
        hint = ""
        if readonly and sqlite_file(url) is not None:
            hint = ("; in a read-only folder the store must have been closed cleanly (no store.sqlite-wal file "
                    "without its store.sqlite-shm): open it once with write access, e.g. cxr-search index verify")
        raise SearchIndexError(f"{safe_url(url)}: cannot open the store: {exc.__class__.__name__}: {exc}{hint}") from exc
    return engine


def safe_url(url: str) -> str:
    """The URL without its password, for messages and ``index.json`` (give it again with --db)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # a malformed URL is shown as given; it holds no usable secret then
        return url


def vector_bytes(vec: np.ndarray) -> bytes:
    """float32 bytes of one vector."""
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def vectors_from_bytes(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    """Stack stored vectors into float32 ``[N, dim]``."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), dim).astype(np.float32)


def reorder(got_ids: np.ndarray, vectors: np.ndarray, ids: Sequence[int], dim: int) -> np.ndarray:
    """Rows of ``vectors`` (keyed by ``got_ids``) in the order of ``ids``; zeros where an id is missing."""
    row_of = {int(i): r for r, i in enumerate(got_ids)}
    out = np.zeros((len(ids), dim), dtype=np.float32)
    for r, i in enumerate(ids):
        j = row_of.get(int(i))
        if j is not None:
            out[r] = vectors[j]
    return out


def chunks(ids: Sequence[int], size: int = _CHUNK) -> Iterator[List[int]]:
    """Split ids for IN (...) clauses."""
    ids = list(ids)
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


class Store:
    """Sessions and the queries the engine needs, over one database URL.

    Args:
        url: SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``).
        create: Create the tables when missing (building); False when only reading.
        readonly: Open for reading only (searches, stats, verify): see :func:`open_engine`.
    """

    def __init__(self, url: str, *, create: bool = False, readonly: bool = False) -> None:
        self.url = url
        self.readonly = readonly
        self.engine = open_engine(url, create=create, readonly=readonly)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    # ------------------------------------------------------------------------------ counts
    def counts(self) -> Dict[str, int]:
        """Totals: images (embedded), studies (with an embedded image), sections, failed (failure rows of the
        scan and decode stages: not the skipped inputs and duplicate copies), pending."""
        with self.session() as s:
            n_img = s.scalar(select(func.count()).select_from(Image).where(Image.status == EMBEDDED)) or 0
            n_studies = s.scalar(select(func.count(func.distinct(Image.study_id))).where(Image.status == EMBEDDED)) or 0
            n_sec = s.scalar(select(func.count()).select_from(Section).where(Section.status == EMBEDDED)) or 0
            n_fail = s.scalar(select(func.count()).select_from(Failure)
                              .where(Failure.stage.notin_(NOT_FAILED_STAGES))) or 0
            n_pending = s.scalar(select(func.count()).select_from(Image).where(Image.status == PENDING)) or 0
            n_pending += s.scalar(select(func.count()).select_from(Section).where(Section.status == PENDING)) or 0
            n_patients = s.scalar(select(func.count()).select_from(Patient)) or 0
        return {"images": n_img, "studies": n_studies, "sections": n_sec, "failed": n_fail, "pending": n_pending,
                "patients": n_patients}

    # ------------------------------------------------------------------------------ vectors
    def vector_ids(self, kind: str) -> np.ndarray:
        """Sorted ids of all stored vectors of ``kind`` (``image`` or ``section``)."""
        col = VECTOR_TABLES[kind][2]
        with self.session() as s:
            ids = s.scalars(select(col).order_by(col)).all()
        return np.asarray(ids, dtype=np.int64)

    def load_vectors(self, kind: str, ids: Optional[Sequence[int]], dim: int) -> Tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of ``kind``: all of them (``ids=None``) or those listed, sorted by id."""
        _, table, col = VECTOR_TABLES[kind]
        out_ids: List[int] = []
        blobs: List[bytes] = []
        with self.session() as s:
            if ids is None:
                for rid, blob in s.execute(select(col, table.vector).order_by(col)).yield_per(10000):
                    out_ids.append(rid)
                    blobs.append(blob)
            else:
                for part in chunks(sorted(int(i) for i in ids)):
                    for rid, blob in s.execute(select(col, table.vector).where(col.in_(part)).order_by(col)):
                        out_ids.append(rid)
                        blobs.append(blob)
        return np.asarray(out_ids, dtype=np.int64), vectors_from_bytes(blobs, dim)

    def vectors_in_order(self, kind: str, ids: Sequence[int], dim: int) -> np.ndarray:
        """``[len(ids), dim]`` vectors of ``kind`` in the order of ``ids`` (zeros for ids not stored)."""
        got, vecs = self.load_vectors(kind, ids, dim)
        return reorder(got, vecs, ids, dim)

    def study_image_ids(self, study_ids: Optional[Iterable[int]] = None) -> Dict[int, List[int]]:
        """Embedded image ids per study (all studies, or those given)."""
        q = select(Image.study_id, Image.id).where(Image.status == EMBEDDED)
        out: Dict[int, List[int]] = {}
        with self.session() as s:
            if study_ids is None:
                rows: Iterable[Any] = s.execute(q.order_by(Image.id)).all()
            else:
                rows = []
                for part in chunks(sorted(set(int(i) for i in study_ids))):
                    rows.extend(s.execute(q.where(Image.study_id.in_(part)).order_by(Image.id)).all())
            for study_id, image_id in rows:
                out.setdefault(study_id, []).append(image_id)
        return out

    # ------------------------------------------------------------------------------ removal
    def scrub_deleted(self, s: Session) -> None:
        """Make SQLite overwrite what this session deletes (``secure_delete``) instead of leaving it in free pages."""
        if self.engine.dialect.name == "sqlite":
            s.execute(text("PRAGMA secure_delete=ON"))

    def checkpoint(self) -> bool:
        """Fold SQLite's write-ahead log into the database file and empty it (after a removal, so the
        deleted rows' old pages do not linger in ``store.sqlite-wal``). True when done (or not SQLite);
        False when readers kept part of the log (it is folded in at a later checkpoint)."""
        if self.engine.dialect.name != "sqlite":
            return True
        with self.engine.connect() as con:
            busy, _, _ = con.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        return not busy

    # ------------------------------------------------------------------------------ tombstones
    def tombstones(self) -> Dict[str, set]:
        """``{"patient": {...}, "study": {...}, "sop": {...}}``: the keys every intake must skip."""
        out: Dict[str, set] = {"patient": set(), "study": set(), "sop": set()}
        with self.session() as s:
            for kind, key in s.execute(select(Tombstone.kind, Tombstone.key)):
                out.setdefault(kind, set()).add(key)
        return out

    def add_tombstones(self, s: Session, kind: str, keys: Iterable[str]) -> int:
        """Record removals of ``kind`` (``patient``, ``study``, ``sop``); returns how many were new."""
        if kind not in TOMBSTONE_KINDS:
            raise ValueError(f"tombstone kind {kind!r}: one of {TOMBSTONE_KINDS}")
        have = set(s.scalars(select(Tombstone.key).where(Tombstone.kind == kind)).all())
        new = sorted(set(keys) - have)
        for key in new:
            s.add(Tombstone(kind=kind, key=key, created=utcnow()))
        return len(new)

    def lift_tombstones(self, s: Session, kind: str, keys: Iterable[str]) -> int:
        """Lift removals (``index remove --undo``); returns how many were lifted."""
        n = 0
        for part in chunks(sorted(set(keys))):
            n += s.execute(delete(Tombstone).where(Tombstone.kind == kind, Tombstone.key.in_(part))).rowcount or 0
        return n

    def add_failure(self, s: Session, path_key: str, path_enc: str, stage: str, reason: str) -> None:
        """Record (or update) why a file could not be indexed."""
        row = s.scalar(select(Failure).where(Failure.path_key == path_key))
        if row is None:
            s.add(Failure(path_key=path_key, path_enc=path_enc, stage=stage, reason=reason[:2000], created=utcnow()))
        else:
            row.stage, row.reason = stage, reason[:2000]


__all__ = [
    "Base", "Build", "DECODE", "DUPLICATE", "EMBEDDED", "FAILED", "Failure", "NOT_FAILED_STAGES", "SCAN", "SKIPPED",
    "Image", "ImageVector", "Meta", "PENDING", "Patient",
    "Report", "SCHEMA_VERSION", "Section", "SectionVector", "Series", "Store", "Study", "TOMBSTONE_KINDS", "Tombstone",
    "VECTOR_TABLES", "chunks",
    "default_url", "reorder", "safe_url", "utcnow",
    "open_engine", "vector_bytes", "vectors_from_bytes",
]
