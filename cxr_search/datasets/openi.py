"""OpenI (Indiana University chest X-ray collection): ``ecgen-radiology/*.xml`` + PNG images.

One row per image of every report that has at least one image on disk AND a findings or impression
section (the reference retrieval protocol needs a text). study_id is the report's ``uId``
(``CXR1``), image_id the ``parentImage`` id (file ``<id>.png``, found anywhere below ROOT).
OpenI has no patient ids; each report is treated as its own patient (patient_id = study_id).

Views: the XML and the PNGs do not record the view, so without more information ``view`` is
``UNKNOWN`` (a note says so, and ``bench retrieval --protocol cxr-clip`` then warns that its query may be
a lateral). Two sources give it, normalised to PA / AP / LATERAL / LL / RL like every other view
(:func:`cxr_search.dicom.values.normalise_view`):

* ``dicom=DIR``: the release's DICOM originals (``NLMCXR_dcm.tgz``, files ``<n>_IM-....dcm``), read with
  the project's header reader (ViewPosition, then ViewCodeSequence, SeriesDescription, ... as fallbacks);
* ``views=CSV``: a header table with one row per image: an id column (``image_id``, ``filename``,
  ``file_name``, ``dicom_id`` or ``ImageID``) and ``ViewPosition`` (or ``view_position``, ``view``);
  ``SeriesDescription`` / ``ProtocolName`` columns, when present, are fallbacks.

An id matches a PNG image id exactly, or by report number and ``IM-...`` part: the PNG
``CXR1_1_IM-0001-4001`` and the DICOM ``1_IM-0001-4001.dcm`` (or ``1_IM-0001-4001.dcm.png``) are the
same image. Images without a matching record keep ``UNKNOWN`` and are counted. Within a study, rows are
ordered frontal first, then by image id.

Split: OpenI is an evaluation set, so every row is ``test``; ``split="seeded"`` instead makes a
GLoRIA-style 70/15/15 split of the reports (seed ``seed``, reports in numeric uId order).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from cxr_search.datasets.adapter_kit import (
    CsvTable,
    PrepareResult,
    SkipLog,
    finish,
    index_files,
    require_dir,
    view_from_text,
    walk_files,
)
from cxr_search.datasets.header_scan import iter_headers
from cxr_search.datasets.manifest import FRONTAL_VIEWS, ManifestRow
from cxr_search.datasets.splits import gloria_split
from cxr_search.errors import ConfigError, DatasetError, ReportError
from cxr_search.reports import OpenIReport, choose_report_text, read_openi_xml

logger = logging.getLogger(__name__)

NAME = "openi"
_HINT = "give the folder holding ecgen-radiology/ (the unpacked NLMCXR_reports.tgz) and the PNG images"
_SPLIT_MODES = ("test", "seeded")
_DICOM_SUFFIXES = (".dcm", ".dicom")
_ID_COLUMNS = ("image_id", "filename", "file_name", "dicom_id", "ImageID")
_VIEW_COLUMNS = ("ViewPosition", "view_position", "view")
_FALLBACK_COLUMNS = ("SeriesDescription", "ProtocolName")
_FILE_SUFFIX_RE = re.compile(r"(\.(png|dcm|dicom|jpe?g))+$", re.IGNORECASE)
_IMAGE_KEY_RE = re.compile(r"^(?:CXR)?(\d+)_(?:\d+_)?(IM-[\w.-]+)$", re.IGNORECASE)


def _natural_key(text: str) -> Tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def image_keys(name: str) -> List[str]:
    """Lookup keys of an OpenI image name: the bare id, then ``<report number>/<IM-... part>``.

    ``CXR1_1_IM-0001-4001``, ``1_IM-0001-4001.dcm`` and ``.../1_IM-0001-4001.dcm.png`` share the second key.
    """
    stem = _FILE_SUFFIX_RE.sub("", name.strip().replace("\\", "/").rsplit("/", 1)[-1])
    keys = [stem]
    match = _IMAGE_KEY_RE.match(stem)
    if match:
        keys.append(f"{int(match.group(1))}/{match.group(2).upper()}")
    return keys


class _ViewTable:
    """Image name -> normalised view, with the bookkeeping of what matched."""

    def __init__(self, source: str, location: str) -> None:
        self.source, self.location = source, location
        self._views: Dict[str, str] = {}
        self.records = 0
        self.unreadable = 0

    def add(self, name: str, view: str) -> None:
        self.records += 1
        for key in image_keys(name):
            self._views.setdefault(key, view)

    def get(self, image_id: str) -> Optional[str]:
        for key in image_keys(image_id):
            if key in self._views:
                return self._views[key]
        return None


def _views_from_dicom(folder: Union[str, Path], workers: int) -> _ViewTable:
    base = Path(folder).expanduser()
    if not base.is_dir():
        raise DatasetError(f"{base}: OpenI DICOM folder not found; give dicom= the unpacked NLMCXR_dcm.tgz folder")
    table = _ViewTable("dicom", str(base))
    paths = (p for p in walk_files(base) if p.name.lower().endswith(_DICOM_SUFFIXES))
    for path, header, reason, detail in iter_headers(paths, workers=workers):
        if header is None:
            table.unreadable += 1
            logger.debug("%s: %s (%s)", path, reason, detail)
            continue
        table.add(Path(path).name, header.view or "UNKNOWN")
    if table.records == 0:
        raise DatasetError(f"{base}: no readable .dcm file below dicom=; give the folder of the unpacked "
                           "NLMCXR_dcm.tgz (files <n>_IM-....dcm)")
    return table


def _views_from_csv(path: Union[str, Path]) -> _ViewTable:
    csv_path = Path(path).expanduser()
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: views table not found; give views= a CSV with an image id and ViewPosition")
    table = _ViewTable("views", str(csv_path))
    hint = (f"views= needs an id column ({', '.join(_ID_COLUMNS)}) and a view column "
            f"({', '.join(_VIEW_COLUMNS)}) with one row per image")
    with CsvTable(csv_path, [], hint=hint) as rows:
        id_col = next((c for c in _ID_COLUMNS if c in rows.columns), None)
        view_col = next((c for c in _VIEW_COLUMNS if c in rows.columns), None)
        if id_col is None or view_col is None:
            raise DatasetError(f"{csv_path}: columns found: {', '.join(rows.columns) or 'none'}; {hint}")
        fallbacks = [c for c in _FALLBACK_COLUMNS if c in rows.columns]
        for r in rows:
            if r[id_col]:
                table.add(r[id_col], view_from_text(r[view_col], *(r[c] for c in fallbacks)))
    if table.records == 0:
        raise DatasetError(f"{csv_path}: the views table has no rows; {hint}")
    return table


def _report_dir(base: Path) -> Path:
    direct = base / "ecgen-radiology"
    if direct.is_dir():
        return direct
    found = sorted(p for p in base.rglob("ecgen-radiology") if p.is_dir())
    if found:
        return found[0]
    raise DatasetError(f"{base}: folder ecgen-radiology/ with the OpenI XML reports not found; {_HINT}")


def prepare_openi(
    root: Union[str, Path],
    *,
    split: str = "test",
    seed: int = 0,
    dicom: Optional[str] = None,
    views: Optional[str] = None,
    workers: int = 1,
) -> PrepareResult:
    """Build the OpenI manifest.

    Args:
        root: Folder holding ``ecgen-radiology/`` and the PNG images (any depth).
        split: ``"test"`` (everything is test) or ``"seeded"`` (70/15/15 by report).
        seed: Seed of the ``"seeded"`` split.
        dicom: Folder of the release's DICOM files: each image's view is read from its header.
        views: CSV header table (image id + ViewPosition per image): the views are read from it.
        workers: Processes reading DICOM headers (``dicom`` only).

    Returns:
        The rows and summary; the summary's ``view_source`` (``dicom``, ``views`` or ``none``), ``views``
        (images per view), ``images_without_view_record`` and ``studies_without_frontal`` say what the
        view information covers.

    Raises:
        ConfigError: Both ``dicom`` and ``views`` given.
        DatasetError: No ``ecgen-radiology`` folder, or no XML file in it, an unknown split mode, a
            ``dicom`` folder without readable DICOM files, a ``views`` table without the needed columns,
            or view records none of which matches an image.
    """
    if split not in _SPLIT_MODES:
        raise DatasetError(f"unknown OpenI split mode {split!r}; use 'test' or 'seeded'")
    if dicom and views:
        raise ConfigError("give OpenI views either from DICOM headers (dicom=DIR) or from a table (views=CSV), not both")
    base = require_dir(root, "OpenI")
    xml_dir = _report_dir(base)
    xml_files = sorted((p for p in xml_dir.iterdir() if p.suffix.lower() == ".xml"), key=lambda p: _natural_key(p.stem))
    if not xml_files:
        raise DatasetError(f"{xml_dir}: no .xml report in ecgen-radiology/; {_HINT}")
    view_table: Optional[_ViewTable] = None
    if dicom:
        view_table = _views_from_dicom(dicom, workers)
    elif views:
        view_table = _views_from_csv(views)
    images, duplicates = index_files(base, (".png",))
    if duplicates:
        logger.warning("%s: %d PNG names occur twice; the first in sorted order is used", base, duplicates)
    skips = SkipLog()
    kept: List[Tuple[OpenIReport, List[Path], List[str]]] = []
    for xml in xml_files:
        try:
            report = read_openi_xml(xml)
        except ReportError as exc:
            skips.skip("unreadable report", exc)
            continue
        if not report.image_ids:
            skips.skip("report without images", report.uid)
            continue
        if not (report.findings or report.impression):
            skips.skip("report without findings or impression", report.uid, count=1)
            continue
        paths, ids = [], []
        for image_id in report.image_ids:
            path = images.get(image_id)
            if path is None:
                skips.skip("image file missing", f"{image_id}.png")
                continue
            paths.append(path)
            ids.append(image_id)
        if not paths:
            skips.skip("report whose images are all missing", report.uid)
            continue
        kept.append((report, paths, ids))

    split_of: Dict[str, str] = {}
    if split == "seeded":
        split_of = gloria_split([r.uid for r, _, _ in kept], seed=seed)
    rows = []
    unmatched: List[str] = []
    for report, paths, ids in kept:
        findings = report.findings or ""
        impression = report.impression or ""
        text = choose_report_text(findings, impression, "longest") or ""
        for path, image_id in zip(paths, ids, strict=False):
            view = view_table.get(image_id) if view_table is not None else None
            if view is None and view_table is not None:
                unmatched.append(image_id)
            rows.append(
                ManifestRow(
                    dataset=NAME,
                    split=split_of.get(report.uid, "test"),
                    patient_id=report.uid,
                    study_id=report.uid,
                    image_id=image_id,
                    image_path=str(path),
                    view=view or "UNKNOWN",
                    findings=findings,
                    impression=impression,
                    report_text=text,
                )
            )
    notes, extra = _view_summary(rows, view_table, unmatched)
    return finish(
        NAME, base, rows, skips, seeded_split=split == "seeded", notes=notes,
        extra={"reports_read": len(xml_files), "split_mode": split, **extra},
    )


def _view_summary(rows: List[ManifestRow], table: Optional[_ViewTable],
                  unmatched: List[str]) -> Tuple[List[str], Dict[str, Any]]:
    """Notes and summary entries on the view information (raises when none of it matched)."""
    studies: Dict[str, bool] = {}
    for row in rows:
        studies[row.study_id] = studies.get(row.study_id, False) or row.view in FRONTAL_VIEWS
    extra: Dict[str, Any] = {
        "view_source": table.source if table is not None else "none",
        "views": dict(sorted(Counter(r.view for r in rows).items())),
        "studies_without_frontal": sum(1 for frontal in studies.values() if not frontal),
    }
    notes: List[str] = []
    if table is None:
        notes.append("the OpenI XML and PNGs carry no view, so every view is UNKNOWN; pass -O dicom=DIR (the "
                     "release's DICOM files) or -O views=CSV so that retrieval can query frontal images")
        return notes, extra
    extra.update(view_location=table.location, view_records=table.records, images_without_view_record=len(unmatched))
    if table.unreadable:
        extra["dicom_unreadable"] = table.unreadable
        notes.append(f"{table.unreadable} DICOM file(s) below {table.location} could not be read")
    if rows and len(unmatched) == len(rows):
        raise DatasetError(f"{table.location}: none of the {table.records} view records matches an OpenI image "
                           f"(images are named like {rows[0].image_id!r}); check the {table.source}= option")
    if unmatched:
        notes.append(f"{len(unmatched)} image(s) have no view record in {table.location} (e.g. {unmatched[0]}); "
                     "their view is UNKNOWN")
    if extra["studies_without_frontal"]:
        notes.append(f"{extra['studies_without_frontal']} studies have no PA or AP image; the cxr-clip retrieval "
                     "protocol leaves them out")
    return notes, extra


__all__ = ["NAME", "image_keys", "prepare_openi"]
