"""Text rules, the cxr-clip query-image rule, retrieval plans and evaluated-id lists."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cxr_search.datasets.manifest import ManifestRow
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.evaluation.retrieval_protocol import (
    TEXT_RULES,
    check_protocol,
    check_text_rule,
    evaluated_ids,
    ids_sha256,
    plan_retrieval,
    read_ids,
    select_queries,
    select_studies,
    study_text,
    write_ids,
)


def row(study: str, image: str, view: str = "UNKNOWN", dataset: str = "openi", **kw) -> ManifestRow:
    kw.setdefault("findings", f"findings {study}")
    return ManifestRow(dataset=dataset, split="test", patient_id=study, study_id=study, image_id=image,
                       image_path=f"/x/{image}.png", view=view, **kw)


@pytest.mark.parametrize("findings, impression, longer, reference_max", [
    ("Clear lungs.", "z short", "Clear lungs.", "z short"),  # longer vs later in Python's order
    ("Zebra pattern.", "apple.", "Zebra pattern.", "apple."),  # upper case sorts before lower case
    ("No acute disease.", "", "No acute disease.", "No acute disease."),  # a missing section is ""
    ("", "Effusion.", "Effusion.", "Effusion."),
    ("equal", "EQUAL", "equal", "equal"),  # a length tie: findings; max: "e" > "E"
])
def test_longer_and_reference_max(findings: str, impression: str, longer: str, reference_max: str) -> None:
    assert study_text("openi", findings, impression, "", "longer") == longer
    assert study_text("mimic-cxr", findings, impression, "", "reference-max") == reference_max
    assert study_text("openi", findings, impression, "", "reference-max") == max(findings, impression)


def test_other_text_rules_and_fallbacks() -> None:
    assert study_text("openi", "", "", "", "reference-max") is None
    assert study_text("openi", " ", "", "", "reference-max") is None
    assert study_text("pacs", "", "", "SR text.", "longer") == "SR text."  # report text only (PACS SR)
    assert study_text("pacs", "", "", "SR text.", "findings") is None
    # CheXpert 5x200: its "Report Impression" under both reference rules.
    assert study_text("chexpert5x200", "zzz later", "Impression.", "", "reference-max") == "Impression."
    assert study_text("openi", "F.", "I.", "", "both") == "F. I."
    assert check_text_rule("auto") == check_text_rule("longest") == "longer" == TEXT_RULES[0]
    with pytest.raises(ConfigError, match="unknown text rule 'max'.*reference-max"):
        check_text_rule("max")
    with pytest.raises(ConfigError, match="unknown protocol 'paper'"):
        check_protocol("paper")
    with pytest.raises(ConfigError):
        select_studies([row("s1", "i1")], text_rule="nope")


def test_select_queries_pa_before_ap_then_id_and_counts() -> None:
    rows = [row("s1", "a", "LATERAL"), row("s1", "b", "AP"), row("s1", "c", "PA"), row("s1", "d", "PA"),
            row("s2", "a2", "AP"), row("s2", "b2", "AP"),
            row("s3", "a3", "LL"), row("s3", "b3", "UNKNOWN"),
            row("s4", "a4", "UNKNOWN"),
            # A second dataset without any view information: first by id, with a warning.
            row("t1", "z", dataset="chexpert5x200", impression="Edema."),
            row("t1", "y", dataset="chexpert5x200", impression="Edema.")]
    studies, skipped = select_studies(rows)
    assert skipped == {"studies_without_text": 0}
    kept, info, warnings = select_queries(studies)
    assert [(s.study_id, s.rows[0].image_id) for s in kept] == [("s1", "c"), ("s2", "a2"), ("t1", "y")]
    assert info["view_information"] == {"openi": True, "chexpert5x200": False}
    assert (info["studies_without_frontal"], info["studies_without_frontal_views_unknown"]) == (2, 1)
    assert info["queries_by_view"] == {"AP": 1, "PA": 1, "UNKNOWN": 1}
    assert "for chexpert5x200" in info["rule"]
    assert len(warnings) == 1 and warnings[0].startswith("chexpert5x200: the manifest has no view information")
    assert [r["image_id"] for r in evaluated_ids(studies, "cxr-clip")] == ["c", "a2", "y"]
    assert len(evaluated_ids(studies, "full")) == len(rows)


def test_plan_checks_options_and_says_what_was_left_out() -> None:
    rows = [row("s1", "a", "PA"), row("s2", "b", "LATERAL"), row("s3", "c", "LL", findings="")]
    with pytest.raises(DatasetError, match=r"found 1 \(1 studies without text, 1 studies without frontal\)"):
        plan_retrieval(rows, protocol="cxr-clip")
    plan = plan_retrieval(rows, protocol="full", text_rule="longest")
    assert plan.text_rule == "longer" and len(plan.studies) == 2 and plan.query_images is None
    with pytest.raises(ConfigError):
        plan_retrieval(rows, protocol="foo")


def test_id_list_hash_is_the_written_file_hash(tmp_path: Path) -> None:
    studies, _ = select_studies([row("s1", "a", "PA"), row("s2", "b", "AP"), row("s2", "c", "LATERAL")])
    ids = evaluated_ids(studies, "cxr-clip")
    write_ids(tmp_path / "ids.csv", ids)
    assert ids_sha256(ids) == hashlib.sha256((tmp_path / "ids.csv").read_bytes()).hexdigest()
    assert read_ids(tmp_path / "ids.csv") == {("openi", "s1", "a"), ("openi", "s2", "b")}
    assert ids_sha256(ids) != ids_sha256(evaluated_ids(studies, "full"))
