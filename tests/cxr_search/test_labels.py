"""Label vocabularies, prompt reports from labels, and zero-shot prompt strings."""

from __future__ import annotations

import csv
import io
import random
import re
from collections import Counter
from typing import Dict, List, Mapping, Optional, Set, Tuple

import pytest

from cxr_search.errors import DatasetError
from cxr_search.evaluation.zeroshot_prompts import RSNA_PROMPTS, binary_prompts
from cxr_search.labels import (
    CHESTXRAY14_LABELS,
    CHEXPERT_LABELS,
    NO_FINDING,
    VINDR_CLASSES,
    chestxray14_finding_labels_to_labels,
    chexpert_row_to_labels,
)
from train.prompt_reports import (
    LABEL_PHRASES,
    NEGATIVE_TEMPLATES,
    NORMAL_SENTENCES,
    POSITIVE_TEMPLATES,
    UNCERTAIN_TEMPLATES,
    label_phrase,
    labels_to_report,
)

BANKS = {"pos": POSITIVE_TEMPLATES, "neg": NEGATIVE_TEMPLATES, "unc": UNCERTAIN_TEMPLATES}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _render(template: str, phrase: str) -> str:
    verb = "are" if phrase == "support devices" else "is"
    return _cap(template.replace("{x}", phrase).replace("{is}", verb))


def _sentences(report: str) -> List[str]:
    # Every template ends with its only full stop, so sentences split unambiguously.
    return [s for s in re.split(r"(?<=\.) ", report) if s]


def _catalogue(labels: List[str]) -> Dict[str, Tuple[str, str]]:
    """Every sentence the bank can produce for these labels -> (kind, label)."""
    out: Dict[str, Tuple[str, str]] = {}
    for label in labels:
        for kind, bank in BANKS.items():
            for template in bank:
                sentence = _render(template, LABEL_PHRASES[label])
                assert sentence not in out, f"ambiguous sentence {sentence!r}"
                out[sentence] = (kind, label)
    for sentence in NORMAL_SENTENCES:
        out[_cap(sentence)] = ("normal", NO_FINDING)
    return out


def _decode(report: str, labels: List[str]) -> Counter:
    catalogue = _catalogue(labels)
    decoded = Counter()
    for sentence in _sentences(report):
        assert sentence in catalogue, f"sentence {sentence!r} not from the bank"
        decoded[catalogue[sentence]] += 1
    return decoded


# --------------------------------------------------------------------------------------------------
# Vocabularies and bank
# --------------------------------------------------------------------------------------------------


def test_vocabularies_have_the_documented_names() -> None:
    assert len(CHEXPERT_LABELS) == 14 and CHEXPERT_LABELS[0] == "No Finding"
    assert "Pleural Effusion" in CHEXPERT_LABELS and "Support Devices" in CHEXPERT_LABELS
    assert len(CHESTXRAY14_LABELS) == 15 and "Pleural_Thickening" in CHESTXRAY14_LABELS
    assert len(VINDR_CLASSES) == 18 and "Nodule/Mass" in VINDR_CLASSES and "ILD" in VINDR_CLASSES
    for vocab in (CHEXPERT_LABELS, CHESTXRAY14_LABELS, VINDR_CLASSES):
        assert len(set(vocab)) == len(vocab)


def test_every_label_has_a_phrase() -> None:
    for label in set(CHEXPERT_LABELS) | set(CHESTXRAY14_LABELS) | set(VINDR_CLASSES):
        phrase = LABEL_PHRASES[label]
        assert phrase and phrase == phrase.strip().lower() and "." not in phrase and "_" not in phrase
    assert LABEL_PHRASES["Effusion"] == "pleural effusion"
    assert LABEL_PHRASES["Pleural_Thickening"] == "pleural thickening"
    assert LABEL_PHRASES["Enlarged Cardiomediastinum"] == "enlarged cardiomediastinum"


