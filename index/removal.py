"""Removals that stick: ``index remove`` and ``index remove --undo``.

A removal deletes patients, studies or single images (SOP instances) from the store and from every
FAISS file, and records a *tombstone* for each identifier it was given, whether or not the index holds
it yet: a deletion request for a patient whose images arrive next week must hold then too. Every later
intake skips what a tombstone names (and counts it as skipped by request) until ``--undo`` lifts it.

Tombstones keep only keyed HMACs (:meth:`IndexSecret.patient_key` of the patient, :meth:`IndexSecret.uid_key`
of a Study or SOP Instance UID). The patient key is taken of the same text the intake reads for the
patient: the DICOM PatientID for a PACS export, ``DATASET:PATIENT_ID`` (the manifest's ``dataset`` and
``patient_id`` columns, e.g. ``mimic:10000032``) for a manifest, and ``study:STUDY_UID`` for a DICOM file
without PatientID (remove such a study with ``--study``).

Nothing else of what was removed stays in the store: with its rows go its vectors, report and sections,
the patient row once it has no study, and the failure rows of its files. On SQLite the deleting
connection overwrites what it deletes (``secure_delete``) and the write-ahead log is emptied afterwards,
so the removed rows are not left in free pages of ``store.sqlite`` or in ``store.sqlite-wal``. On
PostgreSQL deleted rows stay in the table files until ``VACUUM`` (autovacuum does it eventually).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from index.lock import writer_lock
from index.store import (
    Build,
    Failure,
    Image,
    ImageVector,
    Patient,
    Report,
    Section,
    SectionVector,
    Series,
    Store,
    Study,
    Tombstone,
    chunks,
    utcnow,
)

logger = logging.getLogger(__name__)

_TOKEN_STRIP = " \t,;:()[]<>'\"."


def _clean(ids: Iterable[str]) -> List[str]:
    return list(dict.fromkeys(str(i).strip() for i in ids if str(i).strip()))


def delete_rows(s: Session, *, study_ids: Iterable[int] = (), image_ids: Iterable[int] = ()) -> Dict[str, List[int]]:
    """Delete whole studies and single images, and every row that only they explain.

    With a study go its series, images, vectors, report and sections; with an image its vector. A
    study left without images goes whole; one that keeps some is marked for a new study vector (the
    next FAISS sync recomputes it). Patients left without studies go, and so do the failure rows of the
    deleted images' files (a decode failure carries the image's path key; a duplicate names its
    SOPInstanceUID in its reason).

    Returns:
        The removed ids per kind (``image``, ``section``, ``study``, ``patient``, ``failure``).
    """
    studies: Set[int] = {int(i) for i in study_ids}
    removed: Dict[str, List[int]] = {"image": [], "section": [], "study": [], "patient": [], "failure": []}
    path_keys: List[str] = []
    sops: Set[str] = set()
    touched: Set[int] = set()
    for part in chunks(sorted({int(i) for i in image_ids})):
        rows = s.execute(select(Image.id, Image.study_id, Image.path_key, Image.sop_uid).where(Image.id.in_(part)))
        for iid, sid, key, sop in rows:
            if sid not in studies:  # an image of a study removed whole goes with it below
                touched.add(sid)
                removed["image"].append(iid)
                path_keys.append(key)
                sops.add(sop)
    for part in chunks(removed["image"]):
        s.execute(delete(ImageVector).where(ImageVector.image_id.in_(part)))
        s.execute(delete(Image).where(Image.id.in_(part)))
    for part in chunks(sorted(touched)):
        left = set(s.scalars(select(Image.study_id).where(Image.study_id.in_(part)).distinct()).all())
        studies |= set(part) - left  # emptied by the single removals: removed whole (report included)
        keep = sorted(set(part) & left)
        if keep:
            s.execute(update(Study).where(Study.id.in_(keep)).values(vector_dirty=True))
            used = select(Image.series_id).where(Image.series_id.is_not(None))
            s.execute(delete(Series).where(Series.study_id.in_(keep), ~Series.id.in_(used)))
    for part in chunks(sorted(studies)):
        rows = s.execute(select(Image.id, Image.path_key, Image.sop_uid).where(Image.study_id.in_(part))).all()
        img = [r[0] for r in rows]
        path_keys.extend(r[1] for r in rows)
        sops.update(r[2] for r in rows)
        sec = s.scalars(select(Section.id).where(Section.study_id.in_(part))).all()
        for ipart in chunks(img):
            s.execute(delete(ImageVector).where(ImageVector.image_id.in_(ipart)))
        for spart in chunks(sec):
            s.execute(delete(SectionVector).where(SectionVector.section_id.in_(spart)))
        s.execute(delete(Section).where(Section.study_id.in_(part)))
        s.execute(delete(Report).where(Report.study_id.in_(part)))
        s.execute(delete(Image).where(Image.study_id.in_(part)))
        s.execute(delete(Series).where(Series.study_id.in_(part)))
        existing = s.scalars(select(Study.id).where(Study.id.in_(part))).all()
        s.execute(delete(Study).where(Study.id.in_(part)))
        removed["image"].extend(img)
        removed["section"].extend(sec)
        removed["study"].extend(existing)
    # Patients left without studies go too: nothing of them remains in the index.
    orphans = s.scalars(select(Patient.id).where(~Patient.id.in_(select(Study.patient_id).distinct()))).all()
    for part in chunks(orphans):
        s.execute(delete(Patient).where(Patient.id.in_(part)))
    removed["patient"] = list(orphans)
    removed["failure"] = _delete_failures_of(s, path_keys, sops)
    return removed


def _delete_failures_of(s: Session, path_keys: Sequence[str], sops: Set[str]) -> List[int]:
    """Delete the failure rows of removed files: by path key, and duplicates that name a removed SOP UID."""
    ids: List[int] = []
    for part in chunks(sorted(set(path_keys))):
        ids.extend(s.scalars(select(Failure.id).where(Failure.path_key.in_(part))).all())
    if sops:
        for fid, reason in s.execute(select(Failure.id, Failure.reason).where(Failure.stage == "duplicate")):
            if {t.strip(_TOKEN_STRIP) for t in (reason or "").split()} & sops:
                ids.append(fid)
    ids = sorted(set(ids))
    for part in chunks(ids):
        s.execute(delete(Failure).where(Failure.id.in_(part)))
    return ids


def _keys(idx: Any, study_uids: Sequence[str], patient_ids: Sequence[str], sop_uids: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """kind -> {identifier as given -> tombstone key}."""
    return {
        "patient": {p: idx.secret.patient_key(p) for p in patient_ids},
        "study": {u: idx.secret.uid_key(u) for u in study_uids},
        "sop": {u: idx.secret.uid_key(u) for u in sop_uids},
    }


def _audit(s: Session, idx: Any, command: str, counts: Dict[str, Any]) -> None:
    now = utcnow()
    s.add(Build(command=command, model_sha256=idx.meta.get("model_sha256", ""),
                preprocessing=idx.meta.get("preprocessing", {}), factories={}, counts=counts, created=now, finished=now))


def remove(idx: Any, *, study_uids: Sequence[str] = (), patient_ids: Sequence[str] = (), sop_uids: Sequence[str] = (),
           wait: float = 0.0, say: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Remove patients, studies and SOP instances from an index, and keep them out (tombstones).

    Idempotent: an identifier the index does not hold is not an error; its tombstone is recorded all
    the same, so that it is kept out when it arrives.

    Args:
        idx: An :class:`index.index_dir.IndexDir` opened for writing.
        study_uids: StudyInstanceUIDs.
        patient_ids: Patients, as the intake reads them (see the module docstring).
        sop_uids: SOPInstanceUIDs of single images.
        wait: Seconds to wait for the writer lock.
        say: Where a "waiting for the lock" message goes.

    Returns:
        ``{"removed": {kind: count}, "tombstones_added": n, "not_in_index": [...], "index": ...}``.

    Raises:
        IndexLockedError: Another writer holds the index.
    """
    study_uids, patient_ids, sop_uids = _clean(study_uids), _clean(patient_ids), _clean(sop_uids)
    store: Store = idx.store
    with writer_lock(idx.root, "index remove", wait=wait, say=say):
        keys = _keys(idx, study_uids, patient_ids, sop_uids)
        with store.session() as s:
            store.scrub_deleted(s)
            added = sum(store.add_tombstones(s, kind, m.values()) for kind, m in keys.items() if m)
            by_uid: Dict[str, int] = {}
            for part in chunks(study_uids):
                by_uid.update(s.execute(select(Study.study_uid, Study.id).where(Study.study_uid.in_(part))).all())
            by_patient: Dict[str, List[int]] = {}
            pkeys = keys["patient"]
            for part in chunks(sorted(pkeys.values())):
                q = select(Patient.pseudo_id, Study.id).join(Study, Study.patient_id == Patient.id)
                for pseudo, sid in s.execute(q.where(Patient.pseudo_id.in_(part))):
                    by_patient.setdefault(pseudo, []).append(sid)
            by_sop: Dict[str, int] = {}
            for part in chunks(sop_uids):
                by_sop.update(s.execute(select(Image.sop_uid, Image.id).where(Image.sop_uid.in_(part))).all())
            missing = ([f"patient {p}" for p in patient_ids if pkeys[p] not in by_patient]
                       + [f"study {u}" for u in study_uids if u not in by_uid]
                       + [f"sop {u}" for u in sop_uids if u not in by_sop])
            study_ids = set(by_uid.values()) | {sid for sids in by_patient.values() for sid in sids}
            removed = delete_rows(s, study_ids=study_ids, image_ids=by_sop.values())
            counts = {k: len(v) for k, v in removed.items()}
            _audit(s, idx, "remove", {"removed": counts, "tombstones_added": added})
        if any(counts[k] for k in ("image", "section", "study")):
            idx.sync()
        if not store.checkpoint():
            logger.warning("%s: readers kept part of the store's write-ahead log; the next writer empties it",
                           idx.root)
    return {"index": str(idx.root), "removed": counts, "tombstones_added": added, "not_in_index": missing}


