"""What a retrieval evaluation evaluates: the studies and their texts, and lists of evaluated ids.

:func:`select_studies` groups manifest rows into studies and picks each study's text by the reference
rule (the impression for CheXpert 5x200, the longer of findings and impression elsewhere).
:func:`evaluated_ids` lists the evaluated images so that anyone can rerun the same split;
:func:`write_ids` / :func:`read_ids` / :func:`restrict_rows` write, read and apply such a list.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import DatasetError, InputFileError
from cxr_search.fileio import write_text_atomic
from cxr_search.reports import choose_report_text

__all__ = ["EvalStudy", "TEXT_RULES", "evaluated_ids", "read_ids", "restrict_rows", "select_studies",
           "text_rule_for", "write_ids"]

TEXT_RULES = ("auto", "longest", "findings", "impression", "both")


@dataclass(frozen=True)
class EvalStudy:
    """One evaluated study: its images (manifest order) and its text."""

    dataset: str
    study_id: str
    text: str
    rows: Tuple[ManifestRow, ...]


def text_rule_for(dataset: str, rule: str = "auto") -> str:
    """The report-text rule of the reference protocol for ``dataset`` (``auto``) or ``rule`` itself."""
    if rule != "auto":
        return rule
    return "impression" if dataset == "chexpert5x200" else "longest"


def select_studies(rows: Sequence[ManifestRow], *, text_rule: str = "auto") -> Tuple[List[EvalStudy], Dict[str, int]]:
    """Group rows into studies (order of first appearance) and pick each study's text.

    Rows keep manifest order inside a study: the reference uses the first image of a study row, and
    for OpenI that is the first ``parentImage`` of the XML.

    Returns:
        The studies that have a text, and counts of what was left out and why.

    Raises:
        DatasetError: Unknown text rule.
    """
    if text_rule not in TEXT_RULES:
        raise DatasetError(f"unknown text rule {text_rule!r}; use one of {', '.join(TEXT_RULES)}")
    groups: Dict[Tuple[str, str], List[ManifestRow]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.study_id), []).append(row)
    studies: List[EvalStudy] = []
    skipped = {"studies_without_text": 0}
    for (dataset, study_id), members in groups.items():
        first = members[0]
        text = choose_report_text(first.findings, first.impression, text_rule_for(dataset, text_rule))
        if text is None and text_rule == "auto" and first.report_text.strip():
            text = first.report_text  # datasets whose manifest has only a report text (e.g. PACS SR)
        if text is None:
            skipped["studies_without_text"] += 1
            continue
        studies.append(EvalStudy(dataset, study_id, text, tuple(members)))
    return studies, skipped


def evaluated_ids(studies: Sequence[EvalStudy], protocol: str) -> List[Dict[str, str]]:
    """The evaluated images (one row each) with the SHA-256 of the text used, in evaluation order."""
    out = []
    for s in studies:
        digest = hashlib.sha256(s.text.encode("utf-8")).hexdigest()[:16]
        for row in s.rows[:1] if protocol == "cxr-clip" else s.rows:
            out.append({"dataset": s.dataset, "study_id": s.study_id, "image_id": row.image_id, "text_sha256": digest})
    return out


def write_ids(path: Path, ids: Sequence[Dict[str, str]]) -> None:
    """Write an evaluated-id list (:func:`evaluated_ids`, or any rows with at least dataset, study_id and
    image_id, the columns :func:`read_ids` reads) as CSV, atomically; columns in the first row's order."""
    buf = io.StringIO()
    fields = list(ids[0]) if ids else ["dataset", "study_id", "image_id"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(ids)
    write_text_atomic(path, buf.getvalue())


def read_ids(path: Path) -> Set[Tuple[str, str, str]]:
    """Read an ``evaluated_ids.csv`` into a set of (dataset, study_id, image_id).

    Raises:
        InputFileError: Unreadable file or missing columns.
    """
    try:
        with Path(path).open("r", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            missing = {"dataset", "study_id", "image_id"} - set(reader.fieldnames or [])
            if missing:
                raise InputFileError(path, f"not an evaluated_ids.csv: columns {', '.join(sorted(missing))} missing")
            return {(r["dataset"], r["study_id"], r["image_id"]) for r in reader}
    except OSError as exc:
        raise InputFileError(path, f"cannot read the id list ({exc.strerror or exc})") from exc


def restrict_rows(rows: Sequence[ManifestRow], ids: Optional[Set[Tuple[str, str, str]]]) -> List[ManifestRow]:
    """Keep only the rows listed in ``ids`` (all rows when ``ids`` is None).

    Raises:
        DatasetError: Listed images that the manifest does not hold (a different manifest or split).
    """
    if ids is None:
        return list(rows)
    kept = [r for r in rows if (r.dataset, r.study_id, r.image_id) in ids]
    if len(kept) != len(ids):
        raise DatasetError(f"{len(ids) - len(kept)} of the {len(ids)} listed images are not in the manifest split; "
                           "use the manifest and --split the id list was written from")
    return kept
