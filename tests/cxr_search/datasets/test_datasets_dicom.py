"""DICOM dataset adapters on small generated fixtures: VinDr-CXR, RSNA Pneumonia, SIIM-ACR, PACS export."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_search.datasets import patient_split_conflicts, prepare
from cxr_search.datasets.pacs import is_chest_body_part, pseudonymous_patient_id
from cxr_search.datasets.splits import gloria_split
from cxr_search.datasets.vindr import NO_FINDING, aggregate_readers
from cxr_search.errors import DatasetError
from cxr_search.labels import VINDR_CLASSES
from cxr_search.reports import choose_report_text, split_sections
from tests.helpers.dataset_files import write_csv

CR_SOP = "1.2.840.10008.5.1.4.1.1.1"
DX_SOP = "1.2.840.10008.5.1.4.1.1.1.1"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
GSPS_SOP = "1.2.840.10008.5.1.4.1.1.11.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def _base(sop_class: str, modality: str, **attrs: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    for key, value in attrs.items():
        if value is not None:
            setattr(ds, key, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_dicom(
    path: Path,
    *,
    modality: str = "DX",
    sop_class: str = DX_SOP,
    pixels: bool = True,
    photometric: str = "MONOCHROME2",
    **attrs: Any,
) -> Dataset:
    """A tiny single-frame greyscale image (or a pixel-less object) written as a DICOM file."""
    attrs.setdefault("BodyPartExamined", "CHEST")
    attrs.setdefault("PatientID", "PAT0")
    attrs.setdefault("PatientSex", "F")
    attrs.setdefault("PatientAge", "045Y")
    attrs.setdefault("StudyDate", "20200131")
    ds = _base(sop_class, modality, **attrs)
    if pixels:
        ds.Rows, ds.Columns = 4, 4
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.arange(16, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def _code(meaning: str, value: str, scheme: str) -> DicomSequence:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return DicomSequence([item])


def write_sr(path: Path, study_uid: str, findings: str, impression: str, accession: str = "") -> Dataset:
    items = []
    for meaning, code, text in (("Findings", "121071", findings), ("Impression", "121073", impression)):
        item = Dataset()
        item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
        item.ConceptNameCodeSequence = _code(meaning, code, "DCM")
        item.TextValue = text
        items.append(item)
    ds = _base(BASIC_TEXT_SR, "SR", StudyInstanceUID=None, AccessionNumber=accession or None, PatientID="PAT-002")
    ds.StudyInstanceUID = study_uid
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = _code("Chest X-Ray Report", "18748-4", "LN")
    ds.ContentSequence = DicomSequence(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def assert_disjoint(rows: Sequence[Any]) -> None:
    assert patient_split_conflicts(rows) == {}


# --------------------------------------------------------------------------------------------------
# VinDr-CXR
# --------------------------------------------------------------------------------------------------

VINDR_LABELS = list(VINDR_CLASSES[:9]) + ["Other lesion"] + list(VINDR_CLASSES[9:]) + ["Other disease", NO_FINDING]


def _vote(*positives: str) -> List[int]:
    return [1 if name in positives else 0 for name in VINDR_LABELS]


def make_vindr(root: Path) -> None:
    train_votes = {
        "aaa": [("R1", _vote("Cardiomegaly", "Aortic enlargement")), ("R2", _vote(NO_FINDING)), ("R3", _vote("Cardiomegaly"))],
        "bbb": [("R4", _vote(NO_FINDING)), ("R5", _vote(NO_FINDING)), ("R6", _vote(NO_FINDING))],
        "ccc": [("R1", _vote("Other lesion")), ("R2", _vote(NO_FINDING)), ("R3", _vote(NO_FINDING))],
        "ddd": [("R1", _vote("Pneumothorax"))],  # not on disk
        "eee": [("R1", _vote(NO_FINDING))],  # not a DICOM file
    }
    write_csv(
        root / "annotations" / "image_labels_train.csv", ["image_id", "rad_id", *VINDR_LABELS],
        [[image, rad, *votes] for image, readers in train_votes.items() for rad, votes in readers],
    )
    write_csv(
        root / "annotations" / "image_labels_test.csv", ["image_id", *VINDR_LABELS],
        [["ttt", *_vote("Lung tumor", "Nodule/Mass")], ["uuu", *_vote(NO_FINDING)]],
    )
    for image in ("aaa", "bbb", "ccc"):
        write_dicom(root / "train" / f"{image}.dicom", PatientSex="M", PatientAge="061Y", ViewPosition="PA")
    (root / "train" / "eee.dicom").write_bytes(b"this is not a dicom file at all" * 8)
    for image in ("ttt", "uuu"):
        write_dicom(root / "test" / f"{image}.dicom")


def test_vindr_reader_aggregation_rule() -> None:
    names = ["Cardiomegaly", "Pneumothorax", NO_FINDING]
    votes = [{"Cardiomegaly": 1.0, NO_FINDING: 0.0}, {NO_FINDING: 1.0}, {"Cardiomegaly": 0.0}]
    assert aggregate_readers(votes, names) == {"Cardiomegaly": 1.0, "Pneumothorax": 0.0, NO_FINDING: 0.0}
    assert aggregate_readers([{NO_FINDING: 1.0}] * 3, names) == {"Cardiomegaly": 0.0, "Pneumothorax": 0.0, NO_FINDING: 1.0}


def test_vindr_official(tmp_path: Path) -> None:
    root = tmp_path / "vindr"
    make_vindr(root)
    result = prepare("vindr-cxr", root)
    by_id = {r.image_id: r for r in result.rows}
    assert sorted(by_id) == ["aaa", "bbb", "ccc", "ttt", "uuu"]
    assert {i: r.split for i, r in by_id.items()} == {"aaa": "train", "bbb": "train", "ccc": "train", "ttt": "test", "uuu": "test"}
    a = by_id["aaa"].labels
    assert list(a) == VINDR_LABELS
    assert {k for k, v in a.items() if v == 1.0} == {"Cardiomegaly", "Aortic enlargement"}
    assert by_id["bbb"].labels[NO_FINDING] == 1.0 and sum(by_id["bbb"].labels.values()) == 1.0
    assert by_id["ccc"].labels["Other lesion"] == 1.0 and by_id["ccc"].labels[NO_FINDING] == 0.0
    assert {k for k, v in by_id["ttt"].labels.items() if v == 1.0} == {"Lung tumor", "Nodule/Mass"}
    assert all(r.label_vocab == "vindr" for r in result.rows)
    assert all(c in by_id["aaa"].labels for c in VINDR_CLASSES)
    assert by_id["aaa"].sex == "M" and by_id["aaa"].age == 61.0 and by_id["aaa"].view == "PA"
    assert by_id["aaa"].sop_instance_uid and by_id["aaa"].study_date == "2020-01-31"
    assert result.summary["skipped_reasons"] == {"image file missing": 1, "not DICOM": 1}
    fast = prepare("vindr-cxr", root, read_headers=False)
    assert {r.image_id for r in fast.rows} == {"aaa", "bbb", "ccc", "eee", "ttt", "uuu"}


def test_vindr_kaggle_and_missing_column(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    boxes = [
        ["aaa", "Cardiomegaly", 3, "R1", 1, 2, 3, 4],
        ["aaa", "Cardiomegaly", 3, "R2", 1, 2, 3, 4],
        ["aaa", "Pleural effusion", 10, "R3", 1, 2, 3, 4],
        ["bbb", "No finding", 14, "R1", "", "", "", ""],
        ["bbb", "No finding", 14, "R2", "", "", "", ""],
    ]
    write_csv(root / "train.csv", ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"], boxes)
    for image in ("aaa", "bbb"):
        write_dicom(root / "train" / f"{image}.dicom")
    result = prepare("vindr-cxr", root)
    by_id = {r.image_id: r for r in result.rows}
    assert {k for k, v in by_id["aaa"].labels.items() if v == 1.0} == {"Cardiomegaly", "Pleural effusion"}
    assert by_id["aaa"].labels[NO_FINDING] == 0.0 and by_id["bbb"].labels[NO_FINDING] == 1.0
    assert {r.split for r in result.rows} == {"train"} and result.summary["label_form"] == "kaggle"

    official = tmp_path / "official"
    header = ["image_id", "rad_id", *[n for n in VINDR_LABELS if n != "Lung tumor"]]
    write_csv(official / "annotations" / "image_labels_train.csv", header, [])
    with pytest.raises(DatasetError) as info:
        prepare("vindr-cxr", official)
    assert "'Lung tumor'" in str(info.value) and "image_labels_train.csv" in str(info.value)
    with pytest.raises(DatasetError, match="image_labels_train.csv"):
        prepare("vindr-cxr", tmp_path / "kaggle" / "train")


# --------------------------------------------------------------------------------------------------
# RSNA Pneumonia
# --------------------------------------------------------------------------------------------------


def make_rsna(root: Path, n: int = 24) -> Dict[str, float]:
    rng = np.random.default_rng(0)
    pids = [f"{int(x):08x}-0000-4000-8000-{k:012d}" for k, x in enumerate(rng.integers(0, 2**31, n))]
    rows, detail, truth = [], [], {}
    for k, pid in enumerate(pids):
        target = k % 3 == 0
        truth[pid] = 1.0 if target else 0.0
        boxes = 2 if k % 6 == 0 else 1
        for _ in range(boxes):
            rows.append([pid, 100 if target else "", 200 if target else "", 50 if target else "", 60 if target else "", int(target)])
            detail.append([pid, "Lung Opacity" if target else ("Normal" if k % 2 else "No Lung Opacity / Not Normal")])
        if k != 5:
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", PatientID=pid, ViewPosition="AP" if k % 2 else "PA", PatientSex="M")
    next(d for d in detail if truth[d[0]] == 0.0)[1] = "Lung Opacity"  # disagrees with Target 0
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], detail)
    return truth


def test_rsna(tmp_path: Path) -> None:
    root = tmp_path / "rsna"
    truth = make_rsna(root)
    result = prepare("rsna-pneumonia", root)
    rows = result.rows
    assert len(rows) == len(truth) - 1
    assert result.summary["skipped_reasons"] == {"image file missing": 1}
    assert any("disagree" in n for n in result.summary["notes"])
    expected_split = gloria_split(sorted(truth), seed=0)
    for r in rows:
        assert r.labels == {"Pneumonia": truth[r.image_id]} and r.label_vocab == "rsna"
        assert r.patient_id == r.study_id == r.image_id
        assert r.split == expected_split[r.image_id]
        assert r.view in ("AP", "PA") and r.sex == "M"
    assert_disjoint(rows)
    assert prepare("rsna-pneumonia", root).rows == rows


def test_rsna_split_equals_gloria_pipeline(tmp_path: Path) -> None:
    sklearn = pytest.importorskip("sklearn.model_selection")
    root = tmp_path / "rsna"
    truth = make_rsna(root, n=40)
    # GLoRIA: groupby("patientId") (sorted ids), train_test_split(0.3, rs 0), then (0.5, rs 0) -> test, valid
    units = sorted(truth)
    train, rest = sklearn.train_test_split(units, test_size=0.3, random_state=0)
    test, valid = sklearn.train_test_split(rest, test_size=0.5, random_state=0)
    gloria = {**{u: "train" for u in train}, **{u: "test" for u in test}, **{u: "validate" for u in valid}}
    rows = prepare("rsna-pneumonia", root, read_headers=False).rows
    assert {r.image_id: r.split for r in rows} == {u: s for u, s in gloria.items() if u in {r.image_id for r in rows}}


def test_rsna_missing_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height"], [["a", 1, 2, 3, 4]])
    with pytest.raises(DatasetError) as info:
        prepare("rsna-pneumonia", tmp_path)
    assert "'Target'" in str(info.value) and "stage_2_train_labels.csv" in str(info.value)


# --------------------------------------------------------------------------------------------------
# SIIM-ACR
# --------------------------------------------------------------------------------------------------


def make_siim(root: Path, n: int = 30, header: str = " EncodedPixels", space: str = " ") -> Dict[str, float]:
    truth: Dict[str, float] = {}
    rows = []
    for k in range(n):
        image_id = f"1.2.276.0.7230010.3.1.4.8323329.{1000 + k}.1517875{k:03d}.{k}"
        positive = k % 4 == 0
        truth[image_id] = 1.0 if positive else 0.0
        if positive:
            rows.append([image_id, f"{space}387620 23 996 33 986 43"])
            if k % 8 == 0:
                rows.append([image_id, f"{space}-1"])  # a later "-1" row does not undo a mask
                rows.append([image_id, f"{space}12 3 4 5"])
        else:
            rows.append([image_id, f"{space}-1"])
        patient = f"patient-{k // 2}"  # two images per patient
        study, series = f"1.2.3.{k}.study", f"1.2.3.{k}.series"
        write_dicom(root / "dicom-images-train" / study / series / f"{image_id}.dcm", PatientID=patient, SOPInstanceUID=image_id)
    write_csv(root / "train-rle.csv", ["ImageId", header], rows)
    return truth


def test_siim_leading_space_header(tmp_path: Path) -> None:
    root = tmp_path / "siim"
    truth = make_siim(root)
    assert (root / "train-rle.csv").read_text().splitlines()[0] == "ImageId, EncodedPixels"
    result = prepare("siim-acr", root)
    rows = result.rows
    assert len(rows) == len(truth)
    for r in rows:
        assert r.labels == {"Pneumothorax": truth[r.image_id]} and r.label_vocab == "siim"
        assert Path(r.image_path).name == f"{r.image_id}.dcm"
        assert r.patient_id.startswith("patient-")
    assert_disjoint(rows)
    patients = sorted({r.patient_id for r in rows})
    counts = {s: len({r.patient_id for r in rows if r.split == s}) for s in ("train", "validate", "test")}
    assert counts == {"train": 10, "test": 2, "validate": 3}  # ceil(0.3*15)=5 held out; 5 -> ceil(2.5)=3 validate
    assert sum(counts.values()) == len(patients)
    assert prepare("siim-acr", root).rows == rows


def test_siim_stage2_header_and_missing_column(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    truth_a = make_siim(a, n=8)
    truth_b = make_siim(b, n=8, header="EncodedPixels", space="")
    rows_a = prepare("siim-acr", a, read_headers=False).rows
    rows_b = prepare("siim-acr", b, read_headers=False).rows
    assert truth_a == truth_b
    assert [(r.image_id, r.labels, r.split) for r in rows_a] == [(r.image_id, r.labels, r.split) for r in rows_b]
    assert all(r.patient_id == r.image_id for r in rows_a)  # no headers read: each image its own patient
    write_csv(a / "train-rle.csv", ["ImageId", " Encoded Pixels"], [])
    with pytest.raises(DatasetError) as info:
        prepare("siim-acr", a)
    assert "'EncodedPixels'" in str(info.value) and "train-rle.csv" in str(info.value)


# --------------------------------------------------------------------------------------------------
# PACS export
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, chest",
    [
        (None, True), ("", True), ("CHEST", True), ("Chest PA", True), ("THORAX", True), ("TORAX", True),
        ("CHST", True), ("CEHST", True), ("CHEAST", True), ("THORX", True), ("PORT CHEST", True), ("LUNG", True),
        ("KNEE", False), ("ABDOMEN", False), ("HAND", False), ("CHEEK", False), ("SKULL", False), ("PELVIS", False),
    ],
)  # fmt: skip
def test_is_chest_body_part(value: Optional[str], chest: bool) -> None:
    assert is_chest_body_part(value) is chest


REPORT_ACC1 = "FINDINGS:\nHeart size is normal. Lungs are clear without effusion.\nIMPRESSION:\nNo acute disease."


def make_pacs(root: Path) -> Dict[str, Any]:
    s1, s2, s5 = generate_uid(), generate_uid(), generate_uid()
    pa = write_dicom(root / "A" / "1", StudyInstanceUID=s1, PatientID="PAT-001", AccessionNumber="ACC1", ViewPosition="PA")
    lat = write_dicom(root / "A" / "2.dcm", StudyInstanceUID=s1, PatientID="PAT-001", AccessionNumber="ACC1", ViewPosition="LL")
    cr = write_dicom(
        root / "B" / "img.dcm", modality="CR", sop_class=CR_SOP, BodyPartExamined="CHST", StudyInstanceUID=s2,
        PatientID="PAT-002", AccessionNumber="ACC2", ViewPosition="", SeriesDescription="Thorax AP",
    )
    write_sr(root / "B" / "report", s2, "Left basilar opacity.", "Left lower lobe pneumonia, follow-up advised.")
    write_dicom(root / "C" / "ct.dcm", modality="CT", sop_class=CT_SOP, PatientID="PAT-003")
    write_dicom(root / "C" / "knee.dcm", BodyPartExamined="KNEE", PatientID="PAT-003")
    write_dicom(root / "C" / "capture.dcm", photometric="RGB", PatientID="PAT-003")
    write_dicom(root / "C" / "cine", NumberOfFrames=2, PatientID="PAT-003")
    write_dicom(root / "E" / "pr.dcm", modality="PR", sop_class=GSPS_SOP, pixels=False, PatientID="PAT-001")
    blank = write_dicom(root / "G" / "blank.dcm", BodyPartExamined="", PatientID="", StudyInstanceUID=s5, ViewPosition="AP")
    (root / "F").mkdir()
    shutil.copy(root / "A" / "2.dcm", root / "F" / "dup.dcm")  # the same image exported twice
    (root / "D").mkdir()
    (root / "D" / "notes.txt").write_text("not an image\n" * 20)
    (root / "D" / "truncated").write_bytes((root / "A" / "2.dcm").read_bytes()[:300])  # cut inside the header
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    return {"s1": s1, "s2": s2, "s5": s5, "pa": pa, "lat": lat, "cr": cr, "blank": blank}


def test_pacs_export(tmp_path: Path) -> None:
    root = tmp_path / "export"
    info = make_pacs(root)
    reports = write_csv(tmp_path / "ris.csv", ["Accession Number", "Report"], [["ACC1", REPORT_ACC1], ["ACC9", "other"]])
    result = prepare("pacs", root, reports_csv=str(reports))
    rows = result.rows
    assert [r.image_id for r in rows] == [info[k].SOPInstanceUID for k in ("pa", "lat", "cr", "blank")]
    pa, lat, cr, blank = rows
    assert pa.image_path == str(root.resolve() / "A" / "1")  # extension-less file
    assert (pa.view, lat.view, cr.view, blank.view) == ("PA", "LL", "AP", "AP")
    assert pa.study_id == info["s1"] and pa.accession_number == "ACC1" and pa.series_instance_uid
    assert pa.patient_id == hashlib.sha256(b"PAT-001").hexdigest()[:16] == lat.patient_id
    assert "PAT-001" not in json.dumps([r.to_csv_dict() for r in rows])
    assert blank.patient_id == pseudonymous_patient_id(None, info["s5"])
    assert pa.sex == "F" and pa.age == 45.0 and pa.study_date == "2020-01-31"
    sec = split_sections(REPORT_ACC1)
    assert (pa.findings, pa.impression) == (sec.findings, sec.impression)
    assert pa.report_text == lat.report_text == choose_report_text(sec.findings, sec.impression, "longest")
    assert cr.findings == "Left basilar opacity." and cr.report_text == "Left lower lobe pneumonia, follow-up advised."
    assert blank.report_text == ""
    assert {r.split for r in rows} == {"test"}
    summary = result.summary
    json.dumps(summary)
    assert summary["skipped_reasons"] == {
        "DICOMDIR index file": 1, "not DICOM": 1, "modality CT": 1, "body part KNEE": 1,
        "no pixel data (modality PR)": 1, "duplicate image_id": 1, "colour image (RGB)": 1, "multi-frame image": 1,
        "no pixel data (modality missing)": 1,
    }  # fmt: skip
    assert summary["report_sources"] == {"csv": 1, "folder": 0, "sr": 1}
    assert summary["structured_reports"] == 1 and summary["reports"] == 2 and summary["files_read"] == 13

    # The pool gives exactly what the in-process scan gives.
    assert prepare("pacs", root, reports_csv=str(reports), workers=2).rows == rows


def test_pacs_reports_dir_precedence_and_seeded_split(tmp_path: Path) -> None:
    root = tmp_path / "export"
    info = make_pacs(root)
    folder = tmp_path / "reports"
    (folder / "2020").mkdir(parents=True)
    (folder / "2020" / "ACC1.txt").write_text("IMPRESSION: Clear lungs.\n")
    (folder / f"{info['s2']}.txt").write_text("FINDINGS: Opacity at the left base, larger than before.\nIMPRESSION: Pneumonia.\n")
    result = prepare("pacs", root, reports_dir=str(folder), split="seeded")
    by_study = {r.study_id: r for r in result.rows}
    assert by_study[info["s1"]].report_text == "Clear lungs."
    assert by_study[info["s2"]].report_text == "Opacity at the left base, larger than before."  # folder beats SR
    assert result.summary["report_sources"] == {"csv": 0, "folder": 2, "sr": 0}
    assert_disjoint(result.rows)
    assert prepare("pacs", root, reports_dir=str(folder), split="seeded").rows == result.rows
    no_sr = prepare("pacs", root, use_sr=False)
    assert by_study[info["s2"]].image_id in {r.image_id for r in no_sr.rows}
    assert all(r.report_text == "" for r in no_sr.rows)


def test_pacs_report_csv_columns(tmp_path: Path) -> None:
    root = tmp_path / "export"
    info = make_pacs(root)
    by_uid = write_csv(
        tmp_path / "uid.csv", ["study_instance_uid", "findings", "impression"], [[info["s1"], "Small effusion.", "Effusion."]]
    )
    rows = prepare("pacs", root, reports_csv=str(by_uid), use_sr=False).rows
    assert {r.report_text for r in rows if r.study_id == info["s1"]} == {"Small effusion."}
    bad = write_csv(tmp_path / "bad.csv", ["MRN", "report_text"], [["1", "x"]])
    with pytest.raises(DatasetError) as err:
        prepare("pacs", root, reports_csv=str(bad))
    assert "AccessionNumber" in str(err.value) and "bad.csv" in str(err.value)
    no_text = write_csv(tmp_path / "notext.csv", ["AccessionNumber", "author"], [["ACC1", "x"]])
    with pytest.raises(DatasetError, match="report_text"):
        prepare("pacs", root, reports_csv=str(no_text))


def test_header_pool_without_fork_gives_the_same_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With another thread alive the pool uses forkserver/spawn instead of fork; same result."""
    root = tmp_path / "export"
    make_pacs(root)
    serial = prepare("pacs", root)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    helper.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="cxr_search.datasets.header_scan"):
            pooled = prepare("pacs", root, workers=2)
    finally:
        stop.set()
        helper.join()
    assert pooled.rows == serial.rows and pooled.summary == serial.summary
    assert any(w in caplog.text for w in ("forkserver workers", "spawn workers"))