def test_label_phrase_fallback_for_custom_labels() -> None:
    assert label_phrase("Hilar_Enlargement") == "hilar enlargement"
    assert label_phrase("Effusion") == "pleural effusion"
    assert label_phrase("Effusion", {"Effusion": "fluid"}) == "fluid"


def test_template_banks_shape() -> None:
    for bank in (POSITIVE_TEMPLATES, NEGATIVE_TEMPLATES, UNCERTAIN_TEMPLATES, NORMAL_SENTENCES):
        assert 8 <= len(bank) <= 12
        assert len(set(bank)) == len(bank)
        for template in bank:
            assert template.endswith(".") and template.count(".") == 1
    for bank in BANKS.values():
        for template in bank:
            assert template.count("{x}") == 1
            assert set(re.findall(r"\{(\w+)\}", template)) <= {"x", "is"}
    for sentence in NORMAL_SENTENCES:
        assert "{" not in sentence
    assert POSITIVE_TEMPLATES[0] == "{x}." and NEGATIVE_TEMPLATES[0] == "no {x}."
    assert UNCERTAIN_TEMPLATES[0] == "cannot rule out {x}."


# --------------------------------------------------------------------------------------------------
# labels_to_report
# --------------------------------------------------------------------------------------------------

ROW = {
    "No Finding": None,
    "Enlarged Cardiomediastinum": float("nan"),
    "Cardiomegaly": 1.0,
    "Lung Opacity": "",
    "Edema": 0.0,
    "Pneumonia": -1.0,
    "Pleural Effusion": 1.0,
    "Support Devices": 1.0,
    "Pneumothorax": 0.0,
}


def test_sentences_match_label_states() -> None:
    expected = Counter({
        ("pos", "Cardiomegaly"): 1,
        ("pos", "Pleural Effusion"): 1,
        ("pos", "Support Devices"): 1,
        ("neg", "Edema"): 1,
        ("neg", "Pneumothorax"): 1,
        ("unc", "Pneumonia"): 1,
    })
    for seed in range(30):
        report = labels_to_report(ROW, rng=random.Random(seed))
        assert _decode(report, list(CHEXPERT_LABELS[1:])) == expected
        assert "  " not in report and report == report.strip()
        assert "support devices is" not in report.lower()


def test_all_templates_eventually_used() -> None:
    seen: Set[Tuple[str, str]] = set()
    rng = random.Random(7)
    catalogue = _catalogue(list(CHEXPERT_LABELS[1:]))
    for _ in range(400):
        for sentence in _sentences(labels_to_report({"Edema": 1.0, "Atelectasis": 0.0, "Fracture": -1.0}, rng=rng)):
            seen.add((catalogue[sentence][0], sentence))
    kinds = Counter(kind for kind, _ in seen)
    assert kinds == Counter({k: len(b) for k, b in BANKS.items()})


def test_seeded_rng_is_reproducible_and_shuffles() -> None:
    a = [labels_to_report(ROW, rng=random.Random(s)) for s in range(20)]
    b = [labels_to_report(ROW, rng=random.Random(s)) for s in range(20)]
    assert a == b
    assert len(set(a)) > 10
    # Sentence order varies, not only wording: the first sentence's label changes across seeds.
    firsts = {_decode(_sentences(r)[0], list(CHEXPERT_LABELS[1:])).most_common(1)[0][0][1] for r in a}
    assert len(firsts) > 1


def test_deterministic_mode_is_fixed_and_ignores_rng() -> None:
    expected = " ".join([
        "Cardiomegaly.",
        "No pulmonary edema.",
        "Cannot rule out pneumonia.",
        "Pleural effusion.",
        "Support devices.",
        "No pneumothorax.",
    ])
    rng = random.Random(3)
    state = rng.getstate()
    assert labels_to_report(ROW, deterministic=True, rng=rng) == expected
    assert rng.getstate() == state
    assert labels_to_report(ROW, deterministic=True) == expected
    assert labels_to_report(ROW, deterministic=True, rng=random.Random(99)) == expected


