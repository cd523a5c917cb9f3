"""OpenI views: from the release's DICOM headers (``-O dicom=``) or a header table (``-O views=``), and
the cxr-clip protocol's frontal query image that they make possible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cli
from cxr_search.datasets import prepare
from cxr_search.datasets.openi import image_keys
from cxr_search.errors import ConfigError, DatasetError
from cxr_search.evaluation.retrieval_protocol import select_queries, select_studies
from tests.helpers.dataset_files import write_csv
from tests.helpers.openi_files import OpenIImage, OpenIStudy, write_openi, write_views_csv

STUDIES = [
    # The first image by id is a lateral; the frontal one comes second.
    OpenIStudy("CXR1", "The heart is normal in size.", "Normal chest.",
               [OpenIImage("CXR1_1_IM-0001-3001", "LL"), OpenIImage("CXR1_1_IM-0001-4001", "PA")]),
    # AP first by id, PA second: PA wins.
    OpenIStudy("CXR2", "Clear lungs.", "z short",
               [OpenIImage("CXR2_IM-0652-1001", "AP"), OpenIImage("CXR2_IM-0652-2001", "PA")]),
    # Lateral only: no frontal image, left out by the cxr-clip protocol.
    OpenIStudy("CXR3", None, "No acute disease.", [OpenIImage("CXR3_IM-1384-2001", "LATERAL")]),
    # Blank ViewPosition: the header reader falls back to SeriesDescription; a second image has no DICOM file.
    OpenIStudy("CXR4", "Heart size normal.", None,
               [OpenIImage("CXR4_IM-2050-1001", "", series="CHEST AP PORTABLE"),
                OpenIImage("CXR4_IM-2050-2001", "PA", dicom=False)]),
    # Two PA images: the smaller id.
    OpenIStudy("CXR5", "Stable cardiomegaly.", "Cardiomegaly.",
               [OpenIImage("CXR5_IM-2117-1003002", "PA"), OpenIImage("CXR5_IM-2117-1001", "PA"),
                OpenIImage("CXR5_IM-2117-0001", "LATERAL")]),
]
EXPECTED_VIEWS = {"CXR1_1_IM-0001-3001": "LL", "CXR1_1_IM-0001-4001": "PA", "CXR2_IM-0652-1001": "AP",
                  "CXR2_IM-0652-2001": "PA", "CXR3_IM-1384-2001": "LATERAL", "CXR4_IM-2050-1001": "AP",
                  "CXR4_IM-2050-2001": "UNKNOWN", "CXR5_IM-2117-1003002": "PA", "CXR5_IM-2117-1001": "PA",
                  "CXR5_IM-2117-0001": "LATERAL"}
EXPECTED_QUERIES = ["CXR1_1_IM-0001-4001", "CXR2_IM-0652-2001", "CXR4_IM-2050-1001", "CXR5_IM-2117-1001"]


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    write_openi(tmp_path / "openi", STUDIES, dicom_dir=tmp_path / "dicom")
    return tmp_path


def queries_of(rows):
    studies, _ = select_studies(rows)
    return select_queries(studies)


def test_image_keys_match_png_and_dicom_names() -> None:
    png = image_keys("CXR1_1_IM-0001-4001")
    assert png[0] == "CXR1_1_IM-0001-4001"
    for other in ("1_IM-0001-4001.dcm", "/data/NLMCXR_dcm/1/1_IM-0001-4001.dcm", "1_IM-0001-4001.dcm.png"):
        assert image_keys(other)[-1] == png[-1] == "1/IM-0001-4001"
    assert image_keys("CXR2_IM-0652-1001")[-1] == image_keys("2_IM-0652-1001.dcm")[-1]
    assert image_keys("CXR2_IM-0652-1001")[-1] != image_keys("3_IM-0652-1001.dcm")[-1]  # another report
    assert image_keys("odd-name.png") == ["odd-name"]


def test_dicom_views_make_the_frontal_image_the_query(release: Path) -> None:
    result = prepare("openi", release / "openi", dicom=str(release / "dicom"))
    assert {r.image_id: r.view for r in result.rows} == EXPECTED_VIEWS
    cxr1 = [r.image_id for r in result.rows if r.study_id == "CXR1"]
    assert cxr1 == ["CXR1_1_IM-0001-4001", "CXR1_1_IM-0001-3001"]  # frontal first in the manifest too
    summary = result.summary
    assert summary["view_source"] == "dicom" and summary["view_records"] == 9
    assert summary["images_without_view_record"] == 1 and summary["studies_without_frontal"] == 1
    assert summary["views"] == {"AP": 2, "LATERAL": 2, "LL": 1, "PA": 4, "UNKNOWN": 1}
    assert any("no view record" in n for n in summary["notes"])
    studies, info, warnings = queries_of(result.rows)
    assert [s.rows[0].image_id for s in studies] == EXPECTED_QUERIES
    assert all(len(s.rows) == 1 for s in studies) and warnings == []
    assert info["view_information"] == {"openi": True}
    assert (info["studies_without_frontal"], info["studies_without_frontal_views_unknown"]) == (1, 0)
    assert info["queries_by_view"] == {"AP": 1, "PA": 3}
    assert select_queries(studies)[0] == studies  # selecting again changes nothing


@pytest.mark.parametrize("style", ["dicom", "png"])
def test_views_table_gives_the_same_views(release: Path, style: str) -> None:
    table = write_views_csv(release / f"views-{style}.csv", STUDIES, style=style)
    result = prepare("openi", release / "openi", views=str(table))
    expected = dict(EXPECTED_VIEWS)
    if style == "dicom":
        expected["CXR4_IM-2050-1001"] = "UNKNOWN"  # blank view_position and no series column in that table
    assert {r.image_id: r.view for r in result.rows} == expected
    assert result.summary["view_source"] == "views"
    studies, info, _ = queries_of(result.rows)
    queries = [s.rows[0].image_id for s in studies]
    assert queries == (EXPECTED_QUERIES if style == "png" else [q for q in EXPECTED_QUERIES if "CXR4" not in q])
    assert info["studies_without_frontal"] == (1 if style == "png" else 2)
    assert info["studies_without_frontal_views_unknown"] == (0 if style == "png" else 1)


def test_without_views_every_view_is_unknown_and_the_query_is_the_first_by_id(release: Path) -> None:
    result = prepare("openi", release / "openi")
    assert {r.view for r in result.rows} == {"UNKNOWN"} and result.summary["view_source"] == "none"
    assert any("-O dicom=DIR" in n for n in result.summary["notes"])
    studies, info, warnings = queries_of(result.rows)
    assert info["view_information"] == {"openi": False} and info["studies_without_frontal"] == 0
    assert studies[0].rows[0].image_id == "CXR1_1_IM-0001-3001"  # the lateral: nothing tells it apart
    assert len(studies) == 5 and len(warnings) == 1 and "no view information" in warnings[0]


def test_view_source_errors(release: Path) -> None:
    root = release / "openi"
    with pytest.raises(ConfigError, match="not both"):
        prepare("openi", root, dicom=str(release / "dicom"), views=str(release / "x.csv"))
    with pytest.raises(DatasetError, match="no readable .dcm"):
        prepare("openi", root, dicom=str(root / "ecgen-radiology"))
    with pytest.raises(DatasetError, match="not found"):
        prepare("openi", root, views=str(release / "missing.csv"))
    bad = write_csv(release / "bad.csv", ["uid", "projection"], [("1", "Frontal")])
    with pytest.raises(DatasetError, match=r"columns found: uid, projection.*ViewPosition"):
        prepare("openi", root, views=str(bad))
    other = write_csv(release / "other.csv", ["image_id", "ViewPosition"], [("CXR99_IM-0001-1001", "PA")])
    with pytest.raises(DatasetError, match="none of the 1 view records matches"):
        prepare("openi", root, views=str(other))


def test_data_prepare_cli_reads_dicom_views(release: Path, capsys: pytest.CaptureFixture) -> None:
    out = release / "openi.csv"
    code = cli.main(["data", "prepare", "openi", str(release / "openi"), "--out", str(out),
                     "-O", f"dicom={release / 'dicom'}", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["view_source"] == "dicom" and summary["studies_without_frontal"] == 1
    assert "LL" in out.read_text()


def test_data_prepare_table_shows_the_view_counts(release: Path, capsys: pytest.CaptureFixture) -> None:
    out = release / "openi.csv"
    assert cli.main(["data", "prepare", "openi", str(release / "openi"), "--out", str(out),
                     "-O", f"dicom={release / 'dicom'}", "--json"]) == 0
    views = json.loads(capsys.readouterr().out)["views"]
    assert cli.main(["data", "prepare", "openi", str(release / "openi"), "--out", str(out),
                     "-O", f"dicom={release / 'dicom'}"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if " views " in line)
    assert [cell.strip() for cell in row.strip("│ ").split("│")] == [
        "views", ", ".join(f"{view or 'unknown'} {n}" for view, n in views.items())]
