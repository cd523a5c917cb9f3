"""The intake's part of ``index verify``: duplicate copies and (given the archive) files with no row.

* Every ``duplicate`` failure row names a SOPInstanceUID (:mod:`index.ingest_copies`). It is
  consistent when that image is embedded (or still pending): an intact copy is indexed, whichever
  copy was found first. It is a problem when the image failed to decode while this copy was never
  tried (``deep``: when this copy decodes, it is an intact file with no image row), or when no image
  row has that UID at all (and the instance was not removed on request).
* Given the archive the index was built from, every input of it must have a row (an image or a
  failure row) unless it was removed on request or is an SR whose text is its study's report; an
  input with none is a problem (the intake lost it, or it was added after the last build).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

from sqlalchemy import select

from index.ingest_accounting import Tombstones, patient_source
from index.ingest_copies import duplicate_sop, was_tried
from index.store import DUPLICATE, EMBEDDED, FAILED, PENDING, Failure, Image, Study, chunks
from index.store import Report as ReportRow

logger = logging.getLogger(__name__)
_EXAMPLES = 5


def _problem(kind: str, what: str, ids: List[int]) -> Dict[str, Any]:
    return {"kind": kind, "problem": what, "count": len(ids), "examples": ids[:_EXAMPLES]}


def check_copies(idx: Any, deep: bool, problems: List[Dict[str, Any]]) -> int:
    """Check the duplicate rows (see the module docstring); returns how many were checked.

    Problem examples are failure row ids (``index failures`` lists them).
    """
    store = idx.store
    with store.session() as s:
        rows = s.execute(select(Failure.id, Failure.path_enc, Failure.reason)
                         .where(Failure.stage == DUPLICATE).order_by(Failure.id)).all()
        sops = sorted({uid for uid in (duplicate_sop(r) for _, _, r in rows) if uid is not None})
        status: Dict[str, str] = {}
        for part in chunks(sops):
            status.update(s.execute(select(Image.sop_uid, Image.status).where(Image.sop_uid.in_(part))).all())
    tombstones = Tombstones(store, idx.secret)
    orphan: List[int] = []
    untried: List[int] = []
    intact: List[int] = []
    for fid, enc, reason in rows:
        uid = duplicate_sop(reason)
        state = status.get(uid) if uid is not None else None
        if state in (EMBEDDED, PENDING):
            continue  # an intact copy is indexed (or is about to be embedded)
        if state is None:
            if not _removed_copy(idx.secret.decrypt_path(enc), uid, tombstones):
                orphan.append(fid)
            continue
        if state == FAILED and not was_tried(reason):
            if deep and _decodes(idx.secret.decrypt_path(enc)):
                intact.append(fid)
            else:
                untried.append(fid)
    if orphan:
        problems.append(_problem("failures", "duplicate row naming a SOPInstanceUID that has no image row", orphan))
    if untried:
        problems.append(_problem("failures", "copy never tried of an image that failed to decode (it may be intact; "
                                 "run index build again)", untried))
    if intact:
        problems.append(_problem("failures", "intact file with no image row: it is a copy of an image that failed "
                                 "to decode (run index build again)", intact))
    return len(rows)


def _removed_copy(path: str, uid: Optional[str], tombstones: Tombstones) -> bool:
    """Whether a duplicate copy's instance, study or patient was removed on request (its header is read)."""
    if uid is not None and tombstones.removed("", "", uid):
        return True
    if not tombstones.any:
        return False
    from cxr_search.datasets.header_scan import header_or_reason

    header = header_or_reason(path)[0]
    return header is not None and tombstones.removed(patient_source(header), header.study_instance_uid or "",
                                                      header.sop_instance_uid or "")


def _decodes(path: str) -> bool:
    from cxr_search.config import PreprocessConfig
    from cxr_search.images import load_image

    try:
        load_image(path, PreprocessConfig())
        return True
    except Exception:  # any error means: this copy does not decode
        return False


def check_archive(idx: Any, archive: Path, problems: List[Dict[str, Any]], progress: bool = False) -> int:
    """Check that every input of an export folder has a row; returns how many inputs were checked.

    Raises:
        SearchIndexError: ``archive`` is not a folder.
    """
    from tqdm.auto import tqdm

    from cxr_search.datasets.header_scan import header_or_reason
    from cxr_search.datasets.pacs import export_entries, is_structured_report
    from cxr_search.errors import SearchIndexError

    root = Path(archive).expanduser()
    if not root.is_dir():
        raise SearchIndexError(f"{root}: not a folder; give the export folder the index was built from")
    secret = idx.secret
    with idx.store.session() as s:
        keys: Set[str] = set(s.scalars(select(Image.path_key)).all())
        keys.update(s.scalars(select(Failure.path_key)).all())
        sr_texts = dict(s.execute(select(Study.study_uid, ReportRow.text).join(ReportRow, ReportRow.study_id == Study.id)
                                  .where(ReportRow.source == "sr")).all())
    tombstones = Tombstones(idx.store, secret)
    seen = 0
    lost = 0
    for entry in tqdm(export_entries(root.resolve()), desc="checking the archive", unit="file", disable=not progress):
        seen += 1
        path = str(entry.path)
        if secret.path_key(path) in keys:
            continue
        if not entry.reason and _accounted_without_row(path, header_or_reason(path)[0], tombstones, sr_texts,
                                                       is_structured_report):
            continue
        lost += 1
    if lost:
        problems.append({"kind": "files", "problem": "file in the archive with no row in the store (not catalogued: "
                         "run index build or index add on the archive)", "count": lost, "examples": []})
    return seen


def _accounted_without_row(path: str, header: Optional[Any], tombstones: Tombstones, sr_texts: Dict[str, str],
                           is_sr: Any) -> bool:
    """An input that leaves no row by design: removed on request, or an SR that is its study's report."""
    if header is None:
        return False
    study, sop = header.study_instance_uid or "", header.sop_instance_uid or ""
    if tombstones.removed(patient_source(header), study, sop):
        return True
    if is_sr(header) and study in sr_texts:
        from cxr_search.datasets.pacs_reports import read_sr_report

        report = read_sr_report(path)[0]
        return report is not None and report[2] == sr_texts[study]
    return False


__all__ = ["check_archive", "check_copies"]
