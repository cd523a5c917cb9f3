"""OpenI (Indiana University chest X-ray collection): ``ecgen-radiology/*.xml`` + PNG images.

One row per image of every report that has at least one image on disk AND a findings or impression
section (the reference retrieval protocol needs a text). study_id is the report's ``uId``
(``CXR1``), image_id the ``parentImage`` id (file ``<id>.png``, found anywhere below ROOT).
OpenI has no patient ids; each report is treated as its own patient (patient_id = study_id).
The XML does not record the view, so ``view`` is ``UNKNOWN`` and a study's rows are ordered by
image id.

Split: OpenI is an evaluation set, so every row is ``test``; ``split="seeded"`` instead makes a
GLoRIA-style 70/15/15 split of the reports (seed ``seed``, reports in numeric uId order).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, List, Tuple, Union

from cxr_search.datasets.adapter_kit import (
    PrepareResult,
    SkipLog,
    finish,
    index_files,
    require_dir,
)
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.datasets.splits import gloria_split
from cxr_search.errors import DatasetError, ReportError
from cxr_search.reports import OpenIReport, choose_report_text, read_openi_xml

logger = logging.getLogger(__name__)

NAME = "openi"
_HINT = "give the folder holding ecgen-radiology/ (the unpacked NLMCXR_reports.tgz) and the PNG images"
_SPLIT_MODES = ("test", "seeded")


def _natural_key(text: str) -> Tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


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
) -> PrepareResult:
    """Build the OpenI manifest.

    Args:
        root: Folder holding ``ecgen-radiology/`` and the PNG images (any depth).
        split: ``"test"`` (everything is test) or ``"seeded"`` (70/15/15 by report).
        seed: Seed of the ``"seeded"`` split.

    Returns:
        The rows and summary.

    Raises:
        DatasetError: No ``ecgen-radiology`` folder, or no XML file in it, or an unknown split mode.
    """
    if split not in _SPLIT_MODES:
        raise DatasetError(f"unknown OpenI split mode {split!r}; use 'test' or 'seeded'")
    base = require_dir(root, "OpenI")
    xml_dir = _report_dir(base)
    xml_files = sorted((p for p in xml_dir.iterdir() if p.suffix.lower() == ".xml"), key=lambda p: _natural_key(p.stem))
    if not xml_files:
        raise DatasetError(f"{xml_dir}: no .xml report in ecgen-radiology/; {_HINT}")
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
    for report, paths, ids in kept:
        findings = report.findings or ""
        impression = report.impression or ""
        text = choose_report_text(findings, impression, "longest") or ""
        for path, image_id in zip(paths, ids, strict=False):
            rows.append(
                ManifestRow(
                    dataset=NAME,
                    split=split_of.get(report.uid, "test"),
                    patient_id=report.uid,
                    study_id=report.uid,
                    image_id=image_id,
                    image_path=str(path),
                    view="UNKNOWN",
                    findings=findings,
                    impression=impression,
                    report_text=text,
                )
            )
    return finish(
        NAME, base, rows, skips, seeded_split=split == "seeded",
        extra={"reports_read": len(xml_files), "split_mode": split},
    )


__all__ = ["NAME", "prepare_openi"]
