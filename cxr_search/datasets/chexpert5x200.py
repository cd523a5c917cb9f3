"""CheXpert 5x200: GLoRIA's ``chexpert_5x200.csv`` (1,000 frontal CheXpert train images, 200 per class).

Columns read: ``Path``, ``Report Impression`` and the five class columns (Atelectasis,
Cardiomegaly, Consolidation, Edema, Pleural Effusion) of which exactly one is 1.0 per row. Paths are
re-rooted under ROOT (the user's CheXpert folder, as for :mod:`cxr_search.datasets.chexpert`).
The impression is the row's text: ``impression`` = ``report_text`` = the whitespace-normalised
"Report Impression". Labels are the one-hot five classes. Every row is ``test``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Tuple, Union

from cxr_search.datasets.adapter_kit import CsvTable, PrepareResult, SkipLog, finish, parse_float, require_dir
from cxr_search.datasets.chexpert import chexpert_base, chexpert_view, reroot_path, study_and_image_id
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.dicom.values import parse_sex
from cxr_search.errors import DatasetError
from cxr_search.reports import normalize_whitespace

logger = logging.getLogger(__name__)

NAME = "chexpert5x200"
#: The five classes in GLoRIA's order.
CLASSES: Tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
_HINT = "give GLoRIA's chexpert_5x200.csv (csv=PATH) and the CheXpert folder its Path values point into"


def prepare_chexpert5x200(
    root: Union[str, Path],
    *,
    csv: Optional[Union[str, Path]] = None,
    check_files: bool = True,
) -> PrepareResult:
    """Build the CheXpert 5x200 manifest.

    Args:
        root: The CheXpert-v1.0 (or -small) folder, or the folder containing it.
        csv: ``chexpert_5x200.csv``; default ``ROOT/chexpert_5x200.csv``.
        check_files: Skip rows whose image is not on disk.

    Returns:
        The rows and summary.

    Raises:
        DatasetError: The CSV is missing or lacks a column (named).
    """
    base = chexpert_base(require_dir(root, "CheXpert"))
    csv_path = Path(csv).expanduser() if csv is not None else base / "chexpert_5x200.csv"
    if not csv_path.is_file() and csv is None and (Path(root) / "chexpert_5x200.csv").is_file():
        csv_path = Path(root) / "chexpert_5x200.csv"
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: chexpert_5x200.csv not found; {_HINT}")
    skips = SkipLog()
    rows = []
    with CsvTable(csv_path, ["Path", "Report Impression", *CLASSES], hint=_HINT) as table:
        has_view = "Frontal/Lateral" in table.columns and "AP/PA" in table.columns
        for r in table:
            rel = r["Path"]
            try:
                patient, study_id, image_id = study_and_image_id(rel)
            except ValueError as exc:
                skips.skip("malformed Path", exc)
                continue
            positives = [c for c in CLASSES if (parse_float(r[c]) or 0.0) == 1.0]
            if len(positives) != 1:
                skips.skip("not exactly one class marked 1.0", rel)
                continue
            impression = normalize_whitespace(r["Report Impression"])
            if not impression:
                skips.skip("empty Report Impression", rel)
                continue
            image = reroot_path(base, rel)
            if check_files and not os.path.isfile(image):
                skips.skip("image file missing", image)
                continue
            view = chexpert_view(r["Frontal/Lateral"], r["AP/PA"]) if has_view else "UNKNOWN"
            rows.append(
                ManifestRow(
                    dataset=NAME,
                    split="test",
                    patient_id=patient,
                    study_id=study_id,
                    image_id=image_id,
                    image_path=image,
                    view=view,
                    sex=parse_sex(r.get("Sex")) or "",
                    age=parse_float(r.get("Age")),
                    impression=impression,
                    report_text=impression,
                    labels={c: 1.0 if c == positives[0] else 0.0 for c in CLASSES},
                    label_vocab="chexpert5x200",
                )
            )
    return finish(NAME, base, rows, skips, extra={"csv": str(csv_path)})


__all__ = ["CLASSES", "NAME", "prepare_chexpert5x200"]
