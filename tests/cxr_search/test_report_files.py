"""Report files: OpenI XML (with DOCTYPE/ENTITY refused), DICOM Structured Reports, plain-text reports."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_search.errors import CxrSearchError, ReportError
from cxr_search.reports import (
    OpenIReport,
    choose_report_text,
    extract_sr_text,
    read_openi_xml,
    read_report_text_file,
    split_sections,
)
from tests.helpers.report_texts import MIMIC_FULL

# --------------------------------------------------------------------------------------------------
# OpenI XML
# --------------------------------------------------------------------------------------------------

OPENI_REAL_LIKE = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR1"/>
   <pmcId id="1"/>
   <docSource>CXR</docSource>
   <IUXRId id="1"/>
   <licenseType>open-access</licenseType>
   <articleDate>2013-08-01</articleDate>
   <articleType>XR</articleType>
   <publisher>Indiana University</publisher>
   <title>Indiana University Chest X-ray Collection</title>
   <specialty>pulmonary diseases</specialty>
   <subset>CXR</subset>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Journal>
            <JournalIssue>
               <PubDate><Year>2013</Year><Month>08</Month><Day>01</Day></PubDate>
            </JournalIssue>
         </Journal>
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            <AbstractText Label="FINDINGS">The cardiac silhouette and mediastinum size are within normal
            limits. There is no pulmonary edema. There is no focal consolidation. There are no XXXX of a
            pleural effusion. There is no evidence of pneumothorax.</AbstractText>
            <AbstractText Label="IMPRESSION">Normal chest x-XXXX.</AbstractText>
         </Abstract>
         <Affiliation>Indiana University School of Medicine</Affiliation>
         <Language>eng</Language>
         <PublicationTypeList><PublicationType>Radiology Report</PublicationType></PublicationTypeList>
      </Article>
      <EIDs><IUXRId id="1"/></EIDs>
   </MedlineCitation>
   <MeSH>
      <major>normal</major>
      <automatic>lung</automatic>
      <automatic>pleural effusion</automatic>
   </MeSH>
   <parentImage id="CXR1_1_IM-0001-3001">
      <figureId>F1</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/CXR1_1_IM-0001-3001.jpg</url>
         <imgModality>7</imgModality>
      </panel>
   </parentImage>
   <parentImage id="CXR1_1_IM-0001-4001">
      <figureId>F2</figureId>
      <caption>Xray Chest PA and Lateral</caption>
      <panel type="single">
         <url>/hadoop/storage/radiology/extract/CXR1_1_IM-0001-4001.jpg</url>
         <imgModality>7</imgModality>
      </panel>
   </parentImage>
</eCitation>
"""


def _openi_xml(
    uid: Optional[str],
    abstract: Sequence[Tuple[str, Optional[str]]],
    images: Sequence[str],
    major: Sequence[str] = (),
    automatic: Sequence[str] = (),
) -> str:
    """An ecgen-radiology file; a None section text writes a self-closed element like the release."""
    parts = ['<?xml version="1.0" encoding="utf-8"?>', "<eCitation>", '   <meta type="rr"/>']
    if uid is not None:
        parts.append(f'   <uId id="{uid}"/>')
    parts += ["   <MedlineCitation>", "      <Article>", "         <Abstract>"]
    for label, text in abstract:
        if text is None:
            parts.append(f'            <AbstractText Label="{label}"/>')
        else:
            parts.append(f'            <AbstractText Label="{label}">{text}</AbstractText>')
    parts += ["         </Abstract>", "      </Article>", "   </MedlineCitation>", "   <MeSH>"]
    parts += [f"      <major>{m}</major>" for m in major]
    parts += [f"      <automatic>{a}</automatic>" for a in automatic]
    parts.append("   </MeSH>")
    for i, image_id in enumerate(images, 1):
        parts.append(f'   <parentImage id="{image_id}"><figureId>F{i}</figureId><caption>Xray</caption></parentImage>')
    parts.append("</eCitation>")
    return "\n".join(parts) + "\n"


def _write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_openi_real_like_report(tmp_path: Path) -> None:
    path = _write(tmp_path, "1.xml", OPENI_REAL_LIKE)
    rep = read_openi_xml(path)
    assert isinstance(rep, OpenIReport)
    assert rep.uid == "CXR1"
    assert rep.comparison == "None."
    assert rep.indication == "Positive TB test"
    assert rep.findings == (
        "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema. "
        "There is no focal consolidation. There are no XXXX of a pleural effusion. There is no evidence of "
        "pneumothorax."
    )
    assert rep.impression == "Normal chest x-XXXX."
    assert rep.image_ids == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    assert rep.mesh_major == ["normal"]
    assert rep.mesh_automatic == ["lung", "pleural effusion"]
    assert rep.path == str(path)
    # The reference retrieval text is the longer section.
    assert choose_report_text(rep.findings, rep.impression) == rep.findings
    sec = rep.to_sections()
    assert list(sec.sections) == ["COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION"]
    assert sec.findings == rep.findings and sec.impression == rep.impression
    assert sec.text.startswith("COMPARISON: None. INDICATION: Positive TB test FINDINGS: The cardiac")


