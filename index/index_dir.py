"""Index folders: create and open, remove studies, sync the FAISS files with the store, stats.

Building an index from an archive (catalogue, embed, sync) is :func:`index.build.build`.

An index folder holds ``index.json`` (model fingerprint and preprocessing, store URL, FAISS facts),
``secret.key``, ``store.sqlite`` (unless the store is elsewhere), ``writer.lock`` (see :mod:`index.lock`)
and three FAISS files whose ids
are store primary keys: ``images.faiss`` (image ids), ``sections.faiss`` (report section ids) and
``studies.faiss`` (study ids; normalised mean of the study's image vectors). The store is the
source of truth: after every change the FAISS files are *synced* to it (missing ids added, stray
ids removed, changed studies replaced), so a run killed at any point is repaired by the next one.

Readers open an index with ``IndexDir.open(root, readonly=True)``: nothing in the folder is created or
changed, and the folder may be read-only (see :func:`index.engines.reader_engine`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
from sqlalchemy import func, select, update

from cxr_search.checkpoints import model_fingerprint
from cxr_search.errors import SearchIndexError
from cxr_search.fileio import write_json_atomic
from cxr_search.model import CXRClip
from index.ann.build import build_index
from index.ann.factory import choose_factory
from index.ann.vector_index import VectorIndex
from index.failures import failure_counts
from index.layout import META_FILE, prepare_folder
from index.lock import read_holders
from index.privacy import IndexSecret
from index.store import Build, Store, Study, Tombstone, default_url, reorder, safe_url, utcnow

logger = logging.getLogger(__name__)

FORMAT = "cxr-search-index/1"
KINDS = ("image", "section", "study")
FAISS_FILES = {"image": "images.faiss", "section": "sections.faiss", "study": "studies.faiss"}
# An exact index is rebuilt as an ANN one once it holds this many times the exact threshold, and
# an ANN index is retrained when it has grown this much since training (its clusters go stale).
_REBUILD_GROWTH = 2.0


def model_identity(model: CXRClip) -> Dict[str, Any]:
    """What an index records of its model: fingerprint, preprocessing, embedding size, source."""
    fp = (getattr(model, "provenance", None) or {}).get("fingerprint") or model_fingerprint(model)
    return {
        "model_sha256": fp,
        "preprocessing": model.config.to_dict()["preprocess"],
        "embed_dim": model.config.embed_dim,
        "model_source": (getattr(model, "provenance", None) or {}).get("source", ""),
    }


@dataclass
class IndexDir:
    """An index folder: its metadata, store and secret.

    Args:
        root: The folder.
        meta: Parsed ``index.json``.
        store: The store.
        secret: The index secret.
    """

    root: Path
    meta: Dict[str, Any]
    store: Store
    secret: IndexSecret
    _indices: Dict[str, VectorIndex] = field(default_factory=dict)

    # ------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, root: Union[str, Path], *, db_url: Optional[str] = None, readonly: bool = False) -> "IndexDir":
        """Open an existing index folder.

        Args:
            root: The folder.
            db_url: The store's URL when it is not the one the index records.
            readonly: For reading only (searches, stats, verify): the store refuses writes, and nothing
                in the folder is created or changed; the folder may be read-only.

        Raises:
            SearchIndexError: Not an index folder, or its metadata or store is unusable.
        """
        root = Path(root).expanduser()
        meta_path = root / META_FILE
        if not meta_path.is_file():
            raise SearchIndexError(f"{root}: no {META_FILE}; not an index folder (build one with cxr-search index build)")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise SearchIndexError(f"{meta_path}: unreadable index metadata ({exc}); rebuild the index") from exc
        if meta.get("format") != FORMAT:
            raise SearchIndexError(f"{meta_path}: index format {meta.get('format')!r}, this cxr-search reads {FORMAT}")
        url = db_url or os.environ.get("CXR_SEARCH_DB_URL") or meta.get("store_url") or default_url(root)
        secret = IndexSecret.load_or_create(root, create=False)
        return cls(root, meta, Store(url, readonly=readonly), secret)

    @classmethod
    def create_or_open(cls, root: Union[str, Path], model: CXRClip, *, db_url: Optional[str] = None) -> "IndexDir":
        """Open the index at ``root`` for writing with ``model``, creating it when missing.

        Raises:
            SearchIndexError: The folder holds an index of another model.
        """
        root = Path(root).expanduser()
        ident = model_identity(model)
        if (root / META_FILE).is_file():
            idx = cls.open(root, db_url=db_url)
            idx.check_model(ident)
            return idx
        prepare_folder(root)
        url = db_url or os.environ.get("CXR_SEARCH_DB_URL") or default_url(root)
        meta = {"format": FORMAT, **ident, "store_url": None if url == default_url(root) else safe_url(url),
                "created": utcnow().isoformat(timespec="seconds"), "indices": {}}
        secret = IndexSecret.load_or_create(root, create=True)
        idx = cls(root, meta, Store(url, create=True), secret)
        idx.save_meta()
        return idx

    def check_model(self, ident: Dict[str, Any]) -> None:
        """Refuse a model whose fingerprint or preprocessing differs from the index's."""
        if ident["model_sha256"] != self.meta.get("model_sha256"):
            raise SearchIndexError(
                f"{self.root}: index built with model {self.meta.get('model_sha256', '?')[:12]} "
                f"({self.meta.get('model_source') or 'unknown source'}); the given model is "
                f"{ident['model_sha256'][:12]} ({ident.get('model_source') or 'unknown source'}). "
                "Use the model the index was built with, or build a new index in another folder."
            )
        if ident["preprocessing"] != self.meta.get("preprocessing"):
            raise SearchIndexError(
                f"{self.root}: the model's preprocessing differs from the index's "
                f"({ident['preprocessing']} vs {self.meta.get('preprocessing')}); use the index's model"
            )

    def save_meta(self) -> None:
        """Write ``index.json`` atomically."""
        write_json_atomic(self.root / META_FILE, self.meta, sort_keys=True)

    def close(self) -> None:
        """Release the store's connections."""
        self.store.close()

    # ------------------------------------------------------------------------------ FAISS files
    def faiss_path(self, kind: str) -> Path:
        """Path of the FAISS file of ``kind``."""
        return self.root / FAISS_FILES[kind]

    def vector_index(self, kind: str) -> VectorIndex:
        """The loaded FAISS index of ``kind`` (cached).

        Raises:
            SearchIndexError: The file is missing or corrupt.
        """
        if kind not in self._indices:
            path = self.faiss_path(kind)
            if not path.is_file():
                raise SearchIndexError(f"{path}: index file missing; run cxr-search index build again to rebuild it")
            self._indices[kind] = VectorIndex.load(path)
        return self._indices[kind]

    def study_vectors(self, study_ids: Optional[Sequence[int]]) -> tuple:
        """(study ids, normalised mean image vectors) of studies with embedded images (all when None)."""
        dim = int(self.meta["embed_dim"])
        members = self.store.study_image_ids(study_ids)
        sids = sorted(members)
        out = np.zeros((len(sids), dim), dtype=np.float32)
        vecs = self.store.vectors_in_order("image", [i for s in sids for i in members[s]], dim)  # study by study
        start = 0
        for k, sid in enumerate(sids):
            mean = vecs[start : start + len(members[sid])].mean(axis=0)  # [D]
            out[k] = mean / max(float(np.linalg.norm(mean)), 1e-12)
            start += len(members[sid])
        return np.asarray(sids, dtype=np.int64), out

    def fetch_vectors(self, kind: str, ids: np.ndarray) -> np.ndarray:
        """Full-precision vectors of ``ids`` in the order given (zeros for ids no longer stored).

        The exact re-ranking stage of compressed indices reads them from the store.
        """
        dim = int(self.meta["embed_dim"])
        if kind == "study":
            got, vecs = self.study_vectors([int(i) for i in ids])
            return reorder(got, vecs, ids, dim)
        return self.store.vectors_in_order(kind, [int(i) for i in ids], dim)

    def _desired(self, kind: str) -> np.ndarray:
        if kind == "study":
            return np.asarray(sorted(self.store.study_image_ids()), dtype=np.int64)
        return self.store.vector_ids(kind)

    def _vectors(self, kind: str, ids: Optional[Sequence[int]]) -> tuple:
        """(ids, vectors) of ``kind``, sorted by id: those of ``ids``, or all when None."""
        if kind == "study":
            return self.study_vectors(ids)
        return self.store.load_vectors(kind, ids, int(self.meta["embed_dim"]))

    def sync(self, *, factory: Optional[str] = None, bytes_per_vector: Optional[float] = None,
             rebuild: bool = False) -> Dict[str, Any]:
        """Make every FAISS file hold exactly the store's vectors; returns per-kind facts."""
        facts: Dict[str, Any] = {}
        for kind in KINDS:
            facts[kind] = self._sync_kind(kind, factory=factory, bytes_per_vector=bytes_per_vector, rebuild=rebuild)
        self.meta["indices"] = facts
        self.meta["updated"] = utcnow().isoformat(timespec="seconds")
        self.save_meta()
        return facts

    def _sync_kind(self, kind: str, *, factory: Optional[str], bytes_per_vector: Optional[float],
                   rebuild: bool) -> Dict[str, Any]:
        desired = self._desired(kind)
        dim = int(self.meta["embed_dim"])
        prev = dict((self.meta.get("indices") or {}).get(kind) or {})
        want = factory or choose_factory(len(desired), dim, bytes_per_vector=bytes_per_vector)
        path = self.faiss_path(kind)
        current: Optional[VectorIndex] = None
        if path.is_file() and not rebuild:
            try:
                current = VectorIndex.load(path)
            except SearchIndexError as exc:
                logger.warning("%s; rebuilding it from the store", exc)
        trained_n = int(prev.get("trained_n") or 0)
        stale = current is not None and (
            (factory is not None and current.factory != factory)
            or (current.factory == "Flat" and want != "Flat")
            or (current.factory != "Flat" and len(desired) > _REBUILD_GROWTH * max(trained_n, 1))
        )
        t0 = time.perf_counter()
        if (current is None or stale) and not len(desired):
            # Nothing to index yet (for instance an archive without reports): an empty exact index.
            current, info, changed = VectorIndex.create(dim, "Flat"), {"factory": "Flat", "trained_n": 0}, 0
        elif current is None or stale:
            ids, vecs = self._vectors(kind, None)
            # factory=None lets build_index rank the candidate factories on a sample of these vectors.
            current, info = build_index(vecs, ids, factory=factory, bytes_per_vector=bytes_per_vector)
            info = {**info, "trained_n": int(len(ids)), "rebuilt": True}
            changed = 0
        else:
            present = current.ids()
            dirty = self._dirty_studies() if kind == "study" else np.zeros(0, dtype=np.int64)
            stray = np.union1d(np.setdiff1d(present, desired), np.intersect1d(dirty, present))
            if len(stray):
                current.remove(stray)
            missing = np.setdiff1d(desired, current.ids())
            if len(missing):
                ids, vecs = self._vectors(kind, missing)
                current.add(vecs, ids)
            changed = int(len(stray) + len(missing))
            info = {k: v for k, v in prev.items() if k not in ("n", "rebuilt")}
            info.update(factory=current.factory, rebuilt=False)
        current.save(path)
        if kind == "study":
            self._clear_dirty()
        self._indices[kind] = current
        info.update(n=int(current.ntotal), file=path.name, sync_s=round(time.perf_counter() - t0, 3), changes=changed)
        return info

    def _dirty_studies(self) -> np.ndarray:
        with self.store.session() as s:
            ids = s.scalars(select(Study.id).where(Study.vector_dirty.is_(True))).all()
        return np.asarray(sorted(ids), dtype=np.int64)

    def _clear_dirty(self) -> None:
        with self.store.session() as s:
            s.execute(update(Study).where(Study.vector_dirty.is_(True)).values(vector_dirty=False))

    # ------------------------------------------------------------------------------ removal
    def remove(self, *, study_uids: Sequence[str] = (), patient_ids: Sequence[str] = (), sop_uids: Sequence[str] = (),
               wait: float = 0.0, say: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
        """Remove patients, studies (StudyInstanceUID) and images (SOPInstanceUID) everywhere, for good.

        Holds the writer lock; records tombstones so that no later intake brings them back (idempotent:
        ids not in the index are not an error). See :func:`index.removal.remove`.
        """
        from index.removal import remove

        return remove(self, study_uids=study_uids, patient_ids=patient_ids, sop_uids=sop_uids, wait=wait, say=say)

    def readmit(self, *, study_uids: Sequence[str] = (), patient_ids: Sequence[str] = (), sop_uids: Sequence[str] = (),
                wait: float = 0.0, say: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
        """Lift the tombstones of earlier removals; the next intake re-admits them (:func:`index.removal.readmit`)."""
        from index.removal import readmit

        return readmit(self, study_uids=study_uids, patient_ids=patient_ids, sop_uids=sop_uids, wait=wait, say=say)


def stats(index_dir: Union[str, Path], *, db_url: Optional[str] = None) -> Dict[str, Any]:
    """Index totals, failures by kind and reason, removals on record, FAISS facts, model, writer, last builds.

    Opens the index read-only (works on a read-only folder, changes nothing).
    """
    idx = IndexDir.open(index_dir, db_url=db_url, readonly=True)
    try:
        counts = idx.store.counts()
        with idx.store.session() as s:
            builds = s.scalars(select(Build).order_by(Build.id.desc()).limit(5)).all()
            last = [{"id": b.id, "command": b.command, "created": b.created.isoformat(timespec="seconds"),
                     "finished": b.finished.isoformat(timespec="seconds") if b.finished else None,
                     "counts": b.counts} for b in builds]
            tombs: Dict[str, int] = {}
            for kind, n in s.execute(select(Tombstone.kind, func.count()).group_by(Tombstone.kind)):
                tombs[kind] = int(n)
        writers = [{"command": h.command, "pid": h.pid, "host": h.host, "user": h.user, "since": h.since}
                   for h in read_holders(idx.root) if h.alive() is not False]
        return {"index": str(index_dir), "model_sha256": idx.meta.get("model_sha256"),
                "model_source": idx.meta.get("model_source"), "totals": counts,
                "failures": failure_counts(idx.store), "tombstones": tombs, "writers": writers,
                "faiss": idx.meta.get("indices", {}), "builds": last}
    finally:
        idx.close()


__all__ = ["FAISS_FILES", "IndexDir", "KINDS", "model_identity", "stats"]