def test_no_finding_positive_gives_normal_sentence() -> None:
    labels = {"No Finding": 1.0, "Support Devices": 1.0}
    for seed in range(10):
        decoded = _decode(labels_to_report(labels, rng=random.Random(seed)), list(CHEXPERT_LABELS[1:]))
        assert decoded == Counter({("normal", NO_FINDING): 1, ("pos", "Support Devices"): 1})
    assert labels_to_report({"No Finding": 1.0}, deterministic=True) == _cap(NORMAL_SENTENCES[0])
    # A non-positive "No Finding" adds nothing of its own.
    assert labels_to_report({"No Finding": 0.0}, deterministic=True) == ""
    assert labels_to_report({"No Finding": -1.0, "Edema": 1.0}, deterministic=True) == "Pulmonary edema."


def test_nothing_mentioned_gives_empty_report() -> None:
    assert labels_to_report({"Edema": None, "Cardiomegaly": float("nan"), "Fracture": " "}) == ""
    assert labels_to_report({}, rng=random.Random(0)) == ""


def test_invalid_values_rejected() -> None:
    with pytest.raises(ValueError, match="Edema"):
        labels_to_report({"Edema": 2.0})
    with pytest.raises(ValueError, match="Edema"):
        labels_to_report({"Edema": "yes"})
    with pytest.raises(ValueError):
        labels_to_report({"Edema": 1.0}, extra_negatives=-1)


def test_extra_negatives_count_and_source() -> None:
    labels = chestxray14_finding_labels_to_labels("Effusion|Mass")
    vocab = list(CHESTXRAY14_LABELS[:-1])
    for seed in range(30):
        report = labels_to_report(labels, rng=random.Random(seed), extra_negatives=3, vocabulary=CHESTXRAY14_LABELS)
        decoded = _decode(report, vocab)
        assert decoded[("pos", "Effusion")] == 1 and decoded[("pos", "Mass")] == 1
        negatives = [label for (kind, label), n in decoded.items() if kind == "neg" for _ in range(n)]
        assert len(negatives) == 3 and len(set(negatives)) == 3
        assert not set(negatives) & {"Effusion", "Mass", NO_FINDING}
        assert sum(decoded.values()) == 5


def test_extra_negatives_cover_all_candidates_and_cap() -> None:
    labels = {"Edema": 1.0}
    seen: Set[str] = set()
    for seed in range(200):
        report = labels_to_report(labels, rng=random.Random(seed), extra_negatives=2)
        decoded = _decode(report, list(CHEXPERT_LABELS[1:]))
        seen |= {label for (kind, label) in decoded if kind == "neg"}
    assert seen == set(CHEXPERT_LABELS) - {NO_FINDING, "Edema"}
    # More than available: every unmentioned finding once.
    few = ("Edema", "Cardiomegaly", "Fracture", NO_FINDING)
    report = labels_to_report(labels, rng=random.Random(0), extra_negatives=10, vocabulary=few)
    decoded = _decode(report, list(CHEXPERT_LABELS[1:]))
    assert decoded == Counter({("pos", "Edema"): 1, ("neg", "Cardiomegaly"): 1, ("neg", "Fracture"): 1})


def test_extra_negatives_deterministic_uses_vocabulary_order() -> None:
    nih = CHESTXRAY14_LABELS
    report = labels_to_report({"Atelectasis": 1.0}, deterministic=True, extra_negatives=2, vocabulary=nih)
    assert report == "Atelectasis. No cardiomegaly. No pleural effusion."
    # A label mentioned with any state is never an extra negative.
    report = labels_to_report({"Cardiomegaly": -1.0}, deterministic=True, extra_negatives=1, vocabulary=nih)
    assert report == "Cannot rule out cardiomegaly. No atelectasis."


def test_global_random_used_without_rng() -> None:
    random.seed(5)
    a = labels_to_report(ROW)
    random.seed(5)
    assert labels_to_report(ROW) == a


