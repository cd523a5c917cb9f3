"""Noisy 8-bit test images, PNG writing and manifest-row dicts, shared by the dataset and cache tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image

from cxr_search.config import PreprocessConfig

#: Small preprocessing (64 px) that keeps image tests fast.
PRE = PreprocessConfig(resize=64, crop_size=64, dicom_shorter_side=128)


def noisy(shape: Tuple[int, ...], seed: int = 0, level: float = 128.0, sd: float = 25.0) -> np.ndarray:
    """Gaussian noise around ``level``, clipped to uint8."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, sd, shape), 0, 255).astype(np.uint8)


def write_png(path: Path, arr: np.ndarray) -> str:
    """Save ``arr`` as an image at ``path`` (format from the suffix); returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return str(path)


def row(dataset: str, study: str, image_id: str, path: str, view: str = "PA", **extra: str) -> Dict[str, str]:
    """A manifest row as a dict of CSV cells (patient ``p1``, split ``train``); ``extra`` overrides cells."""
    base = {
        "dataset": dataset, "split": "train", "patient_id": "p1", "study_id": study, "image_id": image_id,
        "image_path": path, "view": view, "findings": "", "impression": "", "report_text": "", "labels": "",
        "label_vocab": "",
    }
    base.update(extra)
    return base
