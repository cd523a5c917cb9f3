"""SIIM-ACR Pneumothorax Segmentation: ``train-rle.csv`` + nested DICOM images.

``train-rle.csv`` (ImageId, EncodedPixels) has one row per mask; the public file writes the second
header as ``" EncodedPixels"`` and its values as ``" -1"`` (leading spaces), which are stripped.
``-1`` means no pneumothorax; an image is positive when any of its rows has a mask. Kaggle's
stage-2 ``stage_2_train.csv`` (same columns, no spaces) is read the same way.

Images are ``dicom-images-train/<study>/<series>/<ImageId>.dcm``; the tree is walked once and
indexed by file name.

Split: GLoRIA-style 70/15/15 with ``random_state`` 0, but over distinct patients (the DICOM
PatientID, or the ImageId when headers are not read) in order of first appearance in the CSV.
GLoRIA split the raw mask rows, which puts the masks of one image into different splits; this
split cannot reproduce that leak, so its assignment differs from GLoRIA's files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Tuple, Union

from cxr_search.datasets.adapter_kit import (
    CsvTable,
    PrepareResult,
    SkipLog,
    find_file,
    finish,
    index_files,
    require_dir,
)
from cxr_search.datasets.header_scan import header_fields, readable_image_headers
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.datasets.splits import gloria_split, unique_in_order

logger = logging.getLogger(__name__)

NAME = "siim-acr"
LABEL = "Pneumothorax"
_HINT = "give the SIIM-ACR folder holding train-rle.csv and dicom-images-train/"


def read_rle_labels(path: Path) -> Dict[str, float]:
    """ImageId -> 1.0 (any mask) / 0.0 (only ``-1``), in order of first appearance.

    Raises:
        DatasetError: A missing ImageId / EncodedPixels column (the leading-space header counts).
    """
    labels: Dict[str, float] = {}
    with CsvTable(path, ["ImageId", "EncodedPixels"], hint=_HINT) as table:
        for r in table:
            image_id = r["ImageId"]
            if not image_id:
                continue
            # A blank cell carries no mask either; only run-length data marks a pneumothorax.
            positive = 1.0 if r["EncodedPixels"] not in ("-1", "") else 0.0
            labels[image_id] = max(labels.get(image_id, 0.0), positive)
    return labels


def prepare_siim(
    root: Union[str, Path],
    *,
    seed: int = 0,
    read_headers: bool = True,
    workers: int = 1,
) -> PrepareResult:
    """Build the SIIM-ACR manifest.

    Args:
        root: The dataset folder.
        seed: ``random_state`` of the 70/15/15 split.
        read_headers: Read each DICOM header (patient id, sex, age, view, UIDs; unreadable files
            are skipped). Without it each image is its own patient.
        workers: Processes for the header reads.

    Returns:
        The rows and summary.

    Raises:
        DatasetError: Missing label file or column (named).
    """
    base = require_dir(root, "SIIM-ACR")
    skips = SkipLog()
    csv_path = find_file(base, ["train-rle.csv", "stage_2_train.csv"], "train-rle.csv", _HINT)
    labels = read_rle_labels(csv_path)
    image_root = base / "dicom-images-train"
    images, duplicates = index_files(image_root if image_root.is_dir() else base, (".dcm", ".dicom"))
    if duplicates:
        logger.warning("%s: %d DICOM file names occur twice; the first in sorted order is used", base, duplicates)
    entries: List[Tuple[str, Path]] = []
    for image_id in labels:
        path = images.get(image_id)
        if path is None:
            skips.skip("image file missing", image_id)
            continue
        entries.append((image_id, path))
    fields: Dict[str, Dict] = {}
    patient_of: Dict[str, str] = {}
    if read_headers:
        headers = readable_image_headers((p for _, p in entries), skips, workers=workers)
        fields = {path_str: header_fields(header) for path_str, header in headers.items()}
        patient_of = {path_str: header.patient_id for path_str, header in headers.items() if header.patient_id}
        entries = [(i, p) for i, p in entries if str(p) in fields]
    patients = [patient_of.get(str(p), image_id) for image_id, p in entries]
    split_of = gloria_split(unique_in_order(patients), seed=seed)
    rows = []
    for (image_id, path), patient in zip(entries, patients, strict=False):
        rows.append(
            ManifestRow(
                dataset=NAME,
                split=split_of[patient],
                patient_id=patient,
                study_id=image_id,
                image_id=image_id,
                image_path=str(path),
                labels={LABEL: labels[image_id]},
                label_vocab="siim",
                **fields.get(str(path), {}),
            )
        )
    return finish(NAME, base, rows, skips, seeded_split=True, extra={"split_seed": seed})


__all__ = ["LABEL", "NAME", "prepare_siim", "read_rle_labels"]
