"""NIH ChestX-ray14: ``Data_Entry_2017.csv`` (or ``_v2020``), the official list files, PNG images.

One image per row and no study concept, so each image is its own study (study_id = image_id =
the file stem, e.g. ``00000001_000``). Labels: the listed findings are positive and everything else
is "not mentioned" (:func:`cxr_search.labels.chestxray14_finding_labels_to_labels`); "No Finding"
rows get ``{"No Finding": 1.0}``.

Splits: ``test_list.txt`` is the official test split. The validation split is carved from
``train_val_list.txt`` by patient: the distinct patient ids of the train/val images, sorted, are
permuted with ``numpy.random.RandomState(seed)`` and the first ``ceil(val_fraction * n)`` become
``validate`` (default 10 %, seed 0). A patient of the official test list whose other images are
in train_val would make the official split non-disjoint; NIH made it patient-wise, and a conflict
is reported, never silently moved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Union

from cxr_search.datasets.adapter_kit import (
    CsvTable,
    PrepareResult,
    SkipLog,
    find_file,
    finish,
    index_files,
    read_id_list,
    require_dir,
    view_from_text,
)
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.datasets.splits import holdout_split
from cxr_search.dicom.values import parse_age, parse_sex
from cxr_search.errors import DatasetError
from cxr_search.labels import chestxray14_finding_labels_to_labels

logger = logging.getLogger(__name__)

NAME = "chestxray14"
_HINT = "give the NIH ChestX-ray14 folder holding Data_Entry_2017.csv, the list files and images*/ folders"
_REQUIRED = ["Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position"]


def _in_images_folder(rel_dir: Path) -> bool:
    return any(part.lower().startswith("images") for part in rel_dir.parts)


def prepare_chestxray14(
    root: Union[str, Path],
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    check_files: bool = True,
) -> PrepareResult:
    """Build the ChestX-ray14 manifest.

    Args:
        root: The dataset folder.
        val_fraction: Fraction of train_val patients moved to ``validate`` (0 keeps all in train).
        seed: Seed of the validation carve.
        check_files: Skip images whose PNG was not found under an ``images*`` folder.

    Returns:
        The rows and summary.

    Raises:
        DatasetError: Missing Data_Entry / list files or columns (named), or (``check_files``) no PNG
            under an ``images*`` folder.
    """
    base = require_dir(root, "ChestX-ray14")
    entry_path = find_file(
        base, ["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "Data_Entry_*.csv"], "Data_Entry_2017.csv", _HINT
    )
    train_val = set(read_id_list(find_file(base, ["train_val_list.txt"], "train_val_list.txt", _HINT)))
    test = set(read_id_list(find_file(base, ["test_list.txt"], "test_list.txt", _HINT)))
    images: Dict[str, Path] = {}
    if check_files:
        images, duplicates = index_files(base, (".png",), dir_filter=_in_images_folder)
        if duplicates:
            logger.warning("%s: %d PNG names occur twice under images*/; using the first (sorted)", base, duplicates)
        if not images:
            raise DatasetError(
                f"{base}: no PNG image found under an images*/ folder (symbolic links to folders are followed); {_HINT}"
            )
    skips = SkipLog()
    entries = []
    with CsvTable(entry_path, _REQUIRED, hint=_HINT) as table:
        for r in table:
            name = r["Image Index"]
            if not name:
                skips.skip("row without Image Index")
                continue
            if name in test:
                split = "test"
            elif name in train_val:
                split = "train"
            else:
                skips.skip("not in train_val_list.txt or test_list.txt", name)
                continue
            stem = name.rsplit(".", 1)[0]
            if check_files:
                path = images.get(stem)
                if path is None:
                    skips.skip("image file missing", name)
                    continue
            else:
                path = base / "images" / name
            try:
                labels = chestxray14_finding_labels_to_labels(r["Finding Labels"])
            except ValueError as exc:
                skips.skip("unknown finding label", f"{name}: {exc}")
                continue
            entries.append((r, split, stem, path, labels))

    val_patients = holdout_split(
        sorted({r["Patient ID"] for r, split, *_ in entries if split == "train"}), val_fraction, seed=seed
    )
    rows = []
    for r, split, stem, path, labels in entries:
        patient = r["Patient ID"]
        if split == "train" and patient in val_patients:
            split = "validate"
        rows.append(
            ManifestRow(
                dataset=NAME,
                split=split,
                patient_id=patient,
                study_id=stem,
                image_id=stem,
                image_path=str(path),
                view=view_from_text(r["View Position"]),
                sex=parse_sex(r["Patient Gender"]) or "",
                age=parse_age(r["Patient Age"]),  # also reads the "058Y" form of early releases
                labels={k: float(v) for k, v in labels.items() if v is not None},
                label_vocab="chestxray14",
            )
        )
    return finish(
        NAME, base, rows, skips,
        extra={"validation": {"fraction": val_fraction, "seed": seed, "patients": len(val_patients)}},
    )


__all__ = ["NAME", "prepare_chestxray14"]
