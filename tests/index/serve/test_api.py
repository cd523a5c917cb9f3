"""The JSON API over a tiny index: every endpoint, filters, paging, "more like this", records, headers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from cxr_search.dicom.read import read_dicom
from index.filters import parse_filters
from index.serve.config import MAX_DEPTH, MAX_K
from index.store import Image, Study
from tests.helpers.index_data import ground_truth
from tests.helpers.serve import XSS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _text(client, query: str = "large right pleural effusion", **body):
    r = client.post("/api/search/text", json={"query": query, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_healthz_reports_the_loaded_generation(client, engine, serve_index: Path) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    body = r.json()
    meta = json.loads((serve_index / "index.json").read_text())
    gen = engine.current()
    assert body["status"] == "ok" and body["index_generation"] == gen.id and len(gen.id) == 12
    assert body["model_sha256"] == meta["model_sha256"]
    assert body["counts"] == gen.searcher.index.store.counts()
    assert body["counts"]["images"] == meta["indices"]["image"]["n"]


def test_text_search_equals_the_searcher_and_leaks_no_path(client, engine, serve_archive) -> None:
    body = _text(client, k=5)
    want = engine.current().searcher.search_text("large right pleural effusion", k=5)
    assert [h["image_id"] for h in body["hits"]] == [h.image_id for h in want]
    np.testing.assert_allclose([h["score"] for h in body["hits"]], [h.score for h in want], atol=1e-6)
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    hit = body["hits"][0]
    for key in ("rank", "score", "image_id", "study_uid", "series_uid", "sop_uid", "view", "modality", "study_date",
                "age", "sex", "patient_key", "report_excerpt", "thumbnail_url", "study_url"):
        assert key in hit
    assert hit["thumbnail_url"] == f"/api/images/{hit['image_id']}/thumbnail"
    assert hit["series_uid"] and hit["modality"] and len(hit["patient_key"]) == 16
    assert body["index_generation"] == engine.current().id and body["took_ms"] >= 0
    raw = json.dumps(body)
    assert "path" not in {k for h in body["hits"] for k in h} and str(serve_archive[0]) not in raw


@pytest.mark.parametrize("filters", [{"view": ["PA"]}, {"sex": ["F"]}, {"age": [30, 60]}, {"view": ["LAT"], "sex": ["M"]},
                                     {"since": "2016-01-01"}, {"modality": ["DX"]}])
def test_filters_keep_only_matching_hits(client, engine, filters) -> None:
    gen = engine.current()
    parsed = parse_filters([f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" if k != "age" else
                            f"age={v[0]}-{v[1]}" for k, v in filters.items()])
    allowed = set(gen.searcher._allowed_ids("image", parsed).tolist())
    assert allowed, f"nothing matches {filters}: make the fixture bigger"
    body = _text(client, k=min(4, len(allowed)), filters=filters)
    assert len(body["hits"]) == min(4, len(allowed))
    assert {h["image_id"] for h in body["hits"]} <= allowed
    with gen.searcher.index.store.session() as s:
        for h in body["hits"]:
            im = s.get(Image, h["image_id"])
            st = s.get(Study, im.study_id)
            if "sex" in filters:
                assert st.sex in filters["sex"] and h["sex"] == st.sex
            if "age" in filters:
                assert filters["age"][0] <= st.age_years < filters["age"][1] + 1
            if "view" in filters and filters["view"] == ["PA"]:
                assert h["view"] == "PA"
            if "since" in filters:
                assert h["study_date"] >= filters["since"]
            if "modality" in filters:
                assert h["modality"] == "DX"


def test_study_level_hits_are_distinct_studies(client) -> None:
    body = _text(client, "cardiomegaly", k=4, level="study")
    assert all(h["kind"] == "study" for h in body["hits"])
    assert len({h["study_uid"] for h in body["hits"]}) == 4
    assert all(h["images"] and all("path" not in im for im in h["images"]) for h in body["hits"])


def test_pages_are_consistent_and_bounded(client, engine) -> None:
    whole = _text(client, k=8)
    first = _text(client, k=4)
    second = _text(client, k=4, offset=4, generation=first["index_generation"])
    assert [h["image_id"] for h in first["hits"] + second["hits"]] == [h["image_id"] for h in whole["hits"]]
    assert [h["rank"] for h in second["hits"]] == [5, 6, 7, 8]
    r = client.post("/api/search/text", json={"query": "effusion", "k": 4, "offset": 4, "generation": "000000000000"})
    assert r.status_code == 409 and "offset 0" in r.json()["detail"]
    for body in ({"k": MAX_K + 1}, {"k": 0}, {"k": 10, "offset": MAX_DEPTH}, {"offset": -1}):
        r = client.post("/api/search/text", json={"query": "effusion", **body})
        assert r.status_code == 422, body
        assert "\n" not in r.json()["detail"]


@pytest.mark.parametrize("body,match", [({"query": ""}, "query"), ({"query": "   "}, "empty query"),
                                        ({"query": "x", "filters": {"colour": ["red"]}}, "colour"),
                                        ({"query": "x", "filters": {"sex": ["X"]}}, "sex"),
                                        ({"query": "x", "filters": {"view": ["SIDEWAYS"]}}, "view"),
                                        ({"query": "x", "filters": {"age": [70, 20]}}, "inverted"),
                                        ({"query": "x", "level": "series"}, "level")])
def test_bad_queries_get_one_line_422(client, body, match) -> None:
    r = client.post("/api/search/text", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert match in detail and "\n" not in detail and "Traceback" not in detail


def test_more_like_this_excludes_the_patient_unless_asked(client, engine) -> None:
    gen = engine.current()
    with gen.searcher.index.store.session() as s:
        rows = s.execute(Image.__table__.select().where(Image.status == "embedded")).all()
        study_patient = {st.id: st.patient_id for st in s.query(Study).all()}
    image_id = rows[0].id
    patient = study_patient[rows[0].study_id]
    for ret in ("images", "studies", "reports"):
        r = client.post("/api/search/image", json={"image_id": image_id, "return": ret, "k": 5})
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        assert hits
        with gen.searcher.index.store.session() as s:
            uids = {h["study_uid"] for h in hits}
            patients = {study_patient[st.id] for st in s.query(Study).filter(Study.study_uid.in_(uids))}
        assert patient not in patients, ret
        if ret == "reports":
            assert all(h["kind"] == "section" and h["section_text"] for h in hits)
    own = client.post("/api/search/image", json={"image_id": image_id, "k": 1, "include_same_patient": True}).json()
    assert own["hits"][0]["image_id"] == image_id and own["hits"][0]["score"] > 0.999
    assert client.post("/api/search/image", json={"image_id": 999999}).status_code == 404


def test_study_record_and_images(client, engine, serve_archive, tmp_path: Path) -> None:
    archive, xss_uid = serve_archive
    r = client.get(f"/api/studies/{xss_uid}")
    assert r.status_code == 200
    study = r.json()
    assert study["study_uid"] == xss_uid and study["images"] and study["report"]["sections"]
    assert any(XSS in sec["text"] for sec in study["report"]["sections"])  # JSON carries the text as it is
    assert study["viewer_url"] is None and study["index_generation"] == engine.current().id
    im = study["images"][0]
    thumb = client.get(im["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert "private" in thumb.headers["cache-control"]
    small = PILImage.open(io.BytesIO(thumb.content))
    big = PILImage.open(io.BytesIO(client.get(im["preview_url"]).content))
    assert max(small.size) <= 256 and max(big.size) > max(small.size)
    assert list((tmp_path / "state" / "thumbs").rglob("*.jpg"))  # cached under the state folder
    assert client.get("/api/studies/1.2.3.4.5.nothing").status_code == 404
    assert client.get("/api/images/999999/thumbnail").status_code == 404
    assert client.get("/api/images/0/thumbnail").status_code == 422
    assert client.get("/api/images/..%2Fetc%2Fpasswd/thumbnail").status_code in (404, 422)


def test_thumbnails_go_through_the_dicom_reader(client, engine, serve_archive) -> None:
    """A MONOCHROME1 image is shown inverted, as the reader displays it (bright bones), not as stored."""
    archive, _ = serve_archive
    gen = engine.current()
    with gen.searcher.index.store.session() as s:
        row = s.query(Image).filter(Image.photometric == "MONOCHROME1", Image.status == "embedded").first()
    assert row is not None, "the fixture archive has no MONOCHROME1 image"
    path = gen.searcher.index.secret.decrypt_path(row.path_enc)
    shown = np.asarray(PILImage.open(io.BytesIO(client.get(f"/api/images/{row.id}/preview").content)), dtype=float)
    display = read_dicom(path).pixels.astype(float)
    import pydicom

    stored = pydicom.dcmread(path).pixel_array.astype(float)
    ref = np.asarray(PILImage.fromarray(display.astype(np.uint8)).resize(shown.shape[::-1]), dtype=float)
    raw = np.asarray(PILImage.fromarray(stored).resize(shown.shape[::-1]), dtype=float)
    assert np.corrcoef(shown.ravel(), ref.ravel())[0, 1] > 0.95
    assert np.corrcoef(shown.ravel(), raw.ravel())[0, 1] < -0.5


def test_viewer_link_and_cors_only_when_configured(make_client, serve_archive) -> None:
    _, uid = serve_archive
    plain = make_client()
    r = plain.post("/api/search/text", json={"query": "effusion"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    configured = make_client(viewer_url="https://pacs.example/viewer?StudyInstanceUIDs={study_uid}",
                             cors_origins=("https://ris.example",))
    assert configured.get(f"/api/studies/{uid}").json()["viewer_url"] == \
        f"https://pacs.example/viewer?StudyInstanceUIDs={uid}"
    ok = configured.post("/api/search/text", json={"query": "effusion"}, headers={"Origin": "https://ris.example"})
    assert ok.headers["access-control-allow-origin"] == "https://ris.example"
    bad = configured.post("/api/search/text", json={"query": "effusion"}, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in bad.headers


def test_security_headers_openapi_and_metrics(client) -> None:
    r = client.post("/api/search/text", json={"query": "effusion"})
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    spec = client.get("/openapi.json").json()
    assert {"/api/search/text", "/api/search/image", "/api/studies/{study_uid}", "/api/images/{image_id}/thumbnail",
            "/api/images/{image_id}/preview", "/healthz"} <= set(spec["paths"])
    assert {"TextQuery", "ImageQuery", "SearchResponse", "StudyOut"} <= set(spec["components"]["schemas"])
    image_body = spec["paths"]["/api/search/image"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(image_body)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'cxr_search_requests_total{method="POST",route="/api/search/text",status="200"}' in metrics.text
    assert "cxr_search_request_seconds_bucket" in metrics.text and "cxr_search_index_size" in metrics.text


def test_ground_truth_is_available(serve_archive) -> None:
    assert ground_truth(serve_archive[0])