# --------------------------------------------------------------------------------------------------
# Row helpers
# --------------------------------------------------------------------------------------------------

CHEXPERT_CSV = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS) + "\n"
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,"
    "1.0,,,,,,,,,0.0,,,,1.0\n"
    "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg,Female,87,Frontal,AP,"
    ",,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,\n"
)


def test_chexpert_row_to_labels_from_csv() -> None:
    rows = list(csv.DictReader(io.StringIO(CHEXPERT_CSV)))
    first = chexpert_row_to_labels(rows[0])
    assert list(first) == list(CHEXPERT_LABELS)
    assert first["No Finding"] == 1.0 and first["Pneumothorax"] == 0.0 and first["Support Devices"] == 1.0
    assert sum(v is not None for v in first.values()) == 3
    second = chexpert_row_to_labels(rows[1])
    assert second["Cardiomegaly"] == -1.0 and second["Lung Opacity"] == 1.0 and second["Fracture"] == 1.0
    assert second["No Finding"] is None
    decoded = _decode(labels_to_report(second, rng=random.Random(1)), list(CHEXPERT_LABELS[1:]))
    assert decoded == Counter({
        ("unc", "Cardiomegaly"): 1, ("pos", "Lung Opacity"): 1, ("unc", "Edema"): 1,
        ("unc", "Consolidation"): 1, ("unc", "Atelectasis"): 1, ("unc", "Pleural Effusion"): 1,
        ("pos", "Fracture"): 1,
    })


def test_chexpert_row_floats_and_missing_columns() -> None:
    row: Mapping[str, Optional[float]] = {name: float("nan") for name in CHEXPERT_LABELS}
    row = {**row, "Edema": 1.0}
    labels = chexpert_row_to_labels(row)
    assert labels["Edema"] == 1.0 and all(v is None for k, v in labels.items() if k != "Edema")
    incomplete = {k: v for k, v in row.items() if k not in ("Edema", "Fracture")}
    with pytest.raises(DatasetError) as info:
        chexpert_row_to_labels(incomplete)
    assert "Edema" in str(info.value) and "Fracture" in str(info.value)


def test_chestxray14_finding_labels() -> None:
    assert chestxray14_finding_labels_to_labels("Effusion|Mass") == {"Effusion": 1.0, "Mass": 1.0}
    assert chestxray14_finding_labels_to_labels("No Finding") == {"No Finding": 1.0}
    assert chestxray14_finding_labels_to_labels("Pleural_Thickening") == {"Pleural_Thickening": 1.0}
    assert chestxray14_finding_labels_to_labels("Cardiomegaly|Emphysema|Hernia") == {
        "Cardiomegaly": 1.0, "Emphysema": 1.0, "Hernia": 1.0,
    }
    with pytest.raises(ValueError, match="Pleural Effusion"):
        chestxray14_finding_labels_to_labels("Pleural Effusion")
    report = labels_to_report(chestxray14_finding_labels_to_labels("No Finding"), deterministic=True, extra_negatives=3,
                              vocabulary=CHESTXRAY14_LABELS)
    assert report == f"{_cap(NORMAL_SENTENCES[0])} No atelectasis. No cardiomegaly. No pleural effusion."


# --------------------------------------------------------------------------------------------------
# Zero-shot prompts
# --------------------------------------------------------------------------------------------------


def test_binary_and_rsna_prompts() -> None:
    assert binary_prompts("Pneumothorax") == ("No Pneumothorax", "Pneumothorax")
    assert binary_prompts("Nodule/Mass") == ("No Nodule/Mass", "Nodule/Mass")
    pairs = [binary_prompts(c) for c in VINDR_CLASSES]
    assert all(neg == f"No {pos}" for neg, pos in pairs) and [p for _, p in pairs] == list(VINDR_CLASSES)
    assert RSNA_PROMPTS == ("No evidence of pneumonia", "Findings suggesting pneumonia.")
