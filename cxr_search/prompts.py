"""Label vocabularies, label-to-text prompt reports, and zero-shot prompt strings.

Label-only datasets (CheXpert, ChestX-ray14) have no report, so training turns each row's labels into
a short synthetic report (spec section 4): one sentence per positive, negative and uncertain label,
drawn from a template bank, shuffled and joined; ChestX-ray14 rows also state a few random absent
findings; a "No Finding" row gets a normal-study sentence. The bank below follows that structure but
its wording is this project's own.

Zero-shot evaluation prompts (spec section 5) must match the reference strings exactly; they are data
here so that the parity harness and the search UI share one definition.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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

#: VinDr-CXR's 18 zero-shot classes (spec section 5), exact spelling.
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

#: How each label name reads inside a sentence. "No Finding" has a phrase for completeness, but prompt
#: reports use :data:`NORMAL_SENTENCES` for it.
LABEL_PHRASES: Dict[str, str] = {
    # CheXpert / MIMIC-CXR
    "No Finding": "no acute cardiopulmonary abnormality",
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity",
    "Lung Lesion": "lung lesion",
    "Edema": "pulmonary edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural abnormality",
    "Fracture": "fracture",
    "Support Devices": "support devices",
    # ChestX-ray14 (NIH "Effusion" means pleural effusion; its hernias are hiatal hernias)
    "Effusion": "pleural effusion",
    "Infiltration": "pulmonary infiltrate",
    "Mass": "lung mass",
    "Nodule": "lung nodule",
    "Emphysema": "emphysema",
    "Fibrosis": "pulmonary fibrosis",
    "Pleural_Thickening": "pleural thickening",
    "Hernia": "hiatal hernia",
    # VinDr-CXR
    "Aortic enlargement": "aortic enlargement",
    "Calcification": "calcification",
    "ILD": "interstitial lung disease",
    "Mediastinal shift": "mediastinal shift",
    "Nodule/Mass": "nodule or mass",
    "Pleural effusion": "pleural effusion",
    "Pleural thickening": "pleural thickening",
    "Pulmonary fibrosis": "pulmonary fibrosis",
    "Rib fracture": "rib fracture",
    "Lung tumor": "lung tumor",
    "Tuberculosis": "tuberculosis",
}

#: Phrases that take a plural verb ("{is}" in templates becomes "are").
PLURAL_PHRASES = frozenset({"support devices"})

# Templates: "{x}" is the finding phrase, "{is}" the verb agreeing with it. Sentences are written in
# lower case (the text tower lowercases anyway) and capitalised when a report is assembled.
POSITIVE_TEMPLATES: Tuple[str, ...] = (
    "{x}.",
    "there {is} {x}.",
    "{x} {is} seen.",
    "{x} {is} present.",
    "findings are consistent with {x}.",
    "{x} {is} noted.",
    "evidence of {x}.",
    "the radiograph shows {x}.",
    "{x} {is} demonstrated.",
    "appearance compatible with {x}.",
    "{x} {is} identified.",
)

NEGATIVE_TEMPLATES: Tuple[str, ...] = (
    "no {x}.",
    "no evidence of {x}.",
    "there {is} no {x}.",
    "{x} {is} not seen.",
    "negative for {x}.",
    "no radiographic signs of {x}.",
    "{x} {is} absent.",
    "no convincing {x} {is} identified.",
    "without {x}.",
    "{x} {is} not present.",
)

UNCERTAIN_TEMPLATES: Tuple[str, ...] = (
    "cannot rule out {x}.",
    "possible {x}.",
    "{x} cannot be excluded.",
    "questionable {x}.",
    "findings may represent {x}.",
    "suspicious for {x}.",
    "{x} {is} possible.",
    "equivocal for {x}.",
    "{x} {is} not excluded.",
    "may reflect {x}.",
)

#: Sentences for a positive "No Finding" (a normal study).
NORMAL_SENTENCES: Tuple[str, ...] = (
    "no acute cardiopulmonary process.",
    "the lungs are clear.",
    "normal chest radiograph.",
    "no acute cardiopulmonary abnormality.",
    "heart size and mediastinal contours are within normal limits.",
    "the lungs are clear and there is no acute intrathoracic abnormality.",
    "unremarkable radiograph of the chest.",
    "no radiographic evidence of acute disease.",
    "the cardiomediastinal silhouette is normal and the lungs are well expanded and clear.",
    "normal study of the chest.",
)

#: Reference RSNA zero-shot prompts: (negative, positive).
RSNA_PROMPTS: Tuple[str, str] = ("No evidence of pneumonia", "Findings suggesting pneumonia.")


def binary_prompts(class_name: str) -> Tuple[str, str]:
    """Zero-shot binary prompts of the reference protocol (VinDr-CXR, SIIM): ``("No {class}", "{class}")``.

    Args:
        class_name: The class name exactly as the protocol spells it (e.g. ``"Nodule/Mass"``).

    Returns:
        (negative prompt, positive prompt).
    """
    return (f"No {class_name}", class_name)


def label_phrase(label: str, phrases: Optional[Mapping[str, str]] = None) -> str:
    """The in-sentence phrase of a label.

    Unknown labels (e.g. a hospital's own label set) fall back to the name in lower case with
    underscores as spaces, so custom vocabularies work without code changes.
    """
    table = LABEL_PHRASES if phrases is None else phrases
    if label in table:
        return table[label]
    fallback = label.replace("_", " ").strip().lower()
    logger.debug("no phrase for label %r; using %r", label, fallback)
    return fallback


def _sentence(template: str, phrase: str) -> str:
    text = template.format(x=phrase, **{"is": "are" if phrase in PLURAL_PHRASES else "is"})
    return text[:1].upper() + text[1:]


def _label_state(label: str, value: Any) -> Optional[float]:
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
        name for name, state in ((str(k).strip().lower(), _label_state(str(k), v)) for k, v in labels.items())
        if (state == 1.0 or (uncertain_positive and state == -1.0)) and name != "no finding"
        and (keep is None or name in keep)
    )
    digest = hashlib.blake2b("|".join(positives).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**62 - 1)


def labels_to_report(
    labels: Mapping[str, Any],
    *,
    rng: Optional[random.Random] = None,
    deterministic: bool = False,
    extra_negatives: int = 0,
    vocabulary: Sequence[str] = CHEXPERT_LABELS,
    phrases: Optional[Mapping[str, str]] = None,
) -> str:
    """Write a short synthetic report from labels (CheXpert coding).

    Each positive (1.0), negative (0.0) and uncertain (-1.0) label contributes one sentence from the
    matching template bank; None, NaN and blank mean "not mentioned" and contribute nothing. A positive
    "No Finding" contributes a normal-study sentence; a negative or uncertain "No Finding" says nothing
    the other labels do not. ``extra_negatives`` adds that many negative sentences for labels of
    ``vocabulary`` that the row does not mention (ChestX-ray14 lists positives only; the reference adds
    3). Sentences are shuffled and joined with single spaces.

    Args:
        labels: Label name -> value.
        rng: Random source; the module-level ``random`` generator when None (PyTorch seeds it per
            DataLoader worker). Call twice for two independent reports of one row.
        deterministic: First template of each kind, sentences in the order of ``labels``, extra
            negatives in ``vocabulary`` order; ``rng`` is not used. For validation sets.
        extra_negatives: Number of unmentioned findings to state as absent (fewer if fewer exist).
        vocabulary: Labels that extra negatives are drawn from ("No Finding" is never drawn).
        phrases: Label -> phrase table overriding :data:`LABEL_PHRASES`.

    Returns:
        The report; "" when nothing is mentioned and no extra negatives are asked for.

    Raises:
        ValueError: A label value other than 1, 0, -1 or blank, or a negative ``extra_negatives``.
    """
    if extra_negatives < 0:
        raise ValueError(f"extra_negatives must be >= 0, got {extra_negatives}")
    r: Any = random if rng is None else rng

    def pick(bank: Sequence[str]) -> str:
        return bank[0] if deterministic else r.choice(bank)

    sentences: List[str] = []
    mentioned = set()
    for label, value in labels.items():
        state = _label_state(label, value)
        if state is None:
            continue
        mentioned.add(label)
        if label == NO_FINDING:
            if state == 1.0:
                text = pick(NORMAL_SENTENCES)
                sentences.append(text[:1].upper() + text[1:])
            continue
        bank = POSITIVE_TEMPLATES if state == 1.0 else NEGATIVE_TEMPLATES if state == 0.0 else UNCERTAIN_TEMPLATES
        sentences.append(_sentence(pick(bank), label_phrase(label, phrases)))

    if extra_negatives:
        candidates = [v for v in dict.fromkeys(vocabulary) if v != NO_FINDING and v not in mentioned]
        count = min(extra_negatives, len(candidates))
        chosen = candidates[:count] if deterministic else r.sample(candidates, count)
        sentences += [_sentence(pick(NEGATIVE_TEMPLATES), label_phrase(v, phrases)) for v in chosen]

    if not deterministic:
        r.shuffle(sentences)
    return " ".join(sentences)


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
    return {name: _label_state(name, row[name]) for name in labels}


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
    "LABEL_PHRASES",
    "NEGATIVE_TEMPLATES",
    "NORMAL_SENTENCES",
    "NO_FINDING",
    "POSITIVE_TEMPLATES",
    "RSNA_PROMPTS",
    "UNCERTAIN_TEMPLATES",
    "VINDR_CLASSES",
    "binary_prompts",
    "chestxray14_finding_labels_to_labels",
    "chexpert_row_to_labels",
    "label_phrase",
    "label_set_key",
    "labels_to_report",
]
