"""Cataloguing: archive (PACS export or manifest) to store rows, idempotent and committed in batches.

A PACS export is walked once; files already catalogued (by the HMAC of their path) are not read
again, so a killed run resumes where it stopped. Every other input is accounted for: it becomes an
image row (status ``pending``), a study's report (DICOM SR), or a failure row with its reason, of
stage ``scan`` (it failed), ``skipped`` (left out by rule: FIFOs are never opened, link loops are not
followed twice ...) or ``duplicate`` (another copy of its SOPInstanceUID is indexed); inputs of a
removed patient, study or instance (tombstones) are counted and leave no row. The identity these
counts satisfy is in :mod:`index.ingest_accounting`; the walk never stops on a bad file. Rows are
upserted by UID (SOPInstanceUID, SeriesInstanceUID, StudyInstanceUID), so a file copied twice into an
export is indexed once, and the copy indexed is one that decodes (:mod:`index.ingest_copies`).
Reports come from a RIS CSV (matched by accession number, then StudyInstanceUID), from DICOM SR
objects of the tree, or from the manifest (:mod:`index.ingest_reports`), and are split into
sections (findings, impression; the whole text when it has neither).
"""

from __future__ import annotations

import datetime as _dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cxr_search.datasets.header_scan import iter_headers
from cxr_search.datasets.manifest import ManifestRow, iter_manifest
from cxr_search.datasets.pacs import export_entries, is_structured_report, radiograph_skip_reason
from cxr_search.errors import DatasetError, SearchIndexError
from index.ingest_accounting import CatalogueResult, Tombstones, patient_source
from index.ingest_copies import FOUND_FIRST, duplicate_reason, duplicate_sop, not_decoded_note, switch_copy, was_tried
from index.ingest_reports import attach_reports, settle_manifest_reports
from index.privacy import IndexSecret, scrub_path
from index.store import (
    DECODE,
    DUPLICATE,
    FAILED,
    SCAN,
    SKIPPED,
    Failure,
    Image,
    Patient,
    Series,
    Store,
    Study,
)

logger = logging.getLogger(__name__)

BATCH = 500  # files per transaction: a kill -9 loses at most this much cataloguing work
_SEXES = {"M", "F", "O"}
#: Reasons of the inputs left out by rule (stage ``skipped``) that the header scan can also give.
_SKIP_PREFIXES = ("not a regular file",)
REPORTS_CSV_INSIDE = "the reports CSV given with --reports"

__all__ = ["BATCH", "CatalogueResult", "Cataloguer", "catalogue"]


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
        # Images whose file did not decode: a later copy of the same SOPInstanceUID takes their place.
        self.failed: Dict[str, int] = dict(s.execute(select(Image.sop_uid, Image.id).where(Image.status == FAILED)).all())


def _known_path_keys(s: Session) -> Set[str]:
    """Path keys of files already catalogued as images (failures are retried: the file may be fixed)."""
    return set(s.scalars(select(Image.path_key)).all())


