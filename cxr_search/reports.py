"""Radiology report text: section splitting, the reference text-choice rule, and report readers.

Readers cover the report formats of the public chest X-ray datasets: MIMIC-CXR free
text files, the Indiana University (OpenI) ``ecgen-radiology`` XML files, and DICOM Structured Reports
as found in hospital PACS exports. Report text is kept verbatim apart from whitespace: de-identification
tokens such as ``XXXX`` (OpenI) or ``___`` (MIMIC-CXR) stay, because the released CXR-CLIP models were
trained on text that contains them.

Section splitting rules (:func:`split_sections`):

* A header is a name followed by ``:``. At the start of a line (after optional spaces, or right after
  a ``FINAL REPORT`` banner) any upper-case name of up to six words counts (``EXAMINATION:``,
  ``CHEST, TWO VIEWS:``); a known section name counts in any case (``Findings:``). Inside a line only
  known section names written in upper case count (``... COMPARISON: None. FINDINGS: ...``), so reports
  whose newlines were collapsed by an earlier export still split, while prose like ``Heart size: normal``
  is never taken for a header.
* Header variants are normalised: upper case, single spaces, ``&`` -> ``AND``; ``FINDINGS/IMPRESSION``
  and ``IMPRESSION AND FINDINGS`` -> ``FINDINGS AND IMPRESSION``; a few plurals and singulars
  (``FINDING``, ``IMPRESSIONS``, ``CONCLUSIONS``, ``COMPARISONS``) -> the usual name.
* ``findings`` = FINDINGS, else FINDINGS AND IMPRESSION. ``impression`` = IMPRESSION, else FINDINGS AND
  IMPRESSION, else CONCLUSION, else SUMMARY.
* Text before the first header goes to ``sections["PREAMBLE"]`` and is never used as findings.
* A report with no header at all: the whole text (``FINAL REPORT`` banner removed) is the findings and
  the impression is None. Such reports are descriptive bodies far more often than one-line conclusions,
  and the reference protocol (the longer of findings and impression) picks that text either way, so
  filing it under findings loses nothing and keeps ``impression`` meaning "a labelled conclusion".
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from cxr_search.errors import ReportError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

_WS_RE = re.compile(r"\s+")


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (spaces, tabs, newlines) to one space and strip the ends.

    Args:
        text: Any text.

    Returns:
        The text on one line; nothing else is changed (``XXXX`` / ``___`` tokens stay).
    """
    return _WS_RE.sub(" ", text).strip()


