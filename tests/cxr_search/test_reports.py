"""Report text handling: section splitting and the reference text choice (files: ``test_report_files.py``)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from cxr_search.reports import ReportSections, choose_report_text, normalize_whitespace, split_sections
from tests.helpers.report_texts import MIMIC_FULL

# --------------------------------------------------------------------------------------------------
# normalize_whitespace
# --------------------------------------------------------------------------------------------------


def test_normalize_whitespace_collapses_runs_and_keeps_tokens() -> None:
    assert normalize_whitespace("  a\t\tb\n\n c \r\n") == "a b c"
    assert normalize_whitespace("XXXX  ___\nXXXX") == "XXXX ___ XXXX"
    assert normalize_whitespace("\n \t ") == ""


# --------------------------------------------------------------------------------------------------
# split_sections: table of header variants
# --------------------------------------------------------------------------------------------------


# (id, text, findings, impression, {header: body} that must be in sections, headers that must NOT be)
SPLIT_CASES: List[Tuple[str, str, Optional[str], Optional[str], Dict[str, str], Sequence[str]]] = [
    (
        "mimic_full_next_line_text",
        MIMIC_FULL,
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities "
        "that most likely represent nipple shadows.",
        "No acute cardiopulmonary process.",
        {
            "EXAMINATION": "CHEST (PA AND LAT)",
            "INDICATION": "___F with new onset ascites // eval for infection",
            "TECHNIQUE": "Chest PA and lateral",
            "COMPARISON": "None.",
        },
        ["FINAL REPORT", "PREAMBLE"],
    ),
    (
        "same_line_text",
        "FINDINGS: Lungs are clear.\nIMPRESSION: Normal chest.",
        "Lungs are clear.",
        "Normal chest.",
        {},
        [],
    ),
    (
        "no_headers_whole_text_is_findings",
        "PA and lateral views of the chest at 10:30.\n\nThe lungs are clear. Heart size is normal.",
        "PA and lateral views of the chest at 10:30. The lungs are clear. Heart size is normal.",
        None,
        {},
        ["PREAMBLE"],
    ),
    (
        "no_headers_banner_dropped",
        "                                 FINAL REPORT\n  Heart size normal.  Lungs clear.\n",
        "Heart size normal. Lungs clear.",
        None,
        {},
        [],
    ),
    (
        "impression_only",
        "FINAL REPORT\n IMPRESSION:  Stable appearance of the chest compared to ___.",
        None,
        "Stable appearance of the chest compared to ___.",
        {"IMPRESSION": "Stable appearance of the chest compared to ___."},
        ["FINDINGS"],
    ),
    (
        "findings_and_impression_fills_both",
        "INDICATION: cough\n\nFINDINGS AND IMPRESSION:\nNo pneumonia. Small left effusion.",
        "No pneumonia. Small left effusion.",
        "No pneumonia. Small left effusion.",
        {"FINDINGS AND IMPRESSION": "No pneumonia. Small left effusion.", "INDICATION": "cough"},
        ["FINDINGS", "IMPRESSION"],
    ),
    (
        "findings_slash_impression",
        "FINDINGS/IMPRESSION: Endotracheal tube 4 cm above the carina.",
        "Endotracheal tube 4 cm above the carina.",
        "Endotracheal tube 4 cm above the carina.",
        {"FINDINGS AND IMPRESSION": "Endotracheal tube 4 cm above the carina."},
        [],
    ),
    (
        "impression_and_findings_spaced_slash",
        "IMPRESSION AND FINDINGS:  Unchanged.\n",
        "Unchanged.",
        "Unchanged.",
        {"FINDINGS AND IMPRESSION": "Unchanged."},
        [],
    ),
    (
        "conclusion_is_impression_when_no_impression",
        "FINDINGS: Mild cardiomegaly.\nCONCLUSION: Cardiomegaly without edema.",
        "Mild cardiomegaly.",
        "Cardiomegaly without edema.",
        {"CONCLUSION": "Cardiomegaly without edema."},
        [],
    ),
    (
        "impression_wins_over_conclusion",
        "IMPRESSION: Pneumonia.\nCONCLUSION: Follow-up advised.",
        None,
        "Pneumonia.",
        {"CONCLUSION": "Follow-up advised.", "IMPRESSION": "Pneumonia."},
        [],
    ),
    (
        "summary_is_impression_fallback",
        "FINDINGS: Clear lungs.\nSUMMARY: Normal study.",
        "Clear lungs.",
        "Normal study.",
        {"SUMMARY": "Normal study."},
        [],
    ),
    (
        "mixed_case_headers",
        "Findings:\nThe lungs are clear.\nImpression: No acute process.",
        "The lungs are clear.",
        "No acute process.",
        {},
        [],
    ),
    (
        "extra_spaces_in_and_around_headers",
        "   FINDINGS :   Lungs   clear.\n  FINDINGS  AND  IMPRESSION:  x\n",
        "Lungs clear.",
        "x",
        {"FINDINGS": "Lungs clear.", "FINDINGS AND IMPRESSION": "x"},
        [],
    ),
    (
        "deid_tokens_preserved",
        "FINDINGS: There are no XXXX of a pleural effusion. ___ seen by Dr. ___ at ___.\n"
        "IMPRESSION: Normal chest x-XXXX.",
        "There are no XXXX of a pleural effusion. ___ seen by Dr. ___ at ___.",
        "Normal chest x-XXXX.",
        {},
        [],
    ),
    (
        "banner_followed_by_header_on_same_line",
        "FINAL REPORT EXAMINATION: CHEST PORTABLE\nFINDINGS: Line tip in the SVC.",
        "Line tip in the SVC.",
        None,
        {"EXAMINATION": "CHEST PORTABLE"},
        ["PREAMBLE", "FINAL REPORT EXAMINATION"],
    ),
    (
        "empty_findings_section_is_none",
        "FINDINGS:\n\nIMPRESSION: No change.",
        None,
        "No change.",
        {"FINDINGS": "", "IMPRESSION": "No change."},
        [],
    ),
    (
        "collapsed_newlines_inline_upper_headers",
        "COMPARISON: None. FINDINGS: The heart is normal in size. IMPRESSION: No acute disease.",
        "The heart is normal in size.",
        "No acute disease.",
        {"COMPARISON": "None."},
        [],
    ),
    (
        "prose_colons_are_not_headers",
        "FINDINGS:\nHeart size: normal. Lines: none. Seen at 10:30.\nImpression: nothing acute, findings: stable.",
        "Heart size: normal. Lines: none. Seen at 10:30.",
        "nothing acute, findings: stable.",
        {},
        ["HEART SIZE", "LINES"],
    ),
    (
        "preamble_is_not_findings",
        "PA AND LATERAL CHEST ___\n\nCOMPARISON: ___\nIMPRESSION: No pneumonia.",
        None,
        "No pneumonia.",
        {"PREAMBLE": "PA AND LATERAL CHEST ___", "COMPARISON": "___"},
        [],
    ),
    (
        "repeated_header_is_joined",
        "IMPRESSION: Small effusion.\nADDENDUM: Reviewed.\nIMPRESSION: Effusion unchanged.",
        None,
        "Small effusion. Effusion unchanged.",
        {"ADDENDUM": "Reviewed."},
        [],
    ),
    (
        "crlf_line_endings_and_plural_alias",
        "FINDING:\r\nClear.\r\nIMPRESSIONS:\r\nNormal.\r\n",
        "Clear.",
        "Normal.",
        {"FINDINGS": "Clear.", "IMPRESSION": "Normal."},
        ["FINDING", "IMPRESSIONS"],
    ),
    (
        "generic_upper_header_at_line_start",
        "CLINICAL HISTORY: fever\nCHEST, TWO VIEWS: clear lungs",
        None,
        None,
        {"CLINICAL HISTORY": "fever", "CHEST, TWO VIEWS": "clear lungs"},
        [],
    ),
]


@pytest.mark.parametrize(
    "text,findings,impression,present,absent", [c[1:] for c in SPLIT_CASES], ids=[c[0] for c in SPLIT_CASES]
)
def test_split_sections_table(
    text: str,
    findings: Optional[str],
    impression: Optional[str],
    present: Dict[str, str],
    absent: Sequence[str],
) -> None:
    sec = split_sections(text)
    assert isinstance(sec, ReportSections)
    assert sec.findings == findings
    assert sec.impression == impression
    for key, body in present.items():
        assert sec.sections.get(key) == body, key
    for key in absent:
        assert key not in sec.sections
    # Outputs are whitespace-normalised; the whole report stays available.
    for value in [sec.findings, sec.impression, *sec.sections.values()]:
        if value is not None:
            assert value == normalize_whitespace(value)
    assert sec.text == normalize_whitespace(text)


def test_split_sections_keeps_section_order() -> None:
    sec = split_sections(MIMIC_FULL)
    assert list(sec.sections) == ["EXAMINATION", "INDICATION", "TECHNIQUE", "COMPARISON", "FINDINGS", "IMPRESSION"]


def test_split_sections_empty_text() -> None:
    sec = split_sections("  \n ")
    assert sec.findings is None and sec.impression is None and sec.sections == {}
    assert sec.text == ""


def test_report_sections_text_rebuilt_without_full_text() -> None:
    sec = ReportSections(findings="a", impression="b", sections={"FINDINGS": "a", "IMPRESSION": "b"})
    assert sec.text == "FINDINGS: a IMPRESSION: b"
    assert ReportSections(findings="only").text == "only"


# --------------------------------------------------------------------------------------------------
# choose_report_text
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "findings,impression,expected",
    [
        # Lexicographic max would pick "z short"; the protocol compares lengths.
        ("a long finding text", "z short", "a long finding text"),
        ("short", "a much longer impression text", "a much longer impression text"),
        ("same", "size", "same"),  # tie -> findings
        (None, "impression", "impression"),
        ("findings", None, "findings"),
        ("", "impression", "impression"),
        ("   ", "x", "x"),
        (None, None, None),
        ("", "  ", None),
    ],
)
def test_choose_report_text_longest(
    findings: Optional[str], impression: Optional[str], expected: Optional[str]
) -> None:
    assert choose_report_text(findings, impression) == expected
    assert choose_report_text(findings, impression, rule="longest") == expected


def test_choose_report_text_longest_matches_obvious_definition() -> None:
    pairs = [("ab", "abc"), ("abcd", "abc"), ("zz", "aaa"), ("aaa", "zz"), ("xyz", "abc")]
    for f, i in pairs:
        obvious = f if len(f) >= len(i) else i
        assert choose_report_text(f, i) == obvious


def test_choose_report_text_other_rules() -> None:
    assert choose_report_text("f text", "imp", rule="findings") == "f text"
    assert choose_report_text(None, "imp", rule="findings") is None
    assert choose_report_text("f text", "imp", rule="impression") == "imp"
    assert choose_report_text("f text", "", rule="impression") is None
    assert choose_report_text("f text", "imp", rule="both") == "f text imp"
    assert choose_report_text(None, "imp", rule="both") == "imp"
    assert choose_report_text("", None, rule="both") is None


def test_choose_report_text_unknown_rule_names_valid_rules() -> None:
    with pytest.raises(ValueError) as info:
        choose_report_text("a", "b", rule="max")
    for name in ("longest", "findings", "impression", "both"):
        assert name in str(info.value)