def test_openi_missing_findings_and_mesh_lists(tmp_path: Path) -> None:
    xml = _openi_xml(
        "CXR7",
        [("COMPARISON", "Chest XXXX dated XXXX."), ("INDICATION", "Shortness of breath."),
         ("IMPRESSION", "Mild cardiomegaly with pulmonary vascular congestion.")],
        ["CXR7_IM-2263-1001", "CXR7_IM-2263-2001"],
        major=["Cardiomegaly/mild", "Pulmonary Congestion/mild"],
        automatic=["heart"],
    )
    rep = read_openi_xml(_write(tmp_path, "7.xml", xml))
    assert rep.findings is None
    assert rep.impression == "Mild cardiomegaly with pulmonary vascular congestion."
    assert rep.comparison == "Chest XXXX dated XXXX."
    assert rep.mesh_major == ["Cardiomegaly/mild", "Pulmonary Congestion/mild"]
    assert rep.mesh_automatic == ["heart"]
    assert choose_report_text(rep.findings, rep.impression) == rep.impression


@pytest.mark.parametrize("empty", [None, "", "   \n  "])
def test_openi_empty_impression_is_none(tmp_path: Path, empty: Optional[str]) -> None:
    xml = _openi_xml(
        "CXR12",
        [("COMPARISON", None), ("INDICATION", None), ("FINDINGS", "Lungs are clear."), ("IMPRESSION", empty)],
        ["CXR12_IM-0110-1001"],
    )
    rep = read_openi_xml(_write(tmp_path, "12.xml", xml))
    assert rep.impression is None and rep.comparison is None and rep.indication is None
    assert rep.findings == "Lungs are clear."
    assert list(rep.to_sections().sections) == ["FINDINGS"]


def test_openi_no_parent_image_no_uid(tmp_path: Path) -> None:
    xml = _openi_xml(None, [("FINDINGS", "Heart size normal."), ("IMPRESSION", "No acute disease.")], [])
    rep = read_openi_xml(_write(tmp_path, "3955.xml", xml))
    assert rep.image_ids == []
    assert rep.uid == "3955"  # falls back to the file stem
    assert rep.mesh_major == [] and rep.mesh_automatic == []


def test_openi_xxxx_tokens_and_whitespace(tmp_path: Path) -> None:
    xml = _openi_xml("CXR2", [("FINDINGS", "XXXX   XXXX\n  opacity in the left XXXX.")], ["CXR2_IM-0652-1001"])
    rep = read_openi_xml(_write(tmp_path, "2.xml", xml))
    assert rep.findings == "XXXX XXXX opacity in the left XXXX."
    assert rep.impression is None


def test_openi_refuses_doctype_and_entities(tmp_path: Path) -> None:
    bomb = (
        '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>\n'
        '<eCitation><MedlineCitation><Article><Abstract><AbstractText Label="FINDINGS">&lol2;</AbstractText>'
        "</Abstract></Article></MedlineCitation></eCitation>"
    )
    path = _write(tmp_path, "bomb.xml", bomb)
    with pytest.raises(ReportError) as info:
        read_openi_xml(path)
    assert str(path) in str(info.value) and "DOCTYPE" in str(info.value)
    plain_doctype = '<?xml version="1.0"?><!DOCTYPE eCitation SYSTEM "x.dtd"><eCitation/>'
    with pytest.raises(ReportError):
        read_openi_xml(_write(tmp_path, "dt.xml", plain_doctype))


@pytest.mark.parametrize(
    "content",
    [
        OPENI_REAL_LIKE[: len(OPENI_REAL_LIKE) // 2],  # truncated download
        "<eCitation><AbstractText Label='FINDINGS'>a < b</AbstractText></eCitation>",
        "",
        "not xml at all",
    ],
)
def test_openi_malformed_names_file(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path, "bad.xml", content)
    with pytest.raises(ReportError) as info:
        read_openi_xml(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, CxrSearchError)


def test_openi_wrong_root_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="eCitation"):
        read_openi_xml(_write(tmp_path, "other.xml", "<PubmedArticleSet/>"))
    with pytest.raises(ReportError, match="missing.xml"):
        read_openi_xml(tmp_path / "missing.xml")


# --------------------------------------------------------------------------------------------------
# DICOM Structured Report
# --------------------------------------------------------------------------------------------------

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def _code(meaning: str, value: str = "99X", scheme: str = "99LOCAL") -> DicomSequence:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return DicomSequence([item])


def _text(meaning: Optional[str], text: str, code: Tuple[str, str] = ("99X", "99LOCAL")) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    if meaning is not None:
        item.ConceptNameCodeSequence = _code(meaning, *code)
    item.TextValue = text
    return item


