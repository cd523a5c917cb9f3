"""CheXpert 1.0 (and CheXpert-v1.0-small): ``train.csv`` / ``valid.csv`` with 14 labels, no reports.

``Path`` values begin with the release folder (``CheXpert-v1.0/`` or ``CheXpert-v1.0-small/``); that
component is dropped and the rest is joined to ROOT (the folder holding ``train.csv``), so the
manifest works wherever the user unpacked the release. A study is patient + study folder
(``patient00001/study1``); the image id adds the file stem (``patient00001/study1/view1_frontal``).
``valid.csv`` is the ``validate`` split; there is no test split (the CheXpert test set is not part of
the release).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import List, Optional, Set, Tuple, Union

from cxr_search.datasets.adapter_kit import (
    CsvTable,
    PrepareResult,
    SkipLog,
    finish,
    parse_float,
    require_dir,
    view_from_text,
)
from cxr_search.datasets.manifest import ManifestRow, clean_labels
from cxr_search.dicom.values import parse_sex
from cxr_search.errors import DatasetError
from cxr_search.labels import CHEXPERT_LABELS, chexpert_row_to_labels

logger = logging.getLogger(__name__)

NAME = "chexpert"
_HINT = "give the CheXpert-v1.0 (or -small) folder that holds train.csv and valid.csv"
_RELEASE_PREFIX = "chexpert-v1.0"


def chexpert_base(root: Path) -> Path:
    """The folder holding ``train.csv``/``valid.csv``: ROOT itself or a ``CheXpert-v1.0*`` child of it."""
    if (root / "train.csv").is_file() or (root / "valid.csv").is_file() or (root / "train").is_dir():
        return root
    children = sorted(p for p in root.glob("CheXpert-v1.0*") if p.is_dir())
    for child in children:
        if (child / "train.csv").is_file() or (child / "train").is_dir():
            return child
    return root


def _parts(rel: str) -> List[str]:
    # str.split instead of pathlib: CheXpert has 224k rows and pathlib costs ~20 us per call.
    return [p for p in rel.replace("\\", "/").split("/") if p and p != "."]


def reroot_path(base: Path, rel: str) -> str:
    """Re-root a CheXpert ``Path`` value under ``base`` (drop the release folder component)."""
    parts = _parts(rel)
    if parts and parts[0].lower().startswith(_RELEASE_PREFIX):
        parts = parts[1:]
    return os.path.join(str(base), *parts)


def study_and_image_id(rel: str) -> Tuple[str, str, str]:
    """(patient_id, study_id, image_id) from a ``.../patient00001/study1/view1_frontal.jpg`` path.

    Raises:
        ValueError: The path has fewer than three components.
    """
    parts = _parts(rel)
    if len(parts) < 3:
        raise ValueError(f"Path {rel!r} is not .../patientNNNNN/studyN/viewN_xxx.jpg")
    patient, study, name = parts[-3], parts[-2], parts[-1]
    stem = name.rsplit(".", 1)[0]
    return patient, f"{patient}/{study}", f"{patient}/{study}/{stem}"


def chexpert_view(frontal_lateral: str, ap_pa: str) -> str:
    """Manifest view from CheXpert's ``Frontal/Lateral`` and ``AP/PA`` columns."""
    if frontal_lateral.strip().lower() == "lateral":
        side = view_from_text(ap_pa)
        return side if side in ("LL", "RL") else "LATERAL"
    return view_from_text(ap_pa)


def prepare_chexpert(
    root: Union[str, Path],
    *,
    check_files: bool = True,
    exclude_csv: Optional[Union[str, Path]] = None,
) -> PrepareResult:
    """Build the CheXpert manifest.

    Args:
        root: The CheXpert-v1.0 (or -small) folder, or the folder that contains it.
        check_files: Skip rows whose image file is not on disk.
        exclude_csv: A CSV with a ``Path`` column (e.g. GLoRIA's ``chexpert_5x200.csv``) whose images
            are left out, so an evaluation set never leaks into training data.

    Returns:
        The rows (train.csv -> train, valid.csv -> validate) and summary.

    Raises:
        DatasetError: Neither train.csv nor valid.csv exists, or a column is missing (named).
    """
    base = chexpert_base(require_dir(root, "CheXpert"))
    sources = [(base / "train.csv", "train"), (base / "valid.csv", "validate")]
    if not any(p.is_file() for p, _ in sources):
        raise DatasetError(f"{base}: CheXpert train.csv / valid.csv not found; {_HINT}")
    excluded: Set[str] = set()
    if exclude_csv is not None:
        with CsvTable(Path(exclude_csv), ["Path"], hint="give a CSV with CheXpert Path values") as table:
            excluded = {study_and_image_id(r["Path"])[2] for r in table if r["Path"]}
    skips = SkipLog()
    rows = []
    required = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    for csv_path, split in sources:
        if not csv_path.is_file():
            logger.warning("%s not found; CheXpert %s split left out", csv_path, split)
            continue
        with CsvTable(csv_path, required, hint=_HINT) as table:
            for r in table:
                rel = r["Path"]
                try:
                    patient, study_id, image_id = study_and_image_id(rel)
                except ValueError as exc:
                    skips.skip("malformed Path", exc)
                    continue
                if image_id in excluded:
                    skips.skip("in the excluded evaluation set", rel)
                    continue
                image = reroot_path(base, rel)
                if check_files and not os.path.isfile(image):
                    skips.skip("image file missing", image)
                    continue
                try:
                    labels = clean_labels(chexpert_row_to_labels(r))
                except ValueError as exc:
                    skips.skip("invalid label value", f"{rel}: {exc}")
                    continue
                rows.append(
                    ManifestRow(
                        dataset=NAME,
                        split=split,
                        patient_id=patient,
                        study_id=study_id,
                        image_id=image_id,
                        image_path=image,
                        view=chexpert_view(r["Frontal/Lateral"], r["AP/PA"]),
                        sex=parse_sex(r["Sex"]) or "",
                        age=parse_float(r["Age"]),
                        labels=labels,
                        label_vocab="chexpert" if labels else "",
                    )
                )
    return finish(NAME, base, rows, skips)


__all__ = ["NAME", "chexpert_base", "chexpert_view", "prepare_chexpert", "reroot_path", "study_and_image_id"]