def readmit(idx: Any, *, study_uids: Sequence[str] = (), patient_ids: Sequence[str] = (), sop_uids: Sequence[str] = (),
            wait: float = 0.0, say: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Lift the tombstones of earlier removals (``index remove --undo``): the next intake re-admits them.

    Nothing is restored by this call: the next ``index add`` (or build) over an archive that holds
    them catalogues and embeds them again.

    Returns:
        ``{"lifted": n, "not_removed": [...], "index": ...}``.

    Raises:
        IndexLockedError: Another writer holds the index.
    """
    study_uids, patient_ids, sop_uids = _clean(study_uids), _clean(patient_ids), _clean(sop_uids)
    store: Store = idx.store
    with writer_lock(idx.root, "index remove --undo", wait=wait, say=say):
        keys = _keys(idx, study_uids, patient_ids, sop_uids)
        with store.session() as s:
            have = {(kind, key) for kind, key in s.execute(select(Tombstone.kind, Tombstone.key))}
            not_removed = [f"{kind} {given}" for kind, m in keys.items() for given, key in m.items()
                           if (kind, key) not in have]
            lifted = sum(store.lift_tombstones(s, kind, m.values()) for kind, m in keys.items() if m)
            _audit(s, idx, "remove --undo", {"tombstones_lifted": lifted})
    return {"index": str(idx.root), "lifted": lifted, "not_removed": not_removed}


__all__ = ["delete_rows", "readmit", "remove"]
