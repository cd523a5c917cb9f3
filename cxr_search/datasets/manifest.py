"""The manifest: one CSV for every dataset, one row per image (format: ``docs/manifest.md``).

:class:`ManifestRow` is the typed record; its attributes hold typed values (``age`` a float,
``labels`` a dict) while mapping-style access (``row["labels"]``, ``row.get("age")``) returns the CSV
cell as a string, so a row can be handed to anything that reads ``csv.DictReader`` dicts (for
example :class:`train.dataset.StudyDataset`).

Writing is atomic (temporary file in the target folder, then ``os.replace``): an interrupted
``data prepare`` never leaves a half-written manifest that a later run would trust.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

from cxr_search.dicom.values import VIEWS
from cxr_search.errors import DatasetError
from cxr_search.fileio import atomic_write

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Manifest columns in file order.
MANIFEST_COLUMNS: Tuple[str, ...] = (
    "dataset",
    "split",
    "patient_id",
    "study_id",
    "image_id",
    "image_path",
    "view",
    "sex",
    "age",
    "study_date",
    "findings",
    "impression",
    "report_text",
    "labels",
    "label_vocab",
    "sop_instance_uid",
    "series_instance_uid",
    "accession_number",
)

#: Columns every manifest must have (and every row must fill).
REQUIRED_COLUMNS: Tuple[str, ...] = ("dataset", "split", "patient_id", "study_id", "image_id", "image_path", "view")

#: Dataset names a manifest may carry.
DATASET_NAMES: Tuple[str, ...] = (
    "mimic-cxr", "chexpert", "chestxray14", "openi", "vindr-cxr", "rsna-pneumonia", "siim-acr", "chexpert5x200",
    "pacs", "synth",
)  # fmt: skip
SPLITS: Tuple[str, ...] = ("train", "validate", "test")
LABEL_VOCABS: Tuple[str, ...] = ("chexpert", "chestxray14", "vindr", "rsna", "siim", "chexpert5x200", "synth")
SEXES: Tuple[str, ...] = ("M", "F", "O")
FRONTAL_VIEWS = frozenset({"PA", "AP"})
_LABEL_VALUES = (1.0, 0.0, -1.0)


@dataclass
class ManifestRow:
    """One image of the manifest.

    Attributes mirror :data:`MANIFEST_COLUMNS`; ``""`` means missing for text columns, ``None`` for
    ``age`` and an empty dict for ``labels`` (label -> 1.0 / 0.0 / -1.0, in vocabulary order).
    ``row[column]`` and ``row.get(column)`` return the CSV cell text instead.
    """

    dataset: str
    split: str
    patient_id: str
    study_id: str
    image_id: str
    image_path: str
    view: str = "UNKNOWN"
    sex: str = ""
    age: Optional[float] = None
    study_date: str = ""
    findings: str = ""
    impression: str = ""
    report_text: str = ""
    labels: Dict[str, float] = field(default_factory=dict)
    label_vocab: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    accession_number: str = ""

    # ------------------------------------------------------------------ CSV cells / mapping access
    def cell(self, column: str) -> str:
        """The CSV cell of ``column`` ("" when missing).

        Raises:
            KeyError: Not a manifest column.
        """
        if column not in _COLUMN_SET:
            raise KeyError(column)
        value = getattr(self, column)
        if column == "age":
            return format_age(value)
        if column == "labels":
            return labels_json(value)
        return value

    def __getitem__(self, column: str) -> str:
        return self.cell(column)

    def get(self, column: str, default: Any = None) -> Any:
        """Mapping-style access to a CSV cell; ``default`` for names that are not manifest columns."""
        return self.cell(column) if column in _COLUMN_SET else default

    def keys(self) -> Tuple[str, ...]:
        """The manifest columns (so ``dict(row)`` gives the CSV row)."""
        return MANIFEST_COLUMNS

    def __contains__(self, column: object) -> bool:
        return column in _COLUMN_SET

    def to_csv_dict(self) -> Dict[str, str]:
        """The row as CSV cells, in column order."""
        return {c: self.cell(c) for c in MANIFEST_COLUMNS}

    @property
    def is_frontal(self) -> bool:
        """Whether the view is PA or AP."""
        return self.view in FRONTAL_VIEWS


_COLUMN_SET = frozenset(MANIFEST_COLUMNS)
_N_REQUIRED = len(REQUIRED_COLUMNS)
# The fast cell paths index columns by position; they rely on these two orders being the same.
assert tuple(f.name for f in fields(ManifestRow)) == MANIFEST_COLUMNS
assert MANIFEST_COLUMNS[:_N_REQUIRED] == REQUIRED_COLUMNS


def format_age(age: Optional[float]) -> str:
    """Age cell text: integers without ``.0``, other floats by ``repr`` (exact round trip)."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return ""
    age = float(age)
    return str(int(age)) if age.is_integer() else repr(age)


