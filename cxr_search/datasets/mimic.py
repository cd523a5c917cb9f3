"""MIMIC-CXR-JPG 2.x (images, split, metadata, CheXpert labels) + MIMIC-CXR free-text reports.

Layout read (the official releases)::

    ROOT/mimic-cxr-2.0.0-split.csv.gz       dicom_id, study_id, subject_id, split
    ROOT/mimic-cxr-2.0.0-metadata.csv.gz    dicom_id, subject_id, study_id, ViewPosition, StudyDate, ...
    ROOT/mimic-cxr-2.0.0-chexpert.csv.gz    subject_id, study_id, 14 CheXpert labels
    ROOT/files/p10/p10000032/s50414267/<dicom_id>.jpg
    reports: ROOT/files/p10/p10000032/s50414267.txt, or ROOT/mimic-cxr-reports.zip, or ``reports=``
             (a folder holding ``files/`` or the ``pXX`` folders, or the zip)

Rules: the official split; view from ViewPosition (ViewCodeSequence meaning as a fallback);
findings / impression by :func:`cxr_search.reports.split_sections`; ``report_text`` = the longer of
the two (reference protocol); labels = the non-blank CheXpert (or NegBio) values. Images listed in the
metadata but absent on disk are skipped; studies without a report file keep their images (label-only).
The summary counts images per view and, per split, the studies without a PA or AP image, which the
``cxr-clip`` retrieval protocol leaves out (it queries one frontal image per study, PA before AP).
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from cxr_search.datasets.adapter_kit import (
    CsvTable,
    PrepareResult,
    SkipLog,
    find_file,
    find_optional_file,
    finish,
    format_date,
    require_dir,
    view_from_text,
)
from cxr_search.datasets.manifest import FRONTAL_VIEWS, SPLITS, ManifestRow, clean_labels
from cxr_search.errors import DatasetError, ReportError
from cxr_search.labels import CHEXPERT_LABELS, chexpert_row_to_labels
from cxr_search.reports import ReportSections, choose_report_text, read_report_text_file, split_sections

logger = logging.getLogger(__name__)

NAME = "mimic-cxr"
_HINT = "download MIMIC-CXR-JPG from PhysioNet and give its top folder (the one holding files/ and the csv.gz files)"
_LABEL_FILES = {"chexpert": "chexpert", "negbio": "negbio"}
_ZIP_MEMBER_RE = re.compile(r"(?:^|/)p(\d+)/s(\d+)\.txt$")
StudyKey = Tuple[str, str]
Report = Tuple[str, str, str]  # findings, impression, report_text


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


class _ReportSource:
    """Finds and parses the report of a (subject_id, study_id), from text files or a zip."""

    def __init__(self, root: Path, reports: Optional[Union[str, Path]]) -> None:
        self.kind = "none"
        self.location = ""
        self._files_dir: Optional[Path] = None
        self._zip: Optional[zipfile.ZipFile] = None
        self._members: Dict[StudyKey, str] = {}
        if reports is not None:
            path = Path(reports).expanduser()
            if path.is_file():
                self._open_zip(path)
            elif path.is_dir():
                self._use_dir(path / "files" if (path / "files").is_dir() else path)
            else:
                raise DatasetError(
                    f"{path}: MIMIC-CXR reports not found; give the folder with files/pXX/... or the zip"
                )
        else:
            zipped = find_optional_file(root, ["mimic-cxr-reports.zip"])
            if zipped is not None:
                self._open_zip(zipped)
            elif (root / "files").is_dir():
                self._use_dir(root / "files")

    def _use_dir(self, files_dir: Path) -> None:
        self.kind, self.location, self._files_dir = "folder", str(files_dir), files_dir

    def _open_zip(self, path: Path) -> None:
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DatasetError(f"{path}: not a readable zip file ({exc}); re-download mimic-cxr-reports.zip") from exc
        for name in self._zip.namelist():
            match = _ZIP_MEMBER_RE.search(name)
            if match:
                self._members.setdefault((match.group(1), match.group(2)), name)
        if not self._members:
            raise DatasetError(f"{path}: the zip holds no files/pXX/pNNN/sNNN.txt report; is it mimic-cxr-reports.zip?")
        self.kind, self.location = "zip", str(path)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def get(self, subject: str, study: str, skips: SkipLog) -> Optional[Report]:
        sections: Optional[ReportSections] = None
        if self._zip is not None:
            member = self._members.get((subject, study))
            if member is None:
                return None
            try:
                sections = split_sections(_decode(self._zip.read(member)))
            except (zipfile.BadZipFile, OSError, KeyError) as exc:
                skips.skip("unreadable report", f"{member}: {exc}")
                return None
        elif self._files_dir is not None:
            path = os.path.join(self._files_dir, f"p{subject[:2]}", f"p{subject}", f"s{study}.txt")
            if not os.path.isfile(path):
                return None
            try:
                sections = read_report_text_file(path)
            except ReportError as exc:
                skips.skip("unreadable report", exc)
                return None
        if sections is None:
            return None
        findings = sections.findings or ""
        impression = sections.impression or ""
        return findings, impression, choose_report_text(findings, impression, "longest") or ""


def prepare_mimic(
    root: Union[str, Path],
    *,
    reports: Optional[Union[str, Path]] = None,
    labels: str = "chexpert",
    check_files: bool = True,
) -> PrepareResult:
    """Build the MIMIC-CXR manifest.

    Args:
        root: The MIMIC-CXR-JPG folder.
        reports: Report folder or ``mimic-cxr-reports.zip``; by default ``ROOT/mimic-cxr-reports.zip``
            or the ``.txt`` files next to the image folders.
        labels: ``"chexpert"``, ``"negbio"`` (the matching ``*-<labels>.csv.gz``) or ``"none"``.
        check_files: Skip images whose JPEG is not on disk.

    Returns:
        The rows and summary.

    Raises:
        DatasetError: A missing split / metadata / label file, or a missing column (named).
    """
    base = require_dir(root, "MIMIC-CXR-JPG")
    if labels not in (*_LABEL_FILES, "none"):
        raise DatasetError(f"unknown MIMIC-CXR label source {labels!r}; use chexpert, negbio or none")
    skips = SkipLog()
    notes = []
    split_path = find_file(base, ["mimic-cxr-*-split.csv.gz", "mimic-cxr-*-split.csv"], "the split file", _HINT)
    meta_path = find_file(base, ["mimic-cxr-*-metadata.csv.gz", "mimic-cxr-*-metadata.csv"], "the metadata file", _HINT)

    split_of: Dict[str, str] = {}
    with CsvTable(split_path, ["dicom_id", "study_id", "subject_id", "split"], hint=_HINT) as table:
        for r in table:
            if r["split"] not in SPLITS:
                skips.skip(f"unknown split value {r['split']!r}", r["dicom_id"])
                continue
            split_of[r["dicom_id"]] = r["split"]

    label_of: Dict[StudyKey, Dict[str, float]] = {}
    if labels != "none":
        suffix = _LABEL_FILES[labels]
        label_path = find_file(
            base, [f"mimic-cxr-*-{suffix}.csv.gz", f"mimic-cxr-*-{suffix}.csv"], f"the {labels} label file",
            f"{_HINT}; or pass labels='none'",
        )
        with CsvTable(label_path, ["subject_id", "study_id", *CHEXPERT_LABELS], hint=_HINT) as table:
            for r in table:
                try:
                    label_of[(r["subject_id"], r["study_id"])] = clean_labels(chexpert_row_to_labels(r))
                except ValueError as exc:
                    skips.skip("invalid label value", f"{label_path.name} s{r['study_id']}: {exc}")

    source = _ReportSource(base, reports)
    if source.kind == "none":
        notes.append("no reports found (no mimic-cxr-reports.zip or files/**/sNNN.txt); pass reports=PATH to add them")
        logger.warning("%s: no MIMIC-CXR reports found; the manifest will have labels only", base)
    report_cache: Dict[StudyKey, Optional[Report]] = {}
    files_dir = str(base / "files")
    rows = []
    try:
        with CsvTable(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition"], hint=_HINT) as table:
            has_code = "ViewCodeSequence_CodeMeaning" in table.columns
            has_date = "StudyDate" in table.columns
            for r in table:
                dicom_id, subject, study = r["dicom_id"], r["subject_id"], r["study_id"]
                split = split_of.get(dicom_id)
                if split is None:
                    skips.skip("not in the split file", dicom_id)
                    continue
                if not subject or not study:
                    skips.skip("metadata row without subject_id/study_id", dicom_id)
                    continue
                # Plain string joins: pathlib costs ~40 us per path, minutes over 377k MIMIC images.
                image = os.path.join(files_dir, f"p{subject[:2]}", f"p{subject}", f"s{study}", f"{dicom_id}.jpg")
                if check_files and not os.path.isfile(image):
                    skips.skip("image file missing", image)
                    continue
                key = (subject, study)
                if key not in report_cache:
                    report_cache[key] = source.get(subject, study, skips)
                findings, impression, text = report_cache[key] or ("", "", "")
                study_labels = label_of.get(key, {})
                rows.append(
                    ManifestRow(
                        dataset=NAME,
                        split=split,
                        patient_id=subject,
                        study_id=study,
                        image_id=dicom_id,
                        image_path=image,
                        view=view_from_text(r["ViewPosition"], r["ViewCodeSequence_CodeMeaning"] if has_code else None),
                        study_date=format_date(r["StudyDate"]) if has_date else "",
                        findings=findings,
                        impression=impression,
                        report_text=text,
                        labels=study_labels,
                        label_vocab="chexpert" if study_labels else "",
                    )
                )
    finally:
        source.close()
    studies_with_report = sum(1 for v in report_cache.values() if v and v[2])
    if source.kind != "none" and report_cache and not studies_with_report:
        notes.append(f"no report matched any study in {source.location}; check the reports option")
    return finish(
        NAME, base, rows, skips, notes=notes,
        extra={"report_source": source.kind, "report_location": source.location, **_view_counts(rows)},
    )


def _view_counts(rows: List[ManifestRow]) -> Dict[str, Any]:
    """Images per view (from ViewPosition) and, per split, the studies without a PA or AP image.

    The cxr-clip retrieval protocol queries one frontal image per study (PA before AP) and leaves
    these studies out; the counts let a user see how many before running it.
    """
    frontal: Dict[Tuple[str, str], bool] = {}
    for row in rows:
        key = (row.split, row.study_id)
        frontal[key] = frontal.get(key, False) or row.view in FRONTAL_VIEWS
    without = Counter(split for (split, _), has in frontal.items() if not has)
    return {
        "views": dict(sorted(Counter(r.view for r in rows).items())),
        "studies_without_frontal": {split: without[split] for split in SPLITS if split in without},
    }


__all__ = ["NAME", "prepare_mimic"]
