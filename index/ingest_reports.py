"""Reports of an intake: RIS CSV, DICOM SR objects and manifest reports attached to their studies.

Every SR object an intake meets is accounted for: its text becomes its study's report (counted in
``reports``), or it already is that report (``already_catalogued``), or it gets a row saying why not:
``SR with no text`` / ``unreadable structured report`` (stage ``scan``), ``SR with no study in the
index`` or ``SR not used: ...`` (its study's report comes from another source; stage ``skipped``).
Precedence per study: a report already stored, then the RIS CSV, then the longest SR text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cxr_search.datasets.pacs_reports import Report, read_csv_reports, read_sr_report
from index.privacy import IndexSecret
from index.store import SCAN, SKIPPED, Failure, Section, Study, chunks
from index.store import Report as ReportRow

SR_NO_STUDY = "SR with no study in the index"
_SOURCES = {"csv": "the RIS CSV", "sr": "another SR object", "manifest": "the manifest"}


def section_rows(report: Report) -> List[Tuple[str, str]]:
    """(kind, text) sections of a report: findings and impression, or the whole text when neither."""
    findings, impression, text = report
    out = [(kind, body) for kind, body in (("findings", findings), ("impression", impression)) if body]
    if not out and text:
        out.append(("report", text))
    return out


def add_report(cat: Any, s: Session, study_id: int, report: Report, source: str) -> bool:
    """Insert the report of a study with its sections (not when the study has one); True when inserted.

    Args:
        cat: The :class:`index.ingest.Cataloguer` whose result counts the report.
        s: Open session.
        study_id: The study's row id.
        report: (findings, impression, text).
        source: ``csv``, ``sr`` or ``manifest``.
    """
    if s.scalar(select(ReportRow.id).where(ReportRow.study_id == study_id)) is not None:
        return False
    sections = section_rows(report)
    if not sections:
        return False
    row = ReportRow(study_id=study_id, source=source, text=report[2] or "\n".join(t for _, t in sections))
    s.add(row)
    s.flush()
    for kind, text in sections:
        s.add(Section(report_id=row.id, study_id=study_id, kind=kind, text=text))
    cat.result.reports_added += 1
    cat.result.sections_added += len(sections)
    return True


def attach_reports(cat: Any, reports_csv: Optional[Path], sr_paths: Dict[str, List[str]]) -> None:
    """Give studies without a report one from the CSV (first) or their SR objects; settle every SR object.

    Args:
        cat: The :class:`index.ingest.Cataloguer` of the intake.
        reports_csv: The RIS CSV, if given.
        sr_paths: StudyInstanceUID -> paths of the SR objects of that study met by the intake.
    """
    with cat.store.session() as s:
        missing = s.execute(
            select(Study.id, Study.study_uid, Study.accession_key).where(~Study.id.in_(select(ReportRow.study_id)))
        ).all()
    found: Dict[int, Tuple[Report, str]] = {}
    if reports_csv is not None and missing:
        by_key = {acc: sid for sid, _, acc in missing if acc}
        by_uid = {uid: sid for sid, uid, _ in missing}
        acc_reports, uid_reports, _ = read_csv_reports(reports_csv, _KeyedSet(cat.secret, by_key), set(by_uid))
        for acc, report in acc_reports.items():
            found.setdefault(by_key[cat.secret.accession_key(acc)], (report, "csv"))
        for uid, report in uid_reports.items():
            found.setdefault(by_uid[uid], (report, "csv"))
    outcomes = _sr_outcomes(cat, sr_paths, found)
    with cat.store.session() as s:
        for path, stage, reason, detail in outcomes:
            if stage:
                cat.record(s, path, stage, reason, detail)
            else:  # the SR is (or already was) its study's report: no row says otherwise
                s.execute(delete(Failure).where(Failure.path_key == cat.secret.path_key(path)))
        for sid, (report, source) in found.items():
            add_report(cat, s, sid, report, source)


def _sr_outcomes(cat: Any, sr_paths: Dict[str, List[str]],
                 found: Dict[int, Tuple[Report, str]]) -> List[Tuple[str, str, str, str]]:
    """(path, stage or "", reason, detail) per SR object; adds the chosen SR reports to ``found``.

    The SR texts are read here, outside any transaction.
    """
    if not sr_paths:
        return []
    sids = {uid: cat.ids.studies.get(uid) for uid in sr_paths}
    existing: Dict[int, Tuple[str, str]] = {}
    with cat.store.session() as s:
        for part in chunks(sorted({sid for sid in sids.values() if sid is not None})):
            for sid, source, text in s.execute(select(ReportRow.study_id, ReportRow.source, ReportRow.text)
                                               .where(ReportRow.study_id.in_(part))):
                existing[sid] = (source, text)
    out: List[Tuple[str, str, str, str]] = []
    for uid, paths in sr_paths.items():
        sid = sids[uid]
        if sid is None:
            out.extend((p, SKIPPED, SR_NO_STUDY, "") for p in paths)
            continue
        texted: List[Tuple[str, Report]] = []
        for path in sorted(paths):
            report, reason, detail = read_sr_report(path)
            if report is None:
                out.append((path, SCAN, reason, detail))
            else:
                texted.append((path, report))
        if not texted:
            continue
        if sid in existing or sid in found:
            source, text = existing.get(sid) or (found[sid][1], "")
            for path, report in texted:
                if source == "sr" and report[2] == text:
                    cat.result.already_catalogued += 1
                    out.append((path, "", "", ""))
                else:
                    out.append((path, SKIPPED, f"SR not used: the study's report comes from {_SOURCES[source]}", ""))
            continue
        best = max(texted, key=lambda pr: len(pr[1][2]))  # the first of the longest, in path order
        found[sid] = (best[1], "sr")
        cat.result.reports += 1
        for path, _ in texted:
            if path == best[0]:
                out.append((path, "", "", ""))
            else:
                out.append((path, SKIPPED, "SR not used: a longer SR of the study is used", ""))
    return out


def settle_manifest_reports(cat: Any, reports: Dict[str, Report]) -> None:
    """Attach the manifest's reports (StudyInstanceUID -> report) to the studies in the index without one."""
    with cat.store.session() as s:
        for study_uid, report in reports.items():
            sid = cat.ids.studies.get(study_uid)
            if sid is not None:
                add_report(cat, s, sid, report, "manifest")


class _KeyedSet:
    """A set of accession numbers known only by their keys: ``acc in s`` tests its HMAC."""

    def __init__(self, secret: IndexSecret, keys: Iterable[str]) -> None:
        self.secret = secret
        self.keys = set(keys)

    def __contains__(self, accession: object) -> bool:
        return isinstance(accession, str) and self.secret.accession_key(accession) in self.keys


__all__ = ["SR_NO_STUDY", "add_report", "attach_reports", "section_rows", "settle_manifest_reports"]
