"""VinDr-CXR: DICOM ``train/`` and ``test/`` images with image-level labels.

Official release (PhysioNet)::

    ROOT/train/<image_id>.dicom, ROOT/test/<image_id>.dicom
    ROOT/annotations/image_labels_train.csv   image_id, rad_id, one 0/1 column per label (3 readers/image)
    ROOT/annotations/image_labels_test.csv    image_id, [rad_id,] labels (consensus of 5 readers)

Reader aggregation (train): a finding label is positive (1.0) when ANY reader marked it, else
negative (0.0) -- the rule of the reference protocol ("train labels aggregated per image across
readers"). ``No finding`` is then derived, not aggregated: 1.0 exactly when no other label is
positive, so an image never says both "no finding" and a finding. The test file is already a
consensus and gets the same treatment (with one row per image, "any" is that row).

Kaggle's re-release has ``train.csv`` with one row per box (image_id, class_name, rad_id, box):
a class is positive when any reader drew a box of it, the other 14 local classes are negative,
and ``No finding`` is 1.0 when no reader drew any box. Kaggle publishes no test labels, so that
form gives a train split only (the official files are preferred when both exist).

Each VinDr image is its own study and patient (the DICOMs carry no usable patient id).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from cxr_search.datasets.adapter_kit import (
    CsvTable,
    PrepareResult,
    SkipLog,
    find_optional_file,
    finish,
    parse_float,
    require_dir,
)
from cxr_search.datasets.header_scan import header_fields, readable_image_headers
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import DatasetError
from cxr_search.labels import VINDR_CLASSES

logger = logging.getLogger(__name__)

NAME = "vindr-cxr"
NO_FINDING = "No finding"
_HINT = (
    "give the VinDr-CXR folder holding train/, test/ and annotations/image_labels_{train,test}.csv "
    "(or Kaggle's train.csv)"
)
#: The 14 local classes of Kaggle's box file (plus "No finding").
KAGGLE_CLASSES: Tuple[str, ...] = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis",
)  # fmt: skip


def aggregate_readers(votes: List[Dict[str, float]], label_names: List[str]) -> Dict[str, float]:
    """Per-image labels from several readers' 0/1 votes (rule in the module docstring).

    Args:
        votes: One dict label -> value per reader.
        label_names: Label columns in file order (``No finding`` included or not).

    Returns:
        label -> 1.0 / 0.0 in ``label_names`` order.
    """
    out: Dict[str, float] = {}
    for name in label_names:
        if name == NO_FINDING:
            continue
        out[name] = 1.0 if any(v.get(name, 0.0) >= 0.5 for v in votes) else 0.0
    if NO_FINDING in label_names:
        out[NO_FINDING] = 0.0 if any(out.values()) else 1.0
        out = {name: out[name] for name in label_names}
    return out


def _read_image_labels(path: Path, skips: SkipLog) -> Tuple[Dict[str, Dict[str, float]], List[str]]:
    """image_id -> aggregated labels from an official image_labels_*.csv."""
    with CsvTable(path, ["image_id", *VINDR_CLASSES], hint=_HINT) as table:
        label_names = [c for c in table.columns if c not in ("image_id", "rad_id") and c]
        votes: Dict[str, List[Dict[str, float]]] = {}
        for r in table:
            values: Dict[str, float] = {}
            for name in label_names:
                number = parse_float(r[name])
                if number is None and r[name]:
                    skips.skip("invalid label value", f"{path.name} {r['image_id']} {name}={r[name]!r}")
                values[name] = number or 0.0
            votes.setdefault(r["image_id"], []).append(values)
    return {image_id: aggregate_readers(v, label_names) for image_id, v in votes.items()}, label_names


def _read_kaggle(path: Path) -> Dict[str, Dict[str, float]]:
    """image_id -> labels from Kaggle's one-row-per-box train.csv."""
    boxed: Dict[str, set] = {}
    with CsvTable(path, ["image_id", "class_name"], hint=_HINT) as table:
        for r in table:
            classes = boxed.setdefault(r["image_id"], set())
            if r["class_name"] and r["class_name"].lower() != NO_FINDING.lower():
                classes.add(r["class_name"])
    names = list(KAGGLE_CLASSES) + sorted({c for cs in boxed.values() for c in cs} - set(KAGGLE_CLASSES))
    out: Dict[str, Dict[str, float]] = {}
    for image_id, classes in boxed.items():
        labels = {name: 1.0 if name in classes else 0.0 for name in names}
        labels[NO_FINDING] = 0.0 if classes else 1.0
        out[image_id] = labels
    return out


