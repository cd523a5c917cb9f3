"""Writers of small dataset files (CSV, grey images) and manifest-order checks, shared by the adapter tests."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from cxr_search.datasets.manifest import ManifestRow, group_studies, patient_split_conflicts


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], *, gz: bool = False) -> Path:
    """Write ``rows`` under ``header`` (None as an empty cell), gzip-compressed when ``gz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in r] for r in rows])
    data = buf.getvalue().encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_image(path: Path, value: int = 128) -> Path:
    """An 8x8 constant-grey image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def assert_patient_disjoint(rows: Sequence[ManifestRow]) -> None:
    """No patient has rows in two splits."""
    assert patient_split_conflicts(rows) == {}


def assert_study_order(rows: Sequence[ManifestRow]) -> None:
    """Rows of a study are contiguous, frontal first, then by image_id."""
    seen_done = set()
    current = None
    for row in rows:
        if row.study_id != current:
            assert row.study_id not in seen_done, f"study {row.study_id} not contiguous"
            if current is not None:
                seen_done.add(current)
            current = row.study_id
    for members in group_studies(rows).values():
        keys = [(0 if r.view in ("PA", "AP") else 1, r.image_id) for r in members]
        assert keys == sorted(keys)
