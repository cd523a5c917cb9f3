"""RSNA Pneumonia Detection Challenge (stage 2): labels CSV + DICOM images.

``stage_2_train_labels.csv`` has one row per box (patientId, x, y, width, height, Target); an image
is pneumonia-positive when any of its rows has Target 1. ``stage_2_detailed_class_info.csv``
(patientId, class), when present, is cross-checked ("Lung Opacity" <=> Target 1) and mismatches are
reported. Images: ``stage_2_train_images/<patientId>.dcm``; RSNA has one image per patient, so the
patient, study and image ids are all the patientId.

Split: GLoRIA's 70/15/15 (``random_state`` 0) over the distinct patientIds in sorted order (pandas
``groupby`` order), computed on the whole label file before any image is skipped, so the
assignment equals GLoRIA's ``train.csv`` / ``val.csv`` / ``test.csv``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Union

from cxr_search.datasets.adapter_kit import (
    CsvTable,
    PrepareResult,
    SkipLog,
    find_file,
    find_optional_file,
    finish,
    require_dir,
)
from cxr_search.datasets.header_scan import header_fields, readable_image_headers
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.datasets.splits import gloria_split

logger = logging.getLogger(__name__)

NAME = "rsna-pneumonia"
LABEL = "Pneumonia"
_HINT = "give the RSNA Pneumonia folder holding stage_2_train_labels.csv and stage_2_train_images/"


def prepare_rsna(
    root: Union[str, Path],
    *,
    seed: int = 0,
    read_headers: bool = True,
    workers: int = 1,
) -> PrepareResult:
    """Build the RSNA Pneumonia manifest.

    Args:
        root: The dataset folder.
        seed: ``random_state`` of the 70/15/15 split (0 = GLoRIA's).
        read_headers: Read each DICOM header (sex, age, view, UIDs; unreadable files are skipped).
        workers: Processes for the header reads.

    Returns:
        The rows and summary.

    Raises:
        DatasetError: Missing label file or column (named).
    """
    base = require_dir(root, "RSNA Pneumonia")
    skips = SkipLog()
    notes: List[str] = []
    labels_path = find_file(base, ["stage_2_train_labels.csv"], "stage_2_train_labels.csv", _HINT)
    target: Dict[str, float] = {}
    with CsvTable(labels_path, ["patientId", "Target"], hint=_HINT) as table:
        for r in table:
            pid = r["patientId"]
            if not pid:
                continue
            if r["Target"] not in ("0", "1", "0.0", "1.0"):
                skips.skip("invalid Target value", f"{pid}: {r['Target']!r}")
                continue
            target[pid] = max(target.get(pid, 0.0), float(r["Target"]))

    detail_path = find_optional_file(base, ["stage_2_detailed_class_info.csv"])
    if detail_path is not None:
        mismatches = 0
        with CsvTable(detail_path, ["patientId", "class"], hint=_HINT) as table:
            for r in table:
                if r["patientId"] in target and (r["class"] == "Lung Opacity") != (target[r["patientId"]] == 1.0):
                    mismatches += 1
        if mismatches:
            notes.append(f"{mismatches} rows of {detail_path.name} disagree with Target ('Lung Opacity' = Target 1)")

    units = sorted(target)
    split_of = gloria_split(units, seed=seed)
    image_dir = base / "stage_2_train_images"
    entries = []
    for pid in units:
        path = image_dir / f"{pid}.dcm"
        if not path.is_file():
            skips.skip("image file missing", path)
            continue
        entries.append((pid, path))
    fields: Dict[str, Dict] = {}
    if read_headers:
        headers = readable_image_headers((p for _, p in entries), skips, workers=workers)
        fields = {path_str: header_fields(header) for path_str, header in headers.items()}
    rows = []
    for pid, path in entries:
        extra = fields.get(str(path))
        if read_headers and extra is None:
            continue
        rows.append(
            ManifestRow(
                dataset=NAME,
                split=split_of[pid],
                patient_id=pid,
                study_id=pid,
                image_id=pid,
                image_path=str(path),
                labels={LABEL: target[pid]},
                label_vocab="rsna",
                **(extra or {}),
            )
        )
    return finish(NAME, base, rows, skips, notes=notes, seeded_split=True, extra={"split_seed": seed})


__all__ = ["LABEL", "NAME", "prepare_rsna"]
