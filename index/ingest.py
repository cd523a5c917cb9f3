"""Cataloguing: archive (PACS export or manifest) to store rows, idempotent and committed in batches.

A PACS export is walked once; files already catalogued (by the HMAC of their path) are not read
again, so a killed run resumes where it stopped. Every other file gets a header-only read and
becomes an image row (status ``pending``), a structured report source, or a failure row with its
reason; the walk never stops on a bad file. Rows are upserted by UID (SOPInstanceUID,
SeriesInstanceUID, StudyInstanceUID), so a file copied twice into an export is indexed once.
Reports come from a RIS CSV (matched by accession number, then StudyInstanceUID), from DICOM SR
objects of the tree, or from the manifest, and are split into sections (findings, impression; the
whole text when it has neither).
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from cxr_search.datasets.adapter_kit import SkipLog
from cxr_search.datasets.header_scan import iter_headers
from cxr_search.datasets.manifest import ManifestRow, iter_manifest
from cxr_search.datasets.pacs import candidate_files, is_structured_report, radiograph_skip_reason
from cxr_search.datasets.pacs_reports import Report, best_sr_report, read_csv_reports
from cxr_search.errors import DatasetError, SearchIndexError
from index.privacy import IndexSecret, scrub_path
from index.store import Failure, Image, Patient, Section, Series, Store, Study
from index.store import Report as ReportRow

logger = logging.getLogger(__name__)

BATCH = 500  # files per transaction: a kill -9 loses at most this much cataloguing work
_SEXES = {"M", "F", "O"}


@dataclass
class CatalogueResult:
    """What one cataloguing pass did."""

    files_seen: int = 0
    files_known: int = 0
    images_added: int = 0
    duplicates: int = 0
    failures_added: int = 0
    reports_added: int = 0
    sections_added: int = 0
    skipped: Counter = field(default_factory=Counter)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready summary."""
        return {
            "files_seen": self.files_seen, "files_already_catalogued": self.files_known,
            "images_added": self.images_added, "duplicate_sop_instance_uids": self.duplicates,
            "failures_added": self.failures_added, "reports_added": self.reports_added,
            "sections_added": self.sections_added, "failure_reasons": dict(self.skipped),
        }


@dataclass
class _Item:
    """One image to catalogue, from a DICOM header or a manifest row."""

    path: str
    sop_uid: str
    study_uid: str
    series_uid: Optional[str]
    patient_source: str
    study_date: Optional[_dt.date]
    age: Optional[float]
    sex: Optional[str]
    view: str
    modality: Optional[str] = None
    rows: Optional[int] = None
    columns: Optional[int] = None
    photometric: Optional[str] = None
    transfer_syntax: Optional[str] = None
    accession: Optional[str] = None


class _Ids:
    """UID -> primary key caches, filled from the store once, so upserts need no per-row queries."""

    def __init__(self, s: Session) -> None:
        self.patients: Dict[str, int] = dict(s.execute(select(Patient.pseudo_id, Patient.id)).all())
        self.studies: Dict[str, int] = dict(s.execute(select(Study.study_uid, Study.id)).all())
        self.series: Dict[str, int] = dict(s.execute(select(Series.series_uid, Series.id)).all())
        self.sops: Set[str] = set(s.scalars(select(Image.sop_uid)).all())


def _known_path_keys(s: Session) -> Set[str]:
    """Path keys of files already catalogued as images (failures are retried: the file may be fixed)."""
    return set(s.scalars(select(Image.path_key)).all())


def section_rows(report: Report) -> List[Tuple[str, str]]:
    """(kind, text) sections of a report: findings and impression, or the whole text when neither."""
    findings, impression, text = report
    out = [(kind, body) for kind, body in (("findings", findings), ("impression", impression)) if body]
    if not out and text:
        out.append(("report", text))
    return out