def _image_path(base: Path, folder: str, image_id: str) -> Optional[Path]:
    for suffix in (".dicom", ".dcm"):
        path = base / folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    return None


def prepare_vindr(
    root: Union[str, Path],
    *,
    read_headers: bool = True,
    workers: int = 1,
) -> PrepareResult:
    """Build the VinDr-CXR manifest.

    Args:
        root: The VinDr-CXR folder.
        read_headers: Read each DICOM header (sex, age, view, UIDs; unreadable files are skipped).
        workers: Processes for the header reads.

    Returns:
        The rows (official split; Kaggle form: train only) and summary.

    Raises:
        DatasetError: No label file, or a label file without ``image_id`` or one of the 18
            protocol classes (named).
    """
    base = require_dir(root, "VinDr-CXR")
    skips = SkipLog()
    notes: List[str] = []
    sources: List[Tuple[str, str, Dict[str, Dict[str, float]]]] = []  # (split, image folder, labels)
    official_train = find_optional_file(base, ["annotations/image_labels_train.csv", "image_labels_train.csv"])
    official_test = find_optional_file(base, ["annotations/image_labels_test.csv", "image_labels_test.csv"])
    if official_train is not None or official_test is not None:
        for path, split in ((official_train, "train"), (official_test, "test")):
            if path is None:
                notes.append(f"image_labels_{split}.csv not found: no {split} split")
                continue
            labels, _ = _read_image_labels(path, skips)
            sources.append((split, split, labels))
        form = "official"
    else:
        kaggle = find_optional_file(base, ["train.csv"])
        if kaggle is None:
            raise DatasetError(
                f"{base}: VinDr-CXR labels not found (looked for annotations/image_labels_train.csv, "
                f"annotations/image_labels_test.csv, train.csv); {_HINT}"
            )
        sources.append(("train", "train", _read_kaggle(kaggle)))
        notes.append("Kaggle train.csv form: 14 local classes only and no test labels, so train split only")
        form = "kaggle"

    entries: List[Tuple[str, str, Path, Dict[str, float]]] = []
    for split, folder, labels in sources:
        for image_id, image_labels in labels.items():
            path = _image_path(base, folder, image_id)
            if path is None:
                skips.skip("image file missing", f"{folder}/{image_id}.dicom")
                continue
            entries.append((split, image_id, path, image_labels))

    fields: Dict[str, Dict] = {}
    if read_headers:
        headers = readable_image_headers((e[2] for e in entries), skips, workers=workers)
        fields = {path_str: header_fields(header) for path_str, header in headers.items()}
    rows = []
    for split, image_id, path, labels in entries:
        extra = fields.get(str(path))
        if read_headers and extra is None:
            continue
        rows.append(
            ManifestRow(
                dataset=NAME,
                split=split,
                patient_id=image_id,
                study_id=image_id,
                image_id=image_id,
                image_path=str(path),
                labels=labels,
                label_vocab="vindr",
                **(extra or {}),
            )
        )
    return finish(NAME, base, rows, skips, notes=notes, extra={"label_form": form})


__all__ = ["KAGGLE_CLASSES", "NAME", "NO_FINDING", "aggregate_readers", "prepare_vindr"]
