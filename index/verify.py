"""``index verify``: the index is complete and consistent, or the report says exactly what is not.

Checks: every embedded image and section row has exactly one stored vector and vice versa; every
FAISS file holds exactly the store's ids, each once (a missing id is a *gap*, an id without a row a
*stray*); the study index holds one vector per study with embedded images; every build used the
index's model (and the given model matches it); image files exist and are readable (``deep``: their
DICOM header still names the same SOPInstanceUID); every duplicate copy's image is indexed from a
copy that decodes, and (``archive``) every file of the export has a row (:mod:`index.verify_intake`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
from sqlalchemy import func, select

from cxr_search.errors import SearchIndexError
from index.index_dir import KINDS, IndexDir, model_identity
from index.store import EMBEDDED, VECTOR_TABLES, Build, Image
from index.verify_intake import check_archive, check_copies

logger = logging.getLogger(__name__)
_EXAMPLES = 5


def _ids_problem(kind: str, what: str, ids: np.ndarray) -> Dict[str, Any]:
    return {"kind": kind, "problem": what, "count": int(len(ids)), "examples": [int(i) for i in ids[:_EXAMPLES]]}


def verify(index_dir: Union[str, Path], *, model: Any = None, deep: bool = False, db_url: Optional[str] = None,
           progress: bool = False, archive: Optional[Union[str, Path]] = None) -> Dict[str, Any]:
    """Check an index; returns ``{"ok": bool, "problems": [...], "checked": {...}}``.

    Duplicate copies are checked too, and, with ``archive`` (the export folder the index was built
    from), that every file of it has a row (:mod:`index.verify_intake`).

    Raises:
        SearchIndexError: The folder is not an index (nothing can be checked).
    """
    idx = IndexDir.open(index_dir, db_url=db_url, readonly=True)
    problems: List[Dict[str, Any]] = []
    checked: Dict[str, Any] = {}
    try:
        store = idx.store
        with store.session() as s:
            for kind, (table, _, _) in VECTOR_TABLES.items():
                rows = np.asarray(s.scalars(select(table.id).where(table.status == EMBEDDED)).all(), dtype=np.int64)
                vecs = store.vector_ids(kind)
                if len(np.setdiff1d(rows, vecs)):
                    problems.append(_ids_problem(kind, "embedded row without a stored vector", np.setdiff1d(rows, vecs)))
                if len(np.setdiff1d(vecs, rows)):
                    problems.append(_ids_problem(kind, "stored vector without an embedded row", np.setdiff1d(vecs, rows)))
            builds = s.execute(select(Build.model_sha256, func.count()).group_by(Build.model_sha256)).all()
        for kind in KINDS:
            desired = idx._desired(kind)
            try:
                present = idx.vector_index(kind).ids()
            except SearchIndexError as exc:
                problems.append({"kind": kind, "problem": str(exc), "count": int(len(desired)), "examples": []})
                continue
            uniq, counts = np.unique(present, return_counts=True)
            dup = uniq[counts > 1]
            gap = np.setdiff1d(desired, uniq)
            stray = np.setdiff1d(uniq, desired)
            for what, ids in (("id more than once in the FAISS index", dup),
                              ("row with no vector in the FAISS index (gap)", gap),
                              ("FAISS id with no row in the store (stray)", stray)):
                if len(ids):
                    problems.append(_ids_problem(kind, what, ids))
            checked[kind] = {"store": int(len(desired)), "faiss": int(len(present))}
        want = idx.meta.get("model_sha256")
        for sha, n in builds:
            if sha != want:
                problems.append({"kind": "model", "problem": f"{n} build(s) used model {sha[:12]}, the index says "
                                 f"{str(want)[:12]}", "count": int(n), "examples": []})
        if model is not None:
            try:
                idx.check_model(model_identity(model))
            except SearchIndexError as exc:
                problems.append({"kind": "model", "problem": str(exc), "count": 1, "examples": []})
        checked["files"] = _check_files(idx, deep, problems, progress)
        checked["duplicate_copies"] = check_copies(idx, deep, problems)
        if archive is not None:
            checked["archive_files"] = check_archive(idx, Path(archive), problems, progress)
    finally:
        idx.close()
    return {"index": str(index_dir), "ok": not problems, "problems": problems, "checked": checked}


def _check_files(idx: IndexDir, deep: bool, problems: List[Dict[str, Any]], progress: bool) -> int:
    from tqdm.auto import tqdm

    missing: List[int] = []
    changed: List[int] = []
    with idx.store.session() as s:
        rows = s.execute(select(Image.id, Image.path_enc, Image.sop_uid).where(Image.status == EMBEDDED)).all()
    for image_id, enc, sop in tqdm(rows, desc="checking files", unit="file", disable=not progress):
        path = idx.secret.decrypt_path(enc)
        if not os.access(path, os.R_OK):
            missing.append(image_id)
        elif deep and path and not _same_sop(path, sop):
            changed.append(image_id)
    if missing:
        problems.append(_ids_problem("image", "file missing or unreadable", np.asarray(missing)))
    if changed:
        problems.append(_ids_problem("image", "file no longer holds the indexed SOPInstanceUID", np.asarray(changed)))
    return len(rows)


def _same_sop(path: str, sop: str) -> bool:
    from cxr_search.dicom.header import read_dicom_header

    try:
        return read_dicom_header(path).sop_instance_uid == sop
    except Exception:  # a non-DICOM image (manifest input) has no header to compare
        return Path(path).suffix.lower() in (".png", ".jpg", ".jpeg")