class Cataloguer:
    """Upserts images, studies, series, patients, reports and failures into a store.

    Args:
        store: The store.
        secret: The index secret (pseudonyms, path keys and encryption).
    """

    def __init__(self, store: Store, secret: IndexSecret) -> None:
        self.store = store
        self.secret = secret
        with store.session() as s:
            self.ids = _Ids(s)
            self.known = _known_path_keys(s)
        self.result = CatalogueResult()

    # ------------------------------------------------------------------------------ upserts
    @staticmethod
    def _get_or_add(s: Session, cache: Dict[str, int], key: str, make: Callable[[], Any]) -> int:
        """Primary key of the row cached under ``key``, inserting ``make()`` when there is none."""
        rid = cache.get(key)
        if rid is None:
            row = make()
            s.add(row)
            s.flush()  # assigns the primary key
            rid = cache[key] = row.id
        return rid

    def _study(self, s: Session, item: _Item) -> int:
        def make() -> Study:
            key = self.secret.patient_key(item.patient_source)
            patient_id = self._get_or_add(s, self.ids.patients, key, lambda: Patient(pseudo_id=key))
            return Study(
                study_uid=item.study_uid, patient_id=patient_id, study_date=item.study_date, age_years=item.age,
                sex=item.sex if item.sex in _SEXES else None,
                accession_key=self.secret.accession_key(item.accession) if item.accession else None,
            )

        return self._get_or_add(s, self.ids.studies, item.study_uid, make)

    def _series(self, s: Session, item: _Item, study_id: int) -> Optional[int]:
        if not item.series_uid:
            return None
        return self._get_or_add(s, self.ids.series, item.series_uid,
                                lambda: Series(series_uid=item.series_uid, study_id=study_id, modality=item.modality))

    def add_image(self, s: Session, item: _Item) -> None:
        """Insert one image (a SOPInstanceUID already present is counted as a duplicate)."""
        key = self.secret.path_key(item.path)
        self.known.add(key)
        if item.sop_uid in self.ids.sops:
            self.result.duplicates += 1
            return
        study_id = self._study(s, item)
        s.add(Image(
            sop_uid=item.sop_uid, series_id=self._series(s, item, study_id), study_id=study_id, path_key=key,
            path_enc=self.secret.encrypt_path(item.path), view=item.view or "UNKNOWN", modality=item.modality,
            rows=item.rows, columns=item.columns, photometric=item.photometric, transfer_syntax=item.transfer_syntax,
        ))
        self.ids.sops.add(item.sop_uid)
        self.result.images_added += 1
        # A file indexed after all is no longer a failure.
        s.query(Failure).filter(Failure.path_key == key).delete()

    def add_failure(self, s: Session, path: str, stage: str, reason: str, detail: str = "") -> None:
        """Record a file that cannot be indexed."""
        text = f"{reason}: {detail}" if detail and detail != path else reason
        self.store.add_failure(s, self.secret.path_key(path), self.secret.encrypt_path(path), stage,
                               scrub_path(text, path))
        self.result.failures_added += 1
        self.result.skipped[reason] += 1

    def add_report(self, s: Session, study_id: int, report: Report, source: str) -> None:
        """Insert the report of a study with its sections (skipped when the study has one)."""
        if s.scalar(select(ReportRow.id).where(ReportRow.study_id == study_id)) is not None:
            return
        sections = section_rows(report)
        if not sections:
            return
        row = ReportRow(study_id=study_id, source=source, text=report[2] or "\n".join(t for _, t in sections))
        s.add(row)
        s.flush()
        for kind, text in sections:
            s.add(Section(report_id=row.id, study_id=study_id, kind=kind, text=text))
        self.result.reports_added += 1
        self.result.sections_added += len(sections)

    # ------------------------------------------------------------------------------ sources
    def catalogue_pacs(
        self, root: Path, *, reports_csv: Optional[Path] = None, body_part_filter: bool = True,
        workers: int = 1, progress: bool = False,
    ) -> CatalogueResult:
        """Walk a PACS export: new files become image, SR or failure rows, in batches."""
        skips = SkipLog()
        sr_paths: Dict[str, List[str]] = {}

        skip_key = self.secret.path_key(str(Path(reports_csv).resolve())) if reports_csv is not None else None

        def new_files() -> Iterator[Path]:
            for path in candidate_files(root, skips):
                if skip_key is not None and self.secret.path_key(str(path)) == skip_key:
                    continue  # the RIS export given with --reports often sits inside the export folder
                self.result.files_seen += 1
                if self.secret.path_key(str(path)) in self.known:
                    self.result.files_known += 1
                    continue
                yield path

        bar = _bar(progress, "cataloguing files", "file")
        batch: List[Tuple[str, Any, Optional[str], str]] = []
        for found in iter_headers(new_files(), workers=workers):
            batch.append(found)
            if len(batch) >= BATCH:
                self._commit_headers(batch, sr_paths, body_part_filter)
                bar.update(len(batch))
                batch = []
        self._commit_headers(batch, sr_paths, body_part_filter)
        bar.update(len(batch))
        bar.close()
        # DICOMDIRs and zip files are skipped by name: counted, not failures.
        self.result.skipped.update(skips.counts)
        self.attach_reports(reports_csv, sr_paths)
        return self.result

    def _commit_headers(self, batch: List[Tuple[str, Any, Optional[str], str]], sr_paths: Dict[str, List[str]],
                        body_part_filter: bool) -> None:
        if not batch:
            return
        with self.store.session() as s:
            for path, header, reason, detail in batch:
                if header is None:
                    self.add_failure(s, path, "scan", reason or "unreadable DICOM", detail)
                    continue
                if is_structured_report(header):
                    if header.study_instance_uid:
                        sr_paths.setdefault(header.study_instance_uid, []).append(path)
                    continue
                why_not = radiograph_skip_reason(header, body_part_filter=body_part_filter)
                if why_not is not None:
                    self.add_failure(s, path, "scan", why_not)
                    continue
                self.add_image(s, _item_from_header(path, header))

    def catalogue_manifest(self, manifest: Path, *, progress: bool = False) -> CatalogueResult:
        """Catalogue the rows of a manifest from ``cxr-search data prepare`` (reports included)."""
        bar = _bar(progress, "cataloguing manifest", "row")
        reports: Dict[str, Report] = {}
        batch: List[ManifestRow] = []
        for row in iter_manifest(manifest):
            self.result.files_seen += 1
            if row.findings or row.impression or row.report_text:
                reports.setdefault(row.study_id, (row.findings, row.impression, row.report_text))
            path = _resolve(row.image_path, manifest)
            if self.secret.path_key(path) in self.known:
                self.result.files_known += 1
                continue
            batch.append(row)
            if len(batch) >= BATCH:
                self._commit_rows(batch, manifest)
                bar.update(len(batch))
                batch = []
        self._commit_rows(batch, manifest)
        bar.update(len(batch))
        bar.close()
        with self.store.session() as s:
            for study_uid, report in reports.items():
                sid = self.ids.studies.get(study_uid)
                if sid is not None:
                    self.add_report(s, sid, report, "manifest")
        return self.result

    def _commit_rows(self, batch: List[ManifestRow], manifest: Path) -> None:
        if not batch:
            return
        with self.store.session() as s:
            for row in batch:
                self.add_image(s, _item_from_row(row, manifest))

    def attach_reports(self, reports_csv: Optional[Path], sr_paths: Dict[str, List[str]]) -> None:
        """Give studies without a report one from the CSV (first) or their SR objects."""
        with self.store.session() as s:
            missing = s.execute(
                select(Study.id, Study.study_uid, Study.accession_key).where(~Study.id.in_(select(ReportRow.study_id)))
            ).all()
        if not missing:
            return
        by_key = {acc: sid for sid, _, acc in missing if acc}
        by_uid = {uid: sid for sid, uid, _ in missing}
        found: Dict[int, Tuple[Report, str]] = {}
        if reports_csv is not None:
            acc_reports, uid_reports, _ = read_csv_reports(reports_csv, _KeyedSet(self.secret, by_key), set(by_uid))
            for acc, report in acc_reports.items():
                found.setdefault(by_key[self.secret.accession_key(acc)], (report, "csv"))
            for uid, report in uid_reports.items():
                found.setdefault(by_uid[uid], (report, "csv"))
        skips = SkipLog()
        for uid, paths in sr_paths.items():
            sid = by_uid.get(uid)
            if sid is not None and sid not in found:
                report = best_sr_report(paths, skips)
                if report is not None:
                    found[sid] = (report, "sr")
        with self.store.session() as s:
            for sid, (report, source) in found.items():
                self.add_report(s, sid, report, source)


