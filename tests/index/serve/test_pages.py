"""The server-rendered page: search, filters in the URL, study page, uploads, escaping, no inline script."""

from __future__ import annotations

import re
import urllib.parse

import pytest

from tests.helpers.index_data import ground_truth

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _no_inline_code(html: str) -> None:
    """Everything the CSP forbids: inline scripts, event-handler attributes, style attributes."""
    assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html)
    assert not re.search(r"<[^>]*\son[a-z]+\s*=[^>]*>", html)
    assert not re.search(r"<[^>]*\sstyle\s*=[^>]*>", html)


def test_empty_page_has_the_search_form(client) -> None:
    r = client.get("/")
    assert r.status_code == 200 and 'id="q"' in r.text and 'id="image-file"' in r.text
    assert '<script src="/static/app.js"' in r.text and 'href="/static/style.css"' in r.text
    _no_inline_code(r.text)
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/style.css").status_code == 200


def test_text_results_with_filters_in_the_url(client, engine) -> None:
    r = client.get("/?" + urllib.parse.urlencode([("q", "pleural effusion"), ("view", "PA"), ("sex", "F")]))
    assert r.status_code == 200
    cards = re.findall(r'<article class="card"', r.text)
    thumbs = re.findall(r'<img src="(/api/images/(\d+)/thumbnail)"', r.text)
    assert cards and len(thumbs) == len(cards)
    assert 'value="PA" checked' in r.text and 'value="F" checked' in r.text and 'value="pleural effusion"' in r.text
    gen = engine.current()
    from index.store import Image, Study

    with gen.searcher.index.store.session() as s:
        for _, image_id in thumbs:
            im = s.get(Image, int(image_id))
            assert im.view == "PA" and s.get(Study, im.study_id).sex == "F"
    assert client.get(thumbs[0][0]).status_code == 200
    _no_inline_code(r.text)


def test_report_markup_is_escaped_everywhere(client, serve_archive) -> None:
    _, uid = serve_archive
    study = client.get(f"/studies/{uid}")
    assert study.status_code == 200
    assert "<script>alert" not in study.text and "<b>bold</b>" not in study.text
    assert "&lt;script&gt;alert(&#34;xss&#34;)&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt; &amp;" in study.text
    results = client.get("/?q=cardiomegaly&level=study")  # 20 study hits: every study of the index
    assert uid in results.text and "&lt;script&gt;" in results.text and "<script>alert" not in results.text
    _no_inline_code(study.text)
    _no_inline_code(results.text)


def test_study_page_links(client, engine, serve_archive) -> None:
    _, uid = serve_archive
    r = client.get(f"/studies/{uid}")
    ids = re.findall(r'href="/\?like=(\d+)&amp;return=images"', r.text)
    assert ids and 'id="similar-reports"' in r.text
    like = client.get(f"/?like={ids[0]}&return=images")
    assert like.status_code == 200 and "more like image" in like.text
    assert uid not in re.findall(r'href="/studies/([^"]+)"', like.text)  # its own study is excluded
    reports = client.get(f"/?like={ids[0]}&return=reports")
    assert reports.status_code == 200 and 'data-kind="section"' in reports.text
    assert client.get("/studies/1.2.3.nothing").status_code == 404
    assert client.get("/?like=999999").status_code == 404


def test_paging_links_carry_the_generation(client, engine) -> None:
    r = client.get("/?q=effusion")  # 20 image hits: a next page
    nxt = re.search(r'href="([^"]+)" id="next"', r.text)
    assert nxt, "expected a next page"
    url = nxt.group(1).replace("&amp;", "&")
    assert f"generation={engine.current().id}" in url and "offset=20" in url
    assert client.get(url).status_code == 200


def test_bad_input_shows_an_error_on_the_page(client) -> None:
    r = client.get("/?q=x&age_min=70&age_max=20")
    assert r.status_code == 422 and 'class="error"' in r.text and "inverted" in r.text
    r = client.get("/?q=x&view=SIDEWAYS")
    assert r.status_code == 422 and "unknown view" in r.text


def test_image_upload_from_the_page(client, serve_archive) -> None:
    archive, _ = serve_archive
    row = ground_truth(archive)[0]
    data = (archive / row["path"]).read_bytes()
    r = client.post("/search/image", files={"file": ("q.dcm", data)}, data={"return": "studies", "view_PA": "1"})
    assert r.status_code == 200 and "uploaded DICOM image" in r.text
    assert row["study_id"] not in r.text  # the query's own study is excluded
    assert 'value="PA" checked' in r.text
    bad = client.post("/search/image", files={"file": ("q.txt", b"hello")}, data={"return": "images"})
    assert bad.status_code == 415 and 'class="error"' in bad.text
