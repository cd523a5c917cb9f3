"""What a retrieval evaluation evaluates: the studies, their texts, the query images, and lists of evaluated ids.

:func:`select_studies` groups manifest rows into studies and picks each study's text by a text rule
(:data:`TEXT_RULES`); :func:`select_queries` picks the one query image per study of the ``cxr-clip``
protocol (a frontal image: PA before AP, then by image id); :func:`plan_retrieval` does both and checks
the options, before any model is loaded. :func:`evaluated_ids` lists the evaluated images so that anyone
can rerun the same split; :func:`write_ids` / :func:`read_ids` / :func:`restrict_rows` write, read and
apply such a list, and :func:`ids_sha256` is the SHA-256 of the file :func:`write_ids` writes.

Text rules (``docs/compatibility.md`` section 5):

* ``longer`` (default): the longer (in characters) of findings and impression, findings on a tie; the
  rule the CXR-CLIP authors state for MIMIC-CXR and OpenI.
* ``reference-max``: Python's ``max(findings, impression)`` of the two strings, what the reference's
  dataset preparation code literally computes: the alphabetically later string (``"z short"`` beats
  ``"Clear lungs."``; upper case sorts before lower case). A missing section is the empty string, so
  a study with one section gets that section.
* ``findings``, ``impression``, ``both`` (findings + " " + impression): other choices, not the reference's.

With ``longer`` and ``reference-max`` a CheXpert 5x200 study's text is its "Report Impression" (the
reference's text there), and a study whose manifest holds only a report text (PACS SR) uses it.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from cxr_search.datasets.manifest import FRONTAL_VIEWS, ManifestRow
from cxr_search.errors import ConfigError, DatasetError, InputFileError
from cxr_search.fileio import write_text_atomic
from cxr_search.reports import choose_report_text

__all__ = ["EvalStudy", "PROTOCOLS", "RetrievalPlan", "TEXT_RULES", "check_protocol", "check_text_rule",
           "evaluated_ids", "ids_csv_text", "ids_sha256", "plan_retrieval", "read_ids", "restrict_rows",
           "select_queries", "select_studies", "study_text", "write_ids"]

#: ``cxr-clip``: the reference protocol (one frontal query per study, image -> text); ``full``: every image,
#: both directions, image and study level.
PROTOCOLS = ("cxr-clip", "full")
#: Text rules, the default first.
TEXT_RULES = ("longer", "reference-max", "findings", "impression", "both")
# Names earlier versions used for the default rule; still accepted.
_TEXT_RULE_ALIASES = {"auto": "longer", "longest": "longer"}
#: How the ``cxr-clip`` protocol picks a study's query image (recorded in results).
QUERY_RULE = "frontal: PA before AP, then by image id; studies without a frontal image are left out"
QUERY_RULE_NO_VIEWS = "first image by image id (the manifest has no view information)"


@dataclass(frozen=True)
class EvalStudy:
    """One evaluated study: its images (manifest order; the ``cxr-clip`` query alone once selected) and its text."""

    dataset: str
    study_id: str
    text: str
    rows: Tuple[ManifestRow, ...]


def check_protocol(protocol: str) -> str:
    """``protocol`` if it is one of :data:`PROTOCOLS`.

    Raises:
        ConfigError: Unknown protocol (exit code 2), with the choices.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    return protocol


def check_text_rule(rule: str) -> str:
    """The canonical name of text rule ``rule`` (``auto`` and ``longest`` are older names of ``longer``).

    Raises:
        ConfigError: Unknown rule (exit code 2), with the choices.
    """
    rule = _TEXT_RULE_ALIASES.get(rule, rule)
    if rule not in TEXT_RULES:
        raise ConfigError(f"unknown text rule {rule!r}; use one of {', '.join(TEXT_RULES)}")
    return rule


