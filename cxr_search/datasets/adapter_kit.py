"""Building blocks shared by the dataset adapters: results, skip accounting, CSV tables, file discovery."""

from __future__ import annotations

import csv
import functools
import gzip
import io
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from cxr_search.datasets.file_walk import walk_files
from cxr_search.datasets.manifest import (
    ManifestRow,
    order_rows,
    patient_split_conflicts,
)
from cxr_search.dicom.values import normalise_view, parse_da
from cxr_search.errors import DatasetError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Maximum example paths/ids kept per skip reason in the summary.
MAX_SKIP_EXAMPLES = 3
#: The skip reason of a listed image whose file is not there (see :func:`finish`).
MISSING_IMAGE = "image file missing"


# --------------------------------------------------------------------------------------------------
# Skips and results
# --------------------------------------------------------------------------------------------------


class SkipLog:
    """Counts skipped items by reason and keeps a few examples of each (never raises)."""

    def __init__(self, max_examples: int = MAX_SKIP_EXAMPLES) -> None:
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}
        self._max = max_examples

    def skip(self, reason: str, example: Any = "", count: int = 1) -> None:
        """Record ``count`` skipped items for ``reason`` (a short, stable category string)."""
        self.counts[reason] += count
        if example != "":
            bucket = self.examples.setdefault(reason, [])
            if len(bucket) < self._max:
                bucket.append(str(example))
        logger.debug("skipped (%s): %s", reason, example)

    @property
    def total(self) -> int:
        """Number of skipped items over all reasons."""
        return sum(self.counts.values())


