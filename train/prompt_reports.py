"""Prompt reports: a short synthetic report written from a label-only row (CheXpert, ChestX-ray14).

Label-only datasets have no report, so training turns each row's labels into one, as the CXR-CLIP
recipe does: one sentence per positive, negative and uncertain label, drawn from a template bank,
shuffled and joined; ChestX-ray14 rows also state a few random absent findings; a "No Finding" row gets
a normal-study sentence. The bank below follows that structure but its wording is this project's own.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from cxr_search.labels import CHEXPERT_LABELS, NO_FINDING, label_state

logger = logging.getLogger(__name__)

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
        state = label_state(label, value)
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


__all__ = [
    "LABEL_PHRASES",
    "NEGATIVE_TEMPLATES",
    "NORMAL_SENTENCES",
    "PLURAL_PHRASES",
    "POSITIVE_TEMPLATES",
    "UNCERTAIN_TEMPLATES",
    "label_phrase",
    "labels_to_report",
]
