"""Tests of the synthetic chest X-ray archive generator (cxr_search.synth)."""

from __future__ import annotations

import csv
import gzip
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_search.errors import ConfigError, InputFileError
from cxr_search.synth import synthesize
from cxr_search.synth.canvas import Frame, blur
from cxr_search.synth.findings import CHEXPERT_LABELS, FINDINGS, Finding, StudyFindings, sample_findings, sample_patient
from cxr_search.synth.phantom import _tone_curve, render_study, render_view
from cxr_search.synth.plan import plan_archive
from cxr_search.synth.reportgen import generate_report
from cxr_search.synth.scene import sample_anatomy
from cxr_search.synth.writers import render

SIZE = 64


def _files(root: Path) -> Dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _gt(root: Path) -> List[Dict[str, str]]:
    with open(root / "ground_truth.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _csv_gz(path: Path) -> List[Dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pacs") / "archive"
    return synthesize(out, studies=40, seed=3, layout="pacs", broken=5, image_size=SIZE)


@pytest.fixture(scope="module")
def mimic(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mimic") / "archive"
    return synthesize(out, studies=30, seed=4, layout="mimic", broken=2, image_size=SIZE)


@pytest.fixture(scope="module")
def openi(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("openi") / "archive"
    return synthesize(out, studies=30, seed=5, layout="openi", broken=3, image_size=SIZE)


# ----------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("layout", ["pacs", "mimic", "openi"])
def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path, layout: str) -> None:
    a = synthesize(tmp_path / "a", studies=6, seed=11, layout=layout, broken=4, image_size=48)
    b = synthesize(tmp_path / "b", studies=6, seed=11, layout=layout, broken=4, image_size=48)
    c = synthesize(tmp_path / "c", studies=6, seed=12, layout=layout, broken=4, image_size=48)
    fa, fb, fc = _files(a.out_dir), _files(b.out_dir), _files(c.out_dir)
    assert fa.keys() == fb.keys()
    for name in fa:
        assert fa[name] == fb[name], name
    assert fa["ground_truth.csv"] != fc["ground_truth.csv"]
    assert a.finding_counts == b.finding_counts


def test_render_study_is_deterministic_and_shaped() -> None:
    sf = StudyFindings((Finding("pleural_effusion", side="left", size="moderate"),))
    a = render_study(np.random.default_rng(1), sf, "PA", 96)
    b = render_study(np.random.default_rng(1), sf, "PA", 96)
    c = render_study(np.random.default_rng(2), sf, "PA", 96)
    assert a.dtype == np.float32 and a.ndim == 2
    assert min(a.shape) == 96 and a.shape[0] >= a.shape[1]
    assert 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert a.shape != c.shape or np.abs(a.astype(float) - c).mean() > 0.01
    lat = render_study(np.random.default_rng(1), sf, "LATERAL", 96)
    assert min(lat.shape) == 96 and lat.shape[0] >= lat.shape[1]


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="layout"):
        synthesize(tmp_path / "x", studies=2, seed=0, layout="dicomdir")
    with pytest.raises(ConfigError):
        synthesize(tmp_path / "y", studies=0, seed=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(InputFileError, match="not empty"):
        synthesize(tmp_path / "full", studies=2, seed=0)


# ----------------------------------------------------------------------------- pacs
def test_pacs_counts_match_disk(pacs) -> None:
    root = pacs.out_dir
    rows = _gt(root)
    assert len(rows) == pacs.images
    files = set(_files(root))
    listed = {r["path"] for r in rows} | set(pacs.broken_files) | {"reports.csv", "ground_truth.csv"}
    assert files == listed  # nothing unaccounted for, nothing missing
    assert pacs.broken == len(pacs.broken_files) == 5
    with open(root / "reports.csv", newline="", encoding="utf-8") as fh:
        reports = list(csv.DictReader(fh))
    assert len(reports) == pacs.reports == pacs.studies == 40
    assert set(reports[0]) == {"AccessionNumber", "StudyInstanceUID", "report_text"}
    assert {r["study_id"] for r in rows} <= {r["StudyInstanceUID"] for r in reports}
    assert len({r["patient_id"] for r in rows}) <= pacs.patients
    assert sum(pacs.finding_counts[f] for f in FINDINGS) > 0
    assert any(not p.endswith(".dcm") and not p.endswith(".DCM") for p in (r["path"] for r in rows))
    assert any(p.endswith(".dcm") for p in (r["path"] for r in rows))


def test_pacs_dicoms_decode_losslessly_and_monochrome1_is_inverted(pacs) -> None:
    root = pacs.out_dir
    rows = _gt(root)
    plan = plan_archive(40, 3)
    expected = [(st, k) for st in plan.studies for k in range(len(st.views))]
    assert len(expected) == len(rows)
    seen_syntax, seen_photo, seen_bits, seen_modality = set(), set(), set(), set()
    for row, (st, k) in zip(rows, expected, strict=False):
        ds = pydicom.dcmread(root / row["path"])
        arr = ds.pixel_array.astype(np.float64)
        assert arr.shape == (ds.Rows, ds.Columns)
        assert ds.BitsAllocated == 16 and 10 <= ds.BitsStored <= 16
        assert arr.max() < 2 ** ds.BitsStored
        assert ds.PatientName and ds.PatientID == row["patient_id"]
        assert ds.SOPInstanceUID == row["image_id"] and ds.StudyInstanceUID == row["study_id"]
        assert str(ds.SOPInstanceUID).startswith("1.2.826.0.1.3680043.8.498.")
        seen_syntax.add(ds.file_meta.TransferSyntaxUID.name)
        seen_photo.add(ds.PhotometricInterpretation)
        seen_bits.add(int(ds.BitsStored))
        seen_modality.add(ds.Modality)
        # The stored pixels are the rendering, linearly scaled (and inverted for MONOCHROME1).
        ref = render(plan, st, k, SIZE).astype(np.float64)
        r = np.corrcoef(arr.ravel(), ref.ravel())[0, 1]
        if ds.PhotometricInterpretation == "MONOCHROME1":
            assert r < -0.999
            lungs_dark_in_display = arr.max() - arr
            assert np.corrcoef(lungs_dark_in_display.ravel(), ref.ravel())[0, 1] > 0.999
        else:
            assert r > 0.999
        if "WindowCenter" in ds:
            assert float(np.atleast_1d(ds.WindowWidth)[0]) > 0
        assert ds.ViewPosition in ("PA", "AP", "LL", "LATERAL", "")
        if ds.ViewPosition == "":
            assert ds.SeriesDescription
    assert {"Explicit VR Little Endian", "RLE Lossless", "JPEG-LS Lossless Image Compression",
            "JPEG 2000 Image Compression (Lossless Only)"} <= seen_syntax
    assert seen_photo == {"MONOCHROME1", "MONOCHROME2"}
    assert len(seen_bits) >= 3 and seen_modality == {"CR", "DX"}


def test_pacs_broken_files_are_broken(pacs) -> None:
    root = pacs.out_dir
    kinds = set()
    for rel in pacs.broken_files:
        path = root / rel
        data = path.read_bytes()
        if not data:
            kinds.add("empty")
            continue
        try:
            ds = pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - any failure to parse is what we want
            kinds.add("not dicom")
            continue
        if "PixelData" not in ds:
            assert ds.Modality == "SR" and "FINDINGS" in ds.ContentSequence[0].TextValue or "IMPRESSION" in ds.ContentSequence[0].TextValue
            kinds.add("sr")
            continue
        with pytest.raises((AttributeError, ValueError, OSError, EOFError)):
            _ = ds.pixel_array
        kinds.add("truncated")
    assert kinds == {"empty", "not dicom", "sr", "truncated"}


# ----------------------------------------------------------------------------- reports
_KEYWORDS = {
    "pleural_effusion": r"effusions?|pleural fluid",
    "pneumothorax": r"pneumothorax",
    "cardiomegaly": r"cardiomegaly|enlarged|enlargement",
    "consolidation": r"consolidation|opacity|opacities|pneumonia",
    "lung_lesion": r"nodule|mass",
    "atelectasis": r"atelectasis",
    "edema": r"edema",
    "support_devices": r"devices?|tube|catheter|(?<!pleural )\bline\b|pacemaker|pacing",
}
_NEGATION = re.compile(r"\b(no|without|normal|clear|unremarkable)\b", re.I)


def _sentences(text: str) -> List[str]:
    text = re.sub(r"\b\d+\.\s", "", text)  # numbered impressions
    return [s.strip() for s in re.split(r"(?<=[.;])\s+", text) if s.strip()]


def _check_report(sf: StudyFindings, text: str) -> None:
    sents = _sentences(text.lower())
    for name, pattern in _KEYWORDS.items():
        hits = [s for s in sents if re.search(pattern, s)]
        f = sf.get(name)
        if f is None:
            # An absent finding may only be negated (or, for devices/lesions, not mentioned).
            for s in hits:
                if name == "consolidation" and re.search("opacit", s) and (
                    ("atelectasis" in s and sf.has("atelectasis")) or ("edema" in s and sf.has("edema"))
                ):
                    continue
                if name == "pleural_effusion" and "pneumothorax" in s and sf.has("pneumothorax"):
                    continue
                if name == "cardiomegaly" and sf.has("cardiomegaly"):
                    continue
                assert _NEGATION.search(s), (name, s, text)
            continue
        assert hits, (name, text)
        positive = [s for s in hits if not s.startswith("no ")]
        assert positive, (name, text)
        joined = " ".join(positive)
        if f.side in ("right", "left") and name != "support_devices":
            assert f.side in joined or (f.side == "left" and "lingula" in joined), (name, f, text)
        if f.side == "bilateral" and name == "pleural_effusion":
            assert "bilateral" in joined, text
        if name in ("pleural_effusion", "pneumothorax", "cardiomegaly", "edema") and f.size:
            assert re.search(f.size, joined), (name, f, text)
        if name == "consolidation":
            zone_words = {"upper": "upper", "middle": "middle|mid |lingula", "lower": "lower|base|basilar"}[f.zone]
            assert re.search(zone_words, joined), (f, text)
        if name == "lung_lesion":
            assert f"{f.size_cm:.1f} cm" in joined and f.size in joined, (f, text)


def test_reports_agree_with_findings() -> None:
    rng = np.random.default_rng(0)
    n_normal = 0
    for i in range(400):
        patient = sample_patient(rng)
        sf = sample_findings(rng, patient=patient, portable=i % 4 == 0)
        rep = generate_report(rng, sf, sex=patient.sex, age=patient.age, deid="___" if i % 2 else None)
        text = " ".join(t for t in (rep.findings, rep.impression) if t)
        _check_report(sf, text)
        if sf.is_normal:
            n_normal += 1
            assert not any(v == 1.0 for v in rep.mentions.values()) or "Fracture" in rep.mentions
        # CheXpert mentions agree with the ground truth.
        names = {"Pleural Effusion": "pleural_effusion", "Pneumothorax": "pneumothorax", "Cardiomegaly": "cardiomegaly",
                 "Edema": "edema", "Lung Lesion": "lung_lesion", "Support Devices": "support_devices",
                 "Atelectasis": "atelectasis", "Consolidation": "consolidation"}
        for label, value in rep.mentions.items():
            if label in names:
                assert (value != 0.0) == sf.has(names[label]), (label, value, sf, text)
    assert 80 < n_normal < 200


def test_pacs_reports_match_ground_truth(pacs) -> None:
    root = pacs.out_dir
    with open(root / "reports.csv", newline="", encoding="utf-8") as fh:
        reports = {r["StudyInstanceUID"]: r["report_text"] for r in csv.DictReader(fh)}
    plan = plan_archive(40, 3)
    rows = _gt(root)
    by_study: Dict[str, Dict[str, str]] = {}
    for r in rows:
        by_study.setdefault(r["study_id"], r)
    for st, (uid, row) in zip(plan.studies, by_study.items(), strict=False):
        text = reports[uid]
        assert "IMPRESSION:" in text
        body = text.split("FINDINGS:", 1)[-1] if "FINDINGS:" in text else text.split("IMPRESSION:", 1)[1]
        _check_report(st.findings, body.replace("IMPRESSION:", " "))
        for name in FINDINGS:
            assert row[name] == str(int(st.findings.has(name)))


# ----------------------------------------------------------------------------- visibility
def _film(anat, sf: StudyFindings, view: str = "PA", size: int = 128, seed: int = 7):
    return render_view(anat, sf, view, size, np.random.default_rng(seed))


def test_large_right_effusion_brightens_right_base_only() -> None:
    for s in range(3):
        anat = sample_anatomy(np.random.default_rng(50 + s))
        normal, info = _film(anat, StudyFindings())
        eff, _ = _film(anat, StudyFindings((Finding("pleural_effusion", side="right", size="large"),)))
        for side, expect_change in (("right", True), ("left", False)):
            mask = info.lung_masks[side]
            rows = np.where(mask.any(axis=1))[0]
            lower = mask.copy()
            lower[: rows.min() + 2 * (rows.max() - rows.min()) // 3] = False
            delta = eff[lower].mean() - normal[lower].mean()
            if expect_change:
                assert delta > 0.2, delta
            else:
                assert abs(delta) < 0.03, delta
        # On the lateral view, the posterior costophrenic sulcus fills.
        lat_n, _ = _film(anat, StudyFindings(), "LATERAL")
        lat_e, _ = _film(anat, StudyFindings((Finding("pleural_effusion", side="right", size="large"),)), "LATERAL")
        h, w = lat_n.shape
        box = (slice(int(h * 0.55), int(h * 0.75)), slice(int(w * 0.55), int(w * 0.8)))
        assert lat_e[box].mean() - lat_n[box].mean() > 0.05


def _bright_width(img: np.ndarray, info) -> float:
    """Width of the bright mediastinum/heart between the lungs, just above the diaphragm (image-based)."""
    lungs = info.lung_masks["right"] | info.lung_masks["left"]
    rows = np.where(lungs.any(axis=1))[0]
    r0, r1 = rows.min(), rows.max()
    band = slice(r0 + int(0.72 * (r1 - r0)), r0 + int(0.8 * (r1 - r0)))
    cols = np.where(lungs[band].any(axis=0))[0]
    strip = cv2.GaussianBlur(img, (0, 0), 1.0)[band, cols.min() : cols.max() + 1].mean(axis=0)
    thr = (np.percentile(strip, 10) + np.percentile(strip, 90)) / 2
    return float((strip > thr).sum())


def test_cardiomegaly_widens_the_heart() -> None:
    for s in range(3):
        anat = sample_anatomy(np.random.default_rng(60 + s))
        base = StudyFindings(ctr=0.43)
        big = base.with_finding(Finding("cardiomegaly", size="marked", ctr=0.68))
        img_n, info_n = _film(anat, base)
        img_c, info_c = _film(anat, big)
        assert info_c.heart_width_px / info_n.heart_width_px == pytest.approx(0.68 / 0.43, rel=0.02)
        assert info_n.heart_width_px / info_n.thorax_width_px == pytest.approx(0.43, rel=0.02)
        assert _bright_width(img_c, info_n) > 1.25 * _bright_width(img_n, info_n)


def test_other_findings_change_their_region() -> None:
    anat = sample_anatomy(np.random.default_rng(70))
    normal, info = _film(anat, StudyFindings())
    left = info.lung_masks["left"]
    ptx, _ = _film(anat, StudyFindings((Finding("pneumothorax", side="left", size="large"),)))
    assert normal[left].mean() - ptx[left].mean() > 0.03  # lucent, no lung markings
    right = info.lung_masks["right"]
    rows = np.where(right.any(axis=1))[0]
    upper = right.copy()
    upper[rows.min() + (rows.max() - rows.min()) // 3 :] = False
    cons, _ = _film(anat, StudyFindings((Finding("consolidation", side="right", zone="upper", pattern="lobar"),)))
    assert cons[upper].mean() - normal[upper].mean() > 0.15
    edema, _ = _film(anat, StudyFindings((Finding("edema", side="bilateral", size="severe"),)))
    both = right | left
    assert edema[both].mean() - normal[both].mean() > 0.05
    dev, _ = _film(anat, StudyFindings((Finding("support_devices", devices=("pacemaker",)),)))
    assert (dev > 0.97).sum() > (normal > 0.97).sum() + 20


def test_findings_are_visible_at_64_pixels() -> None:
    """At the tiny model's input size the finding still moves pixel statistics clearly."""
    anat = sample_anatomy(np.random.default_rng(80))
    n, info = _film(anat, StudyFindings(), size=64)
    e, _ = _film(anat, StudyFindings((Finding("pleural_effusion", side="left", size="moderate"),)), size=64)
    lung = info.lung_masks["left"].copy()
    rows = np.where(lung.any(axis=1))[0]
    lung[: rows.min() + 2 * (rows.max() - rows.min()) // 3] = False  # lower third of the left lung
    assert e[lung].mean() - n[lung].mean() > 0.1
    m, _ = _film(anat, StudyFindings((Finding("lung_lesion", side="right", zone="middle", size="mass", size_cm=5.0),)),
                 size=64)
    assert np.abs(m - n).max() > 0.3


# ----------------------------------------------------------------------------- sampling
def test_finding_frequencies_are_balanced() -> None:
    rng = np.random.default_rng(1)
    counts = dict.fromkeys(FINDINGS, 0)
    normal = 0
    n = 3000
    for _ in range(n):
        sf = sample_findings(rng)
        normal += sf.is_normal
        assert len(sf.findings) <= 3
        for f in sf.findings:
            counts[f.name] += 1
    assert 0.28 < normal / n < 0.38
    for name, c in counts.items():
        assert 0.08 < c / n < 0.25, (name, c / n)


# ----------------------------------------------------------------------------- mimic / openi
def test_mimic_layout(mimic) -> None:
    root = mimic.out_dir
    meta = _csv_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = _csv_gz(root / "mimic-cxr-2.0.0-split.csv.gz")
    chex = _csv_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert list(meta[0])[:9] == ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                                 "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"]
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    assert list(chex[0]) == ["subject_id", "study_id", *CHEXPERT_LABELS]
    assert len(chex) == mimic.studies == mimic.reports
    assert len(meta) == len(split) == mimic.images + len(mimic.broken_files)
    subject_split: Dict[str, str] = {}
    for r in split:
        assert r["split"] in ("train", "validate", "test")
        assert subject_split.setdefault(r["subject_id"], r["split"]) == r["split"]  # patient-disjoint
    gt = _gt(root)
    assert len(gt) == mimic.images
    pat = re.compile(r"files/p(\d\d)/p(\d{8})/s(\d{8})/[0-9a-f]{8}(-[0-9a-f]{8}){4}\.jpg")
    for row in gt:
        m = pat.fullmatch(row["path"])
        assert m and m.group(2).startswith(m.group(1)) and m.group(2) == row["patient_id"]
        img = Image.open(root / row["path"])
        assert img.mode == "L" and img.format == "JPEG" and min(img.size) == SIZE
        report = (root / row["path"]).parent.with_suffix(".txt").read_text(encoding="utf-8")
        assert "FINAL REPORT" in report and "IMPRESSION:" in report or "FINDINGS AND IMPRESSION:" in report
    by_study = {r["study_id"]: r for r in gt}
    for r in chex:
        assert all(r[c] in ("1.0", "0.0", "-1.0", "") for c in CHEXPERT_LABELS)
        g = by_study.get(r["study_id"])
        if g is None:
            continue
        assert (r["No Finding"] == "1.0") == (g["no_finding"] == "1")
        for label, name in (("Pleural Effusion", "pleural_effusion"), ("Pneumothorax", "pneumothorax"),
                            ("Cardiomegaly", "cardiomegaly"), ("Edema", "edema"), ("Support Devices", "support_devices")):
            if r[label] in ("1.0", "-1.0"):
                assert g[name] == "1"
            if r[label] == "0.0":
                assert g[name] == "0"
    for rel in mimic.broken_files:
        with pytest.raises(OSError):
            Image.open(root / rel).load()


def test_openi_layout(openi) -> None:
    root = openi.out_dir
    gt = _gt(root)
    assert len(gt) == openi.images
    xmls = sorted((root / "ecgen-radiology").glob("*.xml"), key=lambda p: int(p.stem))
    good = [p for p in xmls if f"ecgen-radiology/{p.name}" not in openi.broken_files]
    assert len(good) == openi.reports == openi.studies
    images_in_xml = set()
    saw_token = False
    for p in good:
        doc = ET.parse(p).getroot()
        assert doc.tag == "eCitation"
        labels = [el.get("Label") for el in doc.iter("AbstractText")]
        assert labels == ["COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"]
        impression = [el.text for el in doc.iter("AbstractText") if el.get("Label") == "IMPRESSION"][0]
        assert impression
        assert doc.find("MeSH/major") is not None
        saw_token |= "XXXX" in ET.tostring(doc, encoding="unicode")
        for pi in doc.iter("parentImage"):
            assert re.fullmatch(rf"CXR{p.stem}_1_IM-\d{{4}}-\d{{4}}", pi.get("id"))
            images_in_xml.add(f"NLMCXR_png/{pi.get('id')}.png")
    assert saw_token
    paths = {r["path"] for r in gt}
    assert paths <= images_in_xml
    assert images_in_xml - paths <= set(openi.broken_files)
    for rel in paths:
        img = Image.open(root / rel)
        assert img.format == "PNG" and img.mode == "L"
    for rel in openi.broken_files:
        if rel.endswith(".xml"):
            with pytest.raises(ET.ParseError):
                ET.parse(root / rel)
        else:
            with pytest.raises(OSError):
                Image.open(root / rel).load()


# ----------------------------------------------------------------------------- fast paths
def test_downsampled_blur_matches_direct_gaussian() -> None:
    rng = np.random.default_rng(0)
    img = cv2.GaussianBlur(rng.random((200, 160)).astype(np.float32), (0, 0), 4)
    img[60:140, 40:120] += 1.0
    for sigma in (8.0, 14.0, 25.0):
        fast = blur(img, sigma)
        slow = cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        assert np.abs(fast - slow).max() < 0.04, sigma
    mask = np.zeros((100, 100), np.uint8)
    mask[30:70, 30:70] = 255
    np.testing.assert_allclose(blur(mask, 3.0), cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), 3.0,
                                                                 borderType=cv2.BORDER_REPLICATE), atol=0.01)


def test_tone_lookup_matches_formula() -> None:
    lut = _tone_curve(0.9, 1.05, 0.95)
    d = np.linspace(0, 8, 4096)
    direct = np.clip((1 - np.exp(-0.9 * d) - 0.1) * 1.05 / 0.85, 0, 1) ** 0.95
    np.testing.assert_allclose(lut, direct, atol=1e-6)


def test_frame_grid_inverts_point_mapping() -> None:
    fr = Frame(90, 70, scale=0.93, rotation=0.05, tx=0.03, ty=-0.02)
    pts = np.array([[0.1, -0.3], [-0.5, 0.4], [0.0, 0.0]])
    px = fr.to_px(pts)
    x, y = fr.grid()
    for (cx, cy), (nx, ny) in zip(px, pts, strict=False):
        c, r = int(round(cx)), int(round(cy))
        assert abs(x[r, c] - nx) < 1.5 / fr.u and abs(y[r, c] - ny) < 1.5 / fr.u


def test_vectorised_spline_matches_segment_loop() -> None:
    from cxr_search.synth.canvas import spline

    pts = [(0.0, 0.0), (0.3, -0.2), (0.5, 0.4), (0.9, 0.1), (1.2, 0.6)]
    fast = spline(pts, 41)
    p = np.asarray(pts)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    seg = max(2, 41 // (len(p) - 1))
    slow = []
    for i in range(1, len(ext) - 2):
        p0, p1, p2, p3 = ext[i - 1], ext[i], ext[i + 1], ext[i + 2]
        for t in np.linspace(0, 1, seg, endpoint=False):
            slow.append(0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                               + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3))
    slow.append(p[-1])
    np.testing.assert_allclose(fast, np.array(slow), atol=1e-12)
    np.testing.assert_allclose(fast[::seg][: len(p)], p, atol=1e-12)  # passes through the control points


def test_montage_smoke(tmp_path: Path) -> None:
    from cxr_search.synth.montage import CASES, make_montage

    sheet = make_montage(tmp_path / "m.png", size=48, columns=4)
    assert (tmp_path / "m.png").is_file()
    assert sheet.shape[0] > 48 * len(CASES) // 4 and sheet.std() > 20


def test_every_finding_renders_with_default_variation() -> None:
    """No acquisition variation at all (zero rotation, unit zoom) is a valid film too."""
    from cxr_search.synth.montage import CASES
    from cxr_search.synth.scene import Variation

    anat = sample_anatomy(np.random.default_rng(90))
    for _, sf, frontal in CASES:
        for view in (frontal, "LATERAL"):
            img, info = render_view(anat, sf, view, 64, np.random.default_rng(0), variation=Variation())
            assert img.shape == info.shape and np.isfinite(img).all()