def clean_labels(labels: Mapping[str, Optional[float]]) -> Dict[str, float]:
    """Drop "not mentioned" labels (None / NaN) and return floats, keeping the order.

    Raises:
        ValueError: A value other than 1, 0 or -1.
    """
    out: Dict[str, float] = {}
    for name, value in labels.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        number = float(value)
        if number not in _LABEL_VALUES:
            raise ValueError(f"label {name!r} has value {value!r}; expected 1.0, 0.0 or -1.0")
        out[name] = number
    return out


def row_sort_key(row: ManifestRow) -> Tuple[int, str]:
    """Order of rows inside a study: frontal views first, then by image_id."""
    return (0 if row.view in FRONTAL_VIEWS else 1, row.image_id)


def order_rows(rows: Iterable[ManifestRow]) -> List[ManifestRow]:
    """Rows grouped by (dataset, study) in order of first appearance, each study in :func:`row_sort_key` order."""
    groups: Dict[Tuple[str, str], List[ManifestRow]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.study_id), []).append(row)
    out: List[ManifestRow] = []
    for members in groups.values():
        out.extend(sorted(members, key=row_sort_key))
    return out


def group_studies(rows: Iterable[ManifestRow]) -> Dict[str, List[ManifestRow]]:
    """Group rows of one dataset by study_id.

    Args:
        rows: Manifest rows; study ids are unique within a dataset only, so rows of several datasets
            must be grouped per dataset first.

    Returns:
        study_id -> rows in manifest order (frontal views first, then by image_id), studies in order
        of first appearance.

    Raises:
        DatasetError: One study_id is used by rows of two different datasets.
    """
    groups: Dict[str, List[ManifestRow]] = {}
    owner: Dict[str, str] = {}
    for row in rows:
        first = owner.setdefault(row.study_id, row.dataset)
        if first != row.dataset:
            raise DatasetError(
                f"study_id {row.study_id!r} occurs in datasets {first!r} and {row.dataset!r}; study ids are only "
                "unique within a dataset, so group the rows of each dataset separately"
            )
        groups.setdefault(row.study_id, []).append(row)
    for members in groups.values():
        members.sort(key=row_sort_key)
    return groups


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def labels_json(labels: Mapping[str, float]) -> str:
    """The labels cell: compact JSON in the mapping's order ("" for no labels)."""
    return json.dumps(dict(labels), ensure_ascii=False, separators=(",", ":")) if labels else ""


class _LabelsCache:
    """Memoises labels <-> JSON: a few thousand label combinations cover hundreds of thousands of rows."""

    def __init__(self, limit: int = 100_000) -> None:
        self._dumped: Dict[Tuple[Tuple[str, float], ...], str] = {}
        self._parsed: Dict[str, Dict[str, float]] = {}
        self._limit = limit

    def dumps(self, labels: Mapping[str, float]) -> str:
        if not labels:
            return ""
        key = tuple(labels.items())
        text = self._dumped.get(key)
        if text is None:
            if len(self._dumped) >= self._limit:
                self._dumped.clear()
            text = self._dumped[key] = labels_json(labels)
        return text

    def loads(self, text: str, where: str) -> Dict[str, float]:
        if not text:
            return {}
        parsed = self._parsed.get(text)
        if parsed is None:
            if len(self._parsed) >= self._limit:
                self._parsed.clear()
            parsed = self._parsed[text] = _parse_labels(text, where)
        return dict(parsed)  # a copy: rows must not share one mutable dict