def _container(meaning: str, children: Sequence[Dataset], code: Tuple[str, str] = ("99X", "99LOCAL")) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "CONTAINER"
    item.ContinuityOfContent = "SEPARATE"
    item.ConceptNameCodeSequence = _code(meaning, *code)
    item.ContentSequence = DicomSequence(list(children))
    return item


def _sr(children: Sequence[Dataset], sop_class: str = BASIC_TEXT_SR) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "ANON1"
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.ConceptNameCodeSequence = _code("Chest X-Ray Report", "18748-4", "LN")
    ds.ContentSequence = DicomSequence(list(children))
    return ds


def test_sr_flat_text_items() -> None:
    ds = _sr([
        _text("History", "Cough for 3 weeks."),
        _text("Findings", "Right lower lobe opacity.", ("121070", "DCM")),
        _text("Impression", "Right lower lobe pneumonia.", ("121073", "DCM")),
    ])
    sec = extract_sr_text(ds)
    assert sec.findings == "Right lower lobe opacity."
    assert sec.impression == "Right lower lobe pneumonia."
    assert sec.sections["HISTORY"] == "Cough for 3 weeks."
    assert sec.text == (
        "HISTORY: Cough for 3 weeks. FINDINGS: Right lower lobe opacity. IMPRESSION: Right lower lobe pneumonia."
    )


def test_sr_nested_containers_and_conclusions() -> None:
    ds = _sr(
        [
            _container("Findings", [
                _text("Finding", "Heart size normal."),
                _container("Lungs", [_text("Finding", "Lungs   clear\nbilaterally.")]),
                _text(None, "No effusion."),
            ]),
            _container("Conclusions", [_text("Conclusion", "Normal chest radiograph.")]),
            _container("Recommendations", [_text("Recommendation", "None.")]),
        ],
        sop_class=COMPREHENSIVE_SR,
    )
    sec = extract_sr_text(ds)
    # Texts are joined in document order, nested containers included.
    assert sec.findings == "Heart size normal. Lungs clear bilaterally. No effusion."
    assert sec.impression == "Normal chest radiograph."
    assert sec.sections["CONCLUSION"] == "Normal chest radiograph."
    assert sec.sections["RECOMMENDATION"] == "None."


def test_sr_impression_preferred_over_conclusion_and_plural_meaning() -> None:
    ds = _sr([_text("Conclusions", "c."), _text("Impressions", "i."), _text("Findings", "f.")])
    sec = extract_sr_text(ds)
    assert sec.impression == "i." and sec.findings == "f." and sec.sections["CONCLUSION"] == "c."


def test_sr_without_text_items() -> None:
    ds = _sr([])
    sec = extract_sr_text(ds)
    assert sec.findings is None and sec.impression is None and sec.sections == {}


def test_sr_from_path(tmp_path: Path) -> None:
    ds = _sr([_text("Findings", "Small left pleural effusion."), _text("Impression", "Effusion.")])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    sec = extract_sr_text(path)
    assert sec.findings == "Small left pleural effusion."
    assert sec.impression == "Effusion."
    assert extract_sr_text(str(path)).sections == sec.sections


def test_sr_rejects_images_and_non_dicom(tmp_path: Path) -> None:
    ct = get_testdata_file("CT_small.dcm")
    with pytest.raises(ReportError) as info:
        extract_sr_text(ct)
    assert "Structured Report" in str(info.value) and "CT_small.dcm" in str(info.value)
    with pytest.raises(ReportError):
        extract_sr_text(pydicom.dcmread(ct))
    junk = _write(tmp_path, "report.txt", "FINDINGS: clear")
    with pytest.raises(ReportError, match="report.txt"):
        extract_sr_text(junk)
    with pytest.raises(ReportError):
        extract_sr_text(tmp_path / "missing.dcm")


# --------------------------------------------------------------------------------------------------
# Text report files
# --------------------------------------------------------------------------------------------------


def test_read_report_text_file_mimic_layout(tmp_path: Path) -> None:
    folder = tmp_path / "files" / "p10" / "p10000032"
    folder.mkdir(parents=True)
    path = folder / "s50414267.txt"
    path.write_text(MIMIC_FULL, encoding="utf-8")
    assert read_report_text_file(path) == split_sections(MIMIC_FULL)


def test_read_report_text_file_encodings(tmp_path: Path) -> None:
    latin = tmp_path / "latin.txt"
    latin.write_bytes("FINDINGS: Opacit\xe9 5\xb0.\nIMPRESSION: ok".encode("latin-1"))
    sec = read_report_text_file(latin)
    assert sec.findings == "Opacit\xe9 5\xb0." and sec.impression == "ok"
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfFINDINGS: caf\xc3\xa9")
    assert read_report_text_file(bom).findings == "caf\xe9"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    assert read_report_text_file(empty).findings is None


def test_read_report_text_file_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="nope.txt"):
        read_report_text_file(tmp_path / "nope.txt")
    with pytest.raises(ReportError):
        read_report_text_file(tmp_path)  # a directory
