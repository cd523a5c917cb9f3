"""``cxr-search search``: literal output, the index's own model, checks before loading, honest query warnings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import select, update

import cli
from cxr_search.checkpoints import save_model
from cxr_search.dicom.read import read_dicom
from cxr_search.errors import ConfigError
from cxr_search.images import resize_shorter_side
from cxr_search.model import create_model
from index.build import BuildOptions, build
from index.index_dir import IndexDir
from index.search import Searcher
from index.store import Image, Section
from tests.helpers.index_data import ground_truth

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Report text that rich markup would eat, crash on or colour.
MARKUP_REPORT = "Small effusion [/ADDENDUM] [impression] [red]effusion seen; [bold]no[/bold] pneumothorax."


def run(capsys: pytest.CaptureFixture, *argv: str) -> Tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def index_dir(pacs_archive: Path, tiny_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of the tiny preset whose every report section contains :data:`MARKUP_REPORT`."""
    out = tmp_path_factory.mktemp("search-cli") / "index"
    build(pacs_archive, out, tiny_model, BuildOptions(reports_csv=pacs_archive / "reports.csv", batch_size=8))
    idx = IndexDir.open(out)
    try:
        with idx.store.session() as s:
            s.execute(update(Section).values(text=Section.text + " " + MARKUP_REPORT))
            s.commit()
    finally:
        idx.close()
    return out


def _indexed_dicom(pacs_archive: Path) -> Path:
    return pacs_archive / ground_truth(pacs_archive)[0]["path"]