def _none_if_empty(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    text = normalize_whitespace(text)
    return text or None


@dataclass
class ReportSections:
    """A report split into sections.

    Attributes:
        findings: The findings text, or None when the report has none.
        impression: The impression (or conclusion) text, or None.
        sections: Every section found, keyed by the normalised upper-case header, in report order;
            text before the first header is under ``"PREAMBLE"``.
        full_text: The whole report on one line when it was read as free text; None for sources
            that are sectioned by construction (XML, SR), whose :attr:`text` is rebuilt from sections.
    """

    findings: Optional[str] = None
    impression: Optional[str] = None
    sections: Dict[str, str] = field(default_factory=dict)
    full_text: Optional[str] = None

    @property
    def text(self) -> str:
        """The whole report as one string ("" when there is nothing)."""
        if self.full_text is not None:
            return self.full_text
        parts = [f"{name}: {body}" if name != "PREAMBLE" else body for name, body in self.sections.items() if body]
        if not parts:
            # Sections can be empty while findings/impression were set directly by a caller.
            parts = [p for p in (self.findings, self.impression) if p]
        return " ".join(parts)


# --------------------------------------------------------------------------------------------------
# Free-text section splitting
# --------------------------------------------------------------------------------------------------

# Known section names as regex fragments (spaces as [ \t]+ so "FINDINGS  AND IMPRESSION" matches).
_KNOWN_HEADERS = (
    r"FINDINGS?[ \t]*(?:/|&|[ \t]AND[ \t])[ \t]*IMPRESSIONS?",
    r"IMPRESSIONS?[ \t]*(?:/|&|[ \t]AND[ \t])[ \t]*FINDINGS?",
    r"FINDINGS?", r"IMPRESSIONS?", r"CONCLUSIONS?", r"SUMMARY", r"INDICATIONS?", r"COMPARISONS?", r"TECHNIQUE",
    r"EXAMINATION", r"EXAM", r"(?:CLINICAL[ \t]+)?HISTORY", r"CLINICAL[ \t]+(?:INFORMATION|INDICATION)",
    r"REASON[ \t]+FOR[ \t]+(?:EXAMINATION|EXAM|STUDY)", r"RECOMMENDATIONS?", r"NOTIFICATION", r"ADDENDUM",
)
_KNOWN = "|".join(f"(?:{h})" for h in _KNOWN_HEADERS)
# Generic upper-case header: up to six words of capitals and light punctuation, no digits (so "10:30"
# or "T12:" never match), at least three characters.
_GENERIC_UPPER = r"[A-Z][A-Z()/&,'\-]*(?:[ \t]+[A-Z()/&,'\-]+){0,5}"
_LINE_HEADER_RE = re.compile(
    rf"^[ \t]*(?P<h>(?i:{_KNOWN})(?=[ \t]*:)|{_GENERIC_UPPER})[ \t]*:", re.MULTILINE
)
_INLINE_HEADER_RE = re.compile(rf"(?<![^\s.;,!?)\]])(?P<h>{_KNOWN})[ \t]*:")
_BANNER_RE = re.compile(r"^[ \t]*FINAL[ \t]+REPORT\b[ \t]*:?", re.MULTILINE | re.IGNORECASE)

_COMBINED_RE = re.compile(r"^(?:FINDINGS?|IMPRESSIONS?) ?(?:/|AND) ?(?:FINDINGS?|IMPRESSIONS?)$")
_ALIASES = {
    "FINDING": "FINDINGS", "IMPRESSIONS": "IMPRESSION", "CONCLUSIONS": "CONCLUSION", "COMPARISONS": "COMPARISON",
    "INDICATIONS": "INDICATION", "RECOMMENDATION": "RECOMMENDATIONS",
}


def _canonical_header(raw: str) -> str:
    name = normalize_whitespace(raw).upper().replace("&", " AND ")
    name = normalize_whitespace(re.sub(r"\s*/\s*", "/", name))
    if _COMBINED_RE.match(name) and "FINDING" in name and "IMPRESSION" in name:
        return "FINDINGS AND IMPRESSION"
    return _ALIASES.get(name, name)


def _find_headers(text: str) -> List[Tuple[int, int, str]]:
    """(start, end, canonical name) of every header, in order, without overlaps."""
    found = []
    for m in _LINE_HEADER_RE.finditer(text):
        if len(m.group("h").strip()) >= 3:
            found.append((m.start(), m.end(), m.group("h")))
    for m in _INLINE_HEADER_RE.finditer(text):
        found.append((m.start("h"), m.end(), m.group("h")))
    found.sort(key=lambda t: (t[0], -t[1]))
    headers: List[Tuple[int, int, str]] = []
    last_end = -1
    for start, end, raw in found:
        if start >= last_end:
            headers.append((start, end, _canonical_header(raw)))
            last_end = end
    return headers


def _first_nonempty(sections: Dict[str, str], *names: str) -> Optional[str]:
    for name in names:
        value = sections.get(name)
        if value:
            return value
    return None


def split_sections(text: str) -> ReportSections:
    """Split a MIMIC-CXR-style free-text report into sections (rules in the module docstring).

    Args:
        text: The report as stored (newlines significant for header detection).

    Returns:
        The sections, whitespace-normalised; absent or empty findings / impression are None.
    """
    full_text = normalize_whitespace(text)
    body = _BANNER_RE.sub("\n", text.replace("\r\n", "\n").replace("\r", "\n"))
    headers = _find_headers(body)
    if not headers:
        return ReportSections(findings=_none_if_empty(body), impression=None, sections={}, full_text=full_text)

    sections: Dict[str, str] = {}
    preamble = normalize_whitespace(body[: headers[0][0]])
    if preamble:
        sections["PREAMBLE"] = preamble
    for i, (_, end, name) in enumerate(headers):
        stop = headers[i + 1][0] if i + 1 < len(headers) else len(body)
        content = normalize_whitespace(body[end:stop])
        # A repeated header (e.g. two IMPRESSION blocks around an addendum) extends its section.
        previous = sections.get(name)
        sections[name] = f"{previous} {content}".strip() if previous else content
    findings = _first_nonempty(sections, "FINDINGS", "FINDINGS AND IMPRESSION")
    impression = _first_nonempty(sections, "IMPRESSION", "FINDINGS AND IMPRESSION", "CONCLUSION", "SUMMARY")
    return ReportSections(findings=findings, impression=impression, sections=sections, full_text=full_text)


# --------------------------------------------------------------------------------------------------
# Which text represents a report
# --------------------------------------------------------------------------------------------------

REPORT_TEXT_RULES = ("longest", "findings", "impression", "both")


def choose_report_text(findings: Optional[str], impression: Optional[str], rule: str = "longest") -> Optional[str]:
    """Pick the text that stands for a report.

    ``"longest"`` is the rule the CXR-CLIP authors state for their retrieval numbers: the longer of
    findings and impression by number of characters. The reference's released preparation code writes
    a lexicographic ``max`` instead (which picks "z short" over "a long finding text"); the retrieval
    benchmark offers that literal rule as ``--text-rule reference-max``
    (:mod:`cxr_search.evaluation.retrieval_protocol`). A tie goes to findings.

    Args:
        findings: Findings text; None or blank means absent.
        impression: Impression text; None or blank means absent.
        rule: ``"longest"``, ``"findings"`` (findings only, None when absent), ``"impression"``
            (impression only) or ``"both"`` (findings + " " + impression, whichever exist).

    Returns:
        The chosen text, unchanged, or None when the rule finds nothing.

    Raises:
        ValueError: Unknown rule.
    """
    if rule not in REPORT_TEXT_RULES:
        raise ValueError(f"unknown report text rule {rule!r}; valid rules: {', '.join(REPORT_TEXT_RULES)}")
    f = findings if findings and findings.strip() else None
    i = impression if impression and impression.strip() else None
    if rule == "findings":
        return f
    if rule == "impression":
        return i
    if rule == "both":
        return " ".join(p for p in (f, i) if p) or None
    if f is None or i is None:
        return f if f is not None else i
    return f if len(f) >= len(i) else i


# --------------------------------------------------------------------------------------------------
# OpenI (Indiana University) XML
# --------------------------------------------------------------------------------------------------


@dataclass
class OpenIReport:
    """One Indiana University ``ecgen-radiology/<n>.xml`` report.

    Attributes:
        uid: The ``uId`` id (e.g. ``"CXR1"``); the file stem when the element is missing.
        findings, impression, comparison, indication: Section texts, whitespace-normalised; None when
            the ``AbstractText`` element is missing or empty.
        image_ids: ``parentImage`` ids in file order (image files are ``<id>.png``); may be empty.
        mesh_major: ``MeSH/major`` terms (e.g. ``"Cardiomegaly/mild"``, ``"normal"``).
        mesh_automatic: ``MeSH/automatic`` terms.
        path: The XML file.
    """

    uid: str
    findings: Optional[str]
    impression: Optional[str]
    comparison: Optional[str]
    indication: Optional[str]
    image_ids: List[str]
    mesh_major: List[str]
    mesh_automatic: List[str]
    path: str

    def to_sections(self) -> ReportSections:
        """The report as :class:`ReportSections` (sections in the usual reading order)."""
        named = (
            ("COMPARISON", self.comparison),
            ("INDICATION", self.indication),
            ("FINDINGS", self.findings),
            ("IMPRESSION", self.impression),
        )
        return ReportSections(
            findings=self.findings,
            impression=self.impression,
            sections={k: v for k, v in named if v is not None},
        )


class _DoctypeRefused(Exception):
    pass


class _NoDoctypeTreeBuilder(ET.TreeBuilder):
    # ENTITY declarations can only live inside a DOCTYPE, so refusing the DOCTYPE (reported by expat
    # before any entity is used) rules out entity-expansion attacks without defusedxml.
    def doctype(self, name: str, pubid: Optional[str], system: Optional[str]) -> None:
        raise _DoctypeRefused(name)


def _parse_xml_file(path: Path) -> ET.Element:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReportError(path, f"cannot read the report file ({exc.strerror or exc}); check the path") from exc
    parser = ET.XMLParser(target=_NoDoctypeTreeBuilder())
    try:
        parser.feed(data)
        return parser.close()
    except _DoctypeRefused as exc:
        raise ReportError(
            path, "XML report contains a DOCTYPE/ENTITY declaration, which is refused for safety; "
            "OpenI reports have none, so the file is not an original ecgen-radiology report"
        ) from exc
    except ET.ParseError as exc:
        raise ReportError(path, f"malformed XML ({exc}); re-extract the file from the OpenI archive") from exc


def read_openi_xml(path: PathLike) -> OpenIReport:
    """Read one OpenI ``ecgen-radiology`` XML report.

    Args:
        path: The ``.xml`` file.

    Returns:
        The parsed report; any section may be None, ``image_ids`` may be empty.

    Raises:
        ReportError: Unreadable file, malformed XML, a DOCTYPE declaration, or a root element other
            than ``eCitation``.
    """
    p = Path(path)
    root = _parse_xml_file(p)
    if root.tag != "eCitation":
        raise ReportError(p, f"root element is <{root.tag}>, expected <eCitation>: not an OpenI ecgen-radiology report")
    texts: Dict[str, Optional[str]] = {}
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").strip().upper()
        value = _none_if_empty("".join(el.itertext()))
        if label and texts.get(label) is None:
            texts[label] = value
    uid_el = root.find(".//uId")
    uid = (uid_el.get("id") if uid_el is not None else None) or p.stem
    image_ids = [el.get("id", "").strip() for el in root.iter("parentImage")]
    image_ids = [i for i in image_ids if i]
    mesh_major: List[str] = []
    mesh_automatic: List[str] = []
    for mesh in root.iter("MeSH"):
        mesh_major += [t for t in (_none_if_empty(e.text) for e in mesh.findall("major")) if t]
        mesh_automatic += [t for t in (_none_if_empty(e.text) for e in mesh.findall("automatic")) if t]
    return OpenIReport(
        uid=uid,
        findings=texts.get("FINDINGS"),
        impression=texts.get("IMPRESSION"),
        comparison=texts.get("COMPARISON"),
        indication=texts.get("INDICATION"),
        image_ids=image_ids,
        mesh_major=mesh_major,
        mesh_automatic=mesh_automatic,
        path=str(p),
    )


# --------------------------------------------------------------------------------------------------
# DICOM Structured Reports
# --------------------------------------------------------------------------------------------------

# Every SR storage class (Basic Text .11, Enhanced .22, Comprehensive .33, ...) shares this root.
_SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# DCM codes of CID 7001-style headings and their plain meanings.
_SR_FINDINGS_CODES = {"121070", "121071"}
_SR_IMPRESSION_CODES = {"121072", "121073"}
_SR_CONCLUSION_CODES = {"121076", "121077"}
_SR_NAME_TO_SECTION = {
    "FINDINGS": "FINDINGS", "FINDING": "FINDINGS", "IMPRESSION": "IMPRESSION", "IMPRESSIONS": "IMPRESSION",
    "CONCLUSION": "CONCLUSION", "CONCLUSIONS": "CONCLUSION",
}


def _sr_section_name(item: Any) -> Optional[str]:
    """Canonical section name of a content item's concept name, or its upper-cased meaning."""
    seq = getattr(item, "ConceptNameCodeSequence", None)
    if not seq:
        return None
    code = seq[0]
    value = str(getattr(code, "CodeValue", "") or "")
    scheme = str(getattr(code, "CodingSchemeDesignator", "") or "")
    if scheme == "DCM":
        if value in _SR_FINDINGS_CODES:
            return "FINDINGS"
        if value in _SR_IMPRESSION_CODES:
            return "IMPRESSION"
        if value in _SR_CONCLUSION_CODES:
            return "CONCLUSION"
    meaning = normalize_whitespace(str(getattr(code, "CodeMeaning", "") or "")).upper()
    if not meaning:
        return None
    return _SR_NAME_TO_SECTION.get(meaning, meaning)


def extract_sr_text(ds_or_path: Any) -> ReportSections:
    """Collect the TEXT content items of a DICOM Structured Report into sections.

    The content tree is walked depth first in document order. A TEXT item's section is its own concept
    name when that is a known heading (Finding(s), Impression(s), Conclusion(s)); otherwise the nearest
    enclosing CONTAINER with a known heading (reports often nest generic "Finding" texts inside a
    "Findings" container); otherwise its own concept name, else the nearest container's, else ``"TEXT"``.
    Several texts of one section are joined with spaces. ``impression`` = IMPRESSION, else CONCLUSION.

    Args:
        ds_or_path: A ``pydicom.Dataset`` or the path of a DICOM file.

    Returns:
        The sections (findings / impression None when absent).

    Raises:
        ReportError: The file is not DICOM, cannot be read, or is not a Structured Report.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(ds_or_path, pydicom.Dataset):
        ds = ds_or_path
        where: Optional[str] = str(getattr(ds, "filename", "") or "") or None
    else:
        where = str(ds_or_path)
        try:
            ds = pydicom.dcmread(where)
        except InvalidDicomError as exc:
            raise ReportError(where, "not a DICOM file, so not a Structured Report") from exc
        except OSError as exc:
            raise ReportError(where, f"cannot read the DICOM file ({exc}); check the path") from exc
    sop = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").upper()
    if not (sop.startswith(_SR_SOP_CLASS_PREFIX) or modality == "SR"):
        raise ReportError(
            where, f"not a DICOM Structured Report (Modality {modality or 'missing'}, SOP Class {sop or 'missing'}); "
            "give an SR object (Basic Text / Enhanced / Comprehensive SR)"
        )

    known = {"FINDINGS", "IMPRESSION", "CONCLUSION"}
    collected: Dict[str, List[str]] = {}
    # Explicit stack instead of recursion: nesting depth comes from the file, not from us.
    root_name = _sr_section_name(ds)
    stack: List[Tuple[Any, Optional[str], Optional[str]]] = [
        (item, root_name if root_name in known else None, root_name)
        for item in reversed(list(ds.get("ContentSequence", None) or []))
    ]
    while stack:
        item, known_ancestor, nearest_container = stack.pop()
        value_type = str(getattr(item, "ValueType", "") or "").upper()
        name = _sr_section_name(item)
        if value_type == "TEXT":
            text = _none_if_empty(str(getattr(item, "TextValue", "") or ""))
            if text:
                if name in known:
                    section = name
                else:
                    section = known_ancestor or name or nearest_container or "TEXT"
                collected.setdefault(section, []).append(text)
        children = getattr(item, "ContentSequence", None) or []
        if children:
            child_known = name if name in known else known_ancestor
            child_container = name if (value_type == "CONTAINER" and name) else nearest_container
            stack.extend((child, child_known, child_container) for child in reversed(list(children)))
    sections = {k: " ".join(v) for k, v in collected.items()}
    if not sections:
        logger.info("%s: Structured Report holds no TEXT content items", where or "<dataset>")
    return ReportSections(
        findings=sections.get("FINDINGS"),
        impression=_first_nonempty(sections, "IMPRESSION", "CONCLUSION"),
        sections=sections,
    )


# --------------------------------------------------------------------------------------------------
# Plain-text report files
# --------------------------------------------------------------------------------------------------


def read_report_text_file(path: PathLike) -> ReportSections:
    """Read a free-text report file (e.g. MIMIC-CXR ``files/p10/p10000032/s50414267.txt``) and split it.

    The file is decoded as UTF-8 (a BOM is dropped); bytes that are not UTF-8 fall back to Latin-1,
    which decodes anything, since older RIS exports are often Windows-1252/Latin-1.

    Args:
        path: The text file.

    Returns:
        :func:`split_sections` of its content.

    Raises:
        ReportError: The file is missing, a directory, or unreadable.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ReportError(p, f"cannot read the report file ({exc.strerror or exc}); check the path") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        logger.debug("%s: not UTF-8, decoding as Latin-1", p)
        text = data.decode("latin-1")
    if not text.strip():
        logger.warning("%s: report file is empty", p)
    return split_sections(text)


__all__ = [
    "OpenIReport", "REPORT_TEXT_RULES", "ReportSections", "choose_report_text", "extract_sr_text",
    "normalize_whitespace", "read_openi_xml", "read_report_text_file", "split_sections",
]
