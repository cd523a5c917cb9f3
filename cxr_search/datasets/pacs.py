"""Hospital PACS export: a folder tree of DICOM files plus reports (RIS CSV, text files or SR).

The tree is walked once, streaming (one folder listed at a time), and every regular file is tried
with a header-only read (:func:`cxr_search.dicom.header.read_dicom_header`), whatever its name (dot-files
too): PACS exports often have no extensions. Symbolic links are followed with loop protection; FIFOs,
sockets and devices are never opened. ``DICOMDIR`` index files and zip archives are skipped by name. A
file that cannot be used is counted under a reason in the summary and never stops the scan.

Kept: chest radiographs, i.e. single-frame greyscale images with pixel data whose Modality is CR or DX (also
the non-standard DR and RG, or a CR/DX SOP class under another modality) and whose
BodyPartExamined is blank or names the chest (:func:`is_chest_body_part`: CHEST, THORAX and
spellings within one or two typos of them). Everything else is skipped with a reason such as
``modality CT`` or ``body part KNEE``. DICOM SR objects are collected as report sources.

Rows: one per image; study_id = StudyInstanceUID, image_id = SOPInstanceUID, patient_id = the
first 16 hex digits of SHA-256(PatientID) (the raw id is never written; a missing PatientID is
replaced by SHA-256 of "study:" + StudyInstanceUID, making the study its own patient). Sex, age,
date, view, accession and UIDs come from the header. Reports: see
:mod:`cxr_search.datasets.pacs_reports`. Split: all ``test`` (an archive to index), or
``split="seeded"`` for a GLoRIA-style 70/15/15 split by pseudonymous patient.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Union

from cxr_search.datasets.adapter_kit import PrepareResult, SkipLog, finish, require_dir
from cxr_search.datasets.file_walk import WalkEntry, walk_entries
from cxr_search.datasets.header_scan import header_fields, iter_headers
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.datasets.pacs_reports import (
    Report,
    best_sr_report,
    index_report_dir,
    read_csv_reports,
    read_dir_report,
)
from cxr_search.datasets.splits import gloria_split, unique_in_order
from cxr_search.errors import DatasetError

logger = logging.getLogger(__name__)

NAME = "pacs"
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RG"})
#: CR Image Storage, Digital X-Ray Image Storage for presentation / for processing.
RADIOGRAPH_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1",
})  # fmt: skip
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# Substrings that name the chest in the languages PACS body parts are commonly written in.
_CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "TORAX", "TORAC", "TORACE", "LUNG", "PULMO", "POUMON", "BRUST", "THX")
# Targets for typo matching, with the largest edit distance accepted for each.
_CHEST_TYPO_TARGETS = (("CHEST", 1), ("THORAX", 2))
_SPLIT_MODES = ("test", "seeded")
_PROGRESS_EVERY = 10000


def pseudonymous_patient_id(patient_id: Optional[str], study_uid: str) -> str:
    """SHA-256 of the PatientID truncated to 16 hex digits (of ``study:<uid>`` when it is missing)."""
    source = patient_id if patient_id else f"study:{study_uid}"
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance (Levenshtein plus adjacent transpositions)."""
    prev2: List[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                cur[j] = min(cur[j], prev2[j - 2] + 1)
        prev2, prev = prev, cur
    return prev[len(b)]


def is_chest_body_part(body_part: Optional[str]) -> bool:
    """Whether a BodyPartExamined value is blank or names the chest (allowing small misspellings).

    Examples: ``"CHEST"``, ``""``, ``"THORAX"``, ``"Chest PA"``, ``"CHST"``, ``"CEHST"``, ``"TORAX"``
    are chest; ``"KNEE"``, ``"ABDOMEN"``, ``"CHEEK"`` are not.
    """
    if body_part is None:
        return True
    text = body_part.upper()
    tokens = re.findall(r"[A-Z]+", text)
    if not tokens:
        return True
    if any(word in text for word in _CHEST_WORDS):
        return True
    return any(
        _edit_distance(token, target) <= limit for token in tokens for target, limit in _CHEST_TYPO_TARGETS
    )


def _is_radiograph(modality: Optional[str], sop_class: Optional[str]) -> bool:
    return (modality or "").upper() in RADIOGRAPH_MODALITIES or (sop_class or "") in RADIOGRAPH_SOP_CLASSES


def _is_sr(modality: Optional[str], sop_class: Optional[str]) -> bool:
    return (sop_class or "").startswith(SR_SOP_CLASS_PREFIX) or (modality or "").upper() == "SR"


#: The longest UID DICOM allows (PS3.5 section 9.1).
MAX_UID_LENGTH = 64
_UID_FIELDS = {"StudyInstanceUID": "study_instance_uid", "SeriesInstanceUID": "series_instance_uid",
               "SOPInstanceUID": "sop_instance_uid"}


def radiograph_skip_reason(header: Any, *, body_part_filter: bool = True) -> Optional[str]:
    """Why a (non-SR) DICOM header is not a usable chest radiograph, or None when it is one.

    Args:
        header: A :class:`cxr_search.dicom.header.DicomHeader`.
        body_part_filter: Refuse BodyPartExamined values that do not name the chest.
    """
    if not header.has_pixel_data:
        return f"no pixel data (modality {header.modality or 'missing'})"
    if not _is_radiograph(header.modality, header.sop_class_uid):
        return f"modality {header.modality or 'missing'}"
    if body_part_filter and not is_chest_body_part(header.body_part):
        return f"body part {header.body_part}"
    if header.number_of_frames is not None and header.number_of_frames > 1:
        return "multi-frame image"
    photometric = header.photometric_interpretation
    if photometric and not photometric.startswith("MONOCHROME"):
        # Radiographs are greyscale; colour objects are screenshots or secondary captures.
        return f"colour image ({photometric})"
    if not header.study_instance_uid or not header.sop_instance_uid:
        return "no StudyInstanceUID or SOPInstanceUID"
    for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        uid = getattr(header, _UID_FIELDS[name]) or ""
        if len(uid) > MAX_UID_LENGTH:
            # DICOM caps a UID at 64 characters (PS3.5 9.1); a longer one is a broken export, and the store's
            # UID columns (sized for any valid UID) must not be the place where it fails.
            return f"{name} longer than {MAX_UID_LENGTH} characters ({len(uid)})"
    return None


def is_structured_report(header: Any) -> bool:
    """Whether a DICOM header is a Structured Report (a report source, not an image)."""
    return _is_sr(header.modality, header.sop_class_uid)


def export_entries(root: Path) -> Iterator[WalkEntry]:
    """Every entry of an export: regular files to read (``reason`` empty) and what is not read, with why.

    Dot-files and dot-folders are walked like any other (a PACS export has no hidden files to
    ignore, and every regular file is tried); symbolic links are followed with loop protection
    (:func:`cxr_search.datasets.file_walk.walk_entries`). ``DICOMDIR`` index files and zip
    archives are refused by name.
    """
    for count, entry in enumerate(walk_entries(root, skip_hidden=False), start=1):
        if count % _PROGRESS_EVERY == 0:
            logger.info("%s: %d files seen", root, count)
        if entry.reason:
            yield entry
        elif entry.path.name.upper() == "DICOMDIR":
            yield WalkEntry(entry.path, "DICOMDIR index file")
        elif entry.path.suffix.lower() == ".zip":
            yield WalkEntry(entry.path, "zip archive (unpack it to include its files)")
        else:
            yield entry


def candidate_files(root: Path, skips: SkipLog) -> Iterator[Path]:
    """Files worth a header read; what :func:`export_entries` refuses goes to ``skips`` with its reason."""
    for entry in export_entries(root):
        if entry.reason:
            skips.skip(entry.reason, entry.path)
        else:
            yield entry.path


def prepare_pacs(
    root: Union[str, Path],
    *,
    reports_csv: Optional[Union[str, Path]] = None,
    reports_dir: Optional[Union[str, Path]] = None,
    use_sr: bool = True,
    body_part_filter: bool = True,
    split: str = "test",
    seed: int = 0,
    workers: int = 1,
) -> PrepareResult:
    """Build the manifest of a PACS export.

    Args:
        root: Top folder of the export.
        reports_csv: RIS CSV keyed by accession number or StudyInstanceUID.
        reports_dir: Folder of ``<accession>.txt`` / ``<StudyInstanceUID>.txt`` report files.
        use_sr: Use DICOM SR objects of the tree as reports for studies with no CSV/folder report.
        body_part_filter: Keep only blank or chest BodyPartExamined (False keeps every CR/DX image).
        split: ``"test"`` (all rows) or ``"seeded"`` (70/15/15 by pseudonymous patient).
        seed: Seed of the ``"seeded"`` split.
        workers: Processes for header reads (1 = in this process).

    Returns:
        The rows and summary (skip reasons per file category).

    Raises:
        DatasetError: ``root`` or a report source is missing, a report CSV lacks its columns, or
            an unknown split mode.
    """
    if split not in _SPLIT_MODES:
        raise DatasetError(f"unknown PACS split mode {split!r}; use 'test' or 'seeded'")
    base = require_dir(root, "PACS export")
    csv_path = Path(reports_csv).expanduser() if reports_csv is not None else None
    if csv_path is not None and not csv_path.is_file():
        raise DatasetError(f"{csv_path}: reports CSV not found; give the RIS export file")
    dir_path = Path(reports_dir).expanduser() if reports_dir is not None else None
    if dir_path is not None and not dir_path.is_dir():
        raise DatasetError(f"{dir_path}: reports folder not found; give a folder of report text files")

    skips = SkipLog()
    rows: List[ManifestRow] = []
    sr_paths: Dict[str, List[str]] = {}
    files_read = 0
    for path_str, header, reason, detail in iter_headers(candidate_files(base, skips), workers=workers):
        files_read += 1
        if header is None:
            skips.skip(reason or "unreadable DICOM", detail or path_str)
            continue
        if is_structured_report(header):
            if use_sr and header.study_instance_uid:
                sr_paths.setdefault(header.study_instance_uid, []).append(path_str)
            else:
                why = "structured report not used" if header.study_instance_uid else "SR without StudyInstanceUID"
                skips.skip(why, path_str)
            continue
        why_not = radiograph_skip_reason(header, body_part_filter=body_part_filter)
        if why_not is not None:
            skips.skip(why_not, path_str)
            continue
        rows.append(
            ManifestRow(
                dataset=NAME,
                split="test",
                patient_id=pseudonymous_patient_id(header.patient_id, header.study_instance_uid),
                study_id=header.study_instance_uid,
                image_id=header.sop_instance_uid,
                image_path=path_str,
                **header_fields(header),
            )
        )
    n_sr = sum(map(len, sr_paths.values()))
    logger.info("%s: %d files read, %d radiographs kept, %d SR objects", base, files_read, len(rows), n_sr)

    sources = _attach_reports(rows, csv_path, dir_path, sr_paths if use_sr else {}, skips)
    notes: List[str] = []
    if sources.pop("csv_repeated_keys", 0):
        notes.append("some report CSV keys occur on several rows; the last row of each key was used")
    if split == "seeded":
        split_of = gloria_split(unique_in_order(r.patient_id for r in rows), seed=seed)
        for row in rows:
            row.split = split_of[row.patient_id]
    return finish(
        NAME, base, rows, skips, notes=notes, seeded_split=split == "seeded",
        extra={"files_read": files_read, "structured_reports": n_sr, "report_sources": sources},
    )


def _attach_reports(
    rows: List[ManifestRow],
    csv_path: Optional[Path],
    dir_path: Optional[Path],
    sr_paths: Dict[str, List[str]],
    skips: SkipLog,
) -> Dict[str, int]:
    """Fill findings / impression / report_text per study; returns studies matched per source."""
    accession_of: Dict[str, str] = {}
    for row in rows:
        if row.accession_number and row.study_id not in accession_of:
            accession_of[row.study_id] = row.accession_number
    studies: List[str] = unique_in_order(r.study_id for r in rows)
    wanted_acc: Set[str] = set(accession_of.values())
    wanted_uid: Set[str] = set(studies)
    report_of: Dict[str, Report] = {}
    counts = {"csv": 0, "folder": 0, "sr": 0}

    if csv_path is not None:
        by_acc, by_uid, repeated = read_csv_reports(csv_path, wanted_acc, wanted_uid)
        counts["csv_repeated_keys"] = repeated
        for study in studies:
            acc = accession_of.get(study)
            report = by_acc.get(acc) if acc else None
            report = report or by_uid.get(study)
            if report:
                report_of[study] = report
                counts["csv"] += 1
    if dir_path is not None:
        remaining = [s for s in studies if s not in report_of]
        keys = {accession_of[s] for s in remaining if s in accession_of} | set(remaining)
        files = index_report_dir(dir_path, keys)
        for study in remaining:
            acc = accession_of.get(study)
            path = files.get(acc) if acc else None
            path = path or files.get(study)
            report = read_dir_report(path, skips) if path is not None else None
            if report and report[2]:
                report_of[study] = report
                counts["folder"] += 1
    for study in studies:
        if study not in report_of and study in sr_paths:
            report = best_sr_report(sr_paths[study], skips)
            if report:
                report_of[study] = report
                counts["sr"] += 1
    for row in rows:
        report = report_of.get(row.study_id)
        if report:
            row.findings, row.impression, row.report_text = report
    return counts


__all__ = [
    "NAME", "RADIOGRAPH_MODALITIES", "candidate_files", "export_entries", "is_chest_body_part", "is_structured_report", "prepare_pacs",
    "pseudonymous_patient_id", "radiograph_skip_reason",
]
