"""Report sources of a hospital PACS export: a RIS CSV, a folder of text files, DICOM SR objects.

All three are looked up only for the studies that kept at least one image, so a RIS export much
larger than the image tree costs one streaming pass and memory for the matched reports only.

* CSV (``reports_csv``): columns are matched ignoring case, spaces and underscores. Keys:
  ``AccessionNumber`` / ``accession_number`` / ``Accession``, ``StudyInstanceUID`` /
  ``study_instance_uid`` / ``StudyUID``; text: ``report`` / ``report_text`` / ``text`` (split with
  :func:`cxr_search.reports.split_sections`), or separate ``findings`` / ``impression`` columns.
  When several rows share a key, the last one wins (RIS exports list report versions in order,
  the final version last).
* Folder (``reports_dir``): files named ``<accession>.txt`` or ``<StudyInstanceUID>.txt`` (any or
  no extension, any depth), read with :func:`cxr_search.reports.read_report_text_file`.
* SR objects found in the tree, matched by StudyInstanceUID; of several SRs of one study the one
  with the longest report text wins (an addendum SR usually repeats the original).

Precedence per study: CSV, then folder, then SR; within CSV and folder the accession number is
tried before the StudyInstanceUID.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple

from cxr_search.datasets.adapter_kit import CsvTable, SkipLog
from cxr_search.datasets.file_walk import walk_files
from cxr_search.errors import DatasetError, ReportError
from cxr_search.reports import (
    ReportSections,
    choose_report_text,
    extract_sr_text,
    normalize_whitespace,
    read_report_text_file,
    split_sections,
)

logger = logging.getLogger(__name__)

#: (findings, impression, report_text)
Report = Tuple[str, str, str]

_ACCESSION_NAMES = ("accessionnumber", "accession", "accessionno", "accno")
_STUDY_NAMES = ("studyinstanceuid", "studyuid", "studyinstance")
_TEXT_NAMES = ("report", "reporttext", "text", "reportbody", "fulltext")
_FINDINGS_NAMES = ("findings",)
_IMPRESSION_NAMES = ("impression", "conclusion")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _pick(columns: List[str], names: Tuple[str, ...]) -> Optional[str]:
    by_norm = {_norm(c): c for c in reversed(columns)}  # first column wins on clashes
    for name in names:
        if name in by_norm:
            return by_norm[name]
    return None


def as_report(sections: ReportSections) -> Report:
    """(findings, impression, longest-rule text) of parsed sections ("" when absent)."""
    findings = sections.findings or ""
    impression = sections.impression or ""
    return findings, impression, choose_report_text(findings, impression, "longest") or ""


def read_csv_reports(
    path: Path, accessions: Set[str], study_uids: Set[str]
) -> Tuple[Dict[str, Report], Dict[str, Report], int]:
    """Reports of the wanted keys from a RIS CSV.

    Args:
        path: The CSV.
        accessions: Accession numbers to keep.
        study_uids: StudyInstanceUIDs to keep.

    Returns:
        (by accession, by study UID, number of rows whose key repeated an earlier row).

    Raises:
        DatasetError: No key column or no text column; the message names the accepted names.
    """
    with CsvTable(path, []) as table:
        columns = table.columns
        acc_col = _pick(columns, _ACCESSION_NAMES)
        uid_col = _pick(columns, _STUDY_NAMES)
        text_col = _pick(columns, _TEXT_NAMES)
        find_col = _pick(columns, _FINDINGS_NAMES)
        imp_col = _pick(columns, _IMPRESSION_NAMES)
        if acc_col is None and uid_col is None:
            raise DatasetError(
                f"{path}: missing column AccessionNumber or StudyInstanceUID (also accepted: accession_number, "
                f"study_instance_uid); found: {', '.join(columns) or 'none'}"
            )
        if text_col is None and find_col is None and imp_col is None:
            raise DatasetError(
                f"{path}: missing report text column report / report_text / text (or findings / impression); "
                f"found: {', '.join(columns) or 'none'}"
            )
        by_acc: Dict[str, Report] = {}
        by_uid: Dict[str, Report] = {}
        repeated = 0
        for r in table:
            acc = r[acc_col] if acc_col else ""
            uid = r[uid_col] if uid_col else ""
            if not ((acc and acc in accessions) or (uid and uid in study_uids)):
                continue
            if text_col and r[text_col]:
                # The csv module keeps embedded newlines, so header detection still sees line starts.
                report = as_report(split_sections(r[text_col]))
            else:
                findings = normalize_whitespace(r[find_col]) if find_col else ""
                impression = normalize_whitespace(r[imp_col]) if imp_col else ""
                report = (findings, impression, choose_report_text(findings, impression, "longest") or "")
            if not report[2]:
                continue
            duplicate = False
            if acc and acc in accessions:
                duplicate = acc in by_acc
                by_acc[acc] = report
            if uid and uid in study_uids:
                duplicate = duplicate or uid in by_uid
                by_uid[uid] = report
            repeated += duplicate
    return by_acc, by_uid, repeated


def index_report_dir(folder: Path, keys: Set[str]) -> Dict[str, Path]:
    """key -> file for report files below ``folder`` whose name (minus extension) is a wanted key.

    Raises:
        DatasetError: ``folder`` is not a folder.
    """
    if not folder.is_dir():
        raise DatasetError(f"{folder}: reports folder not found; give a folder of <accession>.txt / <StudyUID>.txt")
    found: Dict[str, Path] = {}
    for path in walk_files(folder):
        name = path.name
        stem = name[:-4] if name.lower().endswith(".txt") else name
        for candidate in (stem, name, path.stem):
            if candidate in keys and candidate not in found:
                found[candidate] = path
                break
    return found


def read_dir_report(path: Path, skips: SkipLog) -> Optional[Report]:
    """A report file as (findings, impression, text); None (and a skip) when unreadable."""
    try:
        return as_report(read_report_text_file(path))
    except ReportError as exc:
        skips.skip("unreadable report file", exc)
        return None


#: Why an SR object gives no report (see :func:`read_sr_report`).
SR_NO_TEXT = "SR with no text"
SR_UNREADABLE = "unreadable structured report"


def read_sr_report(path: str) -> Tuple[Optional[Report], str, str]:
    """The report of one SR object.

    Returns:
        (report, "", "") when it holds text; otherwise (None, reason, detail) with the reason
        :data:`SR_NO_TEXT` or :data:`SR_UNREADABLE`. Never raises on a bad file.
    """
    try:
        report = as_report(extract_sr_text(path))
    except ReportError as exc:
        return None, SR_UNREADABLE, str(exc)
    except Exception as exc:  # a corrupt SR must not stop the export
        return None, SR_UNREADABLE, f"{path}: {type(exc).__name__}: {exc}"
    if not report[2]:
        return None, SR_NO_TEXT, ""
    return report, "", ""


def best_sr_report(paths: Iterable[str], skips: SkipLog) -> Optional[Report]:
    """The SR with the longest report text among ``paths``; None when none has text."""
    best: Optional[Report] = None
    for path in sorted(paths):
        report, reason, detail = read_sr_report(path)
        if report is None:
            if reason == SR_UNREADABLE:
                skips.skip(reason, detail)
            continue
        if best is None or len(report[2]) > len(best[2]):
            best = report
    return best


__all__ = [
    "Report", "SR_NO_TEXT", "SR_UNREADABLE", "as_report", "best_sr_report", "index_report_dir", "read_csv_reports",
    "read_dir_report", "read_sr_report",
]
