"""MIMIC-CXR views from the metadata CSV's ViewPosition: the counts in the summary, and the cxr-clip
protocol's frontal query image (PA before AP, then by dicom_id) with the studies it leaves out."""

from __future__ import annotations

from pathlib import Path

from cxr_search.datasets import prepare
from cxr_search.evaluation.retrieval_protocol import plan_retrieval
from tests.helpers.dataset_files import write_csv, write_image

IMAGES = [
    # dicom_id, subject, study, ViewPosition, split
    ("a1", "10000032", "50000001", "LATERAL", "test"),  # first by id, a lateral
    ("a2", "10000032", "50000001", "AP", "test"),
    ("a3", "10000032", "50000001", "PA", "test"),  # PA wins over AP
    ("b1", "10000033", "50000002", "LL", "test"),  # lateral only: left out
    ("c1", "10000034", "50000003", "", "test"),  # blank view
    ("c2", "10000034", "50000003", "AP", "test"),
    ("d1", "10000035", "50000004", "", "test"),  # no known view at all: left out, counted as unknown
    ("e1", "10000036", "50000005", "LATERAL", "train"),
    ("e2", "10000036", "50000005", "PA", "train"),
]


def make_release(root: Path) -> None:
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [(d, st, s, sp) for d, s, st, _, sp in IMAGES], gz=True)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
              [(d, s, st, v) for d, s, st, v, _ in IMAGES], gz=True)
    for d, s, st, _, _ in IMAGES:
        write_image(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
    for s, st in {(s, st) for _, s, st, _, _ in IMAGES}:
        (root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}.txt").write_text(
            f"FINAL REPORT\n FINDINGS: Findings of study {st}.\n\n IMPRESSION: Impression {st}.\n")


def test_mimic_frontal_query_and_counts(tmp_path: Path) -> None:
    make_release(tmp_path)
    result = prepare("mimic-cxr", tmp_path, labels="none")
    summary = result.summary
    assert summary["views"] == {"AP": 2, "LATERAL": 2, "LL": 1, "PA": 2, "UNKNOWN": 2}
    assert summary["studies_without_frontal"] == {"test": 2}
    test_rows = [r for r in result.rows if r.split == "test"]
    plan = plan_retrieval(test_rows, protocol="cxr-clip")
    assert [(s.study_id, s.rows[0].image_id) for s in plan.studies] == [("50000001", "a3"), ("50000003", "c2")]
    assert plan.skipped == {"studies_without_text": 0, "studies_without_frontal": 2}
    assert plan.query_images["studies_without_frontal_views_unknown"] == 1
    assert plan.query_images["view_information"] == {"mimic-cxr": True} and plan.warnings == []
    assert [i["image_id"] for i in plan.ids()] == ["a3", "c2"]
    # The full protocol keeps every image of every study with a text.
    full = plan_retrieval(test_rows, protocol="full")
    assert sum(len(s.rows) for s in full.studies) == 7 and "studies_without_frontal" not in full.skipped
