"""Archive layouts that are not DICOM: MIMIC-CXR(-JPG) and OpenI, plus the ground-truth table.

All outputs are byte-for-byte deterministic for a seed: no wall-clock times (gzip headers carry
``mtime=0`` and no file name), fixed column orders, fixed line endings.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
from PIL import Image

from cxr_search.synth.findings import (
    CHEXPERT_LABELS,
    StudyFindings,
    chexpert_vector,
    ground_truth_columns,
    ground_truth_values,
)
from cxr_search.synth.phantom import render_view
from cxr_search.synth.plan import ArchivePlan, PlannedStudy, stream
from cxr_search.synth.reportgen import format_sections

logger = logging.getLogger(__name__)

#: Identifier columns of ``ground_truth.csv``, before the finding columns.
ID_COLUMNS = ["patient_id", "study_id", "accession_number", "image_id", "view", "path", "split"]

_LAYOUT_STREAM = 15


@dataclass
class LayoutResult:
    """What a layout writer produced."""

    images: int = 0
    reports: int = 0
    rows: List[Dict[str, str]] = field(default_factory=list)
    broken_files: List[str] = field(default_factory=list)


def render(plan: ArchivePlan, study: PlannedStudy, k: int, size: int) -> np.ndarray:
    """Image ``k`` of a study as float32 in [0, 1] (MONOCHROME2 sense)."""
    patient = plan.patients[study.patient]
    img, _ = render_view(patient.anatomy, study.findings, study.views[k], size, np.random.default_rng(study.image_seeds[k]))
    return img


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8."""
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def gt_row(
    study: PlannedStudy, *, patient_id: str, study_id: str, image_id: str, view: str, path: str, split: str,
    accession: str = "",
) -> Dict[str, str]:
    """One ``ground_truth.csv`` row (``view`` is the true view: PA, AP or LATERAL)."""
    row = {"patient_id": patient_id, "study_id": study_id, "accession_number": accession, "image_id": image_id,
           "view": view, "path": path, "split": split}
    row.update(ground_truth_values(study.findings))
    return row


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]], *, gz: bool = False) -> None:
    """Write a CSV (optionally gzip-compressed, with a reproducible header)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    data = buf.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        raw = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
            fh.write(data)
        data = raw.getvalue()
    path.write_bytes(data)


def write_ground_truth(out_dir: Path, rows: List[Dict[str, str]]) -> Path:
    """Write ``ground_truth.csv`` (one row per image) and return its path."""
    cols = ID_COLUMNS + ground_truth_columns()
    path = out_dir / "ground_truth.csv"
    write_csv(path, cols, ([r.get(c, "") for c in cols] for r in rows))
    return path


def _save_jpeg(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(img)).save(path, format="JPEG", quality=95)


def _save_png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(img)).save(path, format="PNG", compress_level=3)


def _spread(n: int, studies: int) -> Dict[int, int]:
    """How many of ``n`` broken extras go to each study (round robin over the first studies)."""
    out: Dict[int, int] = {}
    for j in range(n):
        out[j % studies] = out.get(j % studies, 0) + 1
    return out


# ----------------------------------------------------------------------------- MIMIC
_MIMIC_VIEW = {"PA": ("PA", "postero-anterior"), "AP": ("AP", "antero-posterior"), "LATERAL": ("LATERAL", "lateral")}


def _unique_ids(rng: np.random.Generator, n: int, lo: int, hi: int) -> List[int]:
    out: List[int] = []
    seen = set()
    while len(out) < n:
        for v in rng.integers(lo, hi, size=max(8, n - len(out))):
            if int(v) not in seen:
                seen.add(int(v))
                out.append(int(v))
                if len(out) == n:
                    break
    return out


def write_mimic(plan: ArchivePlan, out: Path, size: int, broken: int) -> LayoutResult:
    """MIMIC-CXR-JPG 2.0.0 tree with MIMIC-CXR report files and the three metadata tables."""
    res = LayoutResult()
    rng = stream(plan.seed, _LAYOUT_STREAM, 1)
    subject_ids = _unique_ids(rng, len(plan.patients), 10_000_000, 20_000_000)
    study_ids = _unique_ids(rng, len(plan.studies), 50_000_000, 60_000_000)
    year_shift = int(rng.integers(90, 190))  # MIMIC shifts dates into the 22nd century
    meta_rows: List[List[object]] = []
    split_rows: List[List[object]] = []
    chex_rows: List[List[object]] = []
    extra = _spread(broken, len(plan.studies))
    for st in plan.studies:
        patient = plan.patients[st.patient]
        subj, sid = subject_ids[st.patient], study_ids[st.index]
        pdir = out / "files" / f"p{str(subj)[:2]}" / f"p{subj}"
        prior = "___" if patient.studies[0] != st.index else None
        report = st.report(plan, deid="___", prior=prior)
        (pdir).mkdir(parents=True, exist_ok=True)
        (pdir / f"s{sid}.txt").write_text(format_sections(report, banner=True, indent=" "), encoding="utf-8")
        res.reports += 1
        chex = chexpert_vector(st.findings, report.mentions)
        chex_rows.append([subj, sid] + [chex[c] for c in CHEXPERT_LABELS])
        d = st.date
        date = f"{d.year + year_shift:04d}{d.month:02d}{d.day:02d}"
        for k, view in enumerate(st.views):
            dicom_id = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))
            img = render(plan, st, k, size)
            rel = f"files/p{str(subj)[:2]}/p{subj}/s{sid}/{dicom_id}.jpg"
            _save_jpeg(out / rel, img)
            res.images += 1
            vp, vmeaning = _MIMIC_VIEW[view]
            if view == "LATERAL" and rng.random() < 0.3:
                vp, vmeaning = "LL", "left lateral"
            secs = (st.seconds + 60 * k) % 86400 + float(rng.integers(0, 1000)) / 1000.0
            time = f"{int(secs // 3600):02d}{int(secs % 3600 // 60):02d}{secs % 60:06.3f}"
            proc = "CHEST (PORTABLE AP)" if st.portable else "CHEST (PA AND LAT)"
            meta_rows.append([dicom_id, subj, sid, proc, vp, img.shape[0], img.shape[1], date, time, proc, vmeaning,
                              "Recumbent" if st.portable else "Erect"])
            split_rows.append([dicom_id, sid, subj, patient.split])
            res.rows.append(gt_row(st, patient_id=str(subj), study_id=str(sid), image_id=dicom_id, view=view, path=rel,
                                   split=patient.split))
        for _ in range(extra.get(st.index, 0)):
            # A corrupt JPEG (truncated or empty) listed in the metadata like any other image.
            dicom_id = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2**32, size=5))
            rel = f"files/p{str(subj)[:2]}/p{subj}/s{sid}/{dicom_id}.jpg"
            buf = io.BytesIO()
            Image.fromarray(to_uint8(render(plan, st, 0, 64))).save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            (out / rel).write_bytes(data[: len(data) // 3] if (len(res.broken_files) % 2 == 0) else b"")
            meta_rows.append([dicom_id, subj, sid, "CHEST (PA AND LAT)", "PA", 64, 64, date, "120000.000",
                              "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            split_rows.append([dicom_id, sid, subj, patient.split])
            res.broken_files.append(rel)
    write_csv(out / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
               "PatientOrientationCodeSequence_CodeMeaning"], meta_rows, gz=True)
    write_csv(out / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows, gz=True)
    chex_rows.sort(key=lambda r: (r[0], r[1]))
    write_csv(out / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS], chex_rows, gz=True)
    return res


# ----------------------------------------------------------------------------- OpenI
def _mesh(sf: StudyFindings) -> List[str]:
    """OpenI-style MeSH "major" terms (term/qualifier/qualifier...)."""
    terms: List[str] = []
    for f in sf.findings:
        if f.name == "pleural_effusion":
            terms.append(f"Pleural Effusion/{f.side}/{f.size}")
        elif f.name == "pneumothorax":
            terms.append(f"Pneumothorax/{f.side}/{f.size}")
        elif f.name == "cardiomegaly":
            terms.append(f"Cardiomegaly/{f.size}")
        elif f.name == "consolidation":
            zone = {"upper": "upper lobe", "middle": "middle lobe" if f.side == "right" else "lingula",
                    "lower": "lower lobe"}[f.zone or "lower"]
            terms.append(f"Consolidation/lung/{zone}/{f.side}" + ("/patchy" if f.pattern == "patchy" else ""))
        elif f.name == "lung_lesion":
            terms.append(f"{'Nodule' if f.size == 'nodule' else 'Mass'}/lung/{f.zone}/{f.side}")
        elif f.name == "atelectasis":
            terms.append(f"Pulmonary Atelectasis/base/{f.side}")
        elif f.name == "edema":
            terms.append(f"Pulmonary Edema/{f.size}")
        elif f.name == "support_devices":
            names = {"ett": "Tube, Inserted", "ngt": "Tube, Inserted", "cvc": "Catheters, Indwelling",
                     "pacemaker": "Pacemaker, Artificial"}
            for d in f.devices:
                if names[d] not in terms:
                    terms.append(names[d])
    extras = {"sternotomy": "Sternotomy", "scoliosis": "Spine/scoliosis", "granuloma": "Calcified Granuloma",
              "rib_fracture": "Fractures, Bone/ribs/right/healed", "hyperinflation": "Lung/hyperdistention",
              "low_volumes": "Lung/hypoinflation"}
    terms += [extras[e] for e in sf.extras]
    return terms or ["normal"]


def _openi_xml(n: int, report_sections: Dict[str, Optional[str]], mesh: List[str], images: List[str], date: str) -> bytes:
    root = ET.Element("eCitation")
    ET.SubElement(root, "meta", type="rr")
    ET.SubElement(root, "uId", id=f"CXR{n}")
    ET.SubElement(root, "pmcId", id=str(n))
    ET.SubElement(root, "docSource").text = "CXR"
    ET.SubElement(root, "IUXRId", id=str(n))
    ET.SubElement(root, "licenseType").text = "open-access"
    ET.SubElement(root, "articleDate").text = date
    ET.SubElement(root, "publisher").text = "Synthetic Hospital (cxr-search synth)"
    ET.SubElement(root, "title").text = "Synthetic Chest X-ray Collection"
    med = ET.SubElement(root, "MedlineCitation", Owner="cxr-search", Status="synthetic")
    art = ET.SubElement(med, "Article", PubModel="Electronic")
    ET.SubElement(art, "ArticleTitle").text = "Synthetic Chest X-ray Collection"
    abstract = ET.SubElement(art, "Abstract")
    for label in ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"):
        el = ET.SubElement(abstract, "AbstractText", Label=label)
        text = report_sections.get(label)
        if text:
            el.text = text
    mesh_el = ET.SubElement(root, "MeSH")
    for t in mesh:
        ET.SubElement(mesh_el, "major").text = t
    for t in mesh:
        ET.SubElement(mesh_el, "automatic").text = t.split("/")[0]
    for i, image_id in enumerate(images):
        pi = ET.SubElement(root, "parentImage", id=image_id)
        ET.SubElement(pi, "figureId").text = f"F{i + 1}"
        ET.SubElement(pi, "caption").text = "Xray Chest PA and Lateral"
        panel = ET.SubElement(pi, "panel", type="single")
        ET.SubElement(panel, "url").text = f"/hadoop/storage/radiology/extract/{image_id}.jpg"
        ET.SubElement(panel, "imgModality").text = "7"
    ET.indent(root, space="   ")
    return b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


def write_openi(plan: ArchivePlan, out: Path, size: int, broken: int) -> LayoutResult:
    """OpenI (Indiana University) layout: ``ecgen-radiology/<n>.xml`` and ``NLMCXR_png/<id>.png``."""
    res = LayoutResult()
    rng = stream(plan.seed, _LAYOUT_STREAM, 2)
    xml_dir = out / "ecgen-radiology"
    png_dir = out / "NLMCXR_png"
    xml_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    n_bad_xml = (broken + 1) // 2
    extra_png = _spread(broken - n_bad_xml, len(plan.studies))
    for st in plan.studies:
        n = st.index + 1
        patient = plan.patients[st.patient]
        report = st.report(plan, deid="XXXX", prior="XXXX" if patient.studies[0] != st.index else None)
        series = int(rng.integers(1, 10000))
        no_images = len(plan.studies) >= 20 and rng.random() < 0.02
        ids: List[str] = []
        if not no_images:
            for k, view in enumerate(st.views):
                number = (1001 if k == 0 else 2001) + (2000 if rng.random() < 0.5 else 0)
                image_id = f"CXR{n}_1_IM-{series:04d}-{number}"
                _save_png(png_dir / f"{image_id}.png", render(plan, st, k, size))
                ids.append(image_id)
                res.images += 1
                res.rows.append(gt_row(st, patient_id=f"CXR{n}", study_id=str(n), image_id=image_id, view=view,
                                       path=f"NLMCXR_png/{image_id}.png", split=patient.split))
        for j in range(extra_png.get(st.index, 0)):
            # A truncated PNG listed as one more image of an otherwise good report.
            image_id = f"CXR{n}_1_IM-{series:04d}-{9001 + j}"
            (png_dir / f"{image_id}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
            ids.append(image_id)
            res.broken_files.append(f"NLMCXR_png/{image_id}.png")
        findings = report.findings
        impression = report.impression
        if report.merged:
            findings = None
        sections = {"COMPARISON": report.comparison, "INDICATION": report.indication, "FINDINGS": findings,
                    "IMPRESSION": impression}
        date = f"{2013 + st.day // 400:04d}-08-01"
        data = _openi_xml(n, sections, _mesh(st.findings), ids, date)
        res.reports += 1
        (xml_dir / f"{n}.xml").write_bytes(data)
    for j in range(n_bad_xml):
        # A truncated XML report with a number past the real ones (parsers must report it, not crash).
        n = len(plan.studies) + j + 1
        data = _openi_xml(n, {"IMPRESSION": "No acute cardiopulmonary process."}, ["normal"], [], "2013-08-01")
        (xml_dir / f"{n}.xml").write_bytes(data[: len(data) // 2])
        res.broken_files.append(f"ecgen-radiology/{n}.xml")
    return res


__all__ = ["ID_COLUMNS", "LayoutResult", "gt_row", "render", "to_uint8", "write_csv", "write_ground_truth",
           "write_mimic", "write_openi"]