class _KeyedSet:
    """A set of accession numbers known only by their keys: ``acc in s`` tests its HMAC."""

    def __init__(self, secret: IndexSecret, keys: Iterable[str]) -> None:
        self.secret = secret
        self.keys = set(keys)

    def __contains__(self, accession: object) -> bool:
        return isinstance(accession, str) and self.secret.accession_key(accession) in self.keys


def _item_from_header(path: str, h: Any) -> _Item:
    return _Item(
        path=path, sop_uid=h.sop_instance_uid, study_uid=h.study_instance_uid, series_uid=h.series_instance_uid,
        # The study stands in for a missing PatientID: it becomes its own patient.
        patient_source=h.patient_id or f"study:{h.study_instance_uid}",
        study_date=h.study_date, age=h.age_years, sex=h.sex, view=h.view or "UNKNOWN", modality=h.modality,
        rows=h.rows, columns=h.columns, photometric=h.photometric_interpretation,
        transfer_syntax=h.transfer_syntax_uid, accession=h.accession_number,
    )


def _resolve(image_path: str, manifest: Path) -> str:
    p = Path(image_path)
    return str(p if p.is_absolute() else (manifest.parent / p).resolve())


def _item_from_row(row: ManifestRow, manifest: Path) -> _Item:
    try:
        date = _dt.date.fromisoformat(row.study_date) if row.study_date else None
    except ValueError:
        date = None
    return _Item(
        path=_resolve(row.image_path, manifest), sop_uid=row.sop_instance_uid or f"{row.dataset}:{row.image_id}",
        study_uid=row.study_id, series_uid=row.series_instance_uid or None,
        patient_source=f"{row.dataset}:{row.patient_id}", study_date=date, age=row.age, sex=row.sex or None,
        view=row.view or "UNKNOWN", accession=row.accession_number or None,
    )


def catalogue(
    store: Store, secret: IndexSecret, archive: Path, *, reports_csv: Optional[Path] = None, workers: int = 1,
    body_part_filter: bool = True, progress: bool = False,
) -> CatalogueResult:
    """Catalogue a PACS export folder or a manifest CSV into the store.

    Raises:
        DatasetError: The archive or reports CSV does not exist.
    """
    archive = Path(archive).expanduser()
    if reports_csv is not None and not Path(reports_csv).is_file():
        raise DatasetError(f"{reports_csv}: reports CSV not found; give the RIS export file")
    cat = Cataloguer(store, secret)
    if archive.is_dir():
        return cat.catalogue_pacs(archive.resolve(), reports_csv=reports_csv, workers=workers,
                                  body_part_filter=body_part_filter, progress=progress)
    if archive.is_file():
        if reports_csv is not None:
            raise SearchIndexError("--reports applies to a PACS export folder; a manifest carries its reports")
        return cat.catalogue_manifest(archive.resolve(), progress=progress)
    raise DatasetError(f"{archive}: no such folder or manifest; give a PACS export folder or a manifest CSV")


def _bar(enabled: bool, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit=unit, disable=not enabled)