def test_report_and_query_text_are_printed_literally(index_dir: Path, pacs_archive: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    for layout in ([], ["--wide"]):
        code, out, err = run(capsys, "search", "text", "effusion [/b]", "-i", str(index_dir), "-k", "3", *layout)
        assert code == 0, err
        assert "effusion [/b]" in out
        flat = " ".join(out.replace("│", " ").split())
        for piece in ("[/ADDENDUM]", "[impression]", "[red]effusion", "[bold]no[/bold]"):
            assert piece in (flat if layout else out), (piece, out)
        assert "Traceback" not in err
    code, out, err = run(capsys, "search", "image", str(_indexed_dicom(pacs_archive)), "-i", str(index_dir),
                         "--return", "reports", "-k", "2")
    assert code == 0, err
    assert "[/ADDENDUM]" in out and "[red]effusion" in out


def test_cards_fit_80_columns_and_keep_identifiers_whole(index_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "search", "text", "pleural effusion", "-i", str(index_dir), "-k", "4",
                       "--json")
    assert code == 0
    hits = json.loads(out)["hits"]
    code, out, _ = run(capsys, "search", "text", "pleural effusion", "-i", str(index_dir), "-k", "4")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    joined = "".join(line.strip() for line in out.splitlines())
    for h in hits:  # UIDs and paths may wrap, never be cut
        assert h["study_uid"] in joined and h["path"] in joined


def test_search_uses_the_index_model_and_reports_it(index_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "search", "text", "right pleural effusion", "-i", str(index_dir), "-k", "3",
                         "--filter", "view=PA", "--filter", "view=AP", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["model"] == "tiny" and doc["k"] == 3 and doc["query_warnings"] == []
    assert doc["filters"] == {"views": ["PA", "AP"]}
    assert len(doc["hits"]) == 3 and {h["view"] for h in doc["hits"]} <= {"PA", "AP"}
    # The hidden old spelling --k still works; another model is refused by the fingerprint check.
    code, out, _ = run(capsys, "search", "text", "effusion", "-i", str(index_dir), "--k", "2", "--json")
    assert code == 0 and len(json.loads(out)["hits"]) == 2
    other = save_model(create_model("tiny", init_seed=7), tmp_path / "other")
    code, _, err = run(capsys, "search", "text", "effusion", "-i", str(index_dir), "-m", str(other))
    assert code == 7 and "index built with model" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, code, words", [
    (["text", "x", "--filter", "view=XYZ"], 2, "LAT means any of LATERAL, LL, RL"),
    (["text", "x", "--filter", "age=60-40"], 2, "inverted"),
    (["text", "x", "--filter", "age=-5"], 2, "not negative"),
    (["text", "x", "--since", "2021-01-01", "--until", "2020-01-01"], 2, "after until"),
    (["text", "x", "-k", "100000"], 2, "between 1 and 1000"),
    (["text", "x", "-k", "0"], 2, "between 1 and 1000"),
    (["text", "x", "--level", "foo"], 2, "image or study"),
    (["text", "x", "--device", "xyz"], 2, "not a device"),
    (["text", "x", "--query-precision", "int3"], 2, "--query-precision"),
    (["text", "   "], 2, "empty query"),
    (["image", "IMAGE", "--return", "foo"], 2, "reports, images or studies"),
    (["image", "IMAGE", "--device", "xyz"], 2, "not a device"),
    (["image", "DIR"], 5, "is a directory, give one image file"),
    (["image", "MISSING"], 5, "no such file"),
])
def test_bad_options_fail_before_any_model_is_loaded(argv: List[str], code: int, words: str, index_dir: Path,
                                                     pacs_archive: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    import cxr_search.checkpoints

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(cxr_search.checkpoints, "load_model", no_loading)
    names = {"IMAGE": str(_indexed_dicom(pacs_archive)), "DIR": str(tmp_path), "MISSING": str(tmp_path / "no.dcm")}
    argv = [names.get(a, a) for a in argv]
    got, out, err = run(capsys, "search", *argv, "-i", str(index_dir))
    assert got == code, err
    assert words.replace(", give", "; give") in err and "Traceback" not in err and "AssertionError" not in err
    assert out == ""


def test_unknown_words_and_truncation_are_told(index_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "search", "text", "\U0001F600\U0001F600 \U0001FAC1", "-i", str(index_dir), "--json")
    assert code == 0
    warnings = json.loads(out)["query_warnings"]
    assert [w["code"] for w in warnings] == ["unknown_words"] and "none of the query" in warnings[0]["message"]
    assert "warning:" in err and "vocabulary" in err
    long_query = " ".join(["large right pleural effusion with basal atelectasis"] * 200)  # 10,199 characters
    code, out, err = run(capsys, "search", "text", long_query, "-i", str(index_dir), "-k", "2")
    assert code == 0
    assert "truncated" not in out and "longer than the model reads" in " ".join(err.split())
    title = out.splitlines()[0]
    assert len(title) <= 160 and f"query shortened here: {len(long_query)} characters" in " ".join(out.split())
    code, out, _ = run(capsys, "search", "text", long_query, "-i", str(index_dir), "-k", "2", "--json")
    doc = json.loads(out)
    assert doc["query"] == long_query  # the JSON keeps the query whole
    (warning,) = doc["query_warnings"]
    assert warning["code"] == "truncated" and "word pieces dropped" in warning["message"]


def test_no_match_is_told(index_dir: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "search", "text", "effusion", "-i", str(index_dir), "--since", "2100-01-01")
    assert code == 0 and "no hits" in out
    assert "no indexed image matches the filters since=2100-01-01" in " ".join(err.split())


def test_image_query_that_is_in_the_index_says_so(index_dir: Path, pacs_archive: Path, tiny_model, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    from cxr_search.inference import Embedder

    own = _indexed_dicom(pacs_archive)
    code, out, err = run(capsys, "search", "image", str(own), "-i", str(index_dir), "--return", "images", "--json")
    assert code == 0
    (warning,) = json.loads(out)["query_warnings"]
    assert warning["code"] == "query_in_index" and "--include-same-patient" in warning["message"]
    copy = tmp_path / "renamed-copy"  # another name: still the same SOPInstanceUID
    shutil.copy(own, copy)
    code, out, _ = run(capsys, "search", "image", str(copy), "-i", str(index_dir), "--return", "images",
                       "--include-same-patient", "-k", "1", "--json")
    doc = json.loads(out)
    assert doc["query_warnings"][0]["code"] == "query_in_index"
    assert "among the hits" in doc["query_warnings"][0]["message"]
    searcher = Searcher(index_dir, Embedder(tiny_model))
    try:
        side = tiny_model.config.preprocess.dicom_shorter_side  # the file's pixels as the Embedder reads them
        pixels = resize_shorter_side(PILImage.fromarray(read_dicom(own, reduce_to=side).pixels, mode="L"), side,
                                     PILImage.Resampling.BILINEAR)
        result = searcher.query_image(pixels, k=1, returns="images", include_same_patient=True)  # no file, no UIDs
        assert [w.code for w in result.warnings] == ["query_in_index"]
        assert "same content" in result.warnings[0].message
        noise = (np.random.default_rng(0).random((80, 70)) * 255).astype(np.uint8)
        assert searcher.query_image(noise, k=1).warnings == []
        with searcher.index.store.session() as s:
            sop = s.scalar(select(Image.sop_uid).where(Image.id == result.hits[0].id))
        assert sop in result.warnings[0].message
    finally:
        searcher.close()


def test_query_vector_equals_the_image_query_it_stands_for(index_dir: Path, pacs_archive: Path, tiny_model) -> None:
    from cxr_search.inference import Embedder

    searcher = Searcher(index_dir, Embedder(tiny_model))
    try:
        own = _indexed_dicom(pacs_archive)
        by_image = searcher.query_image(own, k=4, returns="studies", include_same_patient=True)
        by_vector = searcher.query_vector(searcher.embed_query_image(own), "study", k=4)
        assert [h.id for h in by_vector.hits] == [h.id for h in by_image.hits]
        with pytest.raises(ConfigError, match="unknown kind"):
            searcher.query_vector(searcher.embed_query_image(own), "series")
    finally:
        searcher.close()
