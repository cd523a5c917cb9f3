"""Held-out synthetic evaluation: study selection, finding sets from the ground truth, the precision ceiling."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

from cxr_search.datasets import prepare
from cxr_search.errors import DatasetError
from cxr_search.evaluation.synth_heldout import evaluate_heldout, heldout_studies, oracle_label_precision
from cxr_search.inference import Embedder
from cxr_search.model import create_model
from cxr_search.reports import choose_report_text
from cxr_search.synth import synthesize
from cxr_search.synth.findings import EXTRAS, FINDINGS


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("heldout") / "archive"
    synthesize(root, studies=20, seed=11, layout="mimic", image_size=64)
    return root


def test_one_frontal_image_and_the_longest_text_per_study(archive: Path) -> None:
    rows = prepare("mimic-cxr", archive).rows
    studies = heldout_studies(rows, archive / "ground_truth.csv")
    truth = list(csv.DictReader((archive / "ground_truth.csv").open()))
    frontal_studies = {r["study_id"] for r in truth if r["view"] in ("PA", "AP")}
    assert {s.study_id for s in studies} == frontal_studies
    by_study = {r.study_id: r for r in rows}
    for s in studies:
        row = by_study[s.study_id]
        assert s.text == choose_report_text(row.findings or None, row.impression or None)
        assert len(s.text) == max(len(row.findings), len(row.impression))  # the reference's longest rule
        expected = {f for f in FINDINGS if next(r for r in truth if r["study_id"] == s.study_id)[f] == "1"}
        assert s.findings == frozenset(expected)
    everything = heldout_studies(rows, archive / "ground_truth.csv", findings="all")
    assert all(set(a.findings) <= set(FINDINGS) | set(EXTRAS) for a in everything)
    assert all(a.findings >= b.findings for a, b in zip(everything, studies, strict=False))
    with pytest.raises(DatasetError):
        heldout_studies(rows, archive / "ground_truth.csv", findings="some")


def test_oracle_precision_matches_counting() -> None:
    sets = [frozenset()] * 12 + [frozenset({"a"})] * 3 + [frozenset({"a", "b"})]
    counts = Counter(sets)
    naive = sum(min(counts[s], 10) / 10 for s in sets) / len(sets)
    assert oracle_label_precision(sets) == pytest.approx(naive)
    assert oracle_label_precision([frozenset()] * 10) == 1.0


def test_evaluate_heldout_reports_both_directions(archive: Path) -> None:
    studies = heldout_studies(prepare("mimic-cxr", archive).rows, archive / "ground_truth.csv")
    scores = evaluate_heldout(Embedder(create_model("tiny"), batch_size=8, text_batch_size=8), studies)
    for key in ("i2t_R@10", "t2i_R@10", "i2t_label_precision@10", "t2i_label_precision@10",
                "label_precision_oracle@10"):
        assert 0.0 <= scores[key] <= 1.0
    assert scores["studies"] == len(studies)
    assert len(studies) >= 10  # so the oracle and the metric use the same cut-off
    for direction in ("i2t", "t2i"):  # no model beats the ceiling
        assert scores[f"{direction}_label_precision@10"] <= scores["label_precision_oracle@10"] + 1e-9
