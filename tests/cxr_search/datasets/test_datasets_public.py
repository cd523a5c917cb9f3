"""Adapters of the CSV/XML public datasets on small fixtures in their official formats.

MIMIC-CXR(-JPG), CheXpert, CheXpert 5x200, ChestX-ray14 and OpenI; manifest I/O and splits are in
``test_datasets.py``, the DICOM datasets in ``test_datasets_dicom.py``.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

from cxr_search.datasets import group_studies, prepare
from cxr_search.errors import DatasetError
from cxr_search.labels import CHEXPERT_LABELS
from cxr_search.reports import choose_report_text, split_sections
from tests.helpers.dataset_files import assert_patient_disjoint, assert_study_order, write_csv, write_image

# --------------------------------------------------------------------------------------------------
# MIMIC-CXR
# --------------------------------------------------------------------------------------------------

MIMIC_REPORTS = {
    # findings longer than impression
    ("10000032", "50414267"): (
        "                                 FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n\n INDICATION:  ___F cough\n\n"
        " FINDINGS: \n\n There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral\n"
        " nodular opacities that most likely represent nipple shadows.\n\n IMPRESSION: \n\n No acute process.\n"
    ),
    # impression longer than findings
    ("10000032", "53189527"): (
        "FINAL REPORT\n FINDINGS:  Lungs clear.\n\n IMPRESSION:  Interval placement of a right internal jugular "
        "central venous catheter terminating in the mid SVC, no pneumothorax.\n"
    ),
    # only an impression
    ("10000764", "57375967"): "FINAL REPORT\n IMPRESSION: Left lower lobe pneumonia.\n",
}


def make_mimic(root: Path, *, reports: str = "files", drop_meta_column: Optional[str] = None) -> Dict[str, Any]:
    images = [
        # dicom_id, subject, study, view, split, on disk
        ("d1", "10000032", "50414267", "LATERAL", "train", True),
        ("d2", "10000032", "50414267", "PA", "train", True),
        ("d3", "10000032", "53189527", "AP", "train", True),
        ("d4", "10000764", "57375967", "AP", "validate", True),
        ("d5", "10000764", "57375967", "LL", "validate", False),  # listed, not downloaded
        ("d6", "10000898", "50771383", "PA", "test", True),  # no report
        ("d7", "10000898", "50771383", "", "test", True),
        ("d8", "10000935", "51178377", "PA", "test", True),  # not in the split file
    ]
    write_csv(
        root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
        [(d, st, s, sp) for d, s, st, _, sp, _ in images if d != "d8"], gz=True,
    )
    meta_header = [
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
        "StudyDate", "StudyTime",
    ]  # fmt: skip
    meta_rows = [(d, s, st, "CHEST (PA AND LAT)", v, 3056, 2544, "21800506", "213014.531") for d, s, st, v, _, _ in images]
    if drop_meta_column:
        i = meta_header.index(drop_meta_column)
        meta_header.pop(i)
        meta_rows = [tuple(x for j, x in enumerate(r) if j != i) for r in meta_rows]
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", meta_header, meta_rows, gz=True)
    label_rows = []
    for k, (subject, study) in enumerate(sorted({(s, st) for _, s, st, *_ in images})):
        values = [""] * len(CHEXPERT_LABELS)
        values[CHEXPERT_LABELS.index("Pleural Effusion")] = ["1.0", "-1.0", "0.0", ""][k % 4]
        values[CHEXPERT_LABELS.index("Edema")] = "0.0"
        label_rows.append([subject, study, *values])
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS], label_rows, gz=True)
    for d, s, st, _, _, on_disk in images:
        if on_disk:
            write_image(root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}" / f"{d}.jpg")
    if reports == "files":
        for (s, st), text in MIMIC_REPORTS.items():
            (root / "files" / f"p{s[:2]}" / f"p{s}" / f"s{st}.txt").write_text(text)
    elif reports == "zip":
        with zipfile.ZipFile(root.parent / "mimic-cxr-reports.zip", "w") as zf:
            for (s, st), text in MIMIC_REPORTS.items():
                zf.writestr(f"mimic-cxr-reports/files/p{s[:2]}/p{s}/s{st}.txt", text)
    return {"images": images, "labels": label_rows}


def _expected_text(raw: str) -> Tuple[str, str, str]:
    sec = split_sections(raw)
    f, i = sec.findings or "", sec.impression or ""
    return f, i, choose_report_text(f, i, "longest") or ""


@pytest.mark.parametrize("source", ["files", "zip"])
def test_mimic(tmp_path: Path, source: str) -> None:
    root = tmp_path / "mimic-cxr-jpg"
    fixture = make_mimic(root, reports=source)
    options = {"reports": str(tmp_path / "mimic-cxr-reports.zip")} if source == "zip" else {}
    result = prepare("mimic-cxr", root, **options)
    rows = result.rows
    assert [r.image_id for r in rows] == ["d2", "d1", "d3", "d4", "d6", "d7"]  # frontal first within a study
    assert_study_order(rows)
    official = {d: sp for d, _, _, _, sp, _ in fixture["images"]}
    assert all(r.split == official[r.image_id] for r in rows)
    assert_patient_disjoint(rows)
    by_id = {r.image_id: r for r in rows}
    assert by_id["d1"].view == "LATERAL" and by_id["d2"].view == "PA" and by_id["d7"].view == "UNKNOWN"
    assert by_id["d1"].study_date == "2180-05-06"
    assert by_id["d1"].image_path == str((root / "files/p10/p10000032/s50414267/d1.jpg").resolve())
    for (subject, study), raw in MIMIC_REPORTS.items():
        f, i, text = _expected_text(raw)
        for r in rows:
            if r.study_id == study:
                assert (r.findings, r.impression, r.report_text) == (f, i, text)
                assert r.patient_id == subject
    assert by_id["d3"].report_text.startswith("Interval placement")  # impression was longer
    assert by_id["d1"].report_text.startswith("There is no focal")  # findings were longer
    assert by_id["d4"].findings == "" and by_id["d4"].report_text == "Left lower lobe pneumonia."
    assert by_id["d6"].report_text == ""  # no report: label-only study
    for _subject, study, *values in fixture["labels"]:
        expected = {n: float(v) for n, v in zip(CHEXPERT_LABELS, values, strict=False) if v != ""}
        for r in rows:
            if r.study_id == study:
                assert r.labels == expected and r.label_vocab == "chexpert"
    summary = result.summary
    json.dumps(summary)
    assert summary["images"] == 6 and summary["studies"] == 4 and summary["reports"] == 3 and summary["patients"] == 3
    assert summary["skipped_reasons"] == {"image file missing": 1, "not in the split file": 1}
    assert summary["splits"]["validate"] == {"images": 1, "studies": 1}
    assert summary["report_source"] == ("zip" if source == "zip" else "folder")


def test_mimic_missing_files_and_columns(tmp_path: Path) -> None:
    root = tmp_path / "m"
    make_mimic(root, drop_meta_column="ViewPosition")
    with pytest.raises(DatasetError) as info:
        prepare("mimic-cxr", root)
    assert "ViewPosition" in str(info.value) and "mimic-cxr-2.0.0-metadata.csv.gz" in str(info.value)
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(DatasetError, match="split"):
        prepare("mimic-cxr", root)


def test_mimic_without_labels_or_reports(tmp_path: Path) -> None:
    root = tmp_path / "m"
    make_mimic(root, reports="none")
    (root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(DatasetError, match="chexpert"):
        prepare("mimic-cxr", root)
    result = prepare("mimic-cxr", root, labels="none")
    assert len(result.rows) == 6 and not any(r.labels or r.report_text for r in result.rows)
    assert any("no report" in n for n in result.summary["notes"])


# --------------------------------------------------------------------------------------------------
# CheXpert
# --------------------------------------------------------------------------------------------------

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def _chexpert_row(path: str, sex: str, age: Any, fl: str, appa: str, **labels: str) -> List[Any]:
    values = [labels.get(n.replace(" ", "_"), "") for n in CHEXPERT_LABELS]
    return [path, sex, age, fl, appa, *values]


def make_chexpert(root: Path, release: str = "CheXpert-v1.0-small") -> Tuple[List[List[Any]], List[List[Any]]]:
    train = [
        _chexpert_row(f"{release}/train/patient00001/study1/view1_frontal.jpg", "Female", 68, "Frontal", "AP", No_Finding="1.0"),
        _chexpert_row(f"{release}/train/patient00002/study2/view2_lateral.jpg", "Male", 87, "Lateral", "", Edema="-1.0", Cardiomegaly="0.0"),
        _chexpert_row(f"{release}/train/patient00002/study2/view1_frontal.jpg", "Male", 87, "Frontal", "PA", Edema="-1.0", Cardiomegaly="0.0"),
        _chexpert_row(f"{release}/train/patient00002/study1/view1_frontal.jpg", "Unknown", 86, "Frontal", "AP", Pleural_Effusion="1.0"),
        _chexpert_row(f"{release}/train/patient00003/study1/view1_frontal.jpg", "Male", 40, "Frontal", "AP"),  # missing file
    ]
    valid = [
        _chexpert_row(f"{release}/valid/patient64541/study1/view1_frontal.jpg", "Male", 73, "Frontal", "AP", Edema="0.0", Atelectasis="1.0"),
    ]
    write_csv(root / "train.csv", CHEXPERT_HEADER, train)
    write_csv(root / "valid.csv", CHEXPERT_HEADER, valid)
    for row in train[:4] + valid:
        write_image(root / row[0].split("/", 1)[1])
    return train, valid


def test_chexpert(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    make_chexpert(root)
    for given in (root, tmp_path):  # the release folder itself or its parent
        result = prepare("chexpert", given)
        rows = result.rows
        assert len(rows) == 5
        assert_study_order(rows)
        assert_patient_disjoint(rows)
        by_id = {r.image_id: r for r in rows}
        r = by_id["patient00002/study2/view2_lateral"]
        assert r.study_id == "patient00002/study2" and r.patient_id == "patient00002"
        assert r.view == "LATERAL" and r.sex == "M" and r.age == 87.0
        assert r.labels == {"Cardiomegaly": 0.0, "Edema": -1.0} and r.label_vocab == "chexpert"
        assert r.image_path == str(root.resolve() / "train/patient00002/study2/view2_lateral.jpg")
        assert by_id["patient00002/study2/view1_frontal"].view == "PA"
        assert by_id["patient00002/study1/view1_frontal"].sex == ""
        assert by_id["patient64541/study1/view1_frontal"].split == "validate"
        assert {r.split for r in rows} == {"train", "validate"}
        assert result.summary["skipped_reasons"] == {"image file missing": 1}
        # rows of study2: frontal before lateral
        assert [x.image_id for x in group_studies(rows)["patient00002/study2"]][0].endswith("frontal")


def test_chexpert_exclude_and_missing_column(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0"
    train, _ = make_chexpert(root, release="CheXpert-v1.0")
    exclude = write_csv(tmp_path / "chexpert_5x200.csv", ["Path"], [[train[0][0]]])
    result = prepare("chexpert", root, exclude_csv=str(exclude))
    assert "patient00001/study1/view1_frontal" not in {r.image_id for r in result.rows}
    assert result.summary["skipped_reasons"]["in the excluded evaluation set"] == 1
    header = [c for c in CHEXPERT_HEADER if c != "AP/PA"]
    write_csv(root / "train.csv", header, [])
    with pytest.raises(DatasetError) as info:
        prepare("chexpert", root)
    assert "'AP/PA'" in str(info.value) and "train.csv" in str(info.value)


# --------------------------------------------------------------------------------------------------
# CheXpert 5x200
# --------------------------------------------------------------------------------------------------

FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]


def test_chexpert5x200(tmp_path: Path) -> None:
    root = tmp_path / "CheXpert-v1.0"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FIVE, "Report Impression"]
    rows = []
    for k, cls in enumerate(FIVE * 2):
        path = f"CheXpert-v1.0/train/patient{k:05d}/study1/view1_frontal.jpg"
        onehot = ["1.0" if c == cls else "0.0" for c in FIVE]
        rows.append([path, "Female", 50 + k, "Frontal", "AP", *onehot, f"\n 1.  {cls} finding   number {k}.\n"])
        write_image(root / path.split("/", 1)[1])
    two_classes = ["1.0", "1.0", "0.0", "0.0", "0.0"]
    rows.append(["CheXpert-v1.0/train/patient00099/study1/view1_frontal.jpg", "Male", 1, "Frontal", "AP", *two_classes, "x"])
    csv_path = write_csv(tmp_path / "gloria" / "chexpert_5x200.csv", header, rows)
    result = prepare("chexpert5x200", root, csv=str(csv_path))
    assert len(result.rows) == 10 and {r.split for r in result.rows} == {"test"}
    for r, (cls, k) in zip(sorted(result.rows, key=lambda r: r.image_id), [(c, k) for k, c in enumerate(FIVE * 2)], strict=False):
        assert r.labels == {c: 1.0 if c == cls else 0.0 for c in FIVE} and r.label_vocab == "chexpert5x200"
        assert r.report_text == r.impression == f"1. {cls} finding number {k}."
        assert r.findings == "" and r.view == "AP"
        assert Path(r.image_path).is_file()
    assert result.summary["skipped_reasons"] == {"not exactly one class marked 1.0": 1}
    write_csv(csv_path, [c for c in header if c != "Report Impression"], [])
    with pytest.raises(DatasetError, match="Report Impression"):
        prepare("chexpert5x200", root, csv=str(csv_path))


# --------------------------------------------------------------------------------------------------
# ChestX-ray14
# --------------------------------------------------------------------------------------------------

NIH_HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender", "View Position",
    "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "",
]  # fmt: skip
NIH_FINDINGS = ["No Finding", "Effusion", "Atelectasis|Effusion", "Cardiomegaly", "Pleural_Thickening", "Mass|Nodule"]


def make_nih(root: Path, n_patients: int = 30) -> List[List[Any]]:
    rows = []
    test, train_val = [], []
    for p in range(1, n_patients + 1):
        for f in range(1 + p % 3):
            name = f"{p:08d}_{f:03d}.png"
            findings = NIH_FINDINGS[(p + f) % len(NIH_FINDINGS)]
            sex, view = "M" if p % 2 else "F", "PA" if f % 2 == 0 else "AP"
            rows.append([name, findings, f, p, 30 + p, sex, view, 2500, 2048, 0.143, 0.143, ""])
            (test if p % 5 == 0 else train_val).append(name)
            folder = "images_001/images" if p <= n_patients // 2 else "images_002/images"
            if name != "00000007_000.png":
                write_image(root / folder / name)
    rows.append(["99999999_000.png", "No Finding", 0, 99999999, 40, "M", "PA", 1, 1, 1, 1, ""])  # in no list
    write_image(root / "images_009" / "99999999_000.png")
    write_csv(root / "Data_Entry_2017.csv", NIH_HEADER, rows)
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return rows


def test_chestxray14(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    entries = make_nih(root)
    result = prepare("chestxray14", root)
    rows = result.rows
    assert result.summary["skipped_reasons"] == {"image file missing": 1, "not in train_val_list.txt or test_list.txt": 1}
    assert len(rows) == len(entries) - 2
    assert_patient_disjoint(rows)
    by_id = {r.image_id: r for r in rows}
    for e in entries[:-1]:
        if e[0] == "00000007_000.png":
            continue
        r = by_id[e[0][:-4]]
        expected_split = "test" if int(e[3]) % 5 == 0 else r.split
        assert r.split == expected_split and (r.split == "test") == (int(e[3]) % 5 == 0)
        assert r.study_id == r.image_id and r.patient_id == str(e[3])
        assert r.labels == {name: 1.0 for name in e[1].split("|")} and r.label_vocab == "chestxray14"
        assert r.view == e[6] and r.sex == e[5] and r.age == float(e[4])
    validate_patients = {r.patient_id for r in rows if r.split == "validate"}
    train_val_patients = {r.patient_id for r in rows if r.split in ("train", "validate")}
    assert len(validate_patients) == math.ceil(0.1 * len(train_val_patients))
    assert prepare("chestxray14", root).rows == rows  # deterministic
    other = prepare("chestxray14", root, seed=5, val_fraction="0.2")
    assert {r.patient_id for r in other.rows if r.split == "validate"} != validate_patients
    assert_patient_disjoint(other.rows)


def test_chestxray14_missing_pieces(tmp_path: Path) -> None:
    root = tmp_path / "nih"
    make_nih(root, n_patients=3)
    (root / "test_list.txt").unlink()
    with pytest.raises(DatasetError, match="test_list.txt"):
        prepare("chestxray14", root)
    (root / "test_list.txt").write_text("")
    write_csv(root / "Data_Entry_2017.csv", [c for c in NIH_HEADER if c != "Patient ID"], [])
    with pytest.raises(DatasetError, match="'Patient ID'"):
        prepare("chestxray14", root)


# --------------------------------------------------------------------------------------------------
# OpenI
# --------------------------------------------------------------------------------------------------


def openi_xml(uid: str, findings: Optional[str], impression: Optional[str], images: Sequence[str]) -> str:
    def section(label: str, text: Optional[str]) -> str:
        return f'<AbstractText Label="{label}"/>' if text is None else f'<AbstractText Label="{label}">{text}</AbstractText>'

    parents = "".join(
        f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral</caption></parentImage>'
        for i in images
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n<eCitation><meta type="rr"/>'
        f'<uId id="{uid}"/><MedlineCitation><Article><Abstract>'
        f'{section("COMPARISON", "None.")}{section("INDICATION", "XXXX-year-old with cough")}'
        f'{section("FINDINGS", findings)}{section("IMPRESSION", impression)}'
        f"</Abstract></Article></MedlineCitation><MeSH><major>normal</major></MeSH>{parents}</eCitation>"
    )


OPENI = [
    ("CXR1", "The cardiac silhouette and mediastinum size are within normal limits. No XXXX.", "Normal chest x-XXXX.", ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
    ("CXR2", "Clear lungs.", "No acute cardiopulmonary abnormality, stable since the prior examination.", ["CXR2_IM-0652-1001"]),
    ("CXR3", None, "Only an impression here.", ["CXR3_IM-1384-1001", "CXR3_IM-1384-2001"]),  # second PNG missing
    ("CXR4", "Findings without images.", "Impression.", []),
    ("CXR5", None, None, ["CXR5_IM-2117-1003002"]),
    ("CXR10", "Heart size normal.", None, ["CXR10_IM-0002-1001"]),
]


def make_openi(root: Path) -> None:
    (root / "ecgen-radiology").mkdir(parents=True)
    for k, (uid, f, i, images) in enumerate(OPENI):
        (root / "ecgen-radiology" / f"{uid[3:]}.xml").write_text(openi_xml(uid, f, i, images))
        for image in images:
            if image != "CXR3_IM-1384-2001":
                write_image(root / "NLMCXR_png" / f"sub{k % 2}" / f"{image}.png")


def test_openi(tmp_path: Path) -> None:
    root = tmp_path / "openi"
    make_openi(root)
    result = prepare("openi", root)
    rows = result.rows
    assert [r.study_id for r in rows] == ["CXR1", "CXR1", "CXR2", "CXR3", "CXR10"]  # numeric uId order
    assert {r.split for r in rows} == {"test"}
    for uid, f, i, images in OPENI:
        members = [r for r in rows if r.study_id == uid]
        for r in members:
            assert r.report_text == choose_report_text(f, i, "longest")
            assert (r.findings, r.impression) == (f or "", i or "")
            assert r.image_id in images and r.patient_id == uid and r.view == "UNKNOWN"
            assert Path(r.image_path).name == f"{r.image_id}.png"
    assert rows[0].report_text.startswith("The cardiac")  # findings longer
    assert rows[2].report_text.startswith("No acute")  # impression longer
    assert result.summary["skipped_reasons"] == {
        "image file missing": 1, "report without images": 1, "report without findings or impression": 1,
    }  # fmt: skip
    assert result.summary["reports"] == 4
    seeded = prepare("openi", root, split="seeded")
    assert seeded.summary["splits"]["train"]["studies"] >= 2
    assert_patient_disjoint(seeded.rows)
    assert prepare("openi", root, split="seeded").rows == seeded.rows
    with pytest.raises(DatasetError, match="ecgen-radiology"):
        prepare("openi", tmp_path / "openi" / "NLMCXR_png")
