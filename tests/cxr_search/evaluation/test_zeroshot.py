"""Zero-shot benchmark: metric functions vs naive/sklearn, the GLoRIA prompt bank, hand-checked scoring
with a fake model, and the ``cxr-search bench zeroshot`` command end to end with the tiny preset."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
from PIL import Image

import cli
from cxr_search.datasets import write_manifest
from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.evaluation.classification_metrics import accuracy, auroc, average_ranks, confusion_counts, f1_score
from cxr_search.evaluation.zeroshot import binary_probabilities, run_zeroshot, select_rows
from cxr_search.evaluation.zeroshot_prompts import (
    CHEXPERT5X200_CLASSES,
    NEGATION_SAFE_PROMPTS,
    gloria_chexpert_prompts,
    load_prompt_bank,
    reference_binary_prompts,
)
from cxr_search.labels import VINDR_CLASSES

# ------------------------------------------------------------------------------------ naive metrics


def naive_auroc(y: Sequence[int], s: Sequence[float]) -> float:
    pos = [si for yi, si in zip(y, s, strict=False) if yi]
    neg = [si for yi, si in zip(y, s, strict=False) if not yi]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def naive_ranks(x: Sequence[float]) -> List[float]:
    return [sum(1 for b in x if b < a) + (sum(1 for b in x if b == a) + 1) / 2 for a in x]


def naive_f1(y: Sequence[int], p: Sequence[int]) -> float:
    tp = sum(1 for a, b in zip(y, p, strict=False) if a and b)
    fp = sum(1 for a, b in zip(y, p, strict=False) if not a and b)
    fn = sum(1 for a, b in zip(y, p, strict=False) if a and not b)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@pytest.mark.parametrize("seed", range(12))
def test_metrics_match_naive_and_sklearn(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes present
    # Few distinct values -> many ties; every other seed uses continuous scores.
    s = rng.integers(0, 4, n).astype(float) if seed % 2 == 0 else rng.normal(size=n)
    pred = rng.integers(0, 2, n)
    assert auroc(y, s) == pytest.approx(naive_auroc(y, s), abs=1e-12)
    assert auroc(y, s) == pytest.approx(sk.roc_auc_score(y, s), abs=1e-12)
    np.testing.assert_allclose(average_ranks(s), naive_ranks(list(s)))
    assert f1_score(y, pred) == pytest.approx(naive_f1(y, pred), abs=1e-12)
    assert f1_score(y, pred) == pytest.approx(sk.f1_score(y, pred, zero_division=0), abs=1e-12)
    assert accuracy(y, pred) == pytest.approx(sk.accuracy_score(y, pred))
    assert sum(confusion_counts(y, pred)) == n


def test_metric_edge_cases():
    assert auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None  # one class only: undefined
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([0, 1, 1, 0, 1], [0.3, 0.3, 0.8, 0.1, 0.2]) == pytest.approx(4.5 / 6)  # 4 wins + 1 tie of 3x2
    assert auroc([0, 0, 1, 1], [1, 2, 3, 4]) == 1.0 and auroc([1, 1, 0, 0], [1, 2, 3, 4]) == 0.0
    assert f1_score([0, 0], [0, 0]) == 0.0  # no positives, none predicted (sklearn's zero_division=0)
    assert accuracy(["a", "b"], ["a", "c"]) == 0.5
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1])
    with pytest.raises(ValueError):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, float("nan")])
    assert list(average_ranks([10, 20, 20, 30])) == [1, 2.5, 2.5, 4]


def test_binary_probability_is_softmax_of_raw_cosines():
    rng = np.random.default_rng(0)
    c = rng.uniform(-1, 1, size=(20, 2))
    naive = np.exp(c[:, 1]) / np.exp(c).sum(axis=1)
    np.testing.assert_allclose(binary_probabilities(c[:, 0], c[:, 1]), naive, rtol=1e-12)


# ------------------------------------------------------------------------------------ prompt bank


def test_gloria_prompt_bank_count_and_format():
    bank = gloria_chexpert_prompts()
    counts = {k: len(v) for k, v in bank.items()}
    assert counts == {"Atelectasis": 210, "Cardiomegaly": 15, "Consolidation": 192, "Edema": 18,
                      "Pleural Effusion": 54}
    assert sum(counts.values()) == 489 == load_prompt_bank()["expected_total"]
    assert list(bank) == list(CHEXPERT5X200_CLASSES)
    assert bank["Atelectasis"][0] == "subsegmental atelectasis at the mid lung zone"
    assert bank["Atelectasis"][-1] == "minimal residual atelectasis at the right lower lobe"
    assert bank["Cardiomegaly"][0] == "cardiac silhouette size is upper limits of normal"
    # Pleural Effusion joins severity, location, subtype (GLoRIA's dict order); duplicates are kept.
    assert bank["Pleural Effusion"][:3] == ["left bilateral pleural effusion", "left subpulmonic pleural effusion",
                                            "left bilateral pleural effusion"]
    assert "small right subpulmonic pleural effusion" in bank["Pleural Effusion"]
    assert "appearance of patchy consolidation at the right uppper lobe" in bank["Consolidation"]
    assert "persistent pulmonary edema" in bank["Edema"]
    assert all(p == p.strip() and "  " not in p for v in bank.values() for p in v)
    raw = gloria_chexpert_prompts(verbatim=True)
    assert raw["Cardiomegaly"][0] == " cardiac silhouette size is upper limits of normal "
    assert "presistent pulmonary edema " in raw["Edema"] and "apperance of bilateral consolidation at the lower lung zone" in raw["Consolidation"]
    attribution = load_prompt_bank()["attribution"]
    assert attribution["license"] == "Apache-2.0" and "marshuang80/gloria" in attribution["source_repository"]


def test_reference_binary_prompts():
    vindr = reference_binary_prompts("vindr")
    assert list(vindr) == list(VINDR_CLASSES) and len(vindr) == 18
    assert vindr["Nodule/Mass"] == ("No Nodule/Mass", "Nodule/Mass")
    assert reference_binary_prompts("siim") == {"Pneumothorax": ("No Pneumothorax", "Pneumothorax")}
    assert reference_binary_prompts("rsna") == {"Pneumonia": ("No evidence of pneumonia", "Findings suggesting pneumonia.")}
    with pytest.raises(ConfigError):
        reference_binary_prompts("mimic")


# ------------------------------------------------------------------------------------ fake model


class FakeModel:
    """Hand-built embeddings: texts and image paths looked up in dicts (unknown texts get ``default``)."""

    def __init__(self, texts: Dict[str, np.ndarray], images: Dict[str, np.ndarray], default: np.ndarray) -> None:
        self.texts, self.images, self.default = texts, images, default
        self.text_calls: List[List[str]] = []

    def embed_images(self, items, **kwargs):
        return np.stack([self.images[str(p)] for p in items]).astype(np.float32)

    def embed_texts(self, texts, **kwargs):
        self.text_calls.append(list(texts))
        return np.stack([self.texts.get(t, self.default) for t in texts]).astype(np.float32)


def _row(dataset: str, image_id: str, labels: Dict[str, float], split: str = "test", path: str = "") -> ManifestRow:
    return ManifestRow(dataset=dataset, split=split, patient_id=image_id, study_id=image_id, image_id=image_id,
                       image_path=path or image_id, labels=labels)


def _unit(deg: float) -> np.ndarray:
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def test_binary_scoring_by_hand():
    # 2-D space: "No Pneumothorax" = x axis, "Pneumothorax" = y axis; image at angle a has
    # cos_neg = cos a, cos_pos = sin a, so p rises with the angle and argmax flips at 45 degrees.
    angles = {"a": (80, 1.0), "b": (30, 1.0), "c": (10, 0.0), "d": (60, 0.0)}
    rows = [_row("siim-acr", k, {"Pneumothorax": y}) for k, (_, y) in angles.items()]
    rows.append(_row("siim-acr", "e", {"Pneumothorax": -1.0}))  # uncertain: left out
    images = {k: _unit(a) for k, (a, _) in angles.items()}
    images["e"] = _unit(45)
    model = FakeModel({"No Pneumothorax": np.array([1.0, 0.0]), "Pneumothorax": np.array([0.0, 1.0])}, images,
                      default=_unit(45))
    result = run_zeroshot(rows, model, "siim")
    cls = result["reference"]["classes"]["Pneumothorax"]
    # Positives a (80) and b (30) against negatives c (10) and d (60): a beats both, b beats c only.
    assert cls["auroc"] == 0.75
    # Predicted positive: a, d (above 45 degrees). a right, b wrong, c right, d wrong.
    assert cls["accuracy"] == 0.5
    assert cls["f1"] == 0.5  # TP a, FP d, FN b
    assert (cls["n"], cls["n_positive"], cls["n_excluded"]) == (4, 2, 1)
    assert result["reference"]["mean"]["auroc"] == 0.75
    assert result["reference"]["prompts"] == {"Pneumothorax": ["No Pneumothorax", "Pneumothorax"]}
    # Variants are separate; the sentence prompts all map to the same vector here, so AUROC is 0.5.
    sentence = result["variants"]["sentence"]
    assert sentence["prompts"]["Pneumothorax"] == ["There is no Pneumothorax.", "There is Pneumothorax."]
    assert sentence["classes"]["Pneumothorax"]["auroc"] == 0.5
    assert result["variants"]["negation_safe"]["classes"] == {}
    # All prompts embedded in one call, each once.
    assert len(model.text_calls) == 1 and len(set(model.text_calls[0])) == len(model.text_calls[0])


def test_negation_safe_variant_and_undefined_auroc():
    # VinDr-like rows: "No finding" label present, most of the 18 classes all-negative.
    base = {name: 0.0 for name in VINDR_CLASSES}
    rows = []
    for i, normal in enumerate([1.0, 1.0, 0.0, 0.0]):
        labels = dict(base, **{"No finding": normal})
        if not normal:
            labels["Cardiomegaly"] = 1.0
        rows.append(_row("vindr-cxr", f"v{i}", labels))
    normal_dir, abnormal_dir = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    images = {"v0": _unit(10), "v1": _unit(20), "v2": _unit(70), "v3": _unit(80)}
    texts = {NEGATION_SAFE_PROMPTS[1]: normal_dir, NEGATION_SAFE_PROMPTS[0]: abnormal_dir,
             "Cardiomegaly": abnormal_dir, "No Cardiomegaly": normal_dir}
    result = run_zeroshot(rows, FakeModel(texts, images, default=_unit(45)), "vindr")
    ref = result["reference"]
    assert list(ref["classes"]) == list(VINDR_CLASSES)
    assert ref["classes"]["Cardiomegaly"]["auroc"] == 1.0 and ref["classes"]["Cardiomegaly"]["accuracy"] == 1.0
    assert ref["classes"]["Atelectasis"]["auroc"] is None  # all negative
    assert ref["mean"]["n_classes_auroc"] == 1 and ref["mean"]["auroc"] == 1.0
    assert any("AUROC undefined" in note and "Atelectasis" in note for note in result["notes"])
    assert "No finding" not in ref["classes"]
    safe = result["variants"]["negation_safe"]
    assert safe["prompts"]["No finding"] == list(NEGATION_SAFE_PROMPTS)
    assert safe["classes"]["No finding"]["auroc"] == 1.0
    assert safe["reference_style"]["prompts"]["No finding"] == ["No No finding", "No finding"]
    assert safe["reference_style"]["classes"]["No finding"]["auroc"] == 0.5  # both map to the default vector


def test_multiclass_mean_of_cosines_by_hand():
    # D = 6. Atelectasis prompts alternate between e0 and e1 (mean embedding has norm 0.707),
    # Cardiomegaly prompts all equal w with x.w = 0.9 for x = (e0 + e1)/sqrt(2). Mean of cosines
    # scores x as Cardiomegaly (0.9 > 0.707); the cosine with the normalised mean embedding would
    # say Atelectasis (1.0 > 0.9). The protocol is the mean of cosines.
    eye = np.eye(6)
    x = (eye[0] + eye[1]) / math.sqrt(2)
    w = 0.9 * x + math.sqrt(1 - 0.81) * eye[2]
    bank = gloria_chexpert_prompts()
    texts: Dict[str, np.ndarray] = {}
    for i, p in enumerate(bank["Atelectasis"]):
        texts[p] = eye[i % 2]
    texts.update({p: w for p in bank["Cardiomegaly"]})
    texts.update({p: eye[3] for p in bank["Consolidation"]})
    texts.update({p: eye[4] for p in bank["Edema"]})
    texts.update({p: eye[5] for p in bank["Pleural Effusion"]})
    images = {"i0": x, "i1": w, "i2": eye[3], "i3": eye[4], "i4": eye[5]}
    rows = [_row("chexpert5x200", f"i{k}", {c: float(j == k) for j, c in enumerate(CHEXPERT5X200_CLASSES)})
            for k in range(5)]
    result = run_zeroshot(rows, FakeModel(texts, images, default=np.zeros(6)), "chexpert5x200")
    ref = result["reference"]
    assert result["protocol"] == "multiclass" and ref["prompt_bank"]["total"] == 489
    assert ref["confusion"]["matrix"][0] == [0, 1, 0, 0, 0]  # Atelectasis image predicted Cardiomegaly
    assert ref["classes"]["Atelectasis"]["accuracy"] == 0.0 and ref["classes"]["Cardiomegaly"]["accuracy"] == 1.0
    assert ref["mean"]["accuracy_micro"] == 0.8 and ref["mean"]["accuracy_macro"] == 0.8
    assert ref["classes"]["Cardiomegaly"]["f1"] == round(2 / 3, 6)
    assert ref["mean"]["f1"] == round((0 + 2 / 3 + 3) / 5, 6)
    assert ref["classes"]["Atelectasis"]["auroc"] == 1.0  # one-vs-rest on class scores
    assert result["variants"] == {}


def test_class_without_evaluable_rows():
    rows = [_row("siim-acr", "a", {"Pneumothorax": -1.0}), _row("siim-acr", "b", {})]
    model = FakeModel({}, {"a": _unit(10), "b": _unit(20)}, default=_unit(45))
    result = run_zeroshot(rows, model, "siim")
    cls = result["reference"]["classes"]["Pneumothorax"]
    assert cls == {"n": 0, "n_positive": 0, "n_excluded": 2, "auroc": None, "accuracy": None, "f1": None}
    assert result["reference"]["mean"] == {"auroc": None, "accuracy": None, "f1": None, "n_classes_auroc": 0,
                                           "n_classes": 0}
    assert any("no evaluable row for Pneumothorax" in note for note in result["notes"])


def test_multiclass_needs_one_positive():
    rows = [_row("chexpert5x200", "i0", {c: 0.0 for c in CHEXPERT5X200_CLASSES})]
    with pytest.raises(DatasetError, match="i0"):
        run_zeroshot(rows, FakeModel({}, {"i0": np.ones(2)}, np.ones(2)), "chexpert5x200")


def test_select_rows_errors():
    rows = [_row("siim-acr", "a", {"Pneumothorax": 1.0}, split="train")]
    with pytest.raises(DatasetError, match="splits present: train"):
        select_rows(rows, "siim", "test")
    with pytest.raises(DatasetError, match="datasets present: siim-acr"):
        select_rows(rows, "rsna", "test")
    with pytest.raises(ConfigError, match="unknown zero-shot task"):
        select_rows(rows, "mimic", "test")
    assert select_rows(rows, "siim", "train") == rows


# ------------------------------------------------------------------------------------ CLI, tiny model


def _tiny_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        path = tmp_path / "img" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(path)
        labels = {name: 0.0 for name in VINDR_CLASSES}
        labels["Cardiomegaly"] = float(i % 2)
        labels["Pleural effusion"] = float(i % 3 == 0)
        labels["No finding"] = 0.0 if i % 2 or i % 3 == 0 else 1.0
        rows.append(_row("vindr-cxr", f"im{i}", labels, split="test" if i < 6 else "train", path=str(path)))
    manifest = tmp_path / "manifest.csv"
    write_manifest(rows, manifest)
    return manifest


def _cli(capsys, *argv: str):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_zeroshot_deterministic(tmp_path, capsys):
    manifest = _tiny_dataset(tmp_path)
    argv = ["bench", "zeroshot", str(manifest), "--task", "vindr", "--model", "tiny", "--device", "cpu", "--json"]
    code, first, _ = _cli(capsys, *argv, "--out", str(tmp_path / "out"))
    assert code == 0
    code, second, _ = _cli(capsys, *argv)
    assert code == 0 and first == second
    result = json.loads(first)
    assert result["n_images"] == 6 and result["split"] == "test" and result["model"] == "tiny"
    assert list(result["reference"]["classes"]) == list(VINDR_CLASSES)
    assert result["reference"]["classes"]["Atelectasis"]["auroc"] is None
    assert 0.0 <= result["reference"]["classes"]["Cardiomegaly"]["auroc"] <= 1.0
    assert result["reference"]["mean"]["n_classes_auroc"] == 2
    assert "No finding" in result["variants"]["negation_safe"]["classes"]
    saved = json.loads((tmp_path / "out" / "zeroshot-vindr.json").read_text())
    assert saved == result
    ids = (tmp_path / "out" / "evaluated_ids.csv").read_text().splitlines()
    assert ids == ["dataset,study_id,image_id"] + [f"vindr-cxr,im{i},im{i}" for i in range(6)]


def test_cli_zeroshot_chexpert5x200_table(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = []
    for k, name in enumerate(CHEXPERT5X200_CLASSES):
        path = tmp_path / f"c{k}.png"
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(path)
        rows.append(_row("chexpert5x200", f"c{k}", {c: float(c == name) for c in CHEXPERT5X200_CLASSES},
                         path=str(path)))
    write_manifest(rows, tmp_path / "m.csv")
    code, out, _ = _cli(capsys, "bench", "zeroshot", str(tmp_path / "m.csv"), "--task", "chexpert5x200",
                        "--model", "tiny", "--device", "cpu")
    assert code == 0
    for text in ("Pleural Effusion", "mean (macro)", "accuracy (micro)"):
        assert text in out


def test_cli_zeroshot_errors(tmp_path, capsys):
    manifest = _tiny_dataset(tmp_path)
    code, out, err = _cli(capsys, "bench", "zeroshot", str(manifest), "--task", "vinder", "--model", "tiny")
    assert code == ConfigError.exit_code and "unknown zero-shot task 'vinder'" in err
    assert "Traceback" not in err and out == ""
    code, _, err = _cli(capsys, "bench", "zeroshot", str(manifest), "--task", "vindr", "--model", "tiny",
                        "--split", "validate")
    assert code == DatasetError.exit_code and "splits present: train (2 rows), test (6 rows)" in " ".join(err.split())
    assert "Traceback" not in err
