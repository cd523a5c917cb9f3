"""Dataset adapters: each public chest X-ray dataset (and a PACS export) as it lies on disk -> one manifest.

Usage::

    from cxr_search.datasets import prepare, write_manifest
    result = prepare("mimic-cxr", "/data/mimic-cxr-jpg/2.0.0", reports="/data/mimic-cxr-reports.zip")
    write_manifest(result.rows, "mimic.csv")
    print(json.dumps(result.summary, indent=2))

Each adapter module documents the on-disk layout it reads; the manifest format is described in
``docs/manifest.md``. Adapters never modify the source folder. Besides :func:`prepare` and
:data:`DATASETS`, the package re-exports the main names of ``manifest``, ``adapter_kit`` and ``splits``.

Modules:

* ``manifest``: the manifest CSV: :class:`ManifestRow`, reading, validation and atomic writing.
* ``adapter_kit``: what the adapters share: results and skip accounting, CSV tables, file discovery.
* ``file_walk``: walking a folder: links followed with loop protection, FIFOs and devices never opened.
* ``splits``: seeded, patient-disjoint splits (GLoRIA's 70/15/15, seeded hold-outs).
* ``header_scan``: DICOM header reads for the adapters (failures become skip reasons; process pool).
* ``mimic``, ``chexpert``, ``chestxray14``, ``openi``, ``vindr``, ``rsna``, ``siim``, ``chexpert5x200``:
  one adapter per public dataset.
* ``pacs``, ``pacs_reports``: a hospital PACS export (DICOM tree) and its report sources (RIS CSV,
  text files, DICOM SR).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Union

from cxr_search.datasets.adapter_kit import PrepareResult, SkipLog
from cxr_search.datasets.chestxray14 import prepare_chestxray14
from cxr_search.datasets.chexpert import prepare_chexpert
from cxr_search.datasets.chexpert5x200 import prepare_chexpert5x200
from cxr_search.datasets.manifest import (
    MANIFEST_COLUMNS,
    REQUIRED_COLUMNS,
    SPLITS,
    ManifestRow,
    group_studies,
    iter_manifest,
    patient_split_conflicts,
    read_manifest,
    write_manifest,
)
from cxr_search.datasets.mimic import prepare_mimic
from cxr_search.datasets.openi import prepare_openi
from cxr_search.datasets.pacs import prepare_pacs
from cxr_search.datasets.rsna import prepare_rsna
from cxr_search.datasets.siim import prepare_siim
from cxr_search.datasets.splits import gloria_split, holdout_split
from cxr_search.datasets.vindr import prepare_vindr
from cxr_search.errors import ConfigError

logger = logging.getLogger(__name__)

Adapter = Callable[..., PrepareResult]

#: Dataset name -> adapter ``(root, **options) -> PrepareResult``.
DATASETS: Dict[str, Adapter] = {
    "mimic-cxr": prepare_mimic,
    "chexpert": prepare_chexpert,
    "chestxray14": prepare_chestxray14,
    "openi": prepare_openi,
    "vindr-cxr": prepare_vindr,
    "rsna-pneumonia": prepare_rsna,
    "siim-acr": prepare_siim,
    "chexpert5x200": prepare_chexpert5x200,
    "pacs": prepare_pacs,
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def adapter_options(dataset: str) -> Dict[str, Any]:
    """Options of a dataset's adapter and their defaults (for CLI help).

    Raises:
        ConfigError: Unknown dataset.
    """
    adapter = _adapter(dataset)
    params = list(inspect.signature(adapter).parameters.values())[1:]
    return {p.name: p.default for p in params}


def _adapter(dataset: str) -> Adapter:
    try:
        return DATASETS[dataset]
    except KeyError:
        raise ConfigError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}") from None


def _coerce(dataset: str, name: str, value: Any, default: Any) -> Any:
    """Turn a string option (as a command line gives it) into the type of the option's default."""
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return value
    text = value.strip().lower()
    try:
        if isinstance(default, bool):
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(
            f"option {name}={value!r} of dataset {dataset!r} must be a {type(default).__name__} "
            f"(default {default!r})"
        ) from None
    return value


def prepare(dataset: str, root: Union[str, Path], **options: Any) -> PrepareResult:
    """Read a dataset folder and build its manifest rows.

    Args:
        dataset: One of :data:`DATASETS` (``mimic-cxr``, ``chexpert``, ``chestxray14``, ``openi``,
            ``vindr-cxr``, ``rsna-pneumonia``, ``siim-acr``, ``chexpert5x200``, ``pacs``).
        root: The dataset folder.
        **options: Adapter options (see :func:`adapter_options`). Dashes in names are read as
            underscores (``reports-csv``), None values mean "use the default", and strings are
            converted to the option's type (``"0.1"``, ``"false"``).

    Returns:
        Rows plus ``summary`` (a JSON-serialisable dict: images, studies, patients, reports,
        splits, skipped counts by reason with examples, notes).

    Raises:
        ConfigError: Unknown dataset or option, or an option value of the wrong type.
        DatasetError: A required file or column of the dataset is missing (named in the message).
    """
    adapter = _adapter(dataset)
    valid = adapter_options(dataset)
    kwargs: Dict[str, Any] = {}
    for raw_name, value in options.items():
        name = raw_name.replace("-", "_")
        if name not in valid:
            choices = ", ".join(valid) or "none"
            raise ConfigError(f"unknown option {raw_name!r} for dataset {dataset!r}; valid options: {choices}")
        if value is None:
            continue
        kwargs[name] = _coerce(dataset, name, value, valid[name])
    logger.info("preparing %s from %s", dataset, root)
    return adapter(root, **kwargs)


__all__ = [
    "DATASETS",
    "MANIFEST_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "ManifestRow",
    "PrepareResult",
    "SkipLog",
    "adapter_options",
    "gloria_split",
    "group_studies",
    "holdout_split",
    "iter_manifest",
    "patient_split_conflicts",
    "prepare",
    "read_manifest",
    "write_manifest",
]