class Cataloguer:
    """Upserts images, studies, series, patients, reports and failure rows into a store.

    Every input given to it is counted in :attr:`result` under exactly one outcome
    (:mod:`index.ingest_accounting`).

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
        self.tombstones = Tombstones(store, secret)
        self.result = CatalogueResult()
        self._added: Set[str] = set()  # path keys catalogued in this run (a manifest may repeat a file)

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

    def removed(self, patient: str, study_uid: str, sop_uid: str) -> bool:
        """Whether an input names a removed patient (its source string), study or instance (then it is counted
        and leaves no row)."""
        return self.tombstones.removed(patient, study_uid, sop_uid)

    def skip_by_request(self, s: Session, path: str) -> None:
        """Count an input of a removed patient, study or instance; any row an earlier run left for it goes."""
        s.execute(delete(Failure).where(Failure.path_key == self.secret.path_key(path)))
        self.result.skipped_by_request += 1

    def add_image(self, s: Session, item: _Item) -> None:
        """Catalogue one image: a new image row, the new copy of an image that failed to decode, or a duplicate."""
        key = self.secret.path_key(item.path)
        if key in self._added:  # the same file twice in one manifest: its first row accounts for it
            self.result.duplicates += 1
            return
        self._added.add(key)
        self.known.add(key)
        if item.sop_uid in self.ids.sops:
            self._another_copy(s, item, key)
            return
        study_id = self._study(s, item)
        s.add(Image(
            sop_uid=item.sop_uid, series_id=self._series(s, item, study_id), study_id=study_id, path_key=key,
            path_enc=self.secret.encrypt_path(item.path), view=item.view or "UNKNOWN", modality=item.modality,
            rows=item.rows, columns=item.columns, photometric=item.photometric, transfer_syntax=item.transfer_syntax,
        ))
        self.ids.sops.add(item.sop_uid)
        self.result.indexed += 1
        # A file indexed after all is no longer a failure.
        s.execute(delete(Failure).where(Failure.path_key == key))

    def _another_copy(self, s: Session, item: _Item, key: str) -> None:
        """A SOPInstanceUID already catalogued: replace a copy that failed to decode, else record a duplicate."""
        own = s.scalar(select(Failure).where(Failure.path_key == key))
        tried = own is not None and own.stage == DUPLICATE and was_tried(own.reason)
        failed_id = self.ids.failed.get(item.sop_uid)
        if failed_id is not None and not tried:
            image = s.get(Image, failed_id)
            if image is not None and image.status == FAILED:
                old = s.scalar(select(Failure.reason).where(Failure.path_key == image.path_key,
                                                              Failure.stage == DECODE))
                facts = {"rows": item.rows, "columns": item.columns, "photometric": item.photometric,
                         "transfer_syntax": item.transfer_syntax}
                switch_copy(s, self.store, image, key, self.secret.encrypt_path(item.path),
                            not_decoded_note(old or "failed in an earlier build"), facts)
                del self.ids.failed[item.sop_uid]
                self.result.indexed += 1
                self.result.replaced += 1
                return
        if own is not None and own.stage == DUPLICATE and duplicate_sop(own.reason) == item.sop_uid:
            self.result.duplicates += 1  # recorded by an earlier run, with what is known of this copy
            return
        self.record(s, item.path, DUPLICATE, duplicate_reason(item.sop_uid, FOUND_FIRST))

    def record(self, s: Session, path: str, stage: str, reason: str, detail: str = "") -> None:
        """Record an input that is not indexed (a failure, a skip or a duplicate) and count it.

        Args:
            s: Open session.
            path: The input (stored only encrypted; removed from the reason text).
            stage: ``scan``, ``skipped`` or ``duplicate``.
            reason: Short, stable reason (what the counts group by).
            detail: Longer message appended to the stored reason.
        """
        text = f"{reason}: {detail}" if detail and detail != path else reason
        self.store.add_failure(s, self.secret.path_key(path), self.secret.encrypt_path(path), stage,
                               scrub_path(text, path))
        if stage == SKIPPED:
            self.result.skipped += 1
            self.result.skipped_reasons[reason] += 1
        elif stage == DUPLICATE:
            self.result.duplicates += 1
        else:
            self.result.failures += 1
            self.result.failure_reasons[reason] += 1

    # ------------------------------------------------------------------------------ sources
    def catalogue_pacs(
        self, root: Path, *, reports_csv: Optional[Path] = None, body_part_filter: bool = True,
        workers: int = 1, progress: bool = False,
    ) -> CatalogueResult:
        """Walk a PACS export: every entry becomes an image, a report, or a row saying why not, in batches."""
        sr_paths: Dict[str, List[str]] = {}
        refused: List[Tuple[str, str, str]] = []  # (path, stage, reason) of entries that are not read
        csv_key = self.secret.path_key(str(Path(reports_csv).resolve())) if reports_csv is not None else None

        def new_files() -> Iterator[Path]:
            for entry in export_entries(root):
                self.result.files_seen += 1
                path = str(entry.path)
                if entry.reason:
                    refused.append((path, SCAN if entry.failed else SKIPPED, entry.reason))
                    if len(refused) >= BATCH:  # a tree of little else than FIFOs or links: commit as it goes
                        self._commit_headers([], refused, sr_paths, body_part_filter)
                    continue
                key = self.secret.path_key(path)
                if key == csv_key:  # the RIS export given with --reports often sits inside the export folder
                    refused.append((path, SKIPPED, REPORTS_CSV_INSIDE))
                elif key in self.known:
                    self.result.already_catalogued += 1
                else:
                    yield entry.path

        bar = _bar(progress, "cataloguing files", "file")
        batch: List[Tuple[str, Any, Optional[str], str]] = []
        for found in iter_headers(new_files(), workers=workers):
            batch.append(found)
            if len(batch) >= BATCH:
                self._commit_headers(batch, refused, sr_paths, body_part_filter)
                bar.update(len(batch))
                batch = []
        self._commit_headers(batch, refused, sr_paths, body_part_filter)
        bar.update(len(batch))
        bar.close()
        attach_reports(self, reports_csv, sr_paths)
        return self.result

    def _commit_headers(self, batch: List[Tuple[str, Any, Optional[str], str]], refused: List[Tuple[str, str, str]],
                        sr_paths: Dict[str, List[str]], body_part_filter: bool) -> None:
        if not batch and not refused:
            return
        with self.store.session() as s:
            for path, stage, reason in refused:
                self.record(s, path, stage, reason)
            refused.clear()
            for path, header, reason, detail in batch:
                self.take_header(s, path, header, reason, detail, sr_paths, body_part_filter=body_part_filter)

    def take_header(self, s: Session, path: str, header: Any, reason: Optional[str], detail: str,
                    sr_paths: Dict[str, List[str]], *, body_part_filter: bool = True) -> None:
        """Catalogue one file from its header read (:func:`cxr_search.datasets.header_scan.header_or_reason`).

        The one entry point for a file of any intake: an image row, an SR kept for its study's
        report (``sr_paths``, settled by :func:`index.ingest_reports.attach_reports`), a removed
        item (no row), or a row saying why it is not indexed.
        """
        if header is None:
            why = reason or "unreadable DICOM"
            self.record(s, path, SKIPPED if why.startswith(_SKIP_PREFIXES) else SCAN, why, detail)
            return
        study_uid, sop_uid = header.study_instance_uid or "", header.sop_instance_uid or ""
        if self.removed(patient_source(header), study_uid, sop_uid):
            self.skip_by_request(s, path)
            return
        if is_structured_report(header):
            if study_uid:
                sr_paths.setdefault(study_uid, []).append(path)
            else:
                self.record(s, path, SCAN, "SR with no StudyInstanceUID")
            return
        why_not = radiograph_skip_reason(header, body_part_filter=body_part_filter)
        if why_not is not None:
            self.record(s, path, SCAN, why_not)
            return
        self.add_image(s, _item_from_header(path, header))

    def catalogue_manifest(self, manifest: Path, *, progress: bool = False) -> CatalogueResult:
        """Catalogue the rows of a manifest from ``cxr-search data prepare`` (reports included)."""
        bar = _bar(progress, "cataloguing manifest", "row")
        reports: Dict[str, Tuple[str, str, str]] = {}
        batch: List[Tuple[_Item, bool]] = []  # (item, removed by request)
        for row in iter_manifest(manifest):
            self.result.files_seen += 1
            item = _item_from_row(row, manifest)
            removed = self.removed(item.patient_source, item.study_uid, item.sop_uid)
            if not removed:
                if row.findings or row.impression or row.report_text:
                    reports.setdefault(row.study_id, (row.findings, row.impression, row.report_text))
                key = self.secret.path_key(item.path)
                if key in self.known and key not in self._added:  # catalogued by an earlier run
                    self.result.already_catalogued += 1
                    continue
            batch.append((item, removed))
            if len(batch) >= BATCH:
                self._commit_items(batch)
                bar.update(len(batch))
                batch = []
        self._commit_items(batch)
        bar.update(len(batch))
        bar.close()
        settle_manifest_reports(self, reports)
        return self.result

    def _commit_items(self, batch: List[Tuple[_Item, bool]]) -> None:
        if not batch:
            return
        with self.store.session() as s:
            for item, removed in batch:
                if removed:
                    self.skip_by_request(s, item.path)
                else:
                    self.add_image(s, item)


def _item_from_header(path: str, h: Any) -> _Item:
    return _Item(
        path=path, sop_uid=h.sop_instance_uid, study_uid=h.study_instance_uid, series_uid=h.series_instance_uid,
        patient_source=patient_source(h), study_date=h.study_date, age=h.age_years, sex=h.sex,
        view=h.view or "UNKNOWN", modality=h.modality, rows=h.rows, columns=h.columns,
        photometric=h.photometric_interpretation, transfer_syntax=h.transfer_syntax_uid, accession=h.accession_number,
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
        result = cat.catalogue_pacs(archive.resolve(), reports_csv=reports_csv, workers=workers,
                                    body_part_filter=body_part_filter, progress=progress)
    elif archive.is_file():
        if reports_csv is not None:
            raise SearchIndexError("--reports applies to a PACS export folder; a manifest carries its reports")
        result = cat.catalogue_manifest(archive.resolve(), progress=progress)
    else:
        raise DatasetError(f"{archive}: no such folder or manifest; give a PACS export folder or a manifest CSV")
    if result.accounted() != result.files_seen:  # a bug, not a user error: say so loudly, keep the rows
        logger.error("intake accounting does not add up: %d inputs, %d accounted for (%s)", result.files_seen,
                     result.accounted(), result.to_dict())
    return result


def _bar(enabled: bool, desc: str, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(desc=desc, unit=unit, disable=not enabled)