@dataclass
class PrepareResult:
    """What an adapter produced.

    Attributes:
        dataset: Dataset name (manifest ``dataset`` column).
        root: The dataset folder that was read.
        rows: Manifest rows, grouped by study (frontal first, then by image_id).
        skipped: Reason -> number of skipped items (images, report files, CSV rows ...).
        skipped_examples: Reason -> a few example paths or ids.
        notes: Things the user should know (fallbacks taken, split caveats ...).
        extra: Adapter-specific counts for the summary (JSON-serialisable).
    """

    dataset: str
    root: str
    rows: List[ManifestRow]
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: Dict[str, List[str]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def summary(self) -> Dict[str, Any]:
        """A JSON-serialisable summary: counts of images, studies, patients, reports, splits, skips."""
        studies: Dict[str, str] = {}
        patients = set()
        split_images: Counter = Counter()
        split_studies: Counter = Counter()
        labelled = 0
        for row in self.rows:
            if row.study_id not in studies:
                studies[row.study_id] = row.report_text
                split_studies[row.split] += 1
            elif row.report_text and not studies[row.study_id]:
                studies[row.study_id] = row.report_text
            patients.add(row.patient_id)
            split_images[row.split] += 1
            labelled += bool(row.labels)
        return {
            "dataset": self.dataset,
            "root": self.root,
            "images": len(self.rows),
            "studies": len(studies),
            "patients": len(patients),
            "reports": sum(1 for text in studies.values() if text),
            "labelled_images": labelled,
            "splits": {k: {"images": split_images[k], "studies": split_studies[k]} for k in sorted(split_images)},
            "skipped": sum(self.skipped.values()),
            "skipped_reasons": dict(self.skipped.most_common()),
            "skipped_examples": {k: list(v) for k, v in self.skipped_examples.items()},
            "notes": list(self.notes),
            **self.extra,
        }


def finish(
    dataset: str,
    root: Path,
    rows: Iterable[ManifestRow],
    skips: SkipLog,
    *,
    notes: Optional[List[str]] = None,
    seeded_split: bool = False,
    extra: Optional[Dict[str, Any]] = None,
) -> PrepareResult:
    """Order rows by study, drop duplicate image ids, check patient-disjointness and build the result.

    Args:
        dataset: Dataset name.
        root: Dataset folder.
        rows: Rows in source order.
        skips: Skip log of the adapter (duplicates are added to it).
        notes: Notes for the summary.
        seeded_split: The split was made here, so a patient in two splits is a bug (raises);
            for official splits it is only reported.
        extra: Extra summary entries.

    Raises:
        AssertionError: ``seeded_split`` and a patient is in two splits.
        DatasetError: No row is left while the dataset's files listed images that were not found:
            the layout promised images, so an empty manifest would hide a wrong folder.
    """
    missing = skips.counts.get(MISSING_IMAGE, 0)
    rows = list(rows)
    if not rows and missing:
        examples = ", ".join(skips.examples.get(MISSING_IMAGE, []))
        raise DatasetError(
            f"{root}: {dataset}: none of the {missing} images its files list was found (e.g. {examples}); give the "
            "folder that holds the image folders (symbolic links to folders are followed) and check their permissions"
        )
    notes = list(notes or [])
    unique: List[ManifestRow] = []
    seen: set = set()
    for row in rows:
        if row.image_id in seen:
            skips.skip("duplicate image_id", row.image_id)
            continue
        seen.add(row.image_id)
        unique.append(row)
    ordered = order_rows(unique)
    conflicts = patient_split_conflicts(ordered)
    if conflicts:
        if seeded_split:
            raise AssertionError(f"{dataset}: seeded split is not patient-disjoint for {len(conflicts)} patients")
        example = next(iter(conflicts))
        message = (
            f"{len(conflicts)} patient(s) appear in more than one split of the official split "
            f"(e.g. {example[1]!r}: {', '.join(conflicts[example])}); kept as released"
        )
        logger.warning("%s: %s", dataset, message)
        notes.append(message)
    result = PrepareResult(
        dataset=dataset,
        root=str(root),
        rows=ordered,
        skipped=Counter(skips.counts),
        skipped_examples={k: list(v) for k, v in skips.examples.items()},
        notes=notes,
        extra=dict(extra or {}),
    )
    logger.info("%s: %d images kept, %d items skipped", dataset, len(ordered), skips.total)
    return result


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def require_dir(root: PathLike, dataset: str) -> Path:
    """The dataset folder as an absolute path.

    Raises:
        DatasetError: It does not exist or is not a folder.
    """
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetError(f"{path}: {dataset} folder not found (or not a folder); give the folder you downloaded")
    return path.resolve()


def find_file(root: Path, candidates: Sequence[str], what: str, hint: str = "") -> Path:
    """The first existing candidate (paths relative to ``root``; glob patterns allowed, sorted).

    Raises:
        DatasetError: None exists; the message names what was looked for.
    """
    found = find_optional_file(root, candidates)
    if found is None:
        tail = f"; {hint}" if hint else ""
        raise DatasetError(f"{root}: {what} not found (looked for {', '.join(candidates)}){tail}")
    return found


def find_optional_file(root: Path, candidates: Sequence[str]) -> Optional[Path]:
    """The first existing candidate under ``root`` (glob patterns allowed), or None."""
    for pattern in candidates:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(p for p in root.glob(pattern) if p.is_file())
            if matches:
                return matches[-1]  # newest version name sorts last (2.1.0 after 2.0.0)
        else:
            path = root / pattern
            if path.is_file():
                return path
    return None


def index_files(
    root: Path,
    suffixes: Sequence[str],
    *,
    dir_filter: Optional[Callable[[Path], bool]] = None,
) -> Tuple[Dict[str, Path], int]:
    """Map file stem -> path for files below ``root`` whose name ends with one of ``suffixes``.

    Args:
        root: Folder to walk.
        suffixes: Lower-case suffixes (``".png"``); matched case-insensitively.
        dir_filter: Keep a file only if this is true for its folder's path relative to ``root``.

    Returns:
        The map (the first path in sorted walk order wins) and the number of duplicate stems.
    """
    out: Dict[str, Path] = {}
    duplicates = 0
    for path in walk_files(root):
        name = path.name.lower()
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            continue
        if dir_filter is not None and not dir_filter(path.parent.relative_to(root)):
            continue
        stem = path.name[: -len(suffix)]
        if stem in out:
            duplicates += 1
            logger.debug("duplicate file name %s (keeping %s)", path, out[stem])
            continue
        out[stem] = path
    return out, duplicates


# --------------------------------------------------------------------------------------------------
# CSV tables
# --------------------------------------------------------------------------------------------------


def open_text(path: Path) -> io.TextIOBase:
    """Open a text file for reading, transparently gunzipping it (detected by its magic bytes)."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(2)
        if magic == b"\x1f\x8b":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
        return path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc.strerror or exc}); check the path and permissions") from exc


class CsvTable:
    """A CSV file (optionally gzipped) read row by row, with required columns checked on open.

    Header names and cell values are stripped of surrounding whitespace, so SIIM's
    ``" EncodedPixels"`` header and ``" -1"`` values read like their unspaced forms.

    Example:
        >>> with CsvTable(path, ["dicom_id", "split"], hint="...") as table:
        ...     for row in table: ...
    """

    def __init__(self, path: Path, required: Sequence[str], *, hint: str = "") -> None:
        self.path = path
        self._fh = open_text(path)
        self._reader = csv.reader(self._fh)
        try:
            header = next(self._reader)
        except StopIteration:
            self.close()
            raise DatasetError(f"{path}: file is empty; expected a CSV header with {', '.join(required)}") from None
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            self.close()
            raise DatasetError(f"{path}: not a readable CSV file ({exc})") from exc
        self.columns: List[str] = [h.strip() for h in header]
        missing = [c for c in required if c not in self.columns]
        if missing:
            self.close()
            tail = f"; {hint}" if hint else ""
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} "
                f"(found: {', '.join(self.columns) or 'none'}){tail}"
            )

    def __enter__(self) -> "CsvTable":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._fh.close()

    def __iter__(self) -> Iterator[Dict[str, str]]:
        width = len(self.columns)
        line = 1
        try:
            for cells in self._reader:
                line += 1
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue
                if len(cells) < width:
                    cells = cells + [""] * (width - len(cells))
                yield dict(zip(self.columns, map(str.strip, cells), strict=False))
        except (csv.Error, UnicodeDecodeError, OSError, EOFError) as exc:
            raise DatasetError(f"{self.path}: line {line}: cannot parse the CSV ({exc}); is it complete?") from exc


def read_csv(path: Path, required: Sequence[str], *, hint: str = "") -> List[Dict[str, str]]:
    """All rows of a CSV as stripped dicts (see :class:`CsvTable`)."""
    with CsvTable(path, required, hint=hint) as table:
        return list(table)


def read_id_list(path: Path) -> List[str]:
    """Non-empty stripped lines of a list file (``train_val_list.txt``)."""
    with open_text(path) as fh:
        return [line.strip() for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------


def parse_float(value: Optional[str]) -> Optional[float]:
    """A float from a cell, None for blanks, NaN and junk."""
    if value is None or not str(value).strip():
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return None if math.isnan(number) else number


def format_date(value: Any) -> str:
    """``YYYY-MM-DD`` from a DICOM/CSV date (``20180506``, ``2018-05-06``, ``datetime.date``), else ""."""
    if isinstance(value, str):
        return _format_date_text(value)
    parsed = parse_da(value)
    return parsed.isoformat() if parsed is not None else ""


@functools.lru_cache(maxsize=65536)
def _format_date_text(value: str) -> str:
    # Hundreds of thousands of rows share a few thousand dates: parse each distinct one once.
    parsed = parse_da(value)
    return parsed.isoformat() if parsed is not None else ""


@functools.lru_cache(maxsize=4096)
def view_from_text(*texts: Optional[str]) -> str:
    """:func:`cxr_search.dicom.values.normalise_view` of CSV view values, cached (few distinct values)."""
    return normalise_view(*texts) if texts else "UNKNOWN"


__all__ = [
    "CsvTable",
    "MISSING_IMAGE",
    "PrepareResult",
    "SkipLog",
    "finish",
    "find_file",
    "find_optional_file",
    "format_date",
    "view_from_text",
    "index_files",
    "open_text",
    "parse_float",
    "read_csv",
    "read_id_list",
    "require_dir",
]