def study_text(dataset: str, findings: str, impression: str, report_text: str, rule: str = "longer") -> Optional[str]:
    """A study's text under ``rule`` (see the module docstring), or None when it has none.

    Raises:
        ConfigError: Unknown rule.
    """
    rule = check_text_rule(rule)
    reference = rule in ("longer", "reference-max")
    if reference and dataset == "chexpert5x200":
        text = choose_report_text(findings, impression, "impression")
    elif rule == "reference-max":
        # The reference's literal rule: the later string in Python's order (not the longer one).
        text = max(findings or "", impression or "")
        text = text if text.strip() else None
    else:
        text = choose_report_text(findings, impression, "longest" if rule == "longer" else rule)
    if text is None and reference and report_text.strip():
        text = report_text  # datasets whose manifest has only a report text (e.g. PACS SR)
    return text


def select_studies(rows: Sequence[ManifestRow], *, text_rule: str = "longer") -> Tuple[List[EvalStudy], Dict[str, int]]:
    """Group rows into studies (order of first appearance) and pick each study's text.

    Rows keep manifest order inside a study; :func:`select_queries` picks the ``cxr-clip`` query among them.

    Returns:
        The studies that have a text, and counts of what was left out and why.

    Raises:
        ConfigError: Unknown text rule.
    """
    text_rule = check_text_rule(text_rule)
    groups: Dict[Tuple[str, str], List[ManifestRow]] = {}
    for row in rows:
        groups.setdefault((row.dataset, row.study_id), []).append(row)
    studies: List[EvalStudy] = []
    skipped = {"studies_without_text": 0}
    for (dataset, study_id), members in groups.items():
        first = members[0]
        text = study_text(dataset, first.findings, first.impression, first.report_text, text_rule)
        if text is None:
            skipped["studies_without_text"] += 1
            continue
        studies.append(EvalStudy(dataset, study_id, text, tuple(members)))
    return studies, skipped


def select_queries(studies: Sequence[EvalStudy]) -> Tuple[List[EvalStudy], Dict[str, Any], List[str]]:
    """The ``cxr-clip`` protocol's one query image per study: a frontal one, PA before AP, then by image id.

    A study without a PA or AP image is left out (its text leaves the candidate pool too): the reference
    evaluates frontal images only. A dataset whose rows carry no view at all (every view ``UNKNOWN``,
    e.g. OpenI prepared without ``-O dicom=`` or ``-O views=``) cannot follow the rule: its studies
    query their first image by id, which may be a lateral, and a warning says so. Applying this to
    its own output changes nothing.

    Returns:
        ``(studies, info, warnings)``: the kept studies with ``rows`` = the query alone; ``info`` for the
        result JSON (``rule``, ``view_information`` per dataset, ``studies_without_frontal`` and, of
        those, ``studies_without_frontal_views_unknown``, ``queries_by_view``); warning messages.
    """
    view_info: Dict[str, bool] = {}
    for s in studies:
        view_info[s.dataset] = view_info.get(s.dataset, False) or any(r.view != "UNKNOWN" for r in s.rows)
    kept: List[EvalStudy] = []
    without_frontal = unknown_only = 0
    by_view: Counter = Counter()
    for s in studies:
        if view_info[s.dataset]:
            frontal = [r for r in s.rows if r.view in FRONTAL_VIEWS]
            if not frontal:
                without_frontal += 1
                unknown_only += all(r.view == "UNKNOWN" for r in s.rows)
                continue
            query = min(frontal, key=lambda r: (r.view != "PA", r.image_id))
        else:
            query = min(s.rows, key=lambda r: r.image_id)
        by_view[query.view] += 1
        kept.append(EvalStudy(s.dataset, s.study_id, s.text, (query,)))
    warnings = [
        f"{dataset}: the manifest has no view information (every view is UNKNOWN), so each study's query is its "
        "first image by id and may be a lateral view; the reference queries frontal images only (for OpenI, "
        "prepare the manifest with -O dicom=DIR or -O views=CSV)"
        for dataset, known in view_info.items() if not known
    ]
    info = {
        "rule": QUERY_RULE if all(view_info.values()) else QUERY_RULE_NO_VIEWS if not any(view_info.values())
        else f"{QUERY_RULE}; {QUERY_RULE_NO_VIEWS} for " + ", ".join(d for d, k in view_info.items() if not k),
        "view_information": dict(view_info),
        "studies_without_frontal": without_frontal,
        "studies_without_frontal_views_unknown": unknown_only,
        "queries_by_view": dict(sorted(by_view.items())),
    }
    return kept, info, warnings


