"""Training inputs: manifest rows checked against the recipe, report texts, paraphrases, worker setup."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from cxr_search.datasets import read_manifest
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import DatasetError
from train.config import DataConfig

logger = logging.getLogger(__name__)

__all__ = ["LABEL_DATASETS", "load_paraphrases", "load_training_rows", "report_texts", "worker_init"]

#: Datasets whose text comes from labels through prompts; every other dataset needs report text.
LABEL_DATASETS = frozenset({"chexpert", "chestxray14"})


def _has_report(row: ManifestRow) -> bool:
    return bool(row.get("findings") or row.get("impression") or row.get("report_text"))


def load_training_rows(
    manifests: Sequence[Union[str, Path]], data: DataConfig
) -> Tuple[List[ManifestRow], List[ManifestRow]]:
    """Read the manifests and return (training rows, validation rows) after checking them against the recipe.

    Validation keeps the first ``data.max_val_studies`` studies of the validation split.

    Raises:
        DatasetError: No manifest, an unreadable one, datasets that differ from ``data.datasets``,
            a report dataset without any report text, or no training row.
    """
    if not manifests:
        raise DatasetError("no training data: pass --data MANIFEST.csv (from `cxr-search data prepare`)")
    rows: List[ManifestRow] = []
    by_dataset: Dict[str, List[str]] = {}
    for path in manifests:
        part = read_manifest(path)
        rows.extend(part)
        for name in sorted({r.dataset for r in part}):
            by_dataset.setdefault(name, []).append(str(path))
            if name not in LABEL_DATASETS and not any(_has_report(r) for r in part if r.dataset == name):
                raise DatasetError(
                    f"{path}: the {name} rows have no report text (findings / impression / report_text), "
                    f"and {name} is a report dataset; prepare it with its reports (see `cxr-search data prepare --help`)"
                )
    wanted, present = set(data.datasets), set(by_dataset)
    if wanted and wanted != present:  # an empty list accepts any dataset
        missing, extra = sorted(wanted - present), sorted(present - wanted)
        parts = []
        if missing:
            parts.append(f"the recipe trains on {', '.join(missing)} but no --data manifest holds it")
        if extra:
            parts.append(f"the manifests hold {', '.join(extra)} which the recipe does not train on")
        raise DatasetError(
            "; ".join(parts) + f"; pass the right --data files or --set data.datasets='{json.dumps(sorted(present))}'"
        )
    train_rows = [r for r in rows if r.split == data.train_split]
    if not train_rows:
        raise DatasetError(f"the manifests have no rows in split '{data.train_split}'; check --set data.train_split")
    val_rows: List[ManifestRow] = []
    if data.val_split:
        studies: Dict[Tuple[str, str], None] = {}
        for r in rows:
            if r.split != data.val_split:
                continue
            key = (r.dataset, r.study_id)
            if key not in studies and data.max_val_studies and len(studies) >= data.max_val_studies:
                continue
            studies[key] = None
            val_rows.append(r)
        if not val_rows:
            logger.warning("no rows in validation split '%s': training without validation", data.val_split)
    logger.info("training rows: %d, validation rows: %d, datasets: %s", len(train_rows), len(val_rows),
                ", ".join(sorted(present)))
    return train_rows, val_rows


def report_texts(rows: Sequence[ManifestRow]) -> Iterator[str]:
    """Every report section of the rows, once per study (the corpus of a WordPiece vocabulary)."""
    seen = set()
    for r in rows:
        key = (r.dataset, r.study_id)
        if key in seen:
            continue
        seen.add(key)
        for col in ("findings", "impression", "report_text"):
            text = r.get(col)
            if text:
                yield str(text)


def load_paraphrases(path: Optional[str]) -> Optional[Dict[str, List[str]]]:
    """Read ``{section text: [paraphrases]}`` (e.g. back-translations) or None.

    Raises:
        DatasetError: Unreadable file or wrong structure.
    """
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read paraphrases ({exc})") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DatasetError(f"{path}: paraphrases must be a JSON object {{text: [paraphrase, ...]}}")
    return data


def worker_init(worker_id: int) -> None:
    """DataLoader worker set-up: one torch thread per worker, so workers do not oversubscribe the CPUs.

    OpenCV's thread count is deliberately left alone: ``cv2.setNumThreads`` in a forked worker can
    deadlock when the parent process already used OpenCV's thread pool (seen with CLAHE).
    """
    torch.set_num_threads(1)
