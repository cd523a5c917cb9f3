"""Label vocabularies and label values: CheXpert, ChestX-ray14 and VinDr-CXR names, row parsing, label-set keys.

Labels use CheXpert's coding: 1.0 positive, 0.0 negative, -1.0 uncertain, blank not mentioned. The
prompt reports that training writes from labels are in :mod:`train.prompt_reports`; zero-shot prompt
strings are in :mod:`cxr_search.evaluation.zeroshot_prompts`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from cxr_search.errors import DatasetError

logger = logging.getLogger(__name__)

NO_FINDING = "No Finding"

#: CheXpert's 14 label columns, in file order (also MIMIC-CXR-JPG's ``chexpert.csv``).
CHEXPERT_LABELS: Tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: The 14 NIH ChestX-ray14 findings as spelt in ``Finding Labels``, plus "No Finding".
CHESTXRAY14_LABELS: Tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
    "No Finding",
)

#: VinDr-CXR's 18 classes of the reference zero-shot protocol, spelt exactly as the protocol does.
VINDR_CLASSES: Tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
)

def label_state(label: str, value: Any) -> Optional[float]:
    """Map a label value to 1.0 / 0.0 / -1.0, or None for not mentioned."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"label {label!r} has value {value!r}; expected 1.0, 0.0, -1.0 or blank") from exc
    if math.isnan(number):
        return None
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"label {label!r} has value {value!r}; expected 1.0, 0.0, -1.0 or blank")
    return number


def label_set_key(labels: Mapping[str, Any], names: Optional[Iterable[str]] = None, *,
                  uncertain_positive: bool = False) -> int:
    """A stable non-negative int64 key of a study's set of positive labels (value 1.0).

    Studies with the same positive labels get the same key in every process and run; "No Finding"
    is left out because it is implied by an empty set. Negative and blank labels do not count;
    uncertain ones (-1.0) count as negative by default (CheXpert's "U-Zeros" policy) or as positive
    with ``uncertain_positive`` ("U-Ones": a hedged mention such as "possible small effusion" then
    joins the studies with that finding). A study whose labels assert nothing positive gets the key
    of the empty set.

    Args:
        labels: Label name -> 1.0 / 0.0 / -1.0 / blank, as in a manifest's ``labels`` JSON.
        names: Only these labels (any case) make up the set, e.g. the findings a retrieval is judged
            on; incidental ones (a healed fracture) then do not split studies apart. None: all labels.
        uncertain_positive: Count uncertain labels as positive.

    Raises:
        ValueError: A value other than 1.0, 0.0, -1.0 or blank.
    """
    keep = None if names is None else {str(n).strip().lower() for n in names}
    positives = sorted(
        name for name, state in ((str(k).strip().lower(), label_state(str(k), v)) for k, v in labels.items())
        if (state == 1.0 or (uncertain_positive and state == -1.0)) and name != "no finding"
        and (keep is None or name in keep)
    )
    digest = hashlib.blake2b("|".join(positives).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**62 - 1)


def chexpert_row_to_labels(
    row: Mapping[str, Any], labels: Sequence[str] = CHEXPERT_LABELS
) -> Dict[str, Optional[float]]:
    """Read the label columns of a CheXpert / MIMIC-CXR-JPG chexpert row.

    Args:
        row: A CSV row (``csv.DictReader`` dict, pandas Series, ...): values such as ``"1.0"``,
            ``"-1.0"``, ``""``, floats or NaN.
        labels: Columns to read.

    Returns:
        Label -> 1.0 / 0.0 / -1.0 / None (blank), in ``labels`` order.

    Raises:
        DatasetError: A label column is missing from the row.
        ValueError: A value other than 1, 0, -1 or blank.
    """
    missing = [name for name in labels if name not in row]
    if missing:
        raise DatasetError(
            f"row lacks the label column(s) {', '.join(missing)}; a CheXpert train.csv / valid.csv or "
            "MIMIC-CXR-JPG chexpert.csv has all 14 CheXpert labels"
        )
    return {name: label_state(name, row[name]) for name in labels}


_NIH_ALIASES = {"Pleural Thickening": "Pleural_Thickening", "No Findings": NO_FINDING}


def chestxray14_finding_labels_to_labels(finding_labels: str) -> Dict[str, Optional[float]]:
    """Parse ChestX-ray14's pipe-separated ``Finding Labels`` (e.g. ``"Effusion|Mass"``).

    Listed findings are positive (1.0); the others are not mentioned (absent from the result), which
    is why ChestX-ray14 prompt reports add random extra negatives.

    Args:
        finding_labels: The cell value; ``"No Finding"`` gives ``{"No Finding": 1.0}``.

    Returns:
        Label -> 1.0 for each listed finding, in the listed order.

    Raises:
        ValueError: A name outside :data:`CHESTXRAY14_LABELS`.
    """
    result: Dict[str, Optional[float]] = {}
    for part in finding_labels.split("|"):
        name = " ".join(part.split())
        if not name:
            continue
        name = _NIH_ALIASES.get(name, name)
        if name not in CHESTXRAY14_LABELS:
            raise ValueError(
                f"unknown ChestX-ray14 finding {name!r} in {finding_labels!r}; known: {', '.join(CHESTXRAY14_LABELS)}"
            )
        result[name] = 1.0
    return result


__all__ = [
    "CHESTXRAY14_LABELS",
    "CHEXPERT_LABELS",
    "NO_FINDING",
    "VINDR_CLASSES",
    "chestxray14_finding_labels_to_labels",
    "chexpert_row_to_labels",
    "label_set_key",
    "label_state",
]