def _row_cells(row: ManifestRow, cache: _LabelsCache) -> List[str]:
    """The row's CSV cells in column order (the fast path of :meth:`ManifestRow.to_csv_dict`)."""
    return [
        row.dataset, row.split, row.patient_id, row.study_id, row.image_id, row.image_path, row.view, row.sex,
        format_age(row.age), row.study_date, row.findings, row.impression, row.report_text,
        cache.dumps(row.labels), row.label_vocab, row.sop_instance_uid, row.series_instance_uid,
        row.accession_number,
    ]  # fmt: skip


def _as_cells(row: Union[ManifestRow, Mapping[str, Any]]) -> Dict[str, str]:
    if isinstance(row, ManifestRow):
        return row.to_csv_dict()
    cells: Dict[str, str] = {}
    for column in MANIFEST_COLUMNS:
        value = row.get(column)
        if value is None:
            cells[column] = ""
        elif column == "age" and not isinstance(value, str):
            cells[column] = format_age(float(value))
        elif column == "labels" and isinstance(value, Mapping):
            cells[column] = labels_json(value)
        else:
            cells[column] = str(value)
    return cells


def write_manifest(rows: Iterable[Union[ManifestRow, Mapping[str, Any]]], path: PathLike) -> int:
    """Write a manifest atomically (temporary file in the same folder, then rename).

    Args:
        rows: :class:`ManifestRow` objects or mappings with manifest columns (extra keys ignored);
            written in the given order.
        path: Destination CSV; parent folders are created.

    Returns:
        The number of rows written.

    Raises:
        DatasetError: A row lacks a required value, or the file cannot be written.
    """
    dest = Path(path)
    count = 0
    try:
        with atomic_write(dest, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(MANIFEST_COLUMNS)
            cache = _LabelsCache()
            for row in rows:
                if isinstance(row, ManifestRow):
                    cells = _row_cells(row, cache)
                else:
                    as_dict = _as_cells(row)
                    cells = [as_dict[c] for c in MANIFEST_COLUMNS]
                if not all(cells[:_N_REQUIRED]):
                    missing = [c for c, v in zip(REQUIRED_COLUMNS, cells, strict=False) if not v]
                    raise DatasetError(
                        f"{dest}: row {count + 1} (image_id {cells[4]!r}) has no {', '.join(missing)}; "
                        "every manifest row needs the required columns"
                    )
                writer.writerow(cells)
                count += 1
    except OSError as exc:
        raise DatasetError(f"{dest}: cannot write the manifest ({exc.strerror or exc}); check the folder") from exc
    logger.info("wrote %d manifest rows to %s", count, dest)
    return count


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def labels_object(text: str, where: str) -> Dict[str, Any]:
    """The JSON object of a ``labels`` cell, values not yet checked (see :func:`clean_labels`).

    Raises:
        DatasetError: Not valid JSON, or not an object; the message starts with ``where``.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{where}: 'labels' is not valid JSON ({exc}): {text[:80]!r}") from exc
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: 'labels' must be a JSON object label -> 1.0/0.0/-1.0, got {text[:80]!r}")
    return value


def _parse_labels(text: str, where: str) -> Dict[str, float]:
    if not text:
        return {}
    value = labels_object(text, where)
    try:
        return clean_labels(value)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{where}: {exc}") from exc


def _row_from_cells(values: Dict[str, str], where: str, cache: _LabelsCache) -> ManifestRow:
    missing = [c for c in REQUIRED_COLUMNS if not values[c].strip()]
    if missing:
        raise DatasetError(f"{where}: required value(s) {', '.join(missing)} empty; re-run `cxr-search data prepare`")
    if values["split"] not in SPLITS:
        raise DatasetError(f"{where}: split {values['split']!r} is not one of {', '.join(SPLITS)}")
    if values["view"] not in VIEWS:
        raise DatasetError(f"{where}: view {values['view']!r} is not one of {', '.join(VIEWS)}")
    if values["sex"] and values["sex"] not in SEXES:
        raise DatasetError(f"{where}: sex {values['sex']!r} is not one of M, F, O or empty")
    age: Optional[float] = None
    if values["age"]:
        try:
            age = float(values["age"])
        except ValueError as exc:
            raise DatasetError(f"{where}: age {values['age']!r} is not a number of years") from exc
    labels = cache.loads(values["labels"], where)
    kwargs: Dict[str, Any] = dict(values)
    kwargs["age"] = age
    kwargs["labels"] = labels
    return ManifestRow(**kwargs)


def iter_manifest(path: PathLike, *, split: Optional[str] = None) -> Iterator[ManifestRow]:
    """Stream a manifest row by row (validated as :func:`read_manifest` does).

    Args:
        path: Manifest CSV.
        split: Yield only rows of this split when given.

    Yields:
        Rows in file order.

    Raises:
        DatasetError: Missing/unreadable file, a missing required column (named), a bad value, or a
            duplicate image_id within a dataset (line named).
    """
    src = Path(path)
    if split is not None and split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    seen: set = set()
    try:
        with src.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DatasetError(
                    f"{src}: manifest lacks the required column(s) {', '.join(missing)}; "
                    "write it with `cxr-search data prepare`"
                )
            extra = [h for h in header if h not in _COLUMN_SET]
            if extra:
                logger.debug("%s: ignoring non-manifest column(s) %s", src, ", ".join(extra))
            index = [header.index(c) if c in header else -1 for c in MANIFEST_COLUMNS]
            cache = _LabelsCache()
            for cells in reader:
                if not cells:
                    continue
                width = len(cells)
                values = {c: (cells[i] if 0 <= i < width else "") for c, i in zip(MANIFEST_COLUMNS, index, strict=False)}
                where = f"{src}: line {reader.line_num}"
                row = _row_from_cells(values, where, cache)
                key = (row.dataset, row.image_id)
                if key in seen:
                    raise DatasetError(f"{where}: image_id {row.image_id!r} appears twice in dataset {row.dataset!r}")
                seen.add(key)
                if split is None or row.split == split:
                    yield row
    except FileNotFoundError as exc:
        raise DatasetError(f"{src}: manifest not found; create it with `cxr-search data prepare`") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{src}: cannot read the manifest ({exc})") from exc


def read_manifest(path: PathLike, *, split: Optional[str] = None) -> List[ManifestRow]:
    """Read and validate a manifest.

    Args:
        path: Manifest CSV written by :func:`write_manifest` (extra columns are ignored).
        split: Keep only rows of this split when given.

    Returns:
        Rows in file order.

    Raises:
        DatasetError: Missing/unreadable file, a missing required column (named together with the
            file), an empty required value, a value outside the allowed set, malformed labels JSON,
            or a duplicate image_id within a dataset.
    """
    return list(iter_manifest(path, split=split))


def patient_split_conflicts(rows: Iterable[ManifestRow]) -> Dict[Tuple[str, str], List[str]]:
    """Patients that appear in more than one split.

    Returns:
        (dataset, patient_id) -> sorted splits, only for patients in two or more splits.
    """
    seen: Dict[Tuple[str, str], set] = {}
    for row in rows:
        seen.setdefault((row.dataset, row.patient_id), set()).add(row.split)
    return {k: sorted(v) for k, v in seen.items() if len(v) > 1}


__all__ = [
    "DATASET_NAMES",
    "FRONTAL_VIEWS",
    "LABEL_VOCABS",
    "MANIFEST_COLUMNS",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "ManifestRow",
    "clean_labels",
    "format_age",
    "group_studies",
    "iter_manifest",
    "labels_object",
    "order_rows",
    "patient_split_conflicts",
    "read_manifest",
    "row_sort_key",
    "write_manifest",
]