@dataclass
class RetrievalPlan:
    """What one retrieval run evaluates, fixed before any model is loaded.

    Attributes:
        protocol: ``cxr-clip`` or ``full``.
        text_rule: The canonical text rule.
        studies: Evaluated studies (``cxr-clip``: each holds its query image only).
        skipped: Studies left out, by reason (``studies_without_text``; ``cxr-clip`` adds
            ``studies_without_frontal``).
        query_images: :func:`select_queries` info (``cxr-clip`` only).
        warnings: Messages the user must see (also written into the result).
    """

    protocol: str
    text_rule: str
    studies: List[EvalStudy]
    skipped: Dict[str, int]
    query_images: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)

    def ids(self) -> List[Dict[str, str]]:
        """The evaluated images (:func:`evaluated_ids`)."""
        return evaluated_ids(self.studies, self.protocol)


def plan_retrieval(rows: Sequence[ManifestRow], *, protocol: str = "cxr-clip", text_rule: str = "longer") -> RetrievalPlan:
    """Check the options, pick the studies, their texts and (``cxr-clip``) their query images.

    Raises:
        ConfigError: Unknown protocol or text rule.
        DatasetError: Fewer than 2 studies left to evaluate (the message says what was left out).
    """
    protocol = check_protocol(protocol)
    text_rule = check_text_rule(text_rule)
    studies, skipped = select_studies(rows, text_rule=text_rule)
    query_images, warnings = None, []
    if protocol == "cxr-clip":
        studies, query_images, warnings = select_queries(studies)
        skipped["studies_without_frontal"] = query_images["studies_without_frontal"]
    if len(studies) < 2:
        left_out = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in skipped.items() if n) or "none left out"
        raise DatasetError(f"retrieval needs at least 2 studies with a report text, found {len(studies)} "
                           f"({left_out}); check the manifest's split and its findings/impression columns")
    return RetrievalPlan(protocol, text_rule, studies, skipped, query_images, warnings)


def evaluated_ids(studies: Sequence[EvalStudy], protocol: str) -> List[Dict[str, str]]:
    """The evaluated images (one row each) with the SHA-256 of the text used, in evaluation order.

    ``cxr-clip`` lists each study's query image (:func:`select_queries`), ``full`` every image.
    """
    if protocol == "cxr-clip":
        studies = select_queries(studies)[0]
    out = []
    for s in studies:
        digest = hashlib.sha256(s.text.encode("utf-8")).hexdigest()[:16]
        for row in s.rows:
            out.append({"dataset": s.dataset, "study_id": s.study_id, "image_id": row.image_id, "text_sha256": digest})
    return out


def ids_csv_text(ids: Sequence[Dict[str, str]]) -> str:
    """The CSV text of an evaluated-id list (what :func:`write_ids` writes); columns in the first row's order."""
    buf = io.StringIO()
    fields = list(ids[0]) if ids else ["dataset", "study_id", "image_id"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(ids)
    return buf.getvalue()


def ids_sha256(ids: Sequence[Dict[str, str]]) -> str:
    """SHA-256 (hex) of :func:`ids_csv_text`: equals ``sha256sum evaluated_ids.csv`` of the written list."""
    return hashlib.sha256(ids_csv_text(ids).encode("utf-8")).hexdigest()


def write_ids(path: Path, ids: Sequence[Dict[str, str]]) -> None:
    """Write an evaluated-id list (:func:`evaluated_ids`, or any rows with at least dataset, study_id and
    image_id, the columns :func:`read_ids` reads) as CSV, atomically; columns in the first row's order."""
    write_text_atomic(path, ids_csv_text(ids))


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
