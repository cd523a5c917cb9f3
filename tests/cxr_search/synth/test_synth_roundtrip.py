"""Synthetic archive -> `data prepare` round trips: counts, labels and reports survive."""

from __future__ import annotations

import csv
import gzip
import json

import pytest

from cxr_search.datasets import prepare, read_manifest, write_manifest
from cxr_search.dicom.read import read_dicom
from cxr_search.errors import DicomError
from cxr_search.synth import synthesize

CORE = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural Effusion", "pneumothorax": "Pneumothorax",
        "consolidation": "Consolidation", "lung_lesion": "Lung Lesion", "atelectasis": "Atelectasis",
        "edema": "Edema", "support_devices": "Support Devices"}


def _ground_truth(summary):
    with open(summary.ground_truth, newline="", encoding="utf-8") as fh:
        return {row["image_id"]: row for row in csv.DictReader(fh)}


def test_mimic_layout_round_trips_counts_and_labels(tmp_path):
    summary = synthesize(tmp_path / "mimic", studies=40, seed=3, layout="mimic", image_size=64)
    result = prepare("mimic-cxr", tmp_path / "mimic")
    assert (result.summary["studies"], result.summary["images"], result.summary["reports"]) == (
        summary.studies, summary.images, summary.reports)
    # Labels read back equal the label file the generator wrote, row for row.
    with gzip.open(tmp_path / "mimic" / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt", newline="") as fh:
        written = {row["study_id"]: {k: float(v) for k, v in row.items()
                                     if k not in ("subject_id", "study_id") and v != ""} for row in csv.DictReader(fh)}
    gt = _ground_truth(summary)
    for row in result.rows:
        assert row.labels == written[row.study_id.lstrip("s")] or row.labels == written[row.study_id]
        truth = gt[row.image_id]
        for column, label in CORE.items():
            # A drawn finding is reported (positive or hedged); an absent one is never positive.
            if truth[column] == "1":
                assert row.labels.get(label) in (1.0, -1.0), (row.study_id, label)
            else:
                assert row.labels.get(label) != 1.0, (row.study_id, label)
    # The manifest file round-trips too.
    write_manifest(result.rows, tmp_path / "m.csv")
    again = read_manifest(tmp_path / "m.csv")
    assert [(r.image_id, r.labels, r.report_text) for r in again] == [(r.image_id, r.labels, r.report_text) for r in result.rows]


def test_pacs_layout_round_trips_counts_and_reports(tmp_path):
    summary = synthesize(tmp_path / "pacs", studies=24, seed=5, layout="pacs", image_size=96, broken=4)
    result = prepare("pacs", tmp_path / "pacs", reports_csv=tmp_path / "pacs" / "reports.csv")
    s = result.summary
    gt = _ground_truth(summary)
    # A file truncated inside its pixel data passes the header-only scan; it fails at decode.
    extra = [r for r in result.rows if r.image_id not in gt]
    assert len(extra) == 1
    with pytest.raises(DicomError):
        read_dicom(extra[0].image_path)
    assert s["images"] - len(extra) == summary.images
    assert s["studies"] == summary.studies and s["reports"] == summary.reports
    assert {r.image_id for r in result.rows} - {extra[0].image_id} == set(gt)
    # No patient name or raw PatientID reaches the manifest.
    raw_ids = {row["patient_id"] for row in gt.values()}
    assert not raw_ids & {r.patient_id for r in result.rows}
    # The text and empty broken files are skipped with reasons; the SR is used as a report source.
    assert s["skipped"] >= 2 and json.dumps(s["skipped_reasons"])
