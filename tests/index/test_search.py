"""Queries against a built index: exactness, filters, exclusion, refusals, HTML and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

import cli
from cxr_search.errors import ConfigError, SearchIndexError
from cxr_search.inference import Embedder
from cxr_search.model import create_model
from index.build import BuildOptions, build
from index.filters import parse_filters
from index.search import Searcher
from index.store import EMBEDDED, Image, Study
from tests.helpers.index_data import DB_PARAMS, db_url_for, ground_truth

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# Every store backend with the exact index, and SQLite with a compressed IVF index (whose candidates
# the searcher re-scores from the store), so the ANN path answers the same exactness tests.
_VARIANTS = [(db, None) for db in DB_PARAMS] + [("sqlite", "IVF2,SQ4")]


@pytest.fixture(scope="module", params=_VARIANTS, ids=[f"{db}-{f or 'exact'}" for db, f in _VARIANTS])
def built(request, pacs_archive: Path, tiny_model, tmp_path_factory: pytest.TempPathFactory):
    """(index folder, store URL or None) per variant."""
    db, factory = request.param
    out = tmp_path_factory.mktemp("search") / "index"
    db_url = db_url_for(db)
    summary = build(pacs_archive, out, tiny_model, BuildOptions(reports_csv=pacs_archive / "reports.csv",
                                                                batch_size=8, db_url=db_url, factory=factory))
    if factory:
        assert summary["faiss"]["image"]["factory"] == factory
    return out, db_url


@pytest.fixture(scope="module")
def tiny_embedder(tiny_model) -> Embedder:
    return Embedder(tiny_model)


@pytest.fixture()
def searcher(built, tiny_embedder):
    s = Searcher(built[0], tiny_embedder, db_url=built[1], text_precision="fp32")  # exactness tests
    yield s
    s.close()


def _image_table(searcher: Searcher):
    """id -> (view, sex, age, date, patient id), and the stored vectors."""
    idx = searcher.index
    with idx.store.session() as s:
        rows = s.execute(select(Image.id, Image.view, Study.sex, Study.age_years, Study.study_date, Study.patient_id)
                         .join(Study, Image.study_id == Study.id).where(Image.status == EMBEDDED)).all()
    ids, vecs = idx.store.load_vectors("image", None, int(idx.meta["embed_dim"]))
    return {r[0]: r[1:] for r in rows}, ids, vecs


def _brute(query: np.ndarray, ids: np.ndarray, vecs: np.ndarray, allowed, k: int):
    mask = np.isin(ids, list(allowed))
    scores = vecs[mask] @ query[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[mask][order], scores[order]


def test_text_search_equals_brute_force(searcher: Searcher, tiny_embedder) -> None:
    table, ids, vecs = _image_table(searcher)
    q = tiny_embedder.embed_texts(["large right pleural effusion"])
    hits = searcher.search_text("large right pleural effusion", k=5)
    want_ids, want_scores = _brute(q, ids, vecs, table.keys(), 5)
    assert [h.id for h in hits] == list(want_ids)
    np.testing.assert_allclose([h.score for h in hits], want_scores, atol=1e-5)
    assert all(h.path and Path(h.path).is_file() for h in hits)
    assert all(h.report_excerpt for h in hits)


@pytest.mark.parametrize("spec", [["view=PA"], ["sex=F"], ["age=40-70"], ["view=LATERAL", "sex=M"], ["since=2015-01-01"]])
def test_filters_return_k_matching_hits(spec, searcher: Searcher, tiny_embedder) -> None:
    table, ids, vecs = _image_table(searcher)
    f = parse_filters(spec)

    def ok(row) -> bool:
        view, sex, age, date, _ = row
        return ((f.views is None or view in f.views) and (f.sexes is None or sex in f.sexes)
                and (f.age_min is None or (age is not None and f.age_min <= age < f.age_max + 1))
                and (f.since is None or (date is not None and date >= f.since)))

    allowed = {i for i, row in table.items() if ok(row)}
    assert allowed, f"no image matches {spec}: make the fixture bigger"
    k = min(4, len(allowed))
    q = tiny_embedder.embed_texts(["no acute cardiopulmonary process"])
    hits = searcher.search_text("no acute cardiopulmonary process", k=k, filters=f)
    assert len(hits) == k
    assert {h.id for h in hits} <= allowed
    want, _ = _brute(q, ids, vecs, allowed, k)
    assert [h.id for h in hits] == list(want)


def test_study_level_hits_are_studies(searcher: Searcher) -> None:
    hits = searcher.search_text("cardiomegaly", k=3, level="study", filters=parse_filters(["view=PA"]))
    assert len(hits) == 3 and all(h.kind == "study" for h in hits)
    assert all(any(im["view"] == "PA" for im in h.images) for h in hits)
    assert len({h.study_uid for h in hits}) == 3


def test_image_query_excludes_same_patient(searcher: Searcher, pacs_archive: Path) -> None:
    gt = ground_truth(pacs_archive)
    row = gt[0]
    path = pacs_archive / row["path"]
    same_patient_studies = {r["study_id"] for r in gt if r["patient_id"] == row["patient_id"]}
    for returns in ("images", "studies", "reports"):
        hits = searcher.search_image(path, k=5, returns=returns)
        assert hits and not {h.study_uid for h in hits} & same_patient_studies
    own = searcher.search_image(path, k=1, returns="images", include_same_patient=True)
    assert own[0].sop_uid == row["image_id"] and own[0].score > 0.999
    sections = searcher.search_image(path, k=3, returns="reports")
    assert all(h.kind == "section" and h.section_text for h in sections)


def test_bad_queries_are_refused(searcher: Searcher) -> None:
    with pytest.raises(ConfigError, match="empty query"):
        searcher.search_text("   ")
    with pytest.raises(ConfigError, match="unknown filter"):
        parse_filters(["colour=red"])
    with pytest.raises(ConfigError, match="age"):
        parse_filters(["age=old"])
    with pytest.raises(ConfigError, match="level"):
        searcher.search_text("effusion", level="series")


def test_model_mismatch_and_damaged_files_are_refused(built, tiny_model, tiny_embedder, tmp_path: Path) -> None:
    index_dir, db_url = built
    other = create_model("tiny", init_seed=7)
    other.provenance = {}
    with pytest.raises(SearchIndexError, match="index built with model"):
        Searcher(index_dir, Embedder(other), db_url=db_url)
    resized = create_model("tiny", preprocess={"resize": 72, "crop_size": 72})
    resized.load_state_dict(tiny_model.state_dict())
    resized.provenance = {}
    with pytest.raises(SearchIndexError):
        Searcher(index_dir, Embedder(resized), db_url=db_url)
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)  # the FAISS files are damaged below; the store is only read
    (copy / "sections.faiss").unlink()
    with pytest.raises(SearchIndexError, match="sections.faiss"):
        Searcher(copy, tiny_embedder, db_url=db_url)
    (copy / "sections.faiss").write_bytes(b"garbage")
    with pytest.raises(SearchIndexError, match="sections.faiss"):
        Searcher(copy, tiny_embedder, db_url=db_url)
    with pytest.raises(SearchIndexError, match="not an index folder"):
        Searcher(tmp_path / "nothing", tiny_embedder)


def test_cli_build_search_verify(pacs_archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "index"
    rc = cli.main(["index", "build", str(pacs_archive), "--model", "tiny", "--out", str(out),
                   "--reports", str(pacs_archive / "reports.csv"), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["totals"]) == {"images", "studies", "sections", "failed"}
    assert summary["totals"]["images"] > 0 and summary["added"] == summary["totals"]

    html = tmp_path / "hits.html"
    rc = cli.main(["search", "text", "large right pleural effusion", "--index", str(out), "--model", "tiny",
                   "-k", "3", "--filter", "view=PA", "--json", "--html", str(html)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and all(h["view"] == "PA" for h in result["hits"])
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") == 3

    query = pacs_archive / ground_truth(pacs_archive)[1]["path"]
    rc = cli.main(["search", "image", str(query), "--index", str(out), "--model", "tiny", "--return", "studies",
                   "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["hits"]

    assert cli.main(["index", "verify", str(out), "--model", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert cli.main(["index", "stats", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["images"] == summary["totals"]["images"]

    # user errors: one line, an exit code, no traceback
    assert cli.main(["search", "text", "x", "--index", str(out), "--model", "tiny", "--filter", "colour=red"]) == 2
    assert cli.main(["search", "text", "x", "--index", str(tmp_path / "missing"), "--model", "tiny"]) == 7
    err = capsys.readouterr().err
    assert "unknown filter" in err and "not an index folder" in err and "Traceback" not in err
    (out / "images.faiss").unlink()
    assert cli.main(["index", "verify", str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False
